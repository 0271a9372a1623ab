"""The gradient pass, one decoder layer at a time, against autograd through the whole model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdllm.calibration import layerwise
from svdllm.calibration.fisher import gradient_stats, head_gradient
from svdllm.models.families import LINEAR_NAMES
from tiny import FAMILIES, tiny_model


def _loss(model, w):
    """A window's mean next-token loss in float64 (transformers' own computes the cross-entropy in float32)."""
    logits = model(input_ids=w[None]).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, w[1:])


def _windows(n=2, seqlen=20, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _whole_model(model, windows):
    """rows, output diagonals and output Grams from one backward through the whole model per window."""
    linears = {f"model.layers.{i}.{n}": layer.get_submodule(n)
               for i, layer in enumerate(model.model.layers) for n in LINEAR_NAMES}
    rows = {k: 0 for k in linears}
    grams = {k: 0 for k in linears}
    for w in windows:
        seen = {}
        handles = [m.register_forward_hook(lambda mod, a, out, k=k: seen.__setitem__(k, out))
                   for k, m in linears.items()]
        loss = _loss(model, w)
        for h in handles:
            h.remove()
        names = list(linears)
        got = torch.autograd.grad(loss, [linears[k].weight for k in names] + [seen[k] for k in names])
        for k, gw, gy in zip(names, got[: len(names)], got[len(names):]):
            rows[k] = rows[k] + gw.double().pow(2).sum(1)
            gy = gy.double().reshape(-1, gy.shape[-1])
            grams[k] = grams[k] + gy.T @ gy
    return rows, grams


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_pass_equals_whole_model_autograd(family):
    """In float64, the streamed statistics equal autograd through the whole model to 1e-8 (relative), for every
    family; Gemma's logit soft-capping is on, and the logits come in chunks of a few tokens."""
    kw = {"final_logit_softcapping": 3.0} if family == "gemma3" else {"num_hidden_layers": 3}
    model = tiny_model(family, dtype=torch.float64, **kw)
    windows = _windows()
    rows, grams = _whole_model(model, windows)
    old = layerwise.LOGIT_CHUNK_ELEMENTS
    layerwise.LOGIT_CHUNK_ELEMENTS = 7 * model.config.vocab_size  # chunks of 7 tokens: 19 predictions → 3 chunks
    try:
        stats = gradient_stats(model, windows, progress=False, output_grams=True)
    finally:
        layerwise.LOGIT_CHUNK_ELEMENTS = old
    assert list(stats.rows) == list(rows) and stats.windows == 2  # layer 0 first, as the model lists them
    for k in rows:
        torch.testing.assert_close(stats.rows[k], rows[k], rtol=1e-8, atol=1e-8 * rows[k].abs().max().item())
        scale = grams[k].abs().max().item()
        torch.testing.assert_close(stats.output_grams[k], grams[k], rtol=1e-8, atol=1e-8 * scale)
        torch.testing.assert_close(stats.outputs[k], grams[k].diagonal(), rtol=1e-8, atol=1e-8 * scale)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_head_gradient_loss_is_the_models():
    model = tiny_model("gemma3", dtype=torch.float64, final_logit_softcapping=2.0)
    ids = _windows(n=1)
    _, loss = head_gradient(model, _last_hidden(model, ids), ids)
    assert loss == pytest.approx(_loss(model, ids[0]).item(), rel=1e-12)
    model = model.float()  # in float32, the loss transformers computes
    _, loss = head_gradient(model, _last_hidden(model, ids), ids)
    assert loss == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-6)


def _last_hidden(model, ids):
    """The last decoder layer's output (before the final norm)."""
    seen = {}
    h = model.model.layers[-1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    model.model(input_ids=ids)
    h.remove()
    out = seen["h"]
    return (out[0] if isinstance(out, tuple) else out).detach()


def test_results_written_layer_by_layer_and_an_interrupted_pass_resumes(tmp_path, monkeypatch):
    """With a directory, each layer's results are written as the backward pass leaves it; a pass stopped in the
    middle of the backward resumes at the layer where it stopped and gives the same statistics."""
    from svdllm.calibration import fisher

    model = tiny_model("llama", num_hidden_layers=4)
    windows = _windows()
    whole = gradient_stats(model, windows, progress=False, output_grams=True)
    done = []
    real = fisher._layer_backward

    def stop_at_layer_1(family, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        done.append(i)
        return real(family, i, *args)

    monkeypatch.setattr(fisher, "_layer_backward", stop_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        gradient_stats(model, windows, progress=False, output_grams=True, directory=tmp_path)
    assert done == [3, 2] and sorted(p.name for p in tmp_path.glob("layer_*")) == ["layer_0002.safetensors",
                                                                                  "layer_0003.safetensors"]
    done.clear()
    monkeypatch.setattr(fisher, "_layer_backward", lambda family, i, *args: done.append(i) or real(family, i, *args))
    resumed = gradient_stats(model, windows, progress=False, output_grams=True, directory=tmp_path)
    assert done == [1, 0]  # layers 3 and 2 were not run again
    assert not (tmp_path / "pass-rank0").exists()  # the intermediate tensors are removed at the end
    assert list(resumed.rows) == list(whole.rows)
    for k in whole.rows:
        torch.testing.assert_close(resumed.rows[k], whole.rows[k], rtol=1e-6, atol=0)
        torch.testing.assert_close(resumed.outputs[k], whole.outputs[k], rtol=1e-6, atol=0)
        torch.testing.assert_close(resumed.output_grams[k], whole.output_grams[k], rtol=1e-6, atol=0)


_PEAK = """
import json, resource, sys, torch
sys.path.insert(0, {tests!r})
from svdllm.calibration.fisher import gradient_stats
from svdllm.io.loader import load_model
model, _ = load_model({path!r}, layerwise=True)
windows = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gradient_stats(model, windows, progress=False, output_grams=True, directory=sys.argv[1])
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def test_peak_memory_of_the_gradient_pass_does_not_grow_with_depth(tmp_path):
    """A 4- and a 32-layer model, read layer by layer: the pass's peak RSS is the same (through the whole model
    at once, the 32-layer one would hold 8× the activations: about 300 MB more here)."""
    from tiny import byte_tokenizer

    peaks = {}
    for depth in (4, 32):
        path = tmp_path / f"d{depth}"
        tiny_model("llama", num_hidden_layers=depth, hidden_size=128, intermediate_size=512, head_dim=32,
                   max_position_embeddings=512).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        code = _PEAK.format(tests=str(Path(__file__).parent), path=str(path))
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"g{depth}")], capture_output=True,
                             text=True, check=True)
        peaks[depth] = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks[32] < peaks[4] * 1.25 + 16, peaks  # MB


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layerwise_loss_is_the_models_mean_loss(family):
    """The allocation's measurements, a layer at a time with logits in chunks, give the model's own loss; a layer
    changed only while it runs gives the loss of the model with that layer changed."""
    from svdllm.calibration import layerwise_loss

    model = tiny_model(family, dtype=torch.float64)
    windows = _windows(n=3)
    expected = sum(_loss(model, w).item() for w in windows) / 3
    old = layerwise.LOGIT_CHUNK_ELEMENTS
    layerwise.LOGIT_CHUNK_ELEMENTS = 5 * model.config.vocab_size
    try:
        assert layerwise_loss(model, windows) == pytest.approx(expected, rel=1e-12)
    finally:
        layerwise.LOGIT_CHUNK_ELEMENTS = old
    proj = model.model.layers[1].mlp.down_proj
    import contextlib

    @contextlib.contextmanager
    def zero_down(i):
        saved = proj.weight.detach().clone()
        if i == 1:
            proj.weight.data.zero_()
        try:
            yield
        finally:
            proj.weight.data.copy_(saved)

    changed = layerwise_loss(model, windows, zero_down)
    proj.weight.data.zero_()
    expected = sum(_loss(model, w).item() for w in windows) / 3
    assert changed == pytest.approx(expected, rel=1e-12)
