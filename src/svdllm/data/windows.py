"""Token windows: random calibration windows and the non-overlapping perplexity windows."""
from __future__ import annotations

import torch

from ..errors import SvdllmError
from .sources import check_source, file_kind, is_hub_source, read_chats, read_file_text, read_hub_text
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


def calibration_set(tokenizer, sources, nsamples: int, seqlen: int, seed: int, data_dir=None) -> torch.Tensor:
    """Calibration windows from one source or a comma-separated mixture, split evenly among the sources.

    A text source (a corpus's validation text, a plain-text file, a file of 'text' records, a Hugging Face dataset's
    column) gives windows at random places in its tokens; a source of conversations (Alpaca, a file of instruction
    records or of chats) gives consecutive windows over conversations in the model's chat template: an instruct
    model calibrated on plain text alone loses the directions its chat markup uses. In the Python API `sources` may
    also be strings (one text) or token windows, given directly (sources.py).
    """
    from .instructions import chat_windows, conversation_windows

    if not isinstance(sources, str):
        return given_windows(tokenizer, sources, nsamples, seqlen, seed)
    names = split_sources(sources)
    if not names:
        raise SvdllmError("--calib-dataset is empty; give a corpus (wikitext2, ptb, c4), 'alpaca', a file or "
                          "hf:DATASET:SPLIT:COLUMN.")
    if nsamples < len(names):
        raise SvdllmError(f"--nsamples {nsamples} is fewer than the {len(names)} calibration sources; raise it.")
    parts = []
    for name in names:
        check_source(name)
    for i, name in enumerate(names):
        n = nsamples // len(names) + (i < nsamples % len(names))
        kind = None if name in CORPORA or name == "alpaca" or is_hub_source(name) else file_kind(name)
        if name == "alpaca" or kind == "instructions":
            parts.append(conversation_windows(tokenizer, name, n, seqlen, seed + i, data_dir))
        elif kind == "chats":
            parts.append(chat_windows(tokenizer, read_chats(name), name, n, seqlen, seed + i))
        else:
            text = load_text(name, "validation", data_dir) if name in CORPORA else \
                read_hub_text(name) if is_hub_source(name) else read_file_text(name)
            parts.append(calibration_windows(tokenize_text(tokenizer, text), n, seqlen, seed + i))
    return torch.cat(parts)


def given_windows(tokenizer, data, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Windows from what a Python caller handed over: strings (one text, windows at random places, as a file), or
    token windows (an (N, L) tensor or a list of id sequences), of which the first `nsamples` are used, each cut
    to `seqlen` tokens."""
    items = list(data.unbind(0) if isinstance(data, torch.Tensor) and data.dim() == 2 else data)
    if items and all(isinstance(x, str) for x in items):
        return calibration_windows(tokenize_text(tokenizer, "\n\n".join(items)), nsamples, seqlen, seed)
    try:
        windows = [torch.as_tensor(x).flatten() for x in items]
    except (TypeError, ValueError, RuntimeError) as e:
        raise SvdllmError("The calibration data must be a source name, strings, or token windows (an (N, L) tensor "
                          f"or lists of token ids): {e}.") from e
    if not windows or any(w.is_floating_point() or w.is_complex() for w in windows):
        raise SvdllmError("The calibration token windows must be integer token ids (and at least one window).")
    if len(windows) < nsamples:
        raise SvdllmError(f"{len(windows)} calibration windows were given and nsamples is {nsamples}; set "
                          f"CalibrationConfig(nsamples={len(windows)}) or give more windows.")
    short = min(w.numel() for w in windows[:nsamples])
    if short < seqlen:
        raise SvdllmError(f"A calibration window has {short} tokens, fewer than seqlen = {seqlen}; set "
                          f"CalibrationConfig(seqlen={short}) or give longer windows.")
    return torch.stack([w[:seqlen] for w in windows[:nsamples]]).long()


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens; the final partial window is dropped (PROTOCOL.md)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise SvdllmError(f"The text has {ids.numel()} tokens, fewer than one window of {seqlen}.")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
