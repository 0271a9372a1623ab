"""The Python API behind the commands: svdllm.quantize, svdllm.export, svdllm.evaluate and their configs' checks, and
CompressConfig.validate, which the CLI and svdllm.compress share. Every bad request is refused before a model is
read, with a message that names the problem and the fix."""
import json

import pytest
import torch

import svdllm
from svdllm import CalibrationConfig, CompressConfig, EvalConfig, ExportConfig, QuantizeConfig, SvdllmError
from tiny import saved_tiny, tiny_model


def test_the_api_is_exported():
    for name in ("quantize", "export", "evaluate", "QuantizeConfig", "ExportConfig", "EvalConfig", "QuantizeResult"):
        assert name in svdllm.__all__ and hasattr(svdllm, name)


@pytest.mark.parametrize("config,message", [
    (QuantizeConfig(scheme="int5"), "Unknown quantization scheme 'int5'; choose one of int8, int4, int3"),
    (QuantizeConfig(method="awq"), "Unknown quantization method 'awq'; choose one of rtn, gptq"),
    (QuantizeConfig(scheme="int4", group_size=12), "--group-size must be a power of two ≥ 8, got 12"),
    (QuantizeConfig(scheme="int4", group_size=4), "--group-size must be a power of two ≥ 8, got 4"),
    (QuantizeConfig(method="gptq", calibration=CalibrationConfig(nsamples=0)), "--nsamples must be at least 1"),
    (QuantizeConfig(method="gptq", calibration=CalibrationConfig(dataset="no-such-file.txt")),
     "neither a corpus .* fix --calib-dataset"),
])
def test_quantize_config_names_the_problem(config, message, tmp_path):
    with pytest.raises(SvdllmError, match=message):
        config.validate()
    with pytest.raises(SvdllmError, match=message):  # before the model is looked for
        svdllm.quantize(tmp_path / "no-such-model", config, out=tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_round_to_nearest_reads_no_calibration():
    QuantizeConfig(method="rtn", calibration=CalibrationConfig(nsamples=0)).validate()  # unused: not checked


def test_quantize_a_model_in_memory(tok, tmp_path):
    """In place, without a directory; a compressed model is saved only with its manifest."""
    model = tiny_model("llama")
    ids = tok("The game began.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    res = svdllm.quantize(model, QuantizeConfig(scheme="int8"), tokenizer=tok, progress=False)
    assert res.model is model and res.out is None and res.bytes_on_disk is None
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ != "Parameter"
    with torch.no_grad():
        assert 0 < float((model(ids).logits - before).norm() / before.norm()) < 0.02

    small = tiny_model("llama")
    result = svdllm.compress(small, tok, CompressConfig(preset="paper", ratio=0.4, method="svd"), progress=False)[0]
    with pytest.raises(SvdllmError, match="pass its manifest"):
        svdllm.quantize(small, QuantizeConfig(), out=tmp_path / "q", tokenizer=tok)
    res = svdllm.quantize(small, QuantizeConfig(scheme="int4", group_size=16), out=tmp_path / "q", tokenizer=tok,
                          manifest=result.manifest, progress=False)
    manifest = json.loads((tmp_path / "q" / "svdllm_manifest.json").read_text())
    assert manifest["ranks"] == result.manifest["ranks"] and manifest["quantization"]["scheme"] == "int4"
    with torch.no_grad():
        torch.testing.assert_close(svdllm.load(tmp_path / "q")(ids).logits, small(ids).logits, rtol=0, atol=0)
    with pytest.raises(SvdllmError, match="already quantized"):
        svdllm.quantize(small, QuantizeConfig(), tokenizer=tok, manifest=res.manifest)
    with pytest.raises(SvdllmError, match="already quantized"):  # the model itself, without a manifest to say so
        svdllm.quantize(small, QuantizeConfig(), tokenizer=tok)


def test_gptq_in_memory_needs_the_tokenizer_for_text(data_dir):
    cal = CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir))
    with pytest.raises(SvdllmError, match="pass the model's tokenizer"):
        svdllm.quantize(tiny_model("llama"), QuantizeConfig(scheme="int4", method="gptq", calibration=cal))


def test_export_config_names_the_problem(tmp_path):
    with pytest.raises(SvdllmError, match="Say which form to export: --dense"):
        ExportConfig().validate()
    with pytest.raises(SvdllmError, match="Unknown export format 'onnx'; choose one of dense, compressed-tensors"):
        svdllm.export(tmp_path / "nothing", tmp_path / "x", "onnx")
    with pytest.raises(SvdllmError, match="not a model saved by svdllm"):
        svdllm.export(tmp_path, tmp_path / "x", ExportConfig("dense"))


def test_export_to_compressed_tensors_needs_a_quantized_model(tok, tmp_path):
    svdllm.compress(tiny_model("llama"), tok, CompressConfig(preset="paper", ratio=0.4, method="svd"),
                    out=tmp_path / "m", progress=False)
    with pytest.raises(SvdllmError, match=r"m is not quantized: run `svdllm quantize --model .*m \.\.\.` first"):
        svdllm.export(tmp_path / "m", tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(SvdllmError, match="already exists; pass --overwrite"):
        svdllm.export(tmp_path / "m", tmp_path / "taken", "dense")
    res = svdllm.export(tmp_path / "m", tmp_path / "taken", "dense", overwrite=True)
    assert res == {"run_dir": str(tmp_path / "m"), "out": str(tmp_path / "taken"), "params": res["params"]}
    assert (tmp_path / "taken" / "config.json").exists() and not (tmp_path / "taken" / "svdllm_manifest.json").exists()


@pytest.mark.parametrize("config,message", [
    (EvalConfig(ppl=["wikitext3"]), "Unknown perplexity test set 'wikitext3'; choose among wikitext2, ptb, c4"),
    (EvalConfig(ppl="wikitext2,lambada"), "Unknown perplexity test set 'lambada'"),
    (EvalConfig(seqlen=1), "--seqlen must be an integer of at least 2, got 1"),
    (EvalConfig(batch_size=0), "--batch-size must be an integer of at least 1"),
    (EvalConfig(max_windows=0), "--max-windows must be an integer of at least 1"),
    (EvalConfig(tasks=["piqa"], limit=0), "--limit must be an integer of at least 1"),
    (EvalConfig(tasks=["piqa"], shard=(2, 2)), "give K/N with 0 <= K < N"),
])
def test_eval_config_names_the_problem(config, message, tmp_path, data_dir):
    config.data_dir = str(data_dir)
    with pytest.raises(SvdllmError, match=message):
        svdllm.evaluate(tmp_path / "no-such-model", config)  # before the model is looked for


def test_eval_config_reads_the_task_files_before_the_model(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SVDLLM_DATA_DIR", raising=False)
    with pytest.raises(SvdllmError, match="pass --data-dir or set \\$SVDLLM_DATA_DIR"):
        EvalConfig(tasks="piqa").validate()
    with pytest.raises(SvdllmError, match="No local data for task 'lambada'"):
        svdllm.evaluate("/nonexistent", EvalConfig(tasks=["lambada"], data_dir=str(data_dir)))
    with pytest.raises(SvdllmError, match="winogrande_xl_validation.jsonl is missing"):
        svdllm.evaluate("/nonexistent", EvalConfig(tasks="winogrande", data_dir=str(data_dir)))


def test_eval_config_defaults():
    from svdllm.evaluation import PAPER_TASKS

    assert EvalConfig().ppl_sets() == ["wikitext2"] and EvalConfig().task_names() == []
    assert EvalConfig(tasks="paper").task_names() == PAPER_TASKS and EvalConfig(tasks="paper").ppl_sets() == []
    assert EvalConfig(ppl="none").ppl_sets() == [] and EvalConfig(ppl="ptb, c4").ppl_sets() == ["ptb", "c4"]
    assert EvalConfig(tasks=["piqa"], ppl=["wikitext2"]).ppl_sets() == ["wikitext2"]


def test_evaluate_a_model_in_memory_and_a_directory(tok, data_dir, tmp_path):
    """In memory: the results only. A directory written by svdllm: kept beside it, in the card too."""
    model = tiny_model("llama")
    config = EvalConfig(ppl=["wikitext2", "ptb"], seqlen=64, max_windows=2, data_dir=str(data_dir), resume=False)
    with pytest.raises(SvdllmError, match="needs its tokenizer"):
        svdllm.evaluate(model, config)
    seen = []
    res = svdllm.evaluate(model, config, tokenizer=tok, progress=False, on_result=lambda n, r: seen.append(n))
    assert seen == ["wikitext2", "ptb"] and set(res["ppl"]) == {"wikitext2", "ptb"} and res["compressed"] is None
    assert res["params"] == sum(p.numel() for p in model.parameters()) and "zero_shot" not in res
    saved = saved_tiny(tmp_path / "dense", "llama", tok)
    from_dir = svdllm.evaluate(str(saved), config, progress=False)
    assert from_dir["ppl"]["wikitext2"]["ppl"] == pytest.approx(res["ppl"]["wikitext2"]["ppl"], rel=1e-6)
    assert not (saved / "svdllm_eval.json").exists()  # not a directory svdllm wrote: nothing written into it

    svdllm.compress(model, tok, CompressConfig(preset="paper", ratio=0.4, method="svd"), out=tmp_path / "m",
                    progress=False)
    res = svdllm.evaluate(tmp_path / "m", config, progress=False)
    assert res["model"] == str(tmp_path / "m") and res["compressed"]["method"] == "svd"
    kept = json.loads((tmp_path / "m" / "svdllm_eval.json").read_text())["ppl"]
    assert set(kept) == {f"{n}[2/{r['total_windows']}]" for n, r in res["ppl"].items()}  # marked: 2 windows only
    assert [kept[f"{n}[2/{r['total_windows']}]"]["ppl"] for n, r in res["ppl"].items()] == \
        [r["ppl"] for r in res["ppl"].values()]
    assert "perplexity, wikitext2" in (tmp_path / "m" / "README.md").read_text()


@pytest.mark.parametrize("config,message", [
    (CompressConfig(method="svd", method_options={"shrink": 1.0}), "Method svd has no option shrink"),
    (CompressConfig(alloc="uniform", alloc_options={"attn_keep": 0.5}), "Allocator 'uniform' has no option attn_keep"),
    (CompressConfig(update="gradient-descent"), "Unknown update 'gradient-descent'"),
    (CompressConfig(preset="fast"), "Unknown preset 'fast'; choose one of best, paper"),
    (CompressConfig(group_size=24), "--group-size must be a power of two"),
])
def test_compress_config_checks_everything_before_the_model(config, message, tok, tmp_path):
    with pytest.raises(SvdllmError, match=message):
        config.validate()
    with pytest.raises(SvdllmError, match=message):  # svdllm.compress checks the same, by the same call
        svdllm.compress(tiny_model("llama"), tok, config, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_compress_config_checks_the_output_directories(tmp_path):
    (tmp_path / "one").mkdir()
    with pytest.raises(SvdllmError, match="one already exists; pass --overwrite"):
        CompressConfig(ratio=0.4).validate(tmp_path / "one")
    CompressConfig(ratio=0.4).validate(tmp_path / "one", overwrite=True)
    (tmp_path / "runs" / "ratio-0.6").mkdir(parents=True)  # several ratios: one sub-directory each
    with pytest.raises(SvdllmError, match="ratio-0.6 already exists"):
        CompressConfig(ratio=[0.2, 0.6]).validate(tmp_path / "runs")
    assert CompressConfig(ratio=[0.2, 0.6]).out_dirs(tmp_path / "runs") == {0.2: tmp_path / "runs" / "ratio-0.2",
                                                                             0.6: tmp_path / "runs" / "ratio-0.6"}
    plan = CompressConfig(ratio=[0.3, 0.6]).validate()
    assert (plan.method, plan.alloc, plan.updates) == ("kfac-svd", "global", {0.3: "none", 0.6: "closed-form"})
