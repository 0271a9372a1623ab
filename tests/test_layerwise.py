"""Layer-wise (lazy) compression of models bigger than memory: the same model as a whole-model run, with
resident weights that do not grow with depth."""
import json

import pytest
import torch

import svdllm
from svdllm.errors import SvdllmError
from svdllm import load_model
from tiny import tiny_model


def _config(data_dir, tmp_path, preset="paper", **kw):
    return svdllm.CompressConfig(preset=preset, cache_dir=str(tmp_path / "cache"),
                                 calibration=svdllm.CalibrationConfig(nsamples=3, seqlen=32, data_dir=str(data_dir)),
                                 **kw)


@pytest.mark.parametrize("family,kw", [("llama", dict(ratio=[0.3, 0.6])),
                                       ("gemma3", dict(ratio=0.4, alloc="lorap")),
                                       ("qwen3", dict(ratio=0.4, update="closed-form")),
                                       # the default: gradient pass, measured allocation, closed form at 0.6
                                       ("mistral", dict(ratio=[0.3, 0.6], preset="best")),
                                       ("gemma3", dict(ratio=0.4, preset="best", method="fwsvd"))])
def test_layerwise_equals_whole_model(family, kw, tok, data_dir, tmp_path):
    dense = tiny_model(family)
    dense.save_pretrained(tmp_path / "dense")  # sharded like a big checkpoint would be
    tok.save_pretrained(tmp_path / "dense")
    whole, _ = load_model(str(tmp_path / "dense"))
    svdllm.compress(whole, tok, _config(data_dir, tmp_path, **kw), out=tmp_path / "whole", progress=False)
    lazy, lazy_tok = load_model(str(tmp_path / "dense"), layerwise=True)
    assert any(p.is_meta for p in lazy.parameters())
    res = svdllm.compress(lazy, lazy_tok, _config(data_dir, tmp_path, **kw), out=tmp_path / "lazy", progress=False)
    ratios = kw["ratio"] if isinstance(kw["ratio"], list) else [kw["ratio"]]
    for r, one in zip(ratios, res):
        sub = (lambda d: d / f"ratio-{r:g}") if len(ratios) > 1 else (lambda d: d)
        a, b = svdllm.load(sub(tmp_path / "whole")), svdllm.load(sub(tmp_path / "lazy"))
        for (n, p), (m, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert n == m
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
        ma = json.loads((sub(tmp_path / "whole") / "svdllm_manifest.json").read_text())
        mb = json.loads((sub(tmp_path / "lazy") / "svdllm_manifest.json").read_text())
        assert ma["ranks"] == mb["ranks"] and ma["params"] == mb["params"]
        assert (ma["method"], ma["alloc"], ma["update"]) == (mb["method"], mb["alloc"], mb["update"])
        assert (sub(tmp_path / "lazy") / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_resident_weights_do_not_grow_with_depth(tok, data_dir, tmp_path):
    peaks = {}
    for depth in (4, 32):
        dense = tiny_model("llama", num_hidden_layers=depth)
        dense.save_pretrained(tmp_path / f"d{depth}")
        tok.save_pretrained(tmp_path / f"d{depth}")
        lazy, _ = load_model(str(tmp_path / f"d{depth}"), layerwise=True)
        res = svdllm.compress(lazy, tok, _config(data_dir, tmp_path, ratio=0.4), out=tmp_path / f"o{depth}",
                              progress=False)[0]
        peaks[depth] = res.timings["peak_resident_weight_mb"]
        layer = sum(p.numel() * 4 for p in dense.model.layers[0].parameters()) / 2**20
        rest = sum(p.numel() * 4 for n, p in dense.named_parameters() if ".layers." not in n) / 2**20
        assert peaks[depth] <= rest + 2 * layer  # one dense layer (and its factors) beside the embeddings
    assert peaks[4] == pytest.approx(peaks[32])


def test_layerwise_needs_an_output_directory(tok, data_dir, tmp_path):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    lazy, _ = load_model(str(tmp_path / "dense"), layerwise=True)
    with pytest.raises(SvdllmError, match="output directory"):
        svdllm.compress(lazy, tok, _config(data_dir, tmp_path, ratio=0.4), progress=False)


def test_layerwise_device_placement(tok, data_dir, tmp_path):
    """Layers are read onto the model's device one at a time (the CPU here; a GPU the same way)."""
    from svdllm.models.lazy import materialize, release, to_device

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    lazy, _ = load_model(str(tmp_path / "dense"), layerwise=True)
    to_device(lazy, "cpu")
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight or not lazy.config.tie_word_embeddings
    materialize(lazy, "model.layers.1.")
    assert all(not p.is_meta for p in lazy.model.layers[1].parameters())
    assert all(p.is_meta for p in lazy.model.layers[0].parameters())
    torch.testing.assert_close(lazy.model.layers[1].mlp.up_proj.weight, dense.model.layers[1].mlp.up_proj.weight)
    release(lazy, "model.layers.1.")
    assert all(p.is_meta for p in lazy.model.layers[1].parameters())
