"""benchmarks/reliability/check_figures.py: a table's figures are found in its raw results at the printed precision, or
the check fails."""
import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("check_figures",
                                              Path(__file__).parents[1] / "benchmarks" / "reliability" / "check_figures.py")
check_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_figures)


def _doc(tmp_path, monkeypatch, table: str, raw: dict) -> list[str]:
    monkeypatch.setattr(check_figures, "ROOT", tmp_path)
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / "eval.json").write_text(json.dumps(raw))
    doc = tmp_path / "DOC.md"
    doc.write_text("# results\n\n" + table)
    return check_figures.check(doc)


RAW = {"ppl": {"wikitext2": {"ppl": 58.7812}}, "params": 92047680, "dense": 239.2512, "achieved": 0.40003,
       "wall_s": 759.0}


def test_figures_found_at_their_printed_precision(tmp_path, monkeypatch):
    table = ("<!-- figures: results/*.json -->\n| model | params | ppl | removed | vs dense | time |\n|---|---|---|---|---|---|\n"
             "| `refine=1` best | 92,047,680 | 58.78 | 40.00% | −75% | 12.7 min |\n")
    assert _doc(tmp_path, monkeypatch, table, RAW) == []


def test_a_figure_that_rounds_differently_or_is_missing_fails(tmp_path, monkeypatch):
    table = ("<!-- figures: results/*.json -->\n| model | ppl | time |\n|---|---|---|\n"
             "| best | 58.77 | 12.8 min |\n| other | 31.10 | |\n")
    failures = _doc(tmp_path, monkeypatch, table, RAW)
    assert len(failures) == 3 and all("DOC.md:" in f for f in failures)
    assert any("'58.77'" in f for f in failures) and any("'12.8 min'" in f for f in failures)


def test_a_table_must_name_its_raw_results(tmp_path, monkeypatch):
    table = "| model | ppl |\n|---|---|\n| best | 58.78 |\n"
    assert "no `<!-- figures" in _doc(tmp_path, monkeypatch, table, RAW)[0]
    assert _doc(tmp_path, monkeypatch, "<!-- figures: none -->\n" + table.replace("58.78", "`58.78`"), RAW) == []
    assert "no raw result matches" in _doc(tmp_path, monkeypatch, "<!-- figures: nothing/*.json -->\n" + table, RAW)[0]


def test_scientific_notation_and_unicode_minus(tmp_path, monkeypatch):
    raw = {"error": 2.53e7, "gap": -5.91}
    table = ("<!-- figures: results/*.json -->\n| method | error | paired |\n|---|---|---|\n"
             "| asvd | 2.5 × 10⁷ | −5.9 |\n")
    assert _doc(tmp_path, monkeypatch, table, raw) == []
    assert len(_doc(tmp_path, monkeypatch, table.replace("2.5 ×", "2.6 ×"), raw)) == 1
