"""Where a compressed model leaves the dense one: on held-out test windows (WikiText-2 test, the protocol's first
windows), the residual stream after every decoder layer is compared with the dense model's on the same tokens,

  drift_l = median over tokens t of ‖h_l,t(compressed) − h_l,t(dense)‖ / ‖h_l,t(dense)‖

together with how often the compressed model's next-token choice is the dense model's (top-1 agreement) and the
perplexity on those windows, as it is and at the one softmax temperature that minimises it (fitted on the same
windows: a diagnostic, not a result). A model above the vocabulary size (49,152 for SmolLM2) does worse than a
uniform guess; among such collapsed models perplexity measures how confidently wrong each is, not how close it
stays to the dense model, which the drift and the agreement do say.

A median over tokens, not one norm over the window: a few tokens (the first, attention sinks) carry residual
norms ten times the rest and would otherwise decide the number alone.
Usage: python benchmarks/methods/drift.py NAME=MODEL_DIR [...] [--base smollm2-135m] [--windows 4] [--dataset wikitext2]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import svdllm
from svdllm.data import eval_windows, load_text, tokenize_text

SHOW = (1, 2, 4, 8, 15, 22, 29, 30)  # layer outputs shown (0: embeddings; the last comes after the final norm)


@torch.no_grad()
def states(model, windows: torch.Tensor) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per window: the residual stream after each layer, and the logits."""
    out = []
    for w in windows:
        r = model(input_ids=w[None], use_cache=False, output_hidden_states=True)
        out.append(([h[0].float() for h in r.hidden_states], r.logits[0].float()))
    return out


def compare(dense, comp, windows: torch.Tensor) -> dict:
    layers = len(dense[0][0])
    rel: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    agree, nll, count = 0, 0.0, 0
    temps = torch.logspace(-1, 2, 31)  # 0.1 .. 100, 26% apart
    tnll = torch.zeros(len(temps), dtype=torch.float64)
    for (hd, ld), (hc, lc), w in zip(dense, comp, windows):
        for i in range(layers):
            rel[i].append((hc[i] - hd[i]).norm(dim=-1) / hd[i].norm(dim=-1))
        agree += int((lc[:-1].argmax(-1) == ld[:-1].argmax(-1)).sum())
        nll += float(F.cross_entropy(lc[:-1], w[1:], reduction="sum"))
        for k, t in enumerate(temps):
            tnll[k] += float(F.cross_entropy(lc[:-1] / t, w[1:], reduction="sum"))
        count += w.numel() - 1
    best = int(tnll.argmin())
    return {"drift": [float(torch.cat(r).median()) for r in rel], "top1_agreement": agree / count,
            "ppl": math.exp(nll / count), "ppl_best_temperature": math.exp(float(tnll[best]) / count),
            "temperature": float(temps[best])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--dataset", default="wikitext2")
    a = p.parse_args()
    dense_model, tok = svdllm.load_model(a.base)
    windows = eval_windows(tokenize_text(tok, load_text(a.dataset, "test")), 2048, a.windows)
    dense = states(dense_model, windows)
    print(f"{a.windows} windows of {a.dataset} test; drift Lk: the median relative error of the residual stream "
          "after layer k\n")
    show = [i for i in SHOW if i < len(dense[0][0])]
    print("| model | ppl | ppl at best T (T) | top-1 = dense | " + " | ".join(f"drift L{i}" for i in show) + " |")
    print("|---|---|---|---|" + "---|" * len(show))
    for spec in ["dense=", *a.models]:
        name, path = spec.split("=", 1)
        r = compare(dense, dense if name == "dense" else states(svdllm.load(path), windows), windows)
        print(f"| {name} | {r['ppl']:.4g} | {r['ppl_best_temperature']:.4g} ({r['temperature']:.2g}) | "
              f"{r['top1_agreement']:.3f} | "
              + " | ".join(f"{r['drift'][i]:.3f}" for i in show) + " |", flush=True)
    del dense_model


if __name__ == "__main__":
    main()
