"""Rank and bit width chosen together (--bits): the allocator's choice, its byte count, and the model it makes."""
import json

import pytest
import torch

import svdllm
from svdllm.allocation import MatrixInfo
from svdllm.allocation.allocators import Global, Spectrum
from svdllm.allocation.joint import Widths, joint_allocation
from svdllm.quantization.pricing import weight_bits
from tiny import tiny_model


def _spectra(errors):
    """Two 64 × 64 matrices: `a` whose components all matter, `b` whose loss sits in its first few."""
    loss_a = torch.full((64,), 1.0, dtype=torch.float64)
    loss_b = torch.tensor([10.0] * 4 + [1e-4] * 60, dtype=torch.float64)
    return {n: Spectrum(torch.ones(64), loss, quant_error=errors) for n, loss in (("a", loss_a), ("b", loss_b))}


MATRICES = [MatrixInfo("a", 64, 64, 0), MatrixInfo("b", 64, 64, 0)]


def test_free_quantization_is_taken_and_ruinous_quantization_is_not():
    widths = Widths((8, 3, 4))
    assert widths.bits == (3, 4, 8)

    def allocate(ratio, errors):
        spectra = _spectra(errors)
        gains = Global(calibrate=0)._losses(MATRICES, spectra)
        return joint_allocation(MATRICES, ratio, gains, spectra, widths)

    # quantization that costs almost nothing: `a` dense and quantized, at a budget float32 cannot meet; `b` keeps
    # its four useful components (in float32: what is left of the budget pays for it)
    free = {3: (1e-3, 1e-3), 4: (5e-4, 5e-4), 8: (1e-4, 1e-4)}
    got = allocate(0.85, free)
    assert got.ranks == {"a": None, "b": 4} and got.bits["a"] is not None
    # quantization that loses everything: float ranks only, b cut to its four useful components, a kept longer
    ruin = {b: (1.0, 1.0) for b in (3, 4, 8)}
    got = allocate(0.85, ruin)
    assert set(got.bits.values()) == {None} and got.ranks["b"] == 4 and got.ranks["a"] > 4
    # the budget holds, in bits as svdllm stores the weights
    for errors in (free, ruin, {3: (0.3, 0.5), 4: (0.05, 0.1), 8: (1e-4, 2e-4)}):
        for ratio in (0.7, 0.85, 0.9):
            got = allocate(ratio, errors)
            used = 0
            for m in MATRICES:
                r, b = got.ranks[m.name], got.bits[m.name]
                shapes = [(64, 64)] if r is None else [(64, r), (r, 64)]
                used += sum(o * i * 32 if b is None else weight_bits(o, i, b) for o, i in shapes)
            assert used // 8 == got.linear_bytes <= (1 - ratio) * 2 * 64 * 64 * 4
    with pytest.raises(svdllm.SvdllmError, match="less than their smallest choice"):
        allocate(0.99, free)


def test_the_allocator_returns_ranks_and_widths_together():
    """Global.search with widths answers an Allocation per ratio holding both (no state left on the allocator); an
    allocator that chooses ranks only refuses widths."""
    from svdllm.allocation import Allocation, get_allocator

    free = {3: (1e-3, 1e-3), 4: (5e-4, 5e-4), 8: (1e-4, 1e-4)}
    alloc = Global(calibrate=0)
    found = alloc.search(MATRICES, [0.8, 0.85], _spectra(free), widths=Widths((3, 4, 8)))
    assert set(found) == {0.8, 0.85} and all(isinstance(a, Allocation) for a in found.values())
    for ratio, a in found.items():
        assert set(a.bits) == set(a.ranks) == {"a", "b"} and a.linear_bytes <= (1 - ratio) * 2 * 64 * 64 * 4
    assert not [k for k in vars(alloc) if "bits" in k or "bytes" in k]
    assert Allocation.from_dict(found[0.8].to_dict()) == found[0.8]  # what the statistics cache records
    with pytest.raises(svdllm.SvdllmError, match="ranks only"):
        get_allocator("uniform").search(MATRICES, [0.8], widths=Widths((4,)))


def test_quantization_errors_fall_with_the_width(tok):
    from svdllm.quantization.sensitivity import quantization_errors
    from svdllm.factorization import get_method

    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    x = torch.randn(512, 64, dtype=torch.float64) * torch.linspace(0.1, 3, 64)
    gram = x.T @ x
    stats = type("S", (), {"gram": gram})()
    dec = get_method("svd-llm").decompose(w, stats)
    err = quantization_errors(w, dec, gram, (3, 4, 8), 16)
    for k in (0, 1):  # dense, then the factor pair
        assert 0 < err[8][k] < err[4][k] < err[3][k] < 1
    from svdllm.quantization.gptq import inverse_factor

    # the spectra phase hands matrices that share a Gram (q/k/v, gate/up) one inverse factor: the same errors
    assert quantization_errors(w, dec, gram, (3, 4, 8), 16, factor=inverse_factor(gram)) == err


def test_compress_with_bits_makes_the_model_the_allocation_priced(tok, data_dir, tmp_path):
    """CompressConfig(bits=[3, 4, 8], ratio=0.85): the saved model's decoder linears take exactly the bytes the
    allocation planned, within the budget; every matrix holds the width it was given; it loads and runs."""
    from svdllm.pipeline import summarize

    model = tiny_model("qwen2")
    cal = svdllm.CalibrationConfig(nsamples=4, seqlen=32, grad_samples=2, data_dir=str(data_dir))
    config = svdllm.CompressConfig(ratio=0.85, bits=[3, 4, 8], group_size=16, calibration=cal, cache_dir="")
    (row,) = summarize(svdllm.compress(tiny_model("qwen2"), tok, config, out=tmp_path / "j", progress=False))
    manifest = json.loads((tmp_path / "j" / "svdllm_manifest.json").read_text())
    assert row["linear_bytes"] == manifest["quantization"]["linear_bytes"]
    assert sum(row["widths"].values()) == len(manifest["ranks"])
    alloc, quant = manifest["allocation"], manifest["quantization"]
    dense_bytes = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                      if isinstance(m, torch.nn.Linear)) * 4
    assert quant["linear_bytes"] == alloc["linear_bytes_planned"] <= 0.15 * dense_bytes
    assert quant["method"] == "gptq" and quant["bits"] == alloc["bits"] and manifest["widths"]["bits"] == [3, 4, 8]
    assert manifest["ratio_of"] == "float32 bytes" and "bits" not in manifest["alloc_options"]
    q = svdllm.load(tmp_path / "j")
    for name, bits in alloc["bits"].items():
        module = q.get_submodule(name)
        weights = [module.weight] if manifest["ranks"][name] is None else [module.u.weight, module.v.weight]
        for w in weights:
            if bits is None:
                assert type(w) is torch.nn.Parameter
            else:
                assert -(2 ** (bits - 1)) <= int(w.qdata.min()) and int(w.qdata.max()) < 2 ** (bits - 1)
                assert w.target_dtype == getattr(torch, f"int{bits}")
    with torch.no_grad():
        logits = q(tok("The game began development in 2010.", return_tensors="pt").input_ids).logits
    assert torch.isfinite(logits).all()
    card = (tmp_path / "j" / "README.md").read_text()
    assert "float32 bytes; ranks and widths chosen together" in card


@pytest.mark.parametrize("extra,message", [({"alloc": "uniform"}, "chooses ranks only"),
                                           ({"update": "closed-form"}, "takes no update"),
                                           ({"bits": [5]}, "widths among 3, 4 and 8"),
                                           ({"bits": []}, "widths among 3, 4 and 8")])
def test_bad_bits_requests_are_named(extra, message, tok, tmp_path):
    config = svdllm.CompressConfig(**{"ratio": 0.8, "bits": [4], **extra})
    with pytest.raises(svdllm.SvdllmError, match=message):
        config.validate(tmp_path / "o")
    with pytest.raises(svdllm.SvdllmError, match=message):  # svdllm.compress checks the same, before any work
        svdllm.compress(tiny_model("qwen2"), tok, config, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
