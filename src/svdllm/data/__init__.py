"""Data: the WikiText-2 / PTB / C4 texts, tokenized and cut into calibration and evaluation windows."""
from .texts import CORPORA, load_text, resolve_data_dir
from .windows import calibration_set, calibration_windows, check_token_ids, eval_windows, tokenize_text

__all__ = ["CORPORA", "load_text", "resolve_data_dir", "calibration_set", "calibration_windows", "eval_windows", "tokenize_text", "check_token_ids"]
