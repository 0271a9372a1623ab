"""Every figure in a table of README.md and BENCHMARKS.md, checked against the raw results it comes from.

Each table that quotes a measured value names its raw results in a comment on one of the lines just above it:

    <!-- figures: benchmarks/results/kfac_smollm2/*.json, benchmarks/results/best_smollm2/eval-*.json -->
    | model | R | WikiText-2 ppl |

(globs relative to the repository; `<!-- figures: none -->` for a table that quotes no measurement, such as a list
of options). Every number in the table outside `code spans` must then be found in those files, printed as the
document prints it (same decimals): a numeric value of a JSON file, or a number in a text file, as it is or in the
document's unit (×100 for a fraction printed as a percentage or accuracy; seconds in minutes or hours; bytes or
MB in MB, GB or GiB). A signed percentage (−58%, +0.7%) may also be the relative change between two raw values
of the same files. A table with numbers and no `figures` comment fails, as does any number not found.

Usage: python benchmarks/reliability/check_figures.py [README.md BENCHMARKS.md]   (exit 1 on any failure; reads files only)
"""
from __future__ import annotations

import glob
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ANNOTATION = re.compile(r"<!--\s*figures:\s*(.*?)\s*-->")
NUMBER = re.compile(r"(?<![\w.+−-])([+−-]?)(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w.]*\d)\s*(%|×|min\b|s\b|h\b|GB|GiB|MB|MiB)?")
SCIENTIFIC = re.compile(r"([+−-]?)(\d+(?:\.\d+)?)\s*[×x]\s*10([⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)")
SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
TEXT_NUMBER = re.compile(r"[-−]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
# a printed value in a unit, from a raw value in the units raw files use
SCALES = {None: (1, 100), "×": (1,), "%": (100, 1), "min": (1 / 60, 1), "h": (1 / 3600, 1), "s": (1,),
          "GB": (1e-9, 1 / 2**30, 1 / 1024, 1), "GiB": (1 / 2**30, 1 / 1024, 1), "MB": (1 / 2**20, 1e-6, 1),
          "MiB": (1 / 2**20, 1)}


def numbers_of(path: Path) -> list[float]:
    """Every numeric value in a raw result: the leaves of a JSON file (or of each line of a JSON-lines file), or
    the numbers in a text file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    out: list[float] = []

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            out.append(float(x))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v)
                try:  # a number used as a key (a ratio, a window count)
                    out.append(float(k))
                except ValueError:
                    pass
        elif isinstance(x, list):
            for v in x:
                walk(v)

    if path.suffix in (".json", ".jsonl"):
        try:
            walk(json.loads(text))
            return out
        except json.JSONDecodeError:
            for line in text.splitlines():
                try:
                    walk(json.loads(line))
                except json.JSONDecodeError:
                    out += [_float(t) for t in TEXT_NUMBER.findall(line)]
            return out
    return [_float(t) for t in TEXT_NUMBER.findall(text)]


def _float(token: str) -> float:
    return float(token.replace("−", "-"))


def tables(path: Path):
    """(line number, sources or None, rows) of each markdown table (also one indented in a list item); sources
    from a `figures` comment within the three lines above the table."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    k = 0
    while k < len(lines):
        if lines[k].startswith("|") and k + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[k + 1]):
            sources = None
            for back in range(1, 4):
                m = ANNOTATION.search(lines[k - back]) if k - back >= 0 else None
                if m:
                    sources = [s.strip() for s in m.group(1).split(",") if s.strip()]
                    break
            start, rows = k, []
            while k < len(lines) and lines[k].startswith("|"):
                if k > start + 1:  # the header names columns; its numbers are labels
                    rows.append((k + 1, lines[k]))
                k += 1
            yield start + 1, sources, rows
        else:
            k += 1


def cell_numbers(row: str):
    """(printed text, sign, digits, unit) of each number in a row, outside code spans."""
    row = re.sub(r"`[^`]*`", " ", row)
    row = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", row)  # a link's target is not a figure
    for m in SCIENTIFIC.finditer(row):  # 5.0 × 10⁷: the mantissa at its precision, in units of 10⁷
        yield m.group(0), m.group(1), m.group(2), "e" + m.group(3).translate(SUPERSCRIPTS)
    row = SCIENTIFIC.sub(" ", row)
    row = re.sub(r"10[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+", " ", row)  # 10⁵ alone: an order of magnitude, said in words
    for m in NUMBER.finditer(row):
        yield m.group(0).strip(), m.group(1), m.group(2), m.group(3)


def decimals(digits: str) -> int:
    return len(digits.split(".")[1]) if "." in digits else 0


def printed(value: float, places: int) -> str:
    return f"{value:.{places}f}"


class Sources:
    def __init__(self, patterns: list[str]):
        self.files = sorted({Path(f) for p in patterns for f in glob.glob(str(ROOT / p), recursive=True)
                             if Path(f).is_file() and Path(f).suffix in (".json", ".jsonl", ".txt", ".md", ".csv")})
        values = [v for f in self.files for v in numbers_of(f)]
        self.values = np.unique(np.array(values, dtype=np.float64)) if values else np.zeros(0)
        self.values = self.values[np.isfinite(self.values)]
        self._pairs = None

    def has(self, sign: str, digits: str, unit: str | None) -> bool:
        places = decimals(digits)
        target = float(digits.replace(",", ""))
        if sign in ("−", "-"):
            target = -target
        tol = 0.5 * 10 ** -places + 1e-9
        scales = (10.0 ** -int(unit[1:]),) if unit and unit.startswith("e") else SCALES.get(unit, (1,))
        for scale in scales:
            cand = self.values * scale
            near = cand[np.abs(cand - target) <= tol]
            if any(printed(v, places) == printed(target, places) or printed(v, places) == printed(-target, places)
                   and target == 0 for v in near):
                return True
            if not sign and any(printed(abs(v), places) == printed(target, places) for v in near):
                return True
            if not sign and any(printed(v, places) == printed(target, places) for v in -cand[np.abs(-cand - target) <= tol]):
                return True  # a loss printed as a positive drop
        if unit == "%" and sign:  # a relative change between two raw values
            return self._relative_change(target, places)
        return False

    def _relative_change(self, target: float, places: int) -> bool:
        if self._pairs is None:
            v = self.values[np.abs(self.values) > 1e-12]
            v = v[:3000]
            with np.errstate(divide="ignore", invalid="ignore"):
                self._pairs = (100 * (v[:, None] / v[None, :] - 1)).ravel()
        tol = 0.5 * 10 ** -places + 1e-9
        near = self._pairs[np.abs(self._pairs - target) <= tol]
        return any(printed(x, places) == printed(target, places) for x in near)


def check(doc: Path) -> list[str]:
    failures = []
    for line, sources, rows in tables(doc):
        found = [(n, text) for n, text in rows if list(cell_numbers(text))]
        if sources == ["none"] or not found:
            continue
        if sources is None:
            failures.append(f"{doc.name}:{line}: a table with figures and no `<!-- figures: ... -->` comment naming "
                            "its raw results")
            continue
        src = Sources(sources)
        if not src.files:
            failures.append(f"{doc.name}:{line}: no raw result matches {', '.join(sources)}")
            continue
        for n, text in found:
            for shown, sign, digits, unit in cell_numbers(text):
                if not src.has(sign, digits, unit):
                    failures.append(f"{doc.name}:{n}: {shown!r} is in none of {', '.join(sources)}")
    return failures


def main(argv: list[str]) -> int:
    docs = [Path(a) for a in argv] or [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    failures, count = [], 0
    for doc in docs:
        failures += check(doc)
        count += sum(1 for _, s, rows in tables(doc) if s and s != ["none"] for _, t in rows for _ in cell_numbers(t))
    for f in failures:
        print(f)
    print(f"check_figures: {count} figures in {len(docs)} documents, {len(failures)} not found in their raw results")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
