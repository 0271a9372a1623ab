"""Weight-only quantization of the factors with torchao: save/load round trip, bits, the dense comparison."""
import json

import pytest
import torch

import svdllm
from svdllm.cli import main
from tiny import tiny_model


def _ids(tok):
    return tok("The game began development in 2010.", return_tensors="pt").input_ids


@pytest.mark.parametrize("scheme,bits,tol", [("int8", 8, 0.02), ("int4", 4, 0.3)])
def test_quantized_factors_round_trip(scheme, bits, tol, tok, tmp_path, capsys):
    model = tiny_model("qwen2")
    svdllm.compress(model, tok, svdllm.CompressConfig(ratio=0.4, method="svd"), out=tmp_path / "m", progress=False)
    assert main(["quantize", "--model", str(tmp_path / "m"), "--scheme", scheme, "--out", str(tmp_path / "q"),
                 "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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
    assert main(["quantize", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "q2"), "-q"]) == 2
    # plain transformers cannot rebuild torchao's flattened weights: no remote-code hook is offered for them
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "q" / "modeling_svdllm.py").exists()
    assert "svdllm.load(PATH, with_tokenizer=True)" in (tmp_path / "q" / "README.md").read_text()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "q"), "--dense", "--out", str(tmp_path / "d")]) == 2
    assert "is quantized" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_dense_model_quantized_alone(tok, tmp_path, capsys):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    assert main(["quantize", "--model", str(tmp_path / "dense"), "--scheme", "int8", "--out", str(tmp_path / "q"),
                 "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["matrices"] == 7 * len(dense.model.layers)
    q = svdllm.load(tmp_path / "q")
    with torch.no_grad():
        ref, got = dense(_ids(tok)).logits, q(_ids(tok)).logits
    assert float((got - ref).norm() / ref.norm()) < 0.02


def test_int4_group_falls_back_where_the_rank_is_not_a_multiple(tok):
    from svdllm.quantization import quantize_model

    model = tiny_model("llama")
    svdllm.compress(model, tok, svdllm.CompressConfig(ratio=0.37, method="svd"), progress=False)
    info = quantize_model(model, "int4", group_size=32)
    ranks = {m.rank for m in model.modules() if isinstance(m, svdllm.factorization.LowRankLinear)}
    assert any(r % 32 for r in ranks) and info["groups"]  # some u-factors needed a smaller group
    with torch.no_grad():
        assert torch.isfinite(model(_ids(tok)).logits).all()
