"""Layer-by-layer calibration: captured inputs, the 4-Grams-per-layer scheme, the cache, sequential mode."""
import json

import pytest
import torch

import svdllm
from svdllm.calibration import StatsCache, calibrate_layers
from svdllm.models.families import GROUP_OF, INPUT_GROUPS, LINEAR_NAMES
from tiny import FAMILIES, tiny_model


def _windows(n=3, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_grams_of_shared_inputs_equal_per_linear_hooks(family):
    """4 Grams per layer (q/k/v and gate/up share one) equal the Grams hooked on each of the 7 linears,
    and the layer-by-layer inputs equal those of a normal full forward."""
    model = tiny_model(family)
    windows = _windows()
    reference = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for name in LINEAR_NAMES:
            def hook(mod, args, out, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                reference[key] = reference.get(key, 0) + x.T @ x
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(w[None], use_cache=False)
    for h in handles:
        h.remove()
    got = dict(calibrate_layers(model, windows, batch_size=2, progress=False))
    assert len(got) == len(model.model.layers)
    for i, stats in got.items():
        assert set(stats.grams) == set(INPUT_GROUPS)
        assert stats.tokens == windows.numel()
        for name in LINEAR_NAMES:
            torch.testing.assert_close(stats.grams[GROUP_OF[name]], reference[(i, name)], rtol=1e-5, atol=1e-6)


def test_sequential_mode_sees_compressed_layers(tok, data_dir, tmp_path):
    cfg = lambda mode: svdllm.CompressConfig(preset="paper",   # noqa: E731
        ratio=0.5, cache_dir=str(tmp_path / "cache"),
        calibration=svdllm.CalibrationConfig(nsamples=3, seqlen=32, data_dir=str(data_dir), mode=mode))
    a, b = tiny_model("llama"), tiny_model("llama")
    svdllm.compress(a, tok, cfg("original"), progress=False)
    svdllm.compress(b, tok, cfg("sequential"), progress=False)
    # layer 0 sees the same (embedding) inputs either way; layer 1 sees compressed outputs in sequential mode
    l0a, l0b = a.model.layers[0].self_attn.q_proj, b.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(l0a.u.weight @ l0a.v.weight, l0b.u.weight @ l0b.v.weight)
    l1a, l1b = a.model.layers[1].mlp.down_proj, b.model.layers[1].mlp.down_proj
    assert not torch.allclose(l1a.u.weight @ l1a.v.weight, l1b.u.weight @ l1b.v.weight)


def test_statistics_cache_skips_the_pass_and_gives_identical_factors(tok, data_dir, tmp_path, monkeypatch):
    cfg = svdllm.CompressConfig(preset="paper", ratio=0.4, cache_dir=str(tmp_path / "cache"),
                                calibration=svdllm.CalibrationConfig(nsamples=3, seqlen=32, data_dir=str(data_dir)))
    first = tiny_model("qwen3")
    r1 = svdllm.compress(first, tok, cfg, progress=False)[0]
    assert not r1.manifest["calibration"]["from_cache"]
    assert len(list((tmp_path / "cache" / "stats").glob("*/layer_*.safetensors"))) == 2

    from svdllm.calibration.walk import Walk

    def no_pass(self, *a, **k):
        if self.windows is not None:  # a walk on calibration windows: a forward pass
            raise AssertionError("the calibration pass ran although the statistics were cached")

    monkeypatch.setattr(Walk, "capture", no_pass)
    second = tiny_model("qwen3")
    r2 = svdllm.compress(second, tok, cfg, progress=False)[0]
    assert r2.manifest["calibration"]["from_cache"]
    for (n1, p1), (n2, p2) in zip(first.named_parameters(), second.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_cache_key_depends_on_data_and_model(tmp_path):
    base = {"model": "a", "tokens": "t", "dataset": "wikitext2", "nsamples": 4, "seqlen": 8, "seed": 0}
    dirs = {StatsCache(tmp_path, base).dir, StatsCache(tmp_path, dict(base, seed=1)).dir,
            StatsCache(tmp_path, dict(base, model="b")).dir, StatsCache(tmp_path, dict(base, tokens="u")).dir}
    assert len(dirs) == 4
    assert StatsCache(tmp_path, dict(base)).dir == StatsCache(tmp_path, base).dir


def test_fisher_rows_equal_autograd_gradients():
    from svdllm.calibration import fisher_rows

    model = tiny_model("qwen3")
    windows = _windows(n=2, seqlen=16)
    rows = fisher_rows(model, windows, progress=False)
    name = "model.layers.1.self_attn.k_proj"
    weight = model.get_submodule(name).weight
    expected = torch.zeros(weight.shape[0], dtype=torch.float64)
    for w in windows:
        loss = model(input_ids=w[None], labels=w[None]).loss
        (grad,) = torch.autograd.grad(loss, weight)
        expected += grad.double().pow(2).sum(1)
    torch.testing.assert_close(rows[name], expected, rtol=1e-5, atol=1e-12)
    assert len(rows) == 7 * len(model.model.layers)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_output_gradient_grams_equal_autograd():
    """GᵀG per linear, G = ∂L/∂y at the linear's output, from the pass's tensor hooks vs autograd directly."""
    from svdllm.calibration import gradient_stats

    model = tiny_model("mistral")  # GQA: k/v have fewer outputs than q
    windows = _windows(n=2, seqlen=16)
    stats = gradient_stats(model, windows, progress=False, output_grams=True)
    diagonal_only = gradient_stats(model, windows, progress=False)  # what fwsvd and the allocators gather
    assert diagonal_only.output_grams is None
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        module = model.get_submodule(name)
        expected = torch.zeros(module.out_features, module.out_features, dtype=torch.float64)
        for w in windows:
            seen = {}
            handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
            loss = model(input_ids=w[None], labels=w[None]).loss
            handle.remove()
            (g,) = torch.autograd.grad(loss, seen["y"])
            g = g.double().reshape(-1, module.out_features)
            expected += g.T @ g
        torch.testing.assert_close(stats.output_grams[name], expected, rtol=1e-5, atol=1e-14)
        torch.testing.assert_close(stats.outputs[name], expected.diagonal(), rtol=1e-5, atol=1e-14)
        torch.testing.assert_close(diagonal_only.outputs[name], expected.diagonal(), rtol=1e-5, atol=1e-14)


def test_interrupted_calibration_resumes_bit_identical(tok, data_dir, tmp_path, monkeypatch):
    """A job killed after layer 0's statistics were written continues from them and produces the same model."""
    import svdllm
    from svdllm.calibration import cache as cache_mod
    from svdllm.calibration import layerwise

    def config(cache):
        return svdllm.CompressConfig(preset="paper", ratio=0.4, cache_dir=str(cache), calibration=svdllm.CalibrationConfig(
            nsamples=3, seqlen=32, data_dir=str(data_dir)))

    reference = tiny_model("llama")
    svdllm.compress(reference, tok, config(tmp_path / "c1"), progress=False)

    real_save = cache_mod.StatsCache.save

    def dying_save(self, i, stats):
        real_save(self, i, stats)
        if i == 0:
            raise KeyboardInterrupt  # the job is killed right after layer 0 reached the disk

    monkeypatch.setattr(cache_mod.StatsCache, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        svdllm.compress(tiny_model("llama"), tok, config(tmp_path / "c2"), progress=False)
    monkeypatch.setattr(cache_mod.StatsCache, "save", real_save)

    grams_computed = []
    real_run = layerwise.layer_statistics

    def counting_run(step, *a, **kw):
        grams_computed.append(step.layer)
        return real_run(step, *a, **kw)

    monkeypatch.setattr(layerwise, "layer_statistics", counting_run)
    resumed = tiny_model("llama")
    svdllm.compress(resumed, tok, config(tmp_path / "c2"), progress=False)
    assert len(grams_computed) == len(resumed.model.layers) - 1  # layer 0 came from the interrupted run
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_interrupted_closed_form_pass_resumes_bit_identical(family, tok, data_dir, tmp_path, monkeypatch):
    """The closed-form pass killed after layer 0 was finished resumes after it (layer 0's factors read back, no
    moments recomputed for it) and gives the uninterrupted run's model; the resume state is removed at the end."""
    import svdllm
    from svdllm.update import closed_form
    from svdllm.update.closed_form import PartialFactors

    def config(cache):
        return svdllm.CompressConfig(preset="paper", ratio=0.4, update="closed-form-drift", cache_dir=str(cache),
                                     calibration=svdllm.CalibrationConfig(nsamples=3, seqlen=32,
                                                                          data_dir=str(data_dir)))

    reference = tiny_model(family)
    svdllm.compress(reference, tok, config(tmp_path / "c1"), progress=False)

    real_save = PartialFactors.save

    def dying_save(self, i, factors, info):
        real_save(self, i, factors, info)
        raise KeyboardInterrupt  # killed right after layer 0's factors reached the disk

    monkeypatch.setattr(PartialFactors, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        svdllm.compress(tiny_model(family), tok, config(tmp_path / "c2"), progress=False)
    monkeypatch.setattr(PartialFactors, "save", real_save)
    assert len(list((tmp_path / "c2").glob("stats/*/partial_*/layer_*.safetensors"))) == 1

    moments = []
    real_moments = closed_form._paired_moments
    monkeypatch.setattr(closed_form, "_paired_moments",
                        lambda *a, **k: moments.append(a[-1]) or real_moments(*a, **k))
    resumed = tiny_model(family)
    svdllm.compress(resumed, tok, config(tmp_path / "c2"), progress=False)
    assert set(moments) == {"model.layers.1"}  # layer 0 came from the interrupted run
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list((tmp_path / "c2").glob("stats/*/partial_*"))


def test_cache_key_covers_every_weight(tok, data_dir, tmp_path):
    """A change to one weight of a middle layer (a fine-tune, say) is a cache miss: the statistics are gathered
    again, not read from the entry of the model it came from."""
    from svdllm.calibration import model_fingerprint

    model = tiny_model("llama", num_hidden_layers=4)
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    cfg = svdllm.CompressConfig(preset="paper", ratio=0.4, cache_dir=str(tmp_path / "cache"),
                                calibration=svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir)))
    svdllm.compress(model, tok, cfg, out=tmp_path / "a", progress=False)
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(model) != before
    svdllm.compress(model, tok, cfg, out=tmp_path / "b", progress=False)
    entries = list((tmp_path / "cache" / "stats").iterdir())
    assert len(entries) == 2  # a second entry: the first was not reused
    a = json.loads((tmp_path / "a" / "svdllm_manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "svdllm_manifest.json").read_text())
    assert not b["calibration"]["from_cache"] and a["truncation_loss"] != b["truncation_loss"]
