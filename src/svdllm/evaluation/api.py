"""`svdllm.evaluate`: perplexity on the named test sets and zero-shot accuracy on the named tasks, by an EvalConfig.

When the model is a directory written by svdllm, the results are merged into its svdllm_eval.json (io/results.py;
one task per call adds up, as long evaluations run) and its model card is rewritten with them, so that `svdllm
compare` and the card find them beside the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import SvdllmError


def _names(value) -> list[str]:
    """A list of names, from a list or a comma-separated string."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value)


@dataclass
class EvalConfig:
    """What svdllm.evaluate measures.

    ppl: perplexity test sets among wikitext2, ptb, c4 (a list, or comma-separated); "none" or [] for none; None
    (default): wikitext2, or none when tasks are given. tasks: zero-shot tasks scored by lm-eval on local files
    (data_dir or $SVDLLM_DATA_DIR), or "paper" for the seven of the SVD-LLM paper. limit: only the first N
    documents per task. seqlen, max_windows: perplexity's window length and how many windows (None: all, the
    protocol). batch_size: windows (perplexity) or requests (zero-shot) per forward. resume: reuse what an
    interrupted run on the same weights kept in the cache. shard=(k, n): score only documents i % n == k.
    scores_dir: where the per-document zero-shot scores are kept (default: the cache directory, per model)."""

    ppl: list[str] | str | None = None
    tasks: list[str] | str = field(default_factory=list)
    limit: int | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    data_dir: str | os.PathLike | None = None
    resume: bool = True
    shard: tuple[int, int] | None = None
    scores_dir: str | os.PathLike | None = None

    def task_names(self) -> list[str]:
        from .zeroshot import PAPER_TASKS

        tasks = _names(self.tasks)
        return list(PAPER_TASKS) if tasks == ["paper"] else tasks

    def ppl_sets(self) -> list[str]:
        if self.ppl is None:  # a user asking for tasks expects tasks, not 12 minutes of WikiText-2 first
            return [] if self.task_names() else ["wikitext2"]
        sets = _names(self.ppl)
        return [] if sets == ["none"] else sets

    def validate(self) -> None:
        """Checks the values, and that every task's local file is there (converting it once), before a model loads."""
        from ..data import CORPORA

        for name in self.ppl_sets():
            if name not in CORPORA:
                raise SvdllmError(f"Unknown perplexity test set {name!r}; choose among {', '.join(CORPORA)} (--ppl), "
                                  "or none.")
        for flag, value, low in (("--seqlen", self.seqlen, 2), ("--batch-size", self.batch_size, 1),
                                 ("--limit", self.limit, 1), ("--max-windows", self.max_windows, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise SvdllmError(f"{flag} must be an integer of at least {low}, got {value!r}.")
        if self.shard is not None and not (len(self.shard) == 2 and 0 <= self.shard[0] < self.shard[1]):
            raise SvdllmError(f"shard {self.shard!r}: give K/N with 0 <= K < N, e.g. 0/4 for the first of four "
                              "shards.")
        tasks = self.task_names()
        if tasks:  # a missing task file fails now, not after the model has loaded
            from ..models.loading import cache_root
            from .zeroshot import local_task_file

            data_dir = self.data_dir or os.environ.get("SVDLLM_DATA_DIR")
            if not data_dir:
                raise SvdllmError("Zero-shot tasks are read from local files: pass --data-dir or set $SVDLLM_DATA_DIR.")
            for t in tasks:
                local_task_file(t, data_dir, cache_root() / "zeroshot")


def evaluate(model_or_path, config: EvalConfig, *, tokenizer=None, dtype: str = "float32", device: str | None = None,
             progress: bool = True, on_result: Callable[[str, dict], None] | None = None) -> dict:
    """Evaluate a model by `config`; returns {"model", "compressed" (how it was made, None for a dense model),
    "params", "ppl": {set: result}} and "zero_shot" when tasks were scored.

    model_or_path: any model svdllm.load_model takes (read in `dtype`, moved to `device`), or a model in memory
    with its `tokenizer`. on_result(name, result) is called as each result is known: each perplexity set by its
    name, then "zero_shot" (long evaluations report as they go)."""
    from ..io.manifest import is_model_dir
    from ..models.loading import cache_root
    from .perplexity import perplexity

    config.validate()
    tasks, ppl_sets = config.task_names(), config.ppl_sets()
    if isinstance(model_or_path, nn.Module):
        if tokenizer is None:
            raise SvdllmError("Evaluating a model in memory needs its tokenizer (tokenizer=...).")
        model, tok, name, directory = model_or_path, tokenizer, getattr(model_or_path.config, "name_or_path", None), None
    else:
        from ..io.loader import load_model

        name = str(model_or_path)
        model, tok = load_model(name, dtype)
        if device:
            model.to(device)
        directory = name if is_model_dir(name) else None
    results = {}
    # what `svdllm compare` needs to place this result without the model directory at hand
    out = {"model": name, "compressed": _how_made(directory), "params": sum(p.numel() for p in model.parameters()),
           "ppl": results}
    for s in ppl_sets:
        results[s] = perplexity(model, tok, s, config.data_dir, config.seqlen, config.max_windows, config.batch_size,
                                progress=progress, resume_dir=cache_root() / "ppl" if config.resume else None)
        if on_result is not None:
            on_result(s, results[s])
    if tasks:
        from .zeroshot import zero_shot

        out["zero_shot"] = zero_shot(model, tok, tasks, config.data_dir, config.limit, config.batch_size,
                                     resume=config.resume, shard=config.shard, scores_dir=config.scores_dir)
        if on_result is not None:
            on_result("zero_shot", out["zero_shot"])
    if directory is not None:
        keep_eval_results(directory, out, config.limit)
    return out


def _how_made(directory: str | None) -> dict | None:
    if directory is None:
        return None
    from ..io.manifest import read_manifest
    from ..io.results import how_made

    return how_made(read_manifest(directory))


def keep_eval_results(model_dir: str | os.PathLike, result: dict, limit: int | None = None) -> None:
    """Merge an evaluate() result into the model directory's svdllm_eval.json and rewrite its model card with them.
    Zero-shot tasks scored before (one task per call is common: long runs) are kept, the averages cover all."""
    from ..io.hf_native import write_card
    from ..io.manifest import read_manifest
    from ..io.results import EVAL_NAME, merge_results, ppl_key, read_results, zero_shot_key
    from .zeroshot import combine

    update = {"ppl": {ppl_key(n, r): r for n, r in result["ppl"].items()}}
    if "zero_shot" in result:
        tag = zero_shot_key(limit, result["zero_shot"]["complete"])
        update[tag] = combine(read_results(model_dir, EVAL_NAME).get(tag), result["zero_shot"])
    merge_results(model_dir, EVAL_NAME, update)
    write_card(model_dir, read_manifest(model_dir), read_results(model_dir, EVAL_NAME))
