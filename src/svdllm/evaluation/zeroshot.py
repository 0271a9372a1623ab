"""Zero-shot accuracy with lm-evaluation-harness, on the local copies of the task data (no hub).

lm-eval's own task definitions (prompt, choices, target, metrics) are used unchanged; only their dataset is
swapped for a JSON-lines file in the Hugging Face schema the task expects, converted once from the files in the
data directory (../shared/data: the original releases, whose layout differs from the hub's). The model is the
loaded object itself, wrapped by lm-eval's HFLM, so a compressed model is scored exactly like a dense one.

A full run of the seven tasks is hours on a CPU (HellaSwag alone is 40,000 scored continuations), so every scored
request is kept as it completes in a response database keyed by a fingerprint of the model's weights: an
interrupted run picks up where it stopped, and a run on a different model never reads another model's answers.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import SvdllmError
from ..io.atomic import atomic_path
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


def zero_shot(model, tokenizer, tasks: list[str], data_dir: str | os.PathLike | None = None,
              limit: int | None = None, batch_size: int = 1, cache: str | os.PathLike | None = None,
              resume: bool = True) -> dict:
    """Zero-shot acc / acc_norm (with stderr) per task as lm-eval scores them, and their averages.

    resume: keep each scored request in `cache`/responses/<model fingerprint> and reuse what is there (lm-eval's
    own response cache, written request by request), so an interrupted run loses almost nothing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SvdllmError("Zero-shot evaluation needs lm-eval: pip install 'lm-eval>=0.4.5'.") from e
    data_dir = data_dir or os.environ.get("SVDLLM_DATA_DIR")
    if not data_dir:
        raise SvdllmError("Zero-shot tasks are read from local files: pass --data-dir or set $SVDLLM_DATA_DIR.")
    if cache is None:
        from ..models.loading import cache_root

        cache = cache_root() / "zeroshot"
    manager = TaskManager()
    configs = [task_config(t, local_task_file(t, data_dir, cache), manager) for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    responses = None
    if resume:
        responses = Path(cache) / "responses" / weights_fingerprint(model, tokenizer)
        responses.parent.mkdir(parents=True, exist_ok=True)
        log.info("Scored requests are kept in %s_rank0.db; a rerun on the same model resumes from them.", responses)
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=manager, num_fewshot=0, limit=limit,
                                  use_cache=None if responses is None else str(responses),
                                  log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    def stderr(value):  # lm-eval reports "N/A" where it cannot estimate one (a task with a single example)
        return value if isinstance(value, (int, float)) else None

    results = {}
    for t in tasks:
        r = out["results"][t]
        row = {"acc": r["acc,none"], "acc_stderr": stderr(r.get("acc_stderr,none"))}
        if "acc_norm,none" in r:
            row.update(acc_norm=r["acc_norm,none"], acc_norm_stderr=stderr(r.get("acc_norm_stderr,none")))
        row["n"] = out.get("n-samples", {}).get(t, {}).get("effective")
        results[t] = row
    avg = sum(r["acc"] for r in results.values()) / len(results)
    avg_norm = sum(r.get("acc_norm", r["acc"]) for r in results.values()) / len(results)
    return {"tasks": results, "average_acc": avg, "average_acc_norm_or_acc": avg_norm, "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", "?")}


def markdown_table(result: dict) -> str:
    """One row per task (acc ± stderr, acc_norm ± stderr), then the averages the papers report."""
    def cell(value, err):
        return f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")

    lines = ["| task | n | acc | acc_norm |", "|---|---|---|---|"]
    for t, r in result["tasks"].items():
        norm = cell(r["acc_norm"], r.get("acc_norm_stderr")) if "acc_norm" in r else "–"
        lines.append(f"| {t} | {r['n']} | {cell(r['acc'], r.get('acc_stderr'))} | {norm} |")
    lines.append(f"| average | | {result['average_acc']:.4f} | {result['average_acc_norm_or_acc']:.4f} (acc where no acc_norm) |")
    if result.get("limit"):
        lines.append(f"\n[--limit {result['limit']}: the first {result['limit']} examples of each task, not the full sets]")
    return "\n".join(lines)
