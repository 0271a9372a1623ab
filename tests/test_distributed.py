"""Data-parallel calibration: 2 processes (gloo, CPU) give the model 1 process gives, to float64 rounding."""
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import svdllm
from tiny import tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["best", "closed-form-drift"])
def test_two_processes_equal_one(kind, tok, data_dir, tmp_path):
    import dist_worker

    tests_dir = str(Path(__file__).parent)
    mp.start_processes(dist_worker.run, args=(2, _free_port(), tests_dir, str(data_dir), str(tmp_path / "two"),
                                              str(tmp_path / "cache2"), kind), nprocs=2, start_method="spawn")
    config = dist_worker.config(kind, str(data_dir), str(tmp_path / "cache1"))
    svdllm.compress(tiny_model("qwen2"), tok, config, out=tmp_path / "one", progress=False)
    for r in ("0.3", "0.6"):
        a, b = svdllm.load(tmp_path / "one" / f"ratio-{r}"), svdllm.load(tmp_path / "two" / f"ratio-{r}")
        ranks_a = {n: m.rank for n, m in a.named_modules() if hasattr(m, "rank")}
        assert ranks_a == {n: m.rank for n, m in b.named_modules() if hasattr(m, "rank")}
        from svdllm.factorization import LowRankLinear

        low = dict(a.named_modules())
        for n, m in b.named_modules():
            if isinstance(m, LowRankLinear):  # the product: an SVD's signs are free
                torch.testing.assert_close(m.u.weight @ m.v.weight, low[n].u.weight @ low[n].v.weight,
                                           rtol=1e-4, atol=1e-5, msg=n)
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            if not n.endswith((".u.weight", ".v.weight")):
                assert torch.equal(p, q), n
