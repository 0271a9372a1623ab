"""Zero-shot accuracy through lm-eval on local data, checked against an independent log-likelihood computation."""
import json

import pytest
import torch

from svdllm.cli import main
from svdllm.errors import SvdllmError
from svdllm.evaluation.report import compare
from svdllm.evaluation.zeroshot import local_task_file, markdown_table, zero_shot
from tiny import tiny_model


@torch.no_grad()
def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _by_hand(model, tok, docs):
    """acc and acc_norm as lm-eval defines them: argmax of the log-likelihood of ' ' + choice after the prompt,
    and of the same divided by the choice's length in characters."""
    acc = norm = 0
    for context, choices, gold in docs:
        ll = [_loglik(model, tok, context, " " + c) for c in choices]
        acc += max(range(len(ll)), key=ll.__getitem__) == gold
        norm += max(range(len(ll)), key=lambda i: ll[i] / len(choices[i])) == gold
    return acc / len(docs), norm / len(docs)


def test_lm_eval_scores_equal_an_independent_computation(tok, data_dir, tmp_path):
    model = tiny_model("llama")
    res = zero_shot(model, tok, ["piqa", "arc_easy"], data_dir, limit=6, cache=tmp_path)
    piqa = [json.loads(line) for line in (data_dir / "piqa" / "valid.jsonl").read_text().splitlines()][:6]
    labels = [int(x) for x in (data_dir / "piqa" / "valid-labels.lst").read_text().split()]
    docs = [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], labels[i]) for i, d in enumerate(piqa)]
    assert (res["tasks"]["piqa"]["acc"], res["tasks"]["piqa"]["acc_norm"]) == pytest.approx(_by_hand(model, tok, docs))
    arc = [json.loads(line) for line in (data_dir / "arc_easy" / "ARC-Easy-Test.jsonl").read_text().splitlines()][:6]
    docs = [(f"Question: {d['question']['stem']}\nAnswer:", [c["text"] for c in d["question"]["choices"]],
             "ABCD".index(d["answerKey"])) for d in arc]
    got = res["tasks"]["arc_easy"]
    assert (got["acc"], got["acc_norm"]) == pytest.approx(_by_hand(model, tok, docs))
    assert got["n"] == 6 and res["limit"] == 6
    assert res["average_acc"] == pytest.approx((res["tasks"]["piqa"]["acc"] + got["acc"]) / 2)


def test_missing_task_file_is_named(data_dir, tmp_path):
    with pytest.raises(SvdllmError, match="hellaswag_val.jsonl is missing"):
        local_task_file("hellaswag", data_dir, tmp_path)
    with pytest.raises(SvdllmError, match="available offline"):
        local_task_file("no_such_task", data_dir, tmp_path)


def test_eval_tasks_missing_file_fails_before_loading(data_dir):
    import svdllm

    with pytest.raises(SvdllmError, match="winogrande_xl_validation.jsonl is missing"):
        svdllm.evaluate("/nonexistent", svdllm.EvalConfig(tasks=["winogrande"], data_dir=str(data_dir)))


def test_real_task_files_convert(shared_data, tmp_path):
    """Every paper task converts from the shared copies into the schema lm-eval's task expects."""
    expected = {"piqa": ("goal", 1838), "arc_easy": ("question", 2376), "arc_challenge": ("question", 1172),
                "openbookqa": ("question_stem", 500), "winogrande": ("sentence", 1267),
                "hellaswag": ("ctx_a", 10042), "mathqa": ("Problem", 2985)}
    for task, (key, n) in expected.items():
        rows = (local_task_file(task, shared_data, tmp_path)).read_text().splitlines()
        assert len(rows) == n and key in json.loads(rows[0])


def test_bench_tiny_compressed_against_dense(tok, data_dir, tmp_path, capsys):
    import svdllm

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    config = svdllm.CompressConfig(preset="paper", ratio=0.5, cache_dir="",
                                   calibration=svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir)))
    svdllm.compress(model, tok, config, out=tmp_path / "small", progress=False)
    assert main(["bench", "--model", str(tmp_path / "small"), "--baseline", str(tmp_path / "dense"),
                 "--batch-sizes", "1,2", "--prompt-lens", "8,16", "--new-tokens", "4", "--repeats", "1",
                 "--rounds", "2", "--kv-lengths", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["result"]["rows"]
    assert [(r["batch"], r["prompt_len"]) for r in rows] == [(1, 8), (1, 16), (2, 8), (2, 16)]
    for r in rows:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["prefill_speedup"] > 0
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] > 0
        assert len(r["prefill_speedup_rounds"]) == len(r["decode_speedup_rounds"]) == 2
    assert out["result"]["rounds"] == out["dense"]["rounds"] == 2
    assert out["result"]["params"] < out["dense"]["params"] and out["result"]["disk_bytes"] > 0
    assert 0 < out["result"]["params_ratio"] < 1 and 0 < out["result"]["disk_ratio"] < 1
    (kv,) = out["result"]["kv_cache"]
    assert kv["tokens"] == 64 and 0 < kv["low_rank_bytes"] < kv["dynamic_bytes"]
    assert out["dense"]["kv_cache"][0]["dynamic_bytes"] == kv["dynamic_bytes"]
    # the result is kept in the model directory, and `compare` plots it against the dense run (paper's Figure 3)
    kept = json.loads((tmp_path / "small" / "svdllm_bench.json").read_text())
    assert kept["baseline"] == str(tmp_path / "dense") and kept["result"] == out["result"] and kept["machine"]["cores"]
    cmp = compare([tmp_path / "small"], tmp_path / "cmp")
    assert [len(r["bench"]) for r in cmp["rows"]] == [4] and cmp["rows"][0]["bench_dense_model"] == str(tmp_path / "dense")
    for name in ("throughput_vs_batch.png", "throughput_vs_seqlen.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 1000


def test_bench_ratios_are_medians_of_per_round_ratios():
    from svdllm.evaluation.bench import merge_rounds, with_ratios

    def run(prefill, decode, mem):
        return {"params": 10, "rows": [{"batch": 1, "prompt_len": 8, "prefill_tok_s": prefill, "decode_tok_s": decode,
                                        "peak_mem_mb": mem}], "kv_cache": []}

    # the machine slows down 2x in round 2 and 4x in round 3, for both models alike
    dense = [run(100, 10, 50), run(50, 5, 50), run(25, 2.5, 60)]
    small = [run(150, 12, 40), run(75, 6, 41), run(37.5, 3, 45)]
    (row,) = with_ratios(small, dense)
    assert row["prefill_speedup"] == pytest.approx(1.5) and row["decode_speedup"] == pytest.approx(1.2)
    assert row["prefill_speedup_rounds"] == pytest.approx([1.5, 1.5, 1.5])
    assert row["peak_mem_ratio"] == pytest.approx(0.8)  # median of 0.8, 0.82, 0.75
    assert row["prefill_tok_s"] == 75 and row["peak_mem_mb"] == 41
    merged = merge_rounds(dense)
    assert merged["rounds"] == 3 and merged["rows"][0]["decode_tok_s"] == 5


@pytest.mark.parametrize("args,message", [(["--batch-sizes", "a"], "take integers separated by commas"),
                                          (["--new-tokens", "1"], "--new-tokens must be at least 2"),
                                          (["--rounds", "0"], "--repeats and --rounds must be at least 1")])
def test_cli_bench_bad_sizes(args, message, capsys):
    assert main(["bench", "--model", "x", *args]) == 2
    assert message in capsys.readouterr().err


def test_markdown_table_with_and_without_stderr():
    from svdllm.evaluation.zeroshot import markdown_table

    result = {"tasks": {"piqa": {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.6, "acc_norm_stderr": None, "n": 1},
                        "arc_easy": {"acc": 0.25, "acc_stderr": None, "n": 1}},
              "average_acc": 0.375, "average_acc_norm_or_acc": 0.425, "limit": 1}
    table = markdown_table(result)
    assert "| piqa | 1 | 0.5000 ± 0.0100 | 0.6000 |" in table
    assert "| arc_easy | 1 | 0.2500 | – |" in table
    assert "--limit 1" in table


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_decode_steps_continue_the_greedy_generation(family):
    """The timed decode loop is the generation itself: its tokens are those of model.generate (sliding-window
    Gemma cache included)."""
    from svdllm.evaluation import bench

    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    tokens = []
    real_forward = model.forward

    def spy(*a, **k):
        out = real_forward(*a, **k)
        tokens.append(out.logits[:, -1].argmax(-1))
        return out

    model.forward = spy
    with torch.no_grad():
        bench._decode_seconds(model, ids, 4, torch.device("cpu"))
    model.forward = real_forward
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                          do_sample=False, pad_token_id=0)[:, 9:]
    assert torch.equal(torch.stack(tokens, 1), want)
    rows = bench.measure(model, (1,), (8,), new_tokens=3, repeats=2)
    assert rows[0]["decode_tok_s"] > 0 and rows[0]["prefill_tok_s"] > 0


@pytest.fixture
def scored(monkeypatch):
    """The number of requests of every batch lm-eval's HFLM scores, in order."""
    from lm_eval.models.huggingface import HFLM

    counts = []
    real = HFLM._loglikelihood_tokens

    def counting(self, requests, *args, **kwargs):
        counts.append(len(requests))
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", counting)
    return counts


def test_interrupted_zero_shot_resumes_from_the_scored_requests(tok, data_dir, tmp_path, scored):
    model = tiny_model("llama")
    zero_shot(model, tok, ["piqa"], data_dir, limit=3, cache=tmp_path)  # stands for a run stopped after 3 questions
    assert scored == [6]  # 2 choices each
    resumed = zero_shot(model, tok, ["piqa"], data_dir, limit=6, cache=tmp_path)
    assert scored[1:] == [6]  # only the 3 new questions were scored
    fresh = zero_shot(model, tok, ["piqa"], data_dir, limit=6, cache=tmp_path, resume=False)
    assert scored[2:] == [12]
    assert resumed["tasks"] == fresh["tasks"]
    other = tiny_model("llama", seed=1)  # other weights never read the first model's answers
    zero_shot(other, tok, ["piqa"], data_dir, limit=3, cache=tmp_path)
    assert scored[3:] == [6]


def test_aggregate_from_document_scores_equals_lm_eval_own(tok, data_dir, tmp_path):
    """acc, acc_norm and their stderr, aggregated by us from the per-document scores, are lm-eval's own numbers
    for one ordinary run of the same documents."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from svdllm.evaluation.zeroshot import task_config

    model = tiny_model("llama", seed=3)
    ours = zero_shot(model, tok, ["piqa", "arc_easy"], data_dir, limit=7, cache=tmp_path / "a")
    manager = TaskManager()
    configs = [task_config(t, local_task_file(t, data_dir, tmp_path / "b"), manager) for t in ("piqa", "arc_easy")]
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=configs,
                                     task_manager=manager, num_fewshot=0, limit=7, log_samples=False)["results"]
    for t in ("piqa", "arc_easy"):
        for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert ours["tasks"][t][m] == pytest.approx(theirs[t][f"{m.replace('_stderr', '')}"
                                                                  f"{'_stderr' if 'stderr' in m else ''},none"])
        assert ours["tasks"][t]["n"] == 7 and ours["tasks"][t]["complete"]


def test_shards_on_different_machines_add_up_to_one_run(tok, data_dir, tmp_path, scored):
    """Two shards scored with separate caches (as on two machines) into one scores directory give the numbers of
    one unsharded run; a third run finds every document scored and scores nothing."""
    model = tiny_model("llama", seed=4)
    scores = tmp_path / "scores"
    half = zero_shot(model, tok, ["piqa"], data_dir, cache=tmp_path / "m1", shard=(0, 2), scores_dir=scores)
    assert scored == [8] and half["tasks"]["piqa"]["n"] == 4 and not half["complete"]  # documents 0, 2, 4, 6
    assert "partial" in markdown_table(half)
    full = zero_shot(model, tok, ["piqa"], data_dir, cache=tmp_path / "m2", shard=(1, 2), scores_dir=scores)
    assert scored[1:] == [8] and full["complete"] and full["tasks"]["piqa"]["n"] == 8
    again = zero_shot(model, tok, ["piqa"], data_dir, cache=tmp_path / "m3", scores_dir=scores)
    assert scored[2:] == []
    one_run = zero_shot(model, tok, ["piqa"], data_dir, cache=tmp_path / "m4", resume=False)
    assert again["tasks"] == full["tasks"] == one_run["tasks"]
    with pytest.raises(SvdllmError, match="another model"):  # another model's scores are never mixed in
        zero_shot(tiny_model("llama", seed=5), tok, ["piqa"], data_dir, cache=tmp_path / "m5", scores_dir=scores)


def test_cli_shard_must_be_k_of_n(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["eval", "--model", "x", "--tasks", "piqa", "--shard", "2/2"])
    assert e.value.code == 2
    assert "expected K/N with 0 <= K < N" in capsys.readouterr().err


def test_eval_one_task_at_a_time_adds_up_and_compare_reads_json(tok, data_dir, tmp_path, monkeypatch):
    """Long evaluations run one task per call: the model directory keeps every task and averages over all of
    them, and `compare` builds the same rows from the JSON files `svdllm eval --json` writes (the command and
    svdllm.evaluate's result), the dense model included."""
    import svdllm

    monkeypatch.setenv("SVDLLM_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    config = svdllm.CompressConfig(preset="paper", ratio=[0.3, 0.5], cache_dir="",
                                   calibration=svdllm.CalibrationConfig(nsamples=2, seqlen=32, data_dir=str(data_dir)))
    svdllm.compress(model, tok, config, out=tmp_path / "run", progress=False)
    files = []
    for name, path in [("dense", tmp_path / "dense"), ("r3", tmp_path / "run" / "ratio-0.3"),
                       ("r5", tmp_path / "run" / "ratio-0.5")]:
        for what in (["--tasks", "piqa"], ["--tasks", "arc_easy"], ["--ppl", "wikitext2"]):
            config = svdllm.EvalConfig(seqlen=64, max_windows=2, data_dir=str(data_dir))
            if what[0] == "--ppl":
                config.ppl = [what[1]]
            else:
                config.tasks, config.limit = [what[1]], 4
            res = svdllm.evaluate(path, config, progress=False)
            files.append(tmp_path / f"{name}-{what[1]}.json")
            files[-1].write_text(json.dumps({"command": "eval", **res}, default=str))
            if what[0] == "--tasks":  # tasks asked, no --ppl: no perplexity scored
                assert json.loads(files[-1].read_text())["ppl"] == {}
    kept = json.loads((tmp_path / "run" / "ratio-0.5" / "svdllm_eval.json").read_text())["zero_shot[limit=4]"]
    assert set(kept["tasks"]) == {"piqa", "arc_easy"}
    assert kept["average_acc"] == pytest.approx((kept["tasks"]["piqa"]["acc"] + kept["tasks"]["arc_easy"]["acc"]) / 2)
    last = json.loads(files[-2].read_text())
    assert last["compressed"]["ratio"] == 0.5 and last["compressed"]["method"] == "svd-llm"
    assert json.loads(files[0].read_text())["compressed"] is None

    from_json = compare(files, tmp_path / "cmp")["rows"]
    assert [(r["method"], r["ratio"]) for r in from_json] == [("dense", 0.0), ("svd-llm", 0.3), ("svd-llm", 0.5)]
    assert from_json[0]["params"] > from_json[1]["params"] > from_json[2]["params"]
    from_dirs = compare([tmp_path / "run"], tmp_path / "cmp2")["rows"]
    for a, b in zip(from_json[1:], from_dirs):
        assert a["zero_shot"] == b["zero_shot"] and a["zero_shot"]["key"] == "zero_shot[limit=4]"
        assert a["ppl"] == b["ppl"] and a["params"] == b["params"]
    for name in ("ppl_vs_ratio.png", "zero_shot_vs_ratio.png", "compare.md"):
        assert (tmp_path / "cmp" / name).stat().st_size > 100
    assert "| dense |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_names_a_bad_json(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"command": "bench"}))
    with pytest.raises(SvdllmError, match="bench.json is not the output of `svdllm eval --json`"):
        compare([tmp_path / "bench.json"], tmp_path / "cmp")
    (tmp_path / "gone.json").write_text(json.dumps({"command": "eval", "model": "runs/gone/ratio-0.2", "ppl": {}}))
    with pytest.raises(SvdllmError, match="recreate that directory"):
        compare([tmp_path / "gone.json"], tmp_path / "cmp")
    # an older file of a hub model (one "/": org/name) is read as a dense model
    (tmp_path / "hub.json").write_text(json.dumps({"command": "eval", "model": "org/name",
                                                   "ppl": {"wikitext2": {"ppl": 9.5, "windows": 2, "total_windows": 2}}}))
    (row,) = compare([tmp_path / "hub.json"], tmp_path / "cmp")["rows"]
    assert row["method"] == "dense" and row["ppl"]["wikitext2"]["ppl"] == 9.5


def test_paired_difference_against_an_independent_computation(tmp_path):
    import numpy as np

    from svdllm.evaluation.zeroshot import DocScores, paired_difference, read_scores

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 300).astype(float)
    b = np.where(rng.random(300) < 0.8, a, 1 - a)  # b mostly agrees with a, as two models of one family do
    header = {"task": "piqa", "model": "m", "data": "d", "lm_eval": "v"}
    files = []
    for name, xs in (("a", a), ("b", b)):
        s = DocScores(tmp_path / f"{name}.jsonl", {**header, "model": name})
        s.add([{"doc_id": i, "acc": float(x), "acc_norm": None} for i, x in enumerate(xs) if not (name == "b" and i == 7)])
        files.append(read_scores(s.path))
    r = paired_difference(*files)
    keep = np.arange(300) != 7  # only the documents both scored
    d = a[keep] - b[keep]
    assert r["n"] == 299
    assert r["diff"] == pytest.approx(d.mean())
    assert r["stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    unpaired = np.sqrt(a[keep].var(ddof=1) / 299 + b[keep].var(ddof=1) / 299)
    assert r["stderr"] < unpaired  # correlated answers: pairing removes the shared part of the noise
    assert paired_difference(files[0], files[0]) == {"n": 300, "diff": 0.0, "stderr": 0.0}
    assert paired_difference(files[0], files[1], "acc_norm")["n"] == 0  # no acc_norm recorded: nothing to pair
