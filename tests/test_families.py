"""Families as data: every listed layout (and models listed nowhere, by patterns) through the real code paths."""
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import svdllm
from svdllm.calibration import calibrate_layers
from svdllm.errors import SvdllmError
from svdllm.factorization import METHODS, LowRankLinear
from svdllm.models.families import FAMILIES, family_of, from_patterns, resolve_family, set_submodule
from tiny import BY_PATTERNS, MOE, OTHER_LAYOUTS, tiny_config, tiny_model

ALL = ["llama", "qwen2", "gemma3"] + OTHER_LAYOUTS


def _windows(n=4, length=24):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_every_listed_family_is_found_in_its_model():
    """Each entry of the table names modules its model really has, and declares as one group exactly the linears
    that receive the same tensor (what `from_patterns` finds by running the model)."""
    built = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "gemma2": "gemma2", "phi3": "phi3", "opt": "opt", "gpt_neox": "gpt_neox"}
    assert set(built) == set(FAMILIES)
    for model_type, tiny in built.items():
        model = tiny_model(tiny)
        family = family_of(model)
        assert family is FAMILIES[model_type]
        layers = family.decoder_layers(model)
        assert len(layers) == model.config.num_hidden_layers
        assert family.head_modules(model), model_type
        exact = [re.escape(f".{n}") + "$" for n in family.linear_names]
        found = from_patterns(model, targets=exact, layers_path=family.layers)
        assert sorted(map(sorted, found.groups.values())) == sorted(map(sorted, family.groups.values())), model_type
        assert list(found.group_of) == [n for names in found.groups.values() for n in names]


@pytest.mark.parametrize("family", ALL)
def test_grouped_grams_equal_per_linear_hooks(family):
    model = tiny_model(family)
    fam = family_of(model)
    windows = _windows()
    reference, handles = {}, []
    for i, layer in enumerate(fam.decoder_layers(model)):
        for name in fam.linear_names:
            def hook(mod, args, out, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                reference[key] = reference.get(key, 0) + x.T @ x
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    for w in windows:
        _logits(model, w[None])
    for h in handles:
        h.remove()
    got = dict(calibrate_layers(model, windows, batch_size=2, progress=False))
    assert len(got) == len(fam.decoder_layers(model))
    for i, stats in got.items():
        assert set(stats.grams) == set(fam.groups)
        for name in fam.linear_names:
            torch.testing.assert_close(stats.grams[fam.group_of[name]], reference[(i, name)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", OTHER_LAYOUTS + BY_PATTERNS)
def test_full_rank_factorization_reproduces_the_logits(family):
    """Whitened factors at full rank, biases kept with W_u: the model's logits are unchanged."""
    model = tiny_model(family)
    fam = resolve_family(model)
    windows = _windows()
    ids = _windows(1, 20)
    ref = _logits(model, ids)
    stats = dict(calibrate_layers(model, windows, progress=False))
    for i, layer in enumerate(fam.decoder_layers(model)):
        for name in fam.linear_names:
            lin = layer.get_submodule(name)
            dec = METHODS["svd-llm"].decompose(lin.weight.double(), stats[i].for_group(fam.group_of[name]))
            w_u, w_v = dec.factors(dec.max_rank, torch.float32)
            set_submodule(layer, name, LowRankLinear.from_factors(w_u, w_v, lin.bias))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(fam.linear_names) * len(stats)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", OTHER_LAYOUTS + BY_PATTERNS)
def test_save_and_load_give_identical_logits(family, tok, tmp_path):
    """Compressed with the default preset's method and allocator, saved; svdllm.load and plain transformers with
    remote code rebuild the same model."""
    model = tiny_model(family)
    cal = svdllm.CalibrationConfig(dataset=list(_windows(4, 32)), nsamples=4, seqlen=32, grad_samples=2)
    svdllm.compress(model, tok, svdllm.CompressConfig(ratio=0.3, calibration=cal, cache_dir=""),
                    out=tmp_path / "m", progress=False)
    ids = _windows(1, 20)
    ours = svdllm.load(tmp_path / "m")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    want = _logits(model, ids)
    torch.testing.assert_close(_logits(ours, ids), want, rtol=0, atol=0)
    torch.testing.assert_close(_logits(native, ids), want, rtol=0, atol=0)
    manifest = json.loads((tmp_path / "m" / "svdllm_manifest.json").read_text())
    assert manifest["method"] == "kfac-svd" and manifest["alloc"] == "global"
    assert abs(manifest["params"]["achieved_ratio"] - 0.3) < 0.02
    assert (manifest["family"] is not None) == (family in BY_PATTERNS)
    for p in ours.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("family", ["opt", "phi3", "gpt_neox", "mixtral"])
@pytest.mark.parametrize("method,alloc,update", [
    ("svd", "uniform", "none"), ("asvd", "uniform", "none"), ("fwsvd", "dipsvd", "none"),
    ("svd-llm", "v2", "closed-form"), ("svd-llm-v2", "lorap", "closed-form-drift"), ("kfac-svd", "global", "closed-form"),
])
def test_every_method_allocator_and_update_runs(family, method, alloc, update, tok):
    model = tiny_model(family)
    ids = _windows(1, 20)
    cal = svdllm.CalibrationConfig(dataset=list(_windows(4, 32)), nsamples=4, seqlen=32, grad_samples=2)
    (result,) = svdllm.compress(model, tok, svdllm.CompressConfig(
        ratio=0.4, method=method, alloc=alloc, update=update, calibration=cal, cache_dir=""), progress=False)
    assert abs(result.params["achieved_ratio"] - 0.4) < 0.03
    assert torch.isfinite(_logits(model, ids)).all()


def test_a_model_type_nobody_listed_is_compressed_by_patterns(tok, tmp_path):
    """GPT-J is not in the table: its layers are found, its linears matched, its groups found by running it (q/k/v
    and fc_in read the same normed input in GPT-J's parallel block), and the manifest says what was left alone."""
    model = tiny_model("gptj")
    with pytest.raises(SvdllmError, match="not listed.*--targets/--ignore"):
        family_of(model)
    cal = svdllm.CalibrationConfig(dataset=list(_windows(4, 32)), nsamples=4, seqlen=32, grad_samples=2)
    svdllm.compress(model, tok, svdllm.CompressConfig(ratio=0.3, calibration=cal, cache_dir="", ignore=["fc_out"]),
                    out=tmp_path / "m", progress=False)
    manifest = json.loads((tmp_path / "m" / "svdllm_manifest.json").read_text())
    family = manifest["family"]
    assert family["layers"] == "transformer.h" and family["head"] == ["transformer.ln_f"]
    assert sorted(family["groups"]["group0"]) == ["attn.k_proj", "attn.q_proj", "attn.v_proj", "mlp.fc_in"]
    assert family["skipped"] == {"mlp.fc_out": "matches --ignore"}
    assert all("fc_out" not in k for k in manifest["ranks"])
    assert {k.split(".", 3)[3] for k in manifest["ranks"]} == {"attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                "attn.out_proj", "mlp.fc_in"}  # matched by patterns
    loaded = svdllm.load(tmp_path / "m")
    low_rank = [k for k, r in manifest["ranks"].items() if r]
    assert low_rank and all(isinstance(loaded.get_submodule(k), LowRankLinear) for k in low_rank)


def test_targets_narrow_a_listed_family(tok):
    model = tiny_model("opt")
    cal = svdllm.CalibrationConfig(dataset=list(_windows(4, 32)), nsamples=4, seqlen=32)
    (result,) = svdllm.compress(model, tok, svdllm.CompressConfig(
        preset="paper", ratio=0.4, calibration=cal, cache_dir="", targets=["fc1|fc2"]), progress=False)
    assert sorted({k.rsplit(".", 1)[1] for k in result.ranks}) == ["fc1", "fc2"]
    assert not isinstance(model.model.decoder.layers[0].self_attn.q_proj, LowRankLinear)


def test_bad_patterns_and_layer_paths_are_named():
    with pytest.raises(SvdllmError, match="--targets.*not a regular expression"):
        svdllm.CompressConfig(targets=["(unclosed"]).validate()
    model = tiny_model("gptj")
    with pytest.raises(SvdllmError, match="--layers-path 'transformer.nowhere'"):
        resolve_family(model, layers_path="transformer.nowhere")
    with pytest.raises(SvdllmError, match="No nn.Linear.*matches --targets"):
        resolve_family(model, targets=["nothing_like_this"])
    with pytest.raises(SvdllmError, match="leave no linear"):
        resolve_family(tiny_model("llama"), ignore=["."])


def test_layerwise_model_of_another_layout(tok, tmp_path):
    """OPT read one layer at a time from its shards gives the same model as loaded whole."""
    from svdllm.io.loader import load_model
    from tiny import byte_tokenizer

    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "opt")
    byte_tokenizer().save_pretrained(tmp_path / "opt")
    cal = svdllm.CalibrationConfig(dataset=list(_windows(4, 32)), nsamples=4, seqlen=32, grad_samples=2)
    config = svdllm.CompressConfig(preset="paper", ratio=0.4, calibration=cal, cache_dir="")
    whole, _ = load_model(str(tmp_path / "opt"))
    svdllm.compress(whole, tok, config, out=tmp_path / "whole", progress=False)
    lazy, _ = load_model(str(tmp_path / "opt"), layerwise=True)
    svdllm.compress(lazy, tok, config, out=tmp_path / "lazy", progress=False)
    ids = _windows(1, 20)
    torch.testing.assert_close(_logits(svdllm.load(tmp_path / "lazy"), ids),
                               _logits(svdllm.load(tmp_path / "whole"), ids), rtol=0, atol=0)
    assert tiny_config("opt").model_type == "opt"


@pytest.mark.parametrize("family", MOE)
def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(family):
    """Mixtral / Qwen2-MoE: the experts, stored by transformers as 3-D tensors, become a linear pair each; the Gram of
    expert e's input is Σ xxᵀ over the tokens the router sent to e (computed here from the fused model's routing),
    and the experts see different numbers of tokens."""
    fused = tiny_model(family)
    windows = _windows(4, 32)
    routed: dict = {}
    handles = []
    for i, layer in enumerate(fused.model.layers):
        def hook(module, args, i=i):
            hidden, top_k_index = args[0], args[1]
            for e in range(module.num_experts):
                x = hidden[(top_k_index == e).any(-1)].double()
                routed[(i, e)] = routed.get((i, e), 0) + x.T @ x
                routed[(i, e, "tokens")] = routed.get((i, e, "tokens"), 0) + x.shape[0]
        handles.append(layer.mlp.experts.register_forward_pre_hook(hook))
    for w in windows:
        _logits(fused, w[None])
    for h in handles:
        h.remove()
    model = tiny_model(family)
    fam = resolve_family(model)
    assert fam.experts and isinstance(model.model.layers[0].mlp.experts[0].gate_up_proj, torch.nn.Linear)
    # the same function, to float32's last bits: transformers' fused experts multiply through another kernel than
    # nn.Linear (on an AMD EPYC with AVX-512, 4% of these logits differ by 6e-8), so not bit for bit
    torch.testing.assert_close(_logits(model, windows[:1]), _logits(fused, windows[:1]), rtol=1e-5, atol=1e-6)
    stats = dict(calibrate_layers(model, windows, progress=False))
    for i in stats:
        counts = {routed[(i, e, "tokens")] for e in range(4)}
        assert len(counts) > 1  # the experts really see different token counts
        for e in range(4):
            gram = stats[i].grams[fam.group_of[f"mlp.experts.{e}.gate_up_proj"]]
            # (the inputs carry the last-bit differences of the layers before: equal to float32's precision)
            torch.testing.assert_close(gram, routed[(i, e)], rtol=1e-6, atol=1e-6 * float(routed[(i, e)].abs().max()))


@pytest.mark.parametrize("family", MOE)
def test_a_mixture_of_experts_model_round_trips(family, tok, tmp_path):
    model = tiny_model(family)
    cal = svdllm.CalibrationConfig(dataset=list(_windows(4, 32)), nsamples=4, seqlen=32, grad_samples=2)
    svdllm.compress(model, tok, svdllm.CompressConfig(ratio=0.3, calibration=cal, cache_dir=""), out=tmp_path / "m",
                    progress=False)
    manifest = json.loads((tmp_path / "m" / "svdllm_manifest.json").read_text())
    assert manifest["family"]["experts"] == "unfused"
    assert sum(".experts." in k and v is not None for k, v in manifest["ranks"].items()) > 0
    if family == "qwen2_moe":
        assert manifest["family"]["skipped"] == {"mlp.shared_expert_gate": "too small to factor"}
    ids = _windows(1, 20)
    want = _logits(model, ids)
    torch.testing.assert_close(_logits(svdllm.load(tmp_path / "m"), ids), want, rtol=0, atol=0)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(native, ids), want, rtol=0, atol=0)


def test_an_unlisted_model_saved_to_disk_is_compressed_by_patterns(tok, data_dir, tmp_path):
    from tiny import saved_tiny

    model_dir = saved_tiny(tmp_path / "gptj", "gptj", tok)
    model, tokenizer = svdllm.load_model(str(model_dir))
    cal = svdllm.CalibrationConfig(nsamples=2, seqlen=32, grad_samples=1, data_dir=str(data_dir))
    svdllm.compress(model, tokenizer, svdllm.CompressConfig(ratio=0.3, calibration=cal, targets=[r"attn\."],
                                                            ignore=["out_proj"], cache_dir=""),
                    out=tmp_path / "m", progress=False)
    manifest = json.loads((tmp_path / "m" / "svdllm_manifest.json").read_text())
    assert {k.rsplit(".", 1)[1] for k in manifest["ranks"]} == {"q_proj", "k_proj", "v_proj"}
    assert manifest["family"]["skipped"] == {"attn.out_proj": "matches --ignore", "mlp.fc_in": "matches no --targets",
                                             "mlp.fc_out": "matches no --targets"}


@pytest.mark.parametrize("family", ["opt", "phi3", "gpt_neox", "mixtral", "gptj"])
def test_sequential_lora_and_dipsvd_on_other_layouts(family, tok, tmp_path):
    """The remaining method (dipsvd) and update (SVD-LLM's sequential LoRA of the factors, through peft), saved and
    loaded back with the same logits."""
    from svdllm.update.lora import FinetuneConfig

    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"instruction": f"Name the number after {i}.", "input": "",
                                    "output": f"It is {i + 1}."} for i in range(24)]))
    model = tiny_model(family)
    cal = svdllm.CalibrationConfig(dataset=list(_windows(4, 32)), nsamples=4, seqlen=32, grad_samples=2)
    ft = FinetuneConfig(data=str(records), val_samples=4, batch_size=4, micro_batch=4, lr=5e-3, warmup_steps=0,
                        max_steps=2, save_every=2)
    (res,) = svdllm.compress(model, tok, svdllm.CompressConfig(
        ratio=0.4, method="dipsvd", alloc="global", update="lora", finetune=ft, calibration=cal, cache_dir=""),
        out=tmp_path / "m", progress=False)
    assert res.manifest["update"] == "lora"
    ids = _windows(1, 20)
    torch.testing.assert_close(_logits(svdllm.load(tmp_path / "m"), ids), _logits(model, ids))
