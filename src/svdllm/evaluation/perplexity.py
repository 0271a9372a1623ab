"""Perplexity by PROTOCOL.md: the whole test text tokenized once, non-overlapping windows of 2048 tokens
(the final partial window dropped), each run with no cache, exp(mean NLL) over every predicted token.

A full-protocol run is a quarter of an hour to an hour on a CPU; each finished batch's NLL sum is logged (keyed
by the weights, the windows and the batch size), so an interrupted run resumes where it stopped."""
from __future__ import annotations

import hashlib
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import check_token_ids, eval_windows, load_text, tokenize_text
from ..errors import SvdllmError
from .resume import BatchLog, weights_fingerprint

LOGIT_CHUNK = 512  # positions per lm-head chunk: Gemma's 262k vocabulary makes full logits 2 GB per window


def _nll_sum(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over one batch of windows, in float64, without materialising all logits at once."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = torch.zeros((), dtype=torch.float64)
    seq = input_ids.shape[1]
    for a in range(0, seq - 1, LOGIT_CHUNK):
        b = min(a + LOGIT_CHUNK, seq - 1)
        logits = head(hidden[:, a:b]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        targets = input_ids[:, a + 1 : b + 1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += nll.double().cpu()
    return total


@torch.no_grad()
def perplexity(model, tokenizer, dataset: str = "wikitext2", data_dir=None, seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = True,
               resume_dir=None) -> dict:
    """Perplexity of `model` on a test set; `max_windows` limits the windows for quick checks (reported).

    resume_dir: where finished batches are logged (None: not logged); the log is removed once the run is done."""
    ids = tokenize_text(tokenizer, load_text(dataset, "test", data_dir))
    check_token_ids(ids, model)
    all_windows = ids.numel() // seqlen
    windows = eval_windows(ids, seqlen, max_windows)
    device = next(model.parameters()).device
    model.eval()
    start = time.perf_counter()
    done = None
    if resume_dir is not None:
        done = BatchLog(resume_dir, {"weights": weights_fingerprint(model, tokenizer), "dataset": dataset,
                                     "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:20],
                                     "batch_size": batch_size})
    resumed = len(done.done) if done is not None else 0
    total, count = 0.0, 0
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=f"ppl {dataset}", unit="batch", disable=not progress)
    for k, i in enumerate(bar):
        batch = windows[i : i + batch_size]
        nll = done.done[k] if k < resumed else float(_nll_sum(model, batch.to(device)))
        if not math.isfinite(nll):
            raise SvdllmError(
                f"Non-finite loss on {dataset} window {i}: the model produces NaN/inf. If it runs in float16, "
                "evaluate with --dtype float32 or bfloat16; otherwise the compressed model is broken."
            )
        if done is not None and k >= resumed:
            done.add(nll)
        total += nll
        count += batch.shape[0] * (seqlen - 1)
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    if done is not None:
        done.clear()
    return {
        "dataset": dataset,
        "ppl": math.exp(total / count),
        "nll": total / count,
        "windows": int(windows.shape[0]),
        "total_windows": int(all_windows),
        "seqlen": seqlen,
        "tokens_scored": count,
        "seconds": time.perf_counter() - start,
        **({"resumed_batches": resumed} if resumed else {}),
    }
