"""A saved model outside svdllm: plain transformers with remote code, the dense export, the model card."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import svdllm
from svdllm.factorization import LowRankLinear
from tiny import tiny_model


def _ids(tok):
    return tok("The game began development in 2010.", return_tensors="pt").input_ids


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_from_pretrained_with_remote_code_gives_identical_logits(family, tok, tmp_path):
    model = tiny_model(family)
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.5, method="svd"), out=tmp_path / "m", progress=False)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert type(native).__name__ == "SvdllmForCausalLM"
    ranks = {n: m.rank for n, m in native.named_modules() if type(m).__name__ == "LowRankLinear"}
    manifest = json.loads((tmp_path / "m" / "svdllm_manifest.json").read_text())
    assert ranks == {k: v for k, v in manifest["ranks"].items() if v is not None}
    ours = svdllm.load(tmp_path / "m")
    assert not hasattr(ours.config, "auto_map")
    native.eval()
    with torch.no_grad():
        torch.testing.assert_close(native(_ids(tok)).logits, model(_ids(tok)).logits, rtol=0, atol=0)
        torch.testing.assert_close(ours(_ids(tok)).logits, model(_ids(tok)).logits, rtol=0, atol=0)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "`svd`" in card and "trust_remote_code=True" in card


def test_dense_export_equals_the_factored_model(tok, tmp_path):
    model = tiny_model("mistral")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.4, method="svd"), out=tmp_path / "m", progress=False)
    res = svdllm.export(tmp_path / "m", tmp_path / "dense", svdllm.ExportConfig("dense"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # no remote code: a plain checkpoint
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert not (tmp_path / "dense" / "modeling_svdllm.py").exists()
    dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(_ids(tok)).logits, model(_ids(tok)).logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in dense.parameters()) == sum(p.numel() for p in tiny_model("mistral").parameters())
    assert res["params"] == sum(p.numel() for p in dense.parameters())


def test_eval_writes_measured_perplexity_into_the_model_card(tok, data_dir, tmp_path):
    model = tiny_model("llama")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.4, method="svd"), out=tmp_path / "m", progress=False)
    svdllm.evaluate(tmp_path / "m", svdllm.EvalConfig(ppl=["wikitext2"], seqlen=64, data_dir=str(data_dir)),
                    progress=False)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "perplexity, wikitext2" in card


def test_model_card_front_matter_is_what_the_hub_reads(tok, data_dir, tmp_path):
    import yaml

    model = tiny_model("llama")
    model.config.name_or_path = "smollm2-135m"  # as the built-in loader names it
    cal = svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir), dataset="wikitext2")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", ratio=0.4, calibration=cal), out=tmp_path / "m",
                    progress=False)
    ev = svdllm.evaluate(tmp_path / "m", svdllm.EvalConfig(ppl=["wikitext2"], seqlen=64, data_dir=str(data_dir)),
                         progress=False)
    measured = ev["ppl"]["wikitext2"]["ppl"]
    card = (tmp_path / "m" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and meta["datasets"] == ["Salesforce/wikitext"]
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "perplexity" and metric["value"] == round(measured, 2)
