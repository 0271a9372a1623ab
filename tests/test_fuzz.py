"""Fuzzing the loader: whatever the manifest or the weights file holds, `svdllm.load` either loads a model or
raises SvdllmError naming the problem; never another exception from deep inside torch or json.

The number of examples per property is $SVDLLM_FUZZ_EXAMPLES (default 60 in the suite)."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svdllm
from svdllm.errors import SvdllmError
from svdllm.io import MANIFEST_NAME
from tiny import tiny_model

EXAMPLES = int(os.environ.get("SVDLLM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TRIED = {"manifest": 0, "weights": 0, "config": 0}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("fuzz") / "saved"
    svdllm.compress(tiny_model("llama"), tok, svdllm.CompressConfig(preset="paper", ratio=0.4, method="svd"), out=out,
                    progress=False)
    return out


def _copy(saved, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(saved, work / "m")
    return work / "m"


def _load_or_clear_error(path):
    try:
        model = svdllm.load(path)
    except SvdllmError as e:
        assert str(e)  # a message, not an empty error
        return None
    return model


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest(saved, tmp_path_factory, data):
    TRIED["manifest"] += 1
    target = _copy(saved, tmp_path_factory)
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    action = data.draw(st.sampled_from(["replace", "delete", "rank", "whole"]))
    if action == "replace":
        key = data.draw(st.sampled_from(sorted(manifest)))
        manifest[key] = data.draw(json_values)
    elif action == "delete":
        manifest.pop(data.draw(st.sampled_from(sorted(manifest))))
    elif action == "rank":
        name = data.draw(st.sampled_from(sorted(manifest["ranks"])))
        manifest["ranks"][name] = data.draw(json_values)
    else:
        manifest = data.draw(json_values)
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    model = _load_or_clear_error(target)
    if model is not None:  # whatever loaded must compute finite logits
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@FUZZ
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**7), st.integers(1, 255)), max_size=6))
def test_fuzzed_weights_file(saved, tmp_path_factory, cut, flips):
    TRIED["weights"] += 1
    target = _copy(saved, tmp_path_factory)
    path = target / "model.safetensors"
    raw = bytearray(path.read_bytes())
    for pos, xor in flips:  # header and tensor bytes alike
        raw[pos % len(raw)] ^= xor
    if cut % 3 == 0:
        raw = raw[: cut % len(raw)]
    path.write_bytes(bytes(raw))
    _load_or_clear_error(target)


@FUZZ
@given(data=st.data())
def test_fuzzed_config(saved, tmp_path_factory, data):
    TRIED["config"] += 1
    target = _copy(saved, tmp_path_factory)
    config = json.loads((saved / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config)))
    if data.draw(st.booleans()):
        config[key] = data.draw(json_values)
    else:
        config.pop(key)
    (target / "config.json").write_text(json.dumps(config))
    _load_or_clear_error(target)


def test_report_fuzz_counts():
    """Runs last in this module: the counts go to the log for the closing note."""
    print(f"fuzzed manifests: {TRIED['manifest']}, weight files: {TRIED['weights']}, configs: {TRIED['config']}")
    if not all(TRIED.values()):
        pytest.skip("some fuzz properties were deselected")
    assert min(TRIED.values()) >= min(EXAMPLES, 10)
