"""Bad input gets a clear SvdllmError naming the problem and the fix, before any work is wasted."""
import json
import os
import shutil
import stat

import pytest
import torch

import svdllm
from svdllm.cli import main
from svdllm.data import load_text
from svdllm.errors import SvdllmError
from svdllm.io import MANIFEST_NAME
from tiny import tiny_model


def _cfg(data_dir, **kw):
    cal = svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir))
    return svdllm.CompressConfig(preset="paper", calibration=cal, cache_dir="", **kw)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_unit_interval(ratio, tok, data_dir):
    with pytest.raises(SvdllmError, match=r"outside \(0, 1\)"):
        svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir, ratio=ratio), progress=False)


def test_ratio_that_leaves_rank_zero(tok, data_dir):
    with pytest.raises(SvdllmError, match="rank 0.*lower --ratio"):
        svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir, ratio=0.999), progress=False)


def test_a_model_without_linears_is_refused_with_the_list(tok, data_dir):
    """GPT-2 keeps its projections in Conv1D modules: nothing a pattern could select."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=260))
    with pytest.raises(SvdllmError, match=r"no nn.Linear \(its weighted modules: Conv1D, LayerNorm\).*'gpt2' is not "
                                          r"supported.*llama.*mistral.*qwen2.*qwen3.*gemma3_text.*opt.*gpt_neox"):
        svdllm.compress(model, tok, _cfg(data_dir), progress=False)


def test_unknown_method(tok, data_dir):
    with pytest.raises(SvdllmError, match="Unknown method 'nope'.*svd-llm"):
        svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir, method="nope"), progress=False)


def test_unknown_calibration_source_is_named(tok, data_dir):
    with pytest.raises(SvdllmError, match="Calibration source 'wikitext3' is neither a corpus.*--calib-dataset"):
        cal = svdllm.CalibrationConfig(dataset="wikitext2,wikitext3", data_dir=str(data_dir))
        svdllm.compress(tiny_model("llama"), tok, svdllm.CompressConfig(preset="paper", calibration=cal), progress=False)


def test_missing_data_file_names_path(tmp_path, tok):
    (tmp_path / "wikitext2_raw").mkdir()
    with pytest.raises(SvdllmError, match=r"looked for .*wikitext2_raw/wiki\.valid\.raw"):
        svdllm.compress(tiny_model("llama"), tok, _cfg(tmp_path), progress=False)
    with pytest.raises(SvdllmError, match=r"ptb/ptb\.test\.txt"):
        load_text("ptb", "test", tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(SvdllmError, match="does not exist.*--data-dir"):
        load_text("wikitext2", "test", tmp_path / "absent")


def test_no_data_dir_and_no_network_fails_at_once(monkeypatch):
    import socket
    import time

    from svdllm.data.instructions import load_records

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.delenv("SVDLLM_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t = time.perf_counter()
    with pytest.raises(SvdllmError, match="hub is not reachable.*--data-dir"):
        load_text("wikitext2", "test", None)
    with pytest.raises(SvdllmError, match="hub is not reachable.*--data-dir"):
        load_records("alpaca", None)
    assert time.perf_counter() - t < 5  # no minute of retries


def test_existing_output_needs_overwrite(tok, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SvdllmError, match="already exists.*--overwrite"):
        svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir), out=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir), out=out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_output_under_a_file_is_refused_before_work(tok, data_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SvdllmError, match="Cannot create the parent"):
        svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir), out=tmp_path / "afile" / "out", progress=False)


@pytest.fixture()
def saved(tok, data_dir, tmp_path):
    out = tmp_path / "saved"
    svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir), out=out, progress=False)
    return out


def test_damaged_checkpoints(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(SvdllmError, match="damaged or truncated"):
        svdllm.load(broken)

    shutil.copytree(saved, tmp_path / "nomanifest")
    (tmp_path / "nomanifest" / MANIFEST_NAME).unlink()
    with pytest.raises(SvdllmError, match="not a model saved by svdllm"):
        svdllm.load(tmp_path / "nomanifest")

    shutil.copytree(saved, tmp_path / "badjson")
    (tmp_path / "badjson" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(SvdllmError, match="not valid JSON"):
        svdllm.load(tmp_path / "badjson")

    shutil.copytree(saved, tmp_path / "mismatch")
    m = json.loads((tmp_path / "mismatch" / MANIFEST_NAME).read_text())
    first = next(iter(m["ranks"]))
    m["ranks"][first] += 1
    (tmp_path / "mismatch" / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(SvdllmError, match="has shape"):
        svdllm.load(tmp_path / "mismatch")

    m["ranks"][first] = None  # the manifest says dense, the weights are factors
    (tmp_path / "mismatch" / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(SvdllmError, match="do not match its manifest"):
        svdllm.load(tmp_path / "mismatch")


def test_cli_prints_error_without_traceback(tmp_path, capsys):
    code = main(["compress", "--model", str(tmp_path / "no-such-model"), "--ratio", "0.4", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("svdllm: error: Model path") and "Traceback" not in err
    code = main(["compress", "--model", "x", "--ratio", "1.2", "--out", str(tmp_path / "o")])
    assert code == 2 and "outside (0, 1)" in capsys.readouterr().err


def test_nan_weights_are_caught(tok, data_dir):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(SvdllmError, match=r"model\.layers\.0"):
        svdllm.compress(model, tok, _cfg(data_dir), progress=False)


def test_tokenizer_of_another_model_is_named(tok, data_dir):
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    small_vocab = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(SvdllmError, match="tokenizer belongs to another model"):
        svdllm.compress(small_vocab, tok, _cfg(data_dir), progress=False)
    from svdllm.evaluation import perplexity

    with pytest.raises(SvdllmError, match="tokenizer belongs to another model"):
        perplexity(small_vocab, tok, "wikitext2", data_dir, 32, 1, progress=False)


def test_full_disk_during_save_leaves_nothing_behind(tok, data_dir, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(SvdllmError, match="No space left"):
        svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir), out=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_written_files_follow_the_umask(tok, data_dir, tmp_path):
    # atomic writes go through mkdtemp/mkstemp, which make private (0700/0600) paths; a saved model must not be
    old = os.umask(0o022)
    try:
        svdllm.compress(tiny_model("llama"), tok, _cfg(data_dir), out=tmp_path / "m", progress=False)
        from svdllm.io.results import merge_results

        merge_results(tmp_path / "m", "svdllm_eval.json", {"ppl": {"x": 1.0}})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "m", *(tmp_path / "m").iterdir()]}
    assert modes.pop("m") == 0o755 and modes["model.safetensors"] == modes["svdllm_eval.json"] == 0o644
    assert set(modes.values()) == {0o644}


def test_a_missing_extra_is_named(tmp_path, tok, data_dir, monkeypatch):
    import importlib

    import svdllm.utils.extras as extras
    from tiny import saved_tiny

    def without(name):
        if name.split(".")[0] in ("lm_eval", "peft", "torchao", "matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return importlib.import_module(name)

    monkeypatch.setattr(extras, "_import", without)
    model = saved_tiny(tmp_path / "m", "llama", tok)
    with pytest.raises(SvdllmError, match=r"Zero-shot evaluation \(--tasks\) needs lm-eval"):
        svdllm.evaluate(model, svdllm.EvalConfig(tasks=["piqa"], limit=2, data_dir=str(data_dir)), progress=False)
    with pytest.raises(SvdllmError, match="Quantization needs torchao"):
        svdllm.quantize(model, svdllm.QuantizeConfig(scheme="int8"), out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(SvdllmError, match=r"needs peft, .*pip install 'svdllm\[lora\]'"):
        extras.require("peft", "LoRA fine-tuning")
    assert not extras.available("matplotlib")
