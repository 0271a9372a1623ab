"""Time of the --bits spectra phase per matrix at Llama-3-8B shapes (random weights, a synthetic input Gram with a
spread of channel scales), one thread: the method's decomposition and quantization_errors (GPTQ at 3, 4, 8 bits on W and
on its factor pair at half the usable rank). Usage: python benchmarks/quantization/joint_cost_8b.py OUT.json"""
import torch, time, json, sys
torch.set_num_threads(1)
from svdllm.quantization.sensitivity import quantization_errors
from svdllm.factorization import get_method
torch.manual_seed(0)
out = {}
for m, n in [(4096, 4096), (1024, 4096)]:
    w = torch.randn(m, n, dtype=torch.float64) / n**0.5
    x = torch.randn(2 * n, n, dtype=torch.float64) * torch.linspace(0.1, 3, n)
    gram = x.T @ x
    del x
    stats = type("S", (), {"gram": gram})()
    t = time.time(); dec = get_method("svd-llm").decompose(w, stats); td = time.time() - t
    t = time.time(); e = quantization_errors(w, dec, gram, (3, 4, 8), 32, usable=(m * n - 1) // (m + n)); tq = time.time() - t
    out[f"{m}x{n}"] = {"decompose_s": td, "quantization_errors_s": tq, "rank": (m * n - 1) // (m + n) // 2}
    print(m, n, out[f"{m}x{n}"], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
