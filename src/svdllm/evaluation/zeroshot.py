"""Zero-shot accuracy with lm-evaluation-harness, on the local copies of the task data (no hub).

lm-eval's own task definitions (prompt, choices, target, metrics) are used unchanged; only their dataset is
swapped for a JSON-lines file in the Hugging Face schema the task expects, converted once from the files in the
data directory (../shared/data: the original releases, whose layout differs from the hub's). The model is the
loaded object itself, wrapped by lm-eval's HFLM, so a compressed model is scored exactly like a dense one.

A full run of the seven tasks is hours on a CPU (HellaSwag alone is 40,000 scored continuations), so it is kept
in two layers, both tied to a fingerprint of the model's weights (a run on another model never reads them):
- every scored request, as it completes, in lm-eval's response database (an interrupted run on this machine
  loses almost nothing);
- every scored document's acc / acc_norm, in a small JSON-lines file per task (`DocScores`), written after each
  chunk of documents. That file is portable: a task set can be scored in pieces (`shard`), by several processes
  or on different days and machines, and the result is aggregated from it exactly as lm-eval aggregates one run
  (the mean, and the standard error of the mean).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import SvdllmError
from ..utils.atomic import atomic_path
from .resume import weights_fingerprint

log = logging.getLogger(__name__)

PAPER_TASKS = ["openbookqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "piqa", "mathqa"]


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _ai2(path: Path, stem_key: str) -> Iterator[dict]:
    """AI2's original ARC / OpenBookQA records → the hub schema (choices as parallel text/label lists)."""
    for r in _jsonl(path):
        q = r["question"]
        yield {"id": r["id"], stem_key: q["stem"],
               "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
               "answerKey": r["answerKey"]}


def _piqa(d: Path) -> Iterator[dict]:
    labels = [int(x) for x in (d / "valid-labels.lst").read_text().split()]
    docs = list(_jsonl(d / "valid.jsonl"))
    if len(labels) != len(docs):
        raise SvdllmError(f"{d}: {len(docs)} PIQA questions but {len(labels)} labels; the copy is damaged.")
    for doc, label in zip(docs, labels):
        yield {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": label}


def _mathqa(d: Path) -> Iterator[dict]:
    yield from json.loads((d / "test.json").read_text(encoding="utf-8"))


# task -> (folder, the files it reads, converter)
LOCAL: dict[str, tuple[str, tuple[str, ...], Callable[[Path], Iterator[dict]]]] = {
    "piqa": ("piqa", ("valid.jsonl", "valid-labels.lst"), _piqa),
    "arc_easy": ("arc_easy", ("ARC-Easy-Test.jsonl",), lambda d: _ai2(d / "ARC-Easy-Test.jsonl", "question")),
    "arc_challenge": ("arc_challenge", ("ARC-Challenge-Test.jsonl",),
                      lambda d: _ai2(d / "ARC-Challenge-Test.jsonl", "question")),
    "openbookqa": ("openbookqa", ("test.jsonl",), lambda d: _ai2(d / "test.jsonl", "question_stem")),
    "winogrande": ("winogrande", ("winogrande_xl_validation.jsonl",),
                   lambda d: _jsonl(d / "winogrande_xl_validation.jsonl")),
    "hellaswag": ("hellaswag", ("hellaswag_val.jsonl",), lambda d: _jsonl(d / "hellaswag_val.jsonl")),
    "mathqa": ("mathqa", ("test.json",), _mathqa),
}


# accuracy of guessing: 1 / number of choices (ARC has a few questions with 3 or 5; 4 is the rule)
CHANCE = {"openbookqa": 1 / 4, "arc_easy": 1 / 4, "arc_challenge": 1 / 4, "winogrande": 1 / 2, "hellaswag": 1 / 4,
          "piqa": 1 / 2, "mathqa": 1 / 5}


def local_task_file(task: str, data_dir: str | os.PathLike, cache: str | os.PathLike) -> Path:
    """The task's evaluation split as hub-schema JSON lines (converted once, written atomically)."""
    if task not in LOCAL:
        raise SvdllmError(f"No local data for task {task!r}; available offline: {', '.join(LOCAL)}.")
    folder, files, convert = LOCAL[task]
    src = Path(data_dir) / folder
    for f in files:
        if not (src / f).exists():
            raise SvdllmError(f"Task {task}: {src / f} is missing. Point --data-dir (or $SVDLLM_DATA_DIR) at a "
                              "folder with the shared data layout (see ../shared/data/README.md).")
    out = Path(cache) / f"{task}.jsonl"
    if out.exists() and out.stat().st_mtime >= max((src / f).stat().st_mtime for f in files):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in convert(src):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out


def task_config(task: str, path: Path, manager) -> dict:
    """lm-eval's registered config for `task`, reading `path` as its only (test) split."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise SvdllmError(f"lm-eval has no task {task!r}; try one of {', '.join(PAPER_TASKS)}.")
    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    cfg.update(task=task, dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": str(path)}},
               test_split="test", validation_split=None, training_split=None, fewshot_split=None, num_fewshot=0)
    cfg.pop("include", None)
    return cfg


class DocScores:
    """The per-document scores of one task on one model: a header line (task, model fingerprint, digest of the
    task file, lm-eval version), then one `[doc_id, acc, acc_norm]` line per scored document. Writers merge with
    what is on disk under a lock, so shards scored by concurrent processes all land."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = Path(path), header
        self.scores: dict[int, list] = {}
        if self.path.exists():
            self.scores = self._read()

    def _read(self) -> dict[int, list]:
        return read_scores(self.path, self.header)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: one writer at a time is then the user's job
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, samples: list[dict]) -> None:
        with self._locked():
            if self.path.exists():
                self.scores = {**self._read(), **self.scores}
            for ex in samples:
                self.scores[int(ex["doc_id"])] = [ex["acc"], ex.get("acc_norm")]
            with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.header) + "\n")
                for i in sorted(self.scores):
                    f.write(json.dumps([i, *self.scores[i]]) + "\n")

    def aggregate(self, docs: list[int]) -> dict:
        """lm-eval's aggregate over the scored documents among `docs`: mean, and stderr = sample stdev / sqrt(n)."""
        rows = [self.scores[i] for i in docs if i in self.scores]
        out = {"n": len(rows)}
        for k, name in enumerate(("acc", "acc_norm")):
            xs = [float(r[k]) for r in rows if r[k] is not None]
            if not xs or len(xs) < len(rows):
                continue
            mean = sum(xs) / len(xs)
            out[name] = mean
            out[f"{name}_stderr"] = (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
                                     if len(xs) > 1 else None)
        return out


def read_scores(path: str | os.PathLike, header: dict | None = None) -> dict[int, list]:
    """The per-document scores of a `DocScores` file, `{doc_id: [acc, acc_norm]}`. With `header`, only if the file
    was written for that task, model, task file and lm-eval version (otherwise a clear error)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    have = json.loads(lines[0]) if lines else {}
    for key in ("task", "model", "data", "lm_eval") if header else ():
        if have.get(key) != header[key]:
            raise SvdllmError(
                f"{path} holds scores of {key} {have.get(key)!r}, not {header[key]!r} (another model, "
                "task file or lm-eval version): give this run another --scores-dir, or delete that file.")
    return {int(r[0]): r[1:] for r in map(json.loads, lines[1:])}


def paired_difference(a: dict[int, list], b: dict[int, list], metric: str = "acc") -> dict:
    """Mean of a - b over the documents both models scored, with the standard error of that mean.

    Two models answer the same documents, so their errors are correlated: the stderr of the paired difference,
    stdev(a_i - b_i) / sqrt(n), is below sqrt(se_a² + se_b²) as far as the two agree more often than independent
    guesses would, and it is the one that says whether a gap between two rows of a table is more than noise."""
    k = ("acc", "acc_norm").index(metric)
    docs = sorted(i for i in a.keys() & b.keys() if a[i][k] is not None and b[i][k] is not None)
    d = [float(a[i][k]) - float(b[i][k]) for i in docs]
    if len(d) < 2:
        return {"n": len(d), "diff": d[0] if d else None, "stderr": None}
    mean = sum(d) / len(d)
    return {"n": len(d), "diff": mean,
            "stderr": math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))}


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def zero_shot(model, tokenizer, tasks: list[str], data_dir: str | os.PathLike | None = None,
              limit: int | None = None, batch_size: int = 1, cache: str | os.PathLike | None = None,
              resume: bool = True, shard: tuple[int, int] | None = None,
              scores_dir: str | os.PathLike | None = None, chunk: int = 1000) -> dict:
    """Zero-shot acc / acc_norm (with stderr) per task as lm-eval scores them, and their averages.

    limit: only the first `limit` documents of each task. shard=(k, n): score only documents i with i % n == k
    (the result then covers whatever the scores file holds so far; `complete` says whether that is every
    document). scores_dir: where the per-document scores are kept (default: in `cache`, per model fingerprint).
    resume: reuse the scored requests and documents an earlier run kept; False scores everything afresh."""
    from ..utils.extras import require

    lm_eval = require("lm_eval", "Zero-shot evaluation (--tasks)")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    data_dir = data_dir or os.environ.get("SVDLLM_DATA_DIR")
    if not data_dir:
        raise SvdllmError("Zero-shot tasks are read from local files: pass --data-dir or set $SVDLLM_DATA_DIR.")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise SvdllmError(f"shard {shard!r}: give K/N with 0 <= K < N, e.g. 0/4 for the first of four shards.")
    if cache is None:
        from ..models.loading import cache_root

        cache = cache_root() / "zeroshot"
    manager = TaskManager()
    files = {t: local_task_file(t, data_dir, cache) for t in tasks}
    configs = {t: task_config(t, files[t], manager) for t in tasks}
    fingerprint = weights_fingerprint(model, tokenizer)
    version = getattr(lm_eval, "__version__", "?")
    root = Path(scores_dir) if scores_dir is not None else Path(cache) / "scores" / fingerprint
    stores, docs, todo = {}, {}, {}
    for t in tasks:
        header = {"task": t, "model": fingerprint, "data": _digest(files[t]), "lm_eval": version}
        path = root / f"{t}.jsonl"
        if not resume and path.exists():
            path.unlink()
        stores[t] = DocScores(path, header)
        total = _count_lines(files[t])
        docs[t] = list(range(min(limit, total) if limit is not None else total))
        mine = [i for i in docs[t] if shard is None or i % shard[1] == shard[0]]
        todo[t] = [i for i in mine if i not in stores[t].scores]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    responses = None
    if resume:
        responses = Path(cache) / "responses" / fingerprint
        responses.parent.mkdir(parents=True, exist_ok=True)
        log.info("Scored requests are kept in %s_rank0.db and scored documents in %s.", responses, root)
    while any(todo.values()):
        # a chunk at a time, so an interruption keeps every finished chunk in the portable scores files
        part = {t: ids[:chunk] for t, ids in todo.items() if ids}
        out = lm_eval.simple_evaluate(model=lm, tasks=[configs[t] for t in part], task_manager=manager,
                                      num_fewshot=0, samples=part,
                                      use_cache=None if responses is None else str(responses),
                                      log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
        for t, ids in part.items():
            stores[t].add(out["samples"][t])
            todo[t] = todo[t][len(ids):]

    results = {}
    for t in tasks:
        row = stores[t].aggregate(docs[t])
        row.update(docs=len(docs[t]), complete=row["n"] == len(docs[t]))
        results[t] = row
    return {**_summary(results), "limit": limit, "shard": list(shard) if shard else None,
            "scores_dir": str(root), "lm_eval_version": version}


def _summary(results: dict[str, dict]) -> dict:
    """The tasks with the averages the papers report (plain mean over tasks) and whether every task is complete."""
    scored = [r for r in results.values() if "acc" in r]  # a shard may hold no document of a small task yet
    avg = sum(r["acc"] for r in scored) / len(scored) if scored else None
    avg_norm = sum(r.get("acc_norm", r["acc"]) for r in scored) / len(scored) if scored else None
    return {"tasks": results, "average_acc": avg, "average_acc_norm_or_acc": avg_norm,
            "complete": all(r.get("complete", True) for r in results.values())}


def combine(earlier: dict | None, later: dict) -> dict:
    """Two zero-shot results of one model (tasks run one command at a time) as one: the later result's tasks
    replace the earlier's of the same name, and the averages cover every task now held."""
    if not earlier or earlier.get("limit") != later.get("limit"):
        return later
    return {**earlier, **later, **_summary({**earlier.get("tasks", {}), **later["tasks"]})}


def markdown_table(result: dict) -> str:
    """One row per task (acc ± stderr, acc_norm ± stderr), then the averages the papers report."""
    def cell(value, err):
        return f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")

    lines = ["| task | n | acc | acc_norm |", "|---|---|---|---|"]
    for t, r in result["tasks"].items():
        n = r["n"] if r.get("complete", True) else f"{r['n']} of {r['docs']} (partial)"
        acc = cell(r["acc"], r.get("acc_stderr")) if "acc" in r else "–"
        norm = cell(r["acc_norm"], r.get("acc_norm_stderr")) if "acc_norm" in r else "–"
        lines.append(f"| {t} | {n} | {acc} | {norm} |")
    if result["average_acc"] is not None:
        lines.append(f"| average | | {result['average_acc']:.4f} | {result['average_acc_norm_or_acc']:.4f} "
                     "(acc where no acc_norm) |")
    if result.get("limit"):
        lines.append(f"\n[--limit {result['limit']}: the first {result['limit']} examples of each task, not the full sets]")
    if not result.get("complete", True):
        lines.append(f"\n[partial: not every document is scored yet (shard {result.get('shard')}); the scores so far "
                     f"are in {result.get('scores_dir')}]")
    return "\n".join(lines)
