"""The same arguments keep giving the same model: every method × allocator × update on a tiny model, against a
record written by the code before a refactor (ranks exactly; the sum and sum of squares of each saved tensor, and
of each factor pair's product, to float32 rounding).

A change that is meant to alter the models rewrites the record, and says so in its commit:
    python tests/test_reference_models.py --write
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

RECORD = Path(__file__).parent / "data" / "reference_models.json"
METHODS = ["svd", "svd-llm", "svd-llm-v2", "asvd", "fwsvd", "dipsvd", "kfac-svd"]
ALLOCATORS = ["uniform", "v2", "lorap", "dipsvd", "global"]
UPDATES = ["none", "closed-form", "closed-form-drift"]
COMBOS = [f"{m}:{a}:{u}" for m in METHODS for a in ALLOCATORS for u in UPDATES]


def build(combo: str, data_dir, cache: str, out: Path) -> dict:
    """The saved model of one combination, summarised: its ranks and each tensor's (sum, sum of squares)."""
    import svdllm
    from tiny import byte_tokenizer, tiny_model

    method, alloc, update = combo.split(":")
    cal = svdllm.CalibrationConfig(nsamples=3, seqlen=32, grad_samples=2, data_dir=str(data_dir))
    config = svdllm.CompressConfig(ratio=0.5, method=method, alloc=alloc, update=update, calibration=cal,
                                   cache_dir=cache)
    svdllm.compress(tiny_model("llama"), byte_tokenizer(), config, out=out, progress=False)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    manifest = json.loads((out / "svdllm_manifest.json").read_text())
    # a factor pair counts through its product W_u·W_v: the split of each component between the two factors (its
    # sign, for one) is not part of the model, and an eigensolver may choose it differently with another thread count
    summary = {}
    for k, t in sorted(tensors.items()):
        if not k.startswith("model.layers.") or k.endswith(".v.weight"):
            continue
        if k.endswith(".u.weight"):
            k, t = k.removesuffix(".u.weight") + ".product", t.double() @ tensors[k.replace(".u.weight", ".v.weight")].double()
        summary[k] = [float(t.double().sum()), float(t.double().pow(2).sum())]
    return {"ranks": manifest["ranks"], "tensors": summary}


@pytest.fixture(scope="module")
def record():
    if not RECORD.is_file():
        pytest.skip(f"no reference record at {RECORD}")
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # one calibration serves every combination


@pytest.mark.parametrize("combo", COMBOS)
def test_same_model_as_recorded(combo, record, data_dir, shared_cache, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(record["threads"])  # the least-squares updates carry the last bits of the thread count
    try:
        got, want = build(combo, data_dir, shared_cache, tmp_path / "m"), record["models"][combo]
    finally:
        torch.set_num_threads(threads)
    assert got["ranks"] == want["ranks"]
    assert got["tensors"].keys() == want["tensors"].keys()
    # float32 factors: an eigensolver's last bits move with the thread count and the CPU's BLAS kernels, so agreement
    # is to float32 rounding (a sum is checked against the tensor's norm, since it may be near zero). A least-squares
    # update multiplies that rounding by its condition number: the record written on an AMD EPYC and read on an Intel
    # Xeon differ by up to 5e-6 there, so the updated combinations get 1e-4.
    rel = 1e-6 if combo.endswith(":none") else 1e-4
    for k, (s, q) in got["tensors"].items():
        assert s == pytest.approx(want["tensors"][k][0], abs=rel * max(q, 1e-30) ** 0.5 * 10), k
        assert q == pytest.approx(want["tensors"][k][1], rel=rel), k


def _write() -> None:
    import tempfile

    import transformers
    from conftest import make_data_dir

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        data = make_data_dir(tmp / "data")
        for combo in COMBOS:
            models[combo] = build(combo, data, str(tmp / "cache"), tmp / "out" / combo.replace(":", "-"))
            print(combo, flush=True)
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                  "threads": torch.get_num_threads(), "models": models}, indent=0, sort_keys=True))


if __name__ == "__main__" and "--write" in sys.argv:
    torch.set_num_threads(2)
    _write()
