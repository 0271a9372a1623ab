"""Weight-only quantization of the factors with torchao: save/load round trip, bits, the dense comparison."""
import json

import pytest
import torch

import svdllm
from svdllm import QuantizeConfig
from tiny import tiny_model


def _ids(tok):
    return tok("The game began development in 2010.", return_tensors="pt").input_ids


@pytest.mark.parametrize("scheme,bits,tol", [("int8", 8, 0.02), ("int4", 4, 0.3)])
def test_quantized_factors_round_trip(scheme, bits, tol, tok, tmp_path):
    model = tiny_model("qwen2")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.4, method="svd"), out=tmp_path / "m", progress=False)
    res = svdllm.quantize(tmp_path / "m", QuantizeConfig(scheme=scheme), out=tmp_path / "q", progress=False)
    out = res.summary()
    assert res.out == tmp_path / "q" and res.bytes_on_disk > 0 and "groups" not in out
    assert out["matrices"] == 2 * 7 * len(model.model.layers)  # both factors of every compressed linear
    assert bits < out["bits_per_weight"] < bits + 2
    q = svdllm.load(tmp_path / "q")
    assert type(q.model.layers[0].self_attn.q_proj.u.weight).__name__ != "Parameter"
    with torch.no_grad():
        ref, got = model(_ids(tok)).logits, q(_ids(tok)).logits
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < tol  # quantized, so not identical; close to the unquantized model
    again = svdllm.load(tmp_path / "q")  # loading is deterministic
    with torch.no_grad():
        torch.testing.assert_close(again(_ids(tok)).logits, got, rtol=0, atol=0)
    manifest = json.loads((tmp_path / "q" / "svdllm_manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme and manifest["ranks"]
    # quantizing twice is refused
    with pytest.raises(svdllm.SvdllmError, match=f"is already quantized \\({scheme}\\)"):
        svdllm.quantize(tmp_path / "q", QuantizeConfig(), out=tmp_path / "q2")
    assert not (tmp_path / "q2").exists()
    # plain transformers cannot rebuild torchao's flattened weights: no remote-code hook is offered for them
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "q" / "modeling_svdllm.py").exists()
    card = (tmp_path / "q" / "README.md").read_text()
    assert "svdllm.load(PATH, with_tokenizer=True)" in card and f"| quantization | {scheme} weights" in card
    assert "Low-rank factorization" in card and "- quantized" in card
    with pytest.raises(svdllm.SvdllmError, match="is quantized; export the unquantized compressed model"):
        svdllm.export(tmp_path / "q", tmp_path / "d", "dense")
    assert not (tmp_path / "d").exists()


def test_dense_model_quantized_alone(tok, tmp_path):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    res = svdllm.quantize(str(tmp_path / "dense"), QuantizeConfig(scheme="int8"), out=tmp_path / "q", progress=False)
    assert res.info["matrices"] == 7 * len(dense.model.layers)
    assert res.manifest["method"] == "dense" and res.manifest["base_model"] == str(tmp_path / "dense")
    q = svdllm.load(tmp_path / "q")
    with torch.no_grad():
        ref, got = dense(_ids(tok)).logits, q(_ids(tok)).logits
    assert float((got - ref).norm() / ref.norm()) < 0.02
    card = (tmp_path / "q" / "README.md").read_text()
    assert "quantized by svdllm" in card and "no low-rank factorization" in card and "- low-rank" not in card
    assert "| quantization | int8 weights" in card and "| method |" not in card


def test_int4_group_falls_back_where_the_rank_is_not_a_multiple(tok):
    from svdllm.quantization.quantize import quantize_model

    model = tiny_model("llama")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.37, method="svd"), progress=False)
    info = quantize_model(model, "int4", group_size=32)
    ranks = {m.rank for m in model.modules() if isinstance(m, svdllm.factorization.LowRankLinear)}
    assert any(r % 32 for r in ranks) and info["groups"]  # some u-factors needed a smaller group
    with torch.no_grad():
        assert torch.isfinite(model(_ids(tok)).logits).all()


def test_int4_packing_is_exact_and_halves_the_bytes():
    from svdllm.quantization.formats import pack_int4, unpack_int4

    q = torch.randint(-8, 8, (7, 5), dtype=torch.int8)  # odd count: the last byte is half used
    q[0, :2] = torch.tensor([-8, 7])
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 18
    assert torch.equal(unpack_int4(packed, [7, 5]), q)
    with pytest.raises(svdllm.SvdllmError, match="not int4"):
        pack_int4(torch.tensor([9], dtype=torch.int8))


def test_int4_file_is_about_half_the_int8_file(tok, tmp_path):
    model = tiny_model("llama")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.4, method="svd"), out=tmp_path / "m", progress=False)
    sizes = {}
    for scheme in ("int8", "int4"):
        sizes[scheme] = svdllm.quantize(tmp_path / "m", QuantizeConfig(scheme=scheme), out=tmp_path / scheme,
                                        progress=False).bytes_on_disk
    from safetensors import safe_open

    def qdata(scheme):
        with safe_open(str(tmp_path / scheme / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.endswith("_weight_qdata")}

    q8, q4 = qdata("int8"), qdata("int4")
    assert q4.keys() == q8.keys() and all(v.dtype == torch.uint8 for v in q4.values())
    assert all(q4[k].numel() == (q8[k].numel() + 1) // 2 for k in q8)  # two 4-bit values per byte
    assert sizes["int4"] < sizes["int8"]


@pytest.mark.parametrize("scheme", ["int4", "int3"])
def test_gptq_factors_round_trip_and_beat_round_to_nearest_on_the_grams(scheme, tok, data_dir, tmp_path):
    """svdllm.quantize by GPTQ on a compressed model: the stored codes rebuild exactly the matrices GPTQ
    made, the saved model loads with the same logits, and each factor pair's error on its calibration Gram is below
    round-to-nearest's on the same grid."""
    from svdllm.calibration import calibrate_layers
    from svdllm.data.windows import calibration_set
    from svdllm.quantization.gptq import Grid, output_error, rtn

    model = tiny_model("llama")
    cal = svdllm.CalibrationConfig(nsamples=4, seqlen=64, data_dir=str(data_dir))
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.4, calibration=cal), out=tmp_path / "m",
                    progress=False)
    config = QuantizeConfig(scheme=scheme, method="gptq", group_size=16, calibration=cal)
    out = svdllm.quantize(tmp_path / "m", config, out=tmp_path / "q", progress=False).info
    assert out["method"] == "gptq" and out["matrices"] == 2 * 7 * len(model.model.layers)
    q = svdllm.load(tmp_path / "q")
    again = svdllm.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(again(_ids(tok)).logits, q(_ids(tok)).logits, rtol=0, atol=0)
    # the error of layer 0's pairs on their Grams (layer 0's inputs do not depend on any quantization)
    windows = calibration_set(tok, "wikitext2", 4, 64, 0, str(data_dir))
    stats = next(iter(calibrate_layers(model, windows, progress=False)))[1]
    bits = int(scheme[3:])
    for name, group in (("self_attn.q_proj", "attn_in"), ("mlp.down_proj", "mlp_out")):
        dense, quant = model.model.layers[0].get_submodule(name), q.model.layers[0].get_submodule(name)
        w = dense.u.weight.double() @ dense.v.weight.double()
        got = quant.u.weight.dequantize().double() @ quant.v.weight.dequantize().double()
        assert len(torch.unique(quant.v.weight.qdata)) <= 2**bits
        g = stats.grams[group]
        base = rtn(dense.u.weight, Grid(bits, 16)) @ rtn(dense.v.weight, Grid(bits, 16))
        assert output_error(w, got, g) < output_error(w, base, g)


def test_gptq_dense_model_and_int3_round_to_nearest(tok, data_dir, tmp_path):
    dense = tiny_model("mistral")
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    cal = svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir))
    svdllm.quantize(tmp_path / "dense", QuantizeConfig(scheme="int4", method="gptq", calibration=cal),
                    out=tmp_path / "q", progress=False)
    manifest = json.loads((tmp_path / "q" / "svdllm_manifest.json").read_text())
    assert manifest["quantization"]["method"] == "gptq" and manifest["quantization"]["calibration"]["nsamples"] == 2
    q = svdllm.load(tmp_path / "q")
    with torch.no_grad():
        ref, got = dense(_ids(tok)).logits, q(_ids(tok)).logits
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.3
    # int3 by round-to-nearest: GPTQ's min-max grid without the error feedback, 8 levels per group
    svdllm.quantize(tmp_path / "dense", QuantizeConfig(scheme="int3"), out=tmp_path / "r", progress=False)
    r = svdllm.load(tmp_path / "r")
    w = r.model.layers[0].mlp.down_proj.weight
    assert w.qdata.min() >= -4 and w.qdata.max() <= 3 and len(torch.unique(w.qdata)) <= 8
    from svdllm.quantization.gptq import Grid, rtn

    expected = rtn(dense.model.layers[0].mlp.down_proj.weight, Grid(3, w.block_size[-1]))
    torch.testing.assert_close(w.dequantize().double(), expected, rtol=0, atol=1e-6)


def test_eval_scores_a_quantized_model_and_its_fingerprint_sees_the_codes(tok, data_dir, tmp_path):
    """svdllm.evaluate's perplexity on an int4 directory (the resumable evaluation hashes the weights: a quantized weight is
    hashed through its codes and scales), and two different quantizations get different fingerprints."""
    from svdllm.evaluation.resume import weights_fingerprint
    from svdllm.quantization.quantize import quantize_model

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    svdllm.quantize(tmp_path / "dense", QuantizeConfig(scheme="int4"), out=tmp_path / "q", progress=False)
    ev = svdllm.evaluate(tmp_path / "q", svdllm.EvalConfig(ppl="wikitext2", seqlen=64, max_windows=2,
                                                           data_dir=str(data_dir)), progress=False)
    assert ev["ppl"]["wikitext2"]["ppl"] > 1 and ev["compressed"]["method"] == "dense"
    a, b = tiny_model("llama"), tiny_model("llama")
    quantize_model(a, "int4", group_size=16)
    quantize_model(b, "int4", group_size=32)
    assert weights_fingerprint(a, tok) != weights_fingerprint(b, tok)
    c = tiny_model("llama")
    quantize_model(c, "int4", group_size=16)
    assert weights_fingerprint(a, tok) == weights_fingerprint(c, tok)


@pytest.mark.parametrize("family,scheme,method,low_rank", [("qwen2", "int4", "rtn", True), ("llama", "int3", "gptq", True),
                                                          ("mistral", "int8", "rtn", False)])
def test_compressed_tensors_export_loads_in_plain_transformers(family, scheme, method, low_rank, tok, data_dir,
                                                               tmp_path):
    """svdllm.export to compressed-tensors: plain transformers (remote code for the low-rank layers) rebuilds
    the quantized model from compressed-tensors' packed codes with svdllm.load's logits; the codes are checked on
    export to rebuild each weight exactly."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    if low_rank:
        svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.4, method="svd"),
                        out=tmp_path / "m", progress=False)
    else:
        model.save_pretrained(tmp_path / "m")
        tok.save_pretrained(tmp_path / "m")
    cal = svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir))
    svdllm.quantize(tmp_path / "m", QuantizeConfig(scheme=scheme, method=method, group_size=16, calibration=cal),
                    out=tmp_path / "q", progress=False)
    out = svdllm.export(tmp_path / "q", tmp_path / "ct", svdllm.ExportConfig("compressed-tensors"))
    assert out["format"] == "compressed-tensors" and out["bytes_on_disk"] > 0 and out["out"] == str(tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    q_config = config["quantization_config"]
    # round-to-nearest grids are symmetric, their codes packed; GPTQ's asymmetric ones one code per byte
    assert q_config["quant_method"] == "compressed-tensors"
    assert q_config["format"] == ("int-quantized" if method == "gptq" else "pack-quantized")
    assert {g["weights"]["num_bits"] for g in q_config["config_groups"].values()} == {int(scheme[3:])}
    ours = svdllm.load(tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", trust_remote_code=low_rank)
    assert hasattr(theirs.model.layers[0].self_attn.q_proj, "u") == low_rank
    with torch.no_grad():
        a, b = ours(_ids(tok)).logits, theirs(_ids(tok)).logits
    # the same integers and scales; int8's torchao kernel rounds its product in another order
    torch.testing.assert_close(b, a, rtol=0, atol=0 if scheme != "int8" else 1e-5)
    with pytest.raises(svdllm.SvdllmError, match="compressed-tensors export"):
        svdllm.load(tmp_path / "ct")
    assert f"| quantization | {scheme} weights of the decoder linears (compressed-tensors" in \
        (tmp_path / "ct" / "README.md").read_text()
    with pytest.raises(svdllm.SvdllmError, match="is not quantized: run `svdllm quantize" if low_rank
                       else "not a model saved by svdllm"):
        svdllm.export(tmp_path / "m", tmp_path / "x", "compressed-tensors")
    assert not (tmp_path / "x").exists()
