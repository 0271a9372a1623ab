"""A torch.distributed rank for test_distributed.py (spawned processes import it from here)."""
import os
import sys


def config(kind: str, data_dir: str, cache: str):
    """The configurations test_distributed.py compares in 1 and 2 processes."""
    import svdllm

    cal = svdllm.CalibrationConfig(nsamples=5, seqlen=32, data_dir=data_dir, grad_samples=3)
    if kind == "best":  # the default: gradient pass with output-side Grams, the global allocation with its
        # measured truncations over two ratios, the closed-form update at 0.6
        return svdllm.CompressConfig(ratio=[0.3, 0.6], cache_dir=cache, calibration=cal)
    # the paired streams of the closed-form update, with cross moments for the attention
    return svdllm.CompressConfig(preset="paper", ratio=[0.3, 0.6], update="closed-form-drift", cache_dir=cache, calibration=cal)


def run(rank: int, world: int, port: int, tests_dir: str, data_dir: str, out: str, cache: str, kind: str) -> None:
    sys.path.insert(0, tests_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import svdllm
        from tiny import byte_tokenizer, tiny_model

        svdllm.compress(tiny_model("qwen2"), byte_tokenizer(), config(kind, data_dir, cache), out=out, progress=False)
    finally:
        dist.destroy_process_group()
