"""The command line itself, on a tiny model saved as a Hugging Face directory: the flags map onto the library's
configs, each command prints its lines and --json its result, bad input exits with 2 and a message. What the
commands do is tested through the library they call (svdllm.compress, quantize, export, evaluate)."""
import json

import pytest

import svdllm
from svdllm.cli import build_parser, main
from tiny import saved_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return saved_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tok)


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_compress_several_ratios_then_eval(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["compress", "--model", str(model_dir), "--ratio", "0.2,0.5", "--nsamples", "3", "--seqlen", "48",
                 "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json",
                 "-q"])
    assert code == 0
    res = _last_json(capsys)
    assert [r["ratio"] for r in res["results"]] == [0.2, 0.5]
    assert res["results"][1]["model_after"] < res["results"][0]["model_after"] < res["results"][0]["model_before"]
    for r in ("0.2", "0.5"):
        manifest = json.loads((out / f"ratio-{r}" / "svdllm_manifest.json").read_text())
        # --preset best, with the closed-form update for the ratios from 0.5 up only
        update = "closed-form" if r == "0.5" else "none"
        assert (manifest["method"], manifest["alloc"], manifest["update"]) == ("kfac-svd", "global", update)

    code = main(["eval", "--model", str(out / "ratio-0.5"), "--ppl", "wikitext2,ptb,c4", "--seqlen", "128",
                 "--max-windows", "2", "--data-dir", str(data_dir), "--json", "-q"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ev = json.loads(lines[-1])
    assert ev["command"] == "eval" and ev["model"] == str(out / "ratio-0.5") and ev["compressed"]["ratio"] == 0.5
    assert set(ev["ppl"]) == {"wikitext2", "ptb", "c4"}
    for line, (name, r) in zip(lines, ev["ppl"].items()):  # one line per set, as each is measured
        assert r["windows"] == 2 and r["ppl"] > 1
        assert line == (f"{name}: perplexity {r['ppl']:.3f} over 2 windows of 128 tokens  "
                        f"[--max-windows 2 of {r['total_windows']}]")


def test_generate_and_listings(model_dir, capsys):
    from svdllm.evaluation.generation import generate_timed

    assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--json"]) == 0
    out = capsys.readouterr()
    greedy = json.loads(out.out.strip().splitlines()[-1])
    assert greedy["command"] == "generate" and greedy["new_tokens"] >= 1 and greedy["tokens_per_s"] > 0
    assert out.out.splitlines()[0] == greedy["text"] and "tokens/s, greedy" in out.err
    model, tok = svdllm.load_model(str(model_dir))
    first = generate_timed(model, tok, "hello", 5, sample=True)
    assert generate_timed(model, tok, "hello", 5, sample=True)["text"] == first["text"]  # sampling is seeded
    # the low-rank KV cache: refused on a dense model, the same text with fewer bytes on a compressed one
    with pytest.raises(svdllm.SvdllmError, match="low-rank KV cache needs a model compressed"):
        generate_timed(model, tok, "hello", kv_cache="low-rank")
    svdllm.compress(model, tok, svdllm.CompressConfig(preset="paper", method="svd", ratio=0.5), progress=False)
    runs = {kind: generate_timed(model, tok, "hello", 5, kv_cache=kind) for kind in ("dynamic", "low-rank")}
    assert runs["low-rank"]["text"] == runs["dynamic"]["text"]
    assert 0 < runs["low-rank"]["kv_cache_bytes"] < runs["dynamic"]["kv_cache_bytes"]
    assert main(["methods"]) == 0 and "svd-llm" in capsys.readouterr().out
    assert main(["allocators"]) == 0 and "uniform" in capsys.readouterr().out


def test_best_preset_adjusts_to_what_the_run_can_do():
    from svdllm.config import PRESETS, resolve_best

    best = {k: PRESETS["best"][k] for k in ("method", "alloc")}
    assert best == {"method": "kfac-svd", "alloc": "global"}
    assert resolve_best(best, set(), 10, 100) == (best, None)
    out, why = resolve_best(best, set(), 60, 100)  # float64 Grams above half of the free disk, float32 below
    assert out == {**best, "gram_dtype": "float32"} and "stored in float32" in why
    out, why = resolve_best(best, set(), 120, 100)  # not even in float32: the next best method
    assert out == {"method": "svd-llm", "alloc": "global"} and "Grams" in why and "disk" in why
    assert resolve_best({**best, "gram_dtype": "float64"}, {"gram_dtype"}, 60, 100)[0]["method"] == "svd-llm"
    assert resolve_best(best, {"method"}, 120, 100) == (best, None)  # named by the user: kept
    assert resolve_best(best, set(), 10**15, None) == (best, None)  # free disk unknown: not second-guessed


def _compress(model_dir, data_dir, out, **kw):
    model, tok = svdllm.load_model(str(model_dir))
    cal = svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir))
    return svdllm.compress(model, tok, svdllm.CompressConfig(calibration=cal, **kw), out=out, progress=False)


def test_best_preset_falls_back_when_the_grams_do_not_fit(model_dir, data_dir, tmp_path, monkeypatch, caplog):
    import svdllm.pipeline as pipeline

    monkeypatch.setattr(pipeline, "free_disk", lambda path: 1024)
    _compress(model_dir, data_dir, tmp_path / "r", ratio=0.5, cache_dir="")
    manifest = json.loads((tmp_path / "r" / "svdllm_manifest.json").read_text())
    assert (manifest["method"], manifest["alloc"], manifest["update"]) == ("svd-llm", "global", "none")
    assert "--preset best: kfac-svd's output-gradient Grams need" in caplog.text


def test_best_preset_stores_the_grams_in_float32_when_float64_does_not_fit(model_dir, data_dir, tmp_path, monkeypatch,
                                                                           caplog):
    import torch
    from safetensors.torch import load_file

    import svdllm.pipeline as pipeline

    monkeypatch.setattr(pipeline, "output_gram_bytes", lambda model: 60)
    monkeypatch.setattr(pipeline, "free_disk", lambda path: 100)
    cache = str(tmp_path / "cache")
    _compress(model_dir, data_dir, tmp_path / "f32", ratio=0.4, cache_dir=cache)
    assert "they are stored in float32" in caplog.text
    # named by the user, float64 is kept whatever the disk
    _compress(model_dir, data_dir, tmp_path / "f64", ratio=0.4, cache_dir=cache, gram_dtype="float64", method="kfac-svd")
    for name, dtype in (("f32", "float32"), ("f64", "float64")):
        manifest = json.loads((tmp_path / name / "svdllm_manifest.json").read_text())
        assert (manifest["method"], manifest["alloc"]) == ("kfac-svd", "global")
        assert manifest["gram_dtype"] == dtype
    single = sorted(tmp_path.glob("cache/**/gradient_pass_2_grams/layer_*.safetensors"))
    half = sorted(tmp_path.glob("cache/**/gradient_pass_2_grams_float32/layer_*.safetensors"))
    assert single and len(half) == len(single)
    for a, b in zip(half, single):  # the same float64 sums, rounded once
        ta, tb = load_file(a), load_file(b)
        grams = [k for k in tb if k.startswith("gram.")]
        assert grams and all(ta[k].dtype == torch.float32 and torch.equal(ta[k], tb[k].float()) for k in grams)


@pytest.mark.parametrize("kw, update", [({"ratio": 0.4}, "none"), ({"ratio": 0.6, "update": "none"}, "none")])
def test_best_preset_takes_the_closed_form_update_only_from_r_one_half(kw, update, model_dir, data_dir, tmp_path):
    _compress(model_dir, data_dir, tmp_path / "r", cache_dir=str(tmp_path / "cache"), **kw)
    assert json.loads((tmp_path / "r" / "svdllm_manifest.json").read_text())["update"] == update


def test_demo_shows_dense_paper_and_default_at_the_same_size(model_dir, data_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(model_dir), "--ratio", "0.4", "--nsamples", "3", "--seqlen", "48",
                 "--grad-samples", "2", "--max-windows", "1", "--max-new-tokens", "4", "--calib-dataset", "wikitext2",
                 "--data-dir", str(data_dir), "--out", str(tmp_path / "demo"), "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    dense, paper, best = res["rows"]
    assert dense["model"] == "dense" and "svd-llm + uniform" in paper["model"] and "kfac-svd + global" in best["model"]
    assert dense["params"] > paper["params"] and dense["params"] > best["params"]
    # the same budget: each removes the ratio of the projections' parameters (uniform ranks round down)
    assert 0.4 <= best["achieved_ratio"] <= paper["achieved_ratio"] < 0.45
    assert all(r["windows"] == 1 and r["ppl"] > 1 for r in res["rows"])
    assert "| model | parameters | of the projections removed | WikiText-2 ppl |" in out
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["rows"] == res["rows"]


def test_quantize_and_export_commands_print_and_return_what_the_library_did(model_dir, tmp_path, capsys):
    small = tmp_path / "small"
    svdllm.compress(*svdllm.load_model(str(model_dir)), svdllm.CompressConfig(preset="paper", method="svd", ratio=0.5),
                    out=small, progress=False)
    assert main(["quantize", "--model", str(small), "--scheme", "int4", "--group-size", "16", "--out",
                 str(tmp_path / "q"), "--json", "-q"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    q = json.loads(lines[-1])
    manifest = json.loads((tmp_path / "q" / "svdllm_manifest.json").read_text())
    assert q == {"command": "quantize", "model": str(small), "out": str(tmp_path / "q"),
                 "bytes_on_disk": q["bytes_on_disk"],
                 **{k: v for k, v in manifest["quantization"].items() if k != "groups"}}
    assert lines[0].startswith(f"int4 (rtn, ") and lines[0].endswith(f"MiB of weights on disk; saved to {tmp_path / 'q'}")
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == {"command": "export", "format": "compressed-tensors", "run_dir": str(tmp_path / "q"),
                                     "out": str(tmp_path / "ct"), "bytes_on_disk": json.loads(lines[-1])["bytes_on_disk"]}
    assert lines[0].startswith(f"compressed-tensors export of {tmp_path / 'q'}: ") and "trust_remote_code=True" in lines[0]
    # bad input: the message and exit code 2, nothing written
    assert main(["export", str(small), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdllm: error: Say which form to export: --dense") and not (tmp_path / "x").exists()


def test_calibration_flags_are_declared_once_with_the_config_defaults(tmp_path):
    from svdllm.cli import _calibration_config

    parser = build_parser()
    default = svdllm.CalibrationConfig()
    args = parser.parse_args(["compress", "--model", "m", "--out", "o"])
    assert _calibration_config(args) == default
    args = parser.parse_args(["compress", "--model", "m", "--out", "o", "--calib-dataset", "ptb,c4", "--nsamples", "5",
                              "--seqlen", "16", "--seed", "3", "--batch-size", "2", "--grad-samples", "1",
                              "--calib-mode", "sequential", "--data-dir", str(tmp_path)])
    assert _calibration_config(args) == svdllm.CalibrationConfig("ptb,c4", 5, 16, 3, 2, "sequential", str(tmp_path), 1)
    # quantize reads gptq's four; the rest keep the config's defaults
    args = parser.parse_args(["quantize", "--model", "m", "--out", "o", "--nsamples", "4"])
    assert _calibration_config(args) == svdllm.CalibrationConfig(nsamples=4)
    # the demo's smaller calibration is its own default
    args = parser.parse_args(["demo"])
    assert _calibration_config(args) == svdllm.CalibrationConfig(dataset="wikitext2,alpaca", nsamples=16, seqlen=1024,
                                                                 grad_samples=4)
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--model", "m", "--out", "o", "--calib-mode", "random"])
