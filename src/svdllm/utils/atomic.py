"""Atomic writes: a file or directory appears complete at its final path or not at all, so an interrupted run
never leaves a half-written result that a later run would trust. Both get the permissions the user's umask gives
everything else (mkstemp and mkdtemp make them private)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_as_usual(path: str | os.PathLike) -> None:
    mask = _umask()
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for f in path.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yields a temporary file beside `path` to write; it replaces `path` when the block succeeds and is removed
    when it fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        readable_as_usual(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure written atomically as PNG, then closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
