"""Token windows: random calibration windows and the non-overlapping perplexity windows."""
from __future__ import annotations

import torch

from ..errors import SvdllmError
from .texts import CORPORA, load_text, split_sources


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (special tokens as the tokenizer adds them, like the papers)."""
    ids = tokenizer(text, return_tensors="pt", return_attention_mask=False)["input_ids"]
    return ids[0]


def check_token_ids(ids: torch.Tensor, model) -> None:
    """Token ids beyond the model's embedding table mean the tokenizer belongs to another model."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = int(ids.max()) if ids.numel() else -1
    if top >= rows:
        raise SvdllmError(f"The tokenizer produced token id {top}, but the model has only {rows} embeddings: the "
                          "tokenizer belongs to another model. Load the model and its own tokenizer together.")


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random start positions, reproducible from `seed`."""
    if ids.numel() <= seqlen:
        raise SvdllmError(
            f"The calibration text has {ids.numel()} tokens, too few for windows of {seqlen}; lower --seqlen."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_set(tokenizer, sources: str, nsamples: int, seqlen: int, seed: int, data_dir=None) -> torch.Tensor:
    """Calibration windows from one source or a comma-separated mixture, split evenly among the sources.

    A source is a corpus (wikitext2, ptb, c4), windows at random places in its validation text, or a set of
    instruction records ("alpaca" or a .json/.jsonl file) written as conversations in the model's chat template.
    An instruct model calibrated on plain text alone loses the directions its chat markup uses.
    """
    from .instructions import conversation_windows

    names = split_sources(sources)
    if not names:
        raise SvdllmError("--calib-dataset is empty; give a corpus (wikitext2, ptb, c4), 'alpaca' or a .json file.")
    if nsamples < len(names):
        raise SvdllmError(f"--nsamples {nsamples} is fewer than the {len(names)} calibration sources; raise it.")
    parts = []
    for i, name in enumerate(names):
        n = nsamples // len(names) + (i < nsamples % len(names))
        if name in CORPORA:
            ids = tokenize_text(tokenizer, load_text(name, "validation", data_dir))
            parts.append(calibration_windows(ids, n, seqlen, seed + i))
        else:
            parts.append(conversation_windows(tokenizer, name, n, seqlen, seed + i, data_dir))
    return torch.cat(parts)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens; the final partial window is dropped (PROTOCOL.md)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise SvdllmError(f"The text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
