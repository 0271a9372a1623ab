"""The command line, end to end on a tiny model saved as a Hugging Face directory."""
import json

import pytest

from svdllm.cli import main
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
    ev = _last_json(capsys)
    assert set(ev["ppl"]) == {"wikitext2", "ptb", "c4"}
    for r in ev["ppl"].values():
        assert r["windows"] == 2 and r["ppl"] > 1


def test_generate_and_listings(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--json"]) == 0
    greedy = _last_json(capsys)
    assert greedy["new_tokens"] >= 1 and greedy["tokens_per_s"] > 0
    args = ["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--json", "--sample"]
    assert main(args) == 0
    first = _last_json(capsys)
    assert main(args) == 0
    assert _last_json(capsys)["text"] == first["text"]  # sampling is seeded
    # the low-rank KV cache: refused on a dense model, the same text with fewer bytes on a compressed one
    assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--kv-cache", "low-rank"]) == 2
    assert "low-rank KV cache needs a model compressed" in capsys.readouterr().err
    small = model_dir.parent / "small-qwen2"
    assert main(["compress", "--model", str(model_dir), "--preset", "paper", "--method", "svd", "--ratio", "0.5", "--out", str(small),
                 "--overwrite", "-q"]) == 0
    capsys.readouterr()
    runs = {}
    for kind in ("dynamic", "low-rank"):
        assert main(["generate", "--model", str(small), "--prompt", "hello", "--max-new-tokens", "5", "--json",
                     "--kv-cache", kind]) == 0
        runs[kind] = _last_json(capsys)
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


def test_best_preset_falls_back_when_the_grams_do_not_fit(model_dir, data_dir, tmp_path, capsys, monkeypatch, caplog):
    import svdllm.pipeline as pipeline

    monkeypatch.setattr(pipeline, "free_disk", lambda path: 1024)
    assert main(["compress", "--model", str(model_dir), "--ratio", "0.5", "--nsamples", "2", "--seqlen", "32",
                 "--data-dir", str(data_dir), "--no-cache", "--out", str(tmp_path / "r"), "-q"]) == 0
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
    args = ["compress", "--model", str(model_dir), "--ratio", "0.4", "--nsamples", "2", "--seqlen", "32",
            "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(args + ["--out", str(tmp_path / "f32")]) == 0
    assert "they are stored in float32" in caplog.text
    # named by the user, float64 is kept whatever the disk
    assert main(args + ["--gram-dtype", "float64", "--method", "kfac-svd", "--out", str(tmp_path / "f64")]) == 0
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


@pytest.mark.parametrize("args, update", [(["--ratio", "0.4"], "none"),
                                          (["--ratio", "0.6", "--update", "none"], "none")])
def test_best_preset_takes_the_closed_form_update_only_from_r_one_half(args, update, model_dir, data_dir, tmp_path):
    assert main(["compress", "--model", str(model_dir), *args, "--nsamples", "2", "--seqlen", "32", "--data-dir",
                 str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r"), "-q"]) == 0
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
