"""The evaluation and calibration corpora, built exactly as PROTOCOL.md (and the papers) build them.

Each corpus is read from a local directory with the layout of the project's shared data folder
(``--data-dir`` or ``$SVDLLM_DATA_DIR``), or, when no directory is given, from the Hugging Face datasets hub.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SvdllmError


@dataclass(frozen=True)
class Corpus:
    name: str
    local: dict[str, str]  # split -> path relative to the data directory
    hub: tuple[str, str | None, str]  # (dataset, config, text field)


CORPORA = {
    "wikitext2": Corpus(
        "wikitext2",
        {"test": "wikitext2_raw/wiki.test.raw", "validation": "wikitext2_raw/wiki.valid.raw"},
        ("wikitext", "wikitext-2-raw-v1", "text"),
    ),
    "ptb": Corpus(
        "ptb",
        {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt"},
        ("ptb_text_only", "penn_treebank", "sentence"),
    ),
    "c4": Corpus("c4", {"validation": "c4/c4_validation_2k.jsonl", "test": "c4/c4_validation_2k.jsonl"},
                 ("allenai/c4", "en", "text")),
}
C4_DOCS = 256  # PROTOCOL.md: the first 256 documents, joined with a space
# Calibration on c4 reads the documents after those 256, so that no window of it is ever scored by `--ppl c4`
# (locally: documents 256–1999 of the 2,000-document sample; from the hub: the next 1,744 of its validation split).
C4_CALIBRATION_DOCS = (C4_DOCS, 2000)
C4_SPLITS = {"test": (0, C4_DOCS), "validation": C4_CALIBRATION_DOCS}


def split_sources(text: str) -> list[str]:
    """The sources of a --calib-dataset value: "wikitext2,alpaca" -> ["wikitext2", "alpaca"]."""
    return [s.strip() for s in text.split(",") if s.strip()]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is None:
        data_dir = os.environ.get("SVDLLM_DATA_DIR") or None
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise SvdllmError(f"Data directory {path} does not exist; fix --data-dir or $SVDLLM_DATA_DIR.")
    return path


def corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise SvdllmError(f"Unknown dataset {name!r}; choose one of {', '.join(CORPORA)}.")
    return CORPORA[name]


def _rows_wikitext(path: Path) -> list[str]:
    # The hub's rows are the raw file's lines: a blank line is "", other lines keep their trailing newline.
    return ["" if line.strip() == "" else line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]


def _rows_ptb(path: Path) -> list[str]:
    # The hub's ptb_text_only rows are the whitespace-normalised lines, without the newline.
    return [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]


def _docs_c4(path: Path, split: str = "test") -> list[str]:
    """The documents of a C4 split: the test set is the first C4_DOCS, calibration the ones after them."""
    start, stop = C4_SPLITS[split]
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line)["text"])
            if len(docs) == stop:
                break
    return docs[start:]


def load_text(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> str:
    """The whole text of a corpus split, joined the way the papers join it."""
    c = corpus(name)
    if split not in c.local:
        raise SvdllmError(f"Dataset {name} has no split {split!r}; available: {', '.join(c.local)}.")
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = root / c.local[split]
        if not path.is_file():
            raise SvdllmError(
                f"Missing data file for {name} ({split}): looked for {path}. The data directory {root} must "
                f"have the layout of the shared data folder ({c.local[split]})."
            )
        if name == "wikitext2":
            return "\n\n".join(_rows_wikitext(path))
        if name == "ptb":
            return "\n\n".join(_rows_ptb(path))
        return " ".join(_docs_c4(path, split))
    return _load_hub_text(c, split)


def hub_reachable() -> bool:
    """Whether the Hugging Face hub can be reached at all: offline, the datasets library retries for a minute."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


def _load_hub_text(c: Corpus, split: str) -> str:
    if not hub_reachable():
        raise SvdllmError(f"No data directory was given for {c.name} and the Hugging Face hub is not reachable: pass "
                          "--data-dir (a folder with the shared data layout) or set $SVDLLM_DATA_DIR.")
    try:
        import datasets
    except ImportError as e:
        raise SvdllmError(
            f"No data directory given for {c.name} and the `datasets` package is not installed. Pass --data-dir "
            "(a folder with the shared data layout), set $SVDLLM_DATA_DIR, or pip install datasets for the hub."
        ) from e
    dataset, config, field = c.hub
    try:
        if c.name == "c4":
            ds = datasets.load_dataset(dataset, config, split="validation", streaming=True)
            start, stop = C4_SPLITS[split]
            return " ".join(row[field] for k, row in zip(range(stop), ds) if k >= start)
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # the hub raises many types (connection, auth, missing config)
        raise SvdllmError(
            f"Could not fetch {c.name} ({split}) from the Hugging Face hub: {e}. Without network, pass --data-dir."
        ) from e
    return "\n\n".join(ds[field])
