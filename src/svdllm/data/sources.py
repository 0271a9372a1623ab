"""Where calibration text comes from, beyond the built-in corpora: a user's own files, any Hugging Face dataset, and
(in the Python API) strings or token windows handed over directly.

A source is one of
  wikitext2, ptb, c4          a built-in corpus (its validation text; texts.py)
  alpaca, FILE.json/.jsonl    instruction records ('instruction', 'output'), written as chat conversations
  FILE.jsonl / FILE.json      records with a 'text' field (or 'messages' in the chat format): plain text / chats
  FILE (.txt, .md, anything)  plain text, read as UTF-8
  hf:DATASET[:CONFIG]:SPLIT:COLUMN    a column of a Hugging Face dataset (needs the network and `datasets`)
and `--calib-dataset` takes several, comma-separated, sharing the windows evenly. Each source's origin (and, for a
file, its SHA-256) goes into the manifest, so that a compressed model says what it was calibrated on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import SvdllmError
from .texts import CORPORA, hub_reachable


def is_hub_source(source: str) -> bool:
    return source.startswith("hf:")


def parse_hub_source(source: str) -> tuple[str, str | None, str, str]:
    """"hf:DATASET[:CONFIG]:SPLIT:COLUMN" -> (dataset, config, split, column)."""
    parts = source[len("hf:"):].split(":")
    if len(parts) == 3:
        return parts[0], None, parts[1], parts[2]
    if len(parts) == 4:
        return parts[0], parts[1], parts[2], parts[3]
    raise SvdllmError(f"Calibration source {source!r}: a Hugging Face dataset is written hf:DATASET:SPLIT:COLUMN or "
                      "hf:DATASET:CONFIG:SPLIT:COLUMN, e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1:train:text.")


def check_source(source: str) -> None:
    """A clear error now for a source that cannot be read, rather than after the model has loaded."""
    if source in CORPORA or source == "alpaca":
        return
    if is_hub_source(source):
        parse_hub_source(source)
        return
    if not os.path.isfile(os.path.expanduser(source)):
        raise SvdllmError(f"Calibration source {source!r} is neither a corpus ({', '.join(CORPORA)}), 'alpaca', "
                          "hf:DATASET:SPLIT:COLUMN nor an existing file (plain text, or .json/.jsonl records with "
                          "'text', 'messages' or 'instruction'/'output'); fix --calib-dataset.")


def read_records(path: Path) -> list[dict]:
    """The records of a JSON list or a JSONL file (one record per line)."""
    try:
        text = path.read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SvdllmError(f"Cannot read {path} as JSON records: {e}.") from e
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise SvdllmError(f"{path} must hold a list of JSON records (one per line for .jsonl).")
    return records


def _records(path: Path) -> list | None:
    """The records of a .json/.jsonl file, or None if it is not one."""
    return read_records(path) if path.suffix in (".json", ".jsonl") else None


def file_kind(source: str) -> str:
    """"instructions", "chats", "text records" or "plain text": how a file source is read."""
    records = _records(Path(source).expanduser())
    if records is None:
        return "plain text"
    keys = set(records[0])
    if {"instruction", "output"} <= keys:
        return "instructions"
    if "messages" in keys:
        return "chats"
    if "text" in keys:
        return "text records"
    raise SvdllmError(f"The records of {source} have the keys {sorted(keys)}; calibration reads 'text' (plain "
                      "text), 'messages' (a chat: a list of {'role', 'content'}) or 'instruction' and 'output'.")


def read_file_text(source: str) -> str:
    """The text of a plain-text file or of a file of 'text' records (joined by blank lines, as the corpora are)."""
    path = Path(source).expanduser()
    records = _records(path)
    if records is None:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SvdllmError(f"Cannot read the calibration text {path} as UTF-8: {e}.") from e
    texts = [r.get("text") for r in records]
    if not all(isinstance(t, str) for t in texts):
        raise SvdllmError(f"Every record of {path} needs a string 'text' field.")
    return "\n\n".join(texts)


def read_chats(source: str) -> list[list[dict]]:
    chats = [r.get("messages") for r in _records(Path(source).expanduser())]
    if not all(isinstance(c, list) and c and all(isinstance(m, dict) and "role" in m and "content" in m for m in c)
               for c in chats):
        raise SvdllmError(f"Every record of {source} needs 'messages': a list of {{'role', 'content'}} turns.")
    return chats


def read_hub_text(source: str) -> str:
    dataset, config, split, column = parse_hub_source(source)
    if not hub_reachable():
        raise SvdllmError(f"Calibration source {source} is on the Hugging Face hub, which is not reachable (offline); "
                          "save the text to a file and pass the file to --calib-dataset.")
    try:
        import datasets
    except ImportError as e:
        raise SvdllmError(f"Calibration source {source} needs the `datasets` package: pip install datasets.") from e
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # the hub raises many types (connection, auth, missing config or split)
        raise SvdllmError(f"Could not load {dataset} ({config or 'default'} config, split {split}) from the Hugging "
                          f"Face hub: {e}.") from e
    if column not in ds.column_names:
        raise SvdllmError(f"{dataset} has no column {column!r}; its columns are {', '.join(ds.column_names)}.")
    return "\n\n".join(t for t in ds[column] if isinstance(t, str))


def origin(source: str) -> dict:
    """What the manifest records about one source: enough to find the same text again."""
    if source in CORPORA:
        return {"source": source, "kind": "corpus", "split": "validation"}
    if source == "alpaca":
        return {"source": source, "kind": "instructions"}
    if is_hub_source(source):
        dataset, config, split, column = parse_hub_source(source)
        return {"source": source, "kind": "hub dataset", "dataset": dataset, "config": config, "split": split,
                "column": column}
    path = Path(source).expanduser()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"source": source, "kind": file_kind(source), "path": str(path.resolve()), "bytes": path.stat().st_size,
            "sha256": digest}


def describe(dataset) -> tuple[str, list[dict]]:
    """(label, origins) of a CalibrationConfig.dataset: the label names it in the cache key, the manifest and the
    model card; the origins (one per source) say where each part came from."""
    from .texts import split_sources

    if isinstance(dataset, str):
        return dataset, [origin(s) for s in split_sources(dataset)]
    import torch

    items = list(dataset.unbind(0)) if isinstance(dataset, torch.Tensor) and dataset.dim() == 2 else list(dataset)
    digest = hashlib.sha256()
    texts = bool(items) and all(isinstance(x, str) for x in items)
    for x in items:
        digest.update(x.encode() if texts else torch.as_tensor(x).to(torch.int64).numpy().tobytes())
    kind = "texts" if texts else "token windows"
    return f"python:{kind.replace(' ', '-')}", [{"source": "python", "kind": kind, "count": len(items),
                                                 "sha256": digest.hexdigest()}]
