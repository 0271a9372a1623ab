"""Does a compressed instruct model still answer in chat? For each model, over N chat prompts it has not been
calibrated or tuned on (PIQA's validation goals, "How do I ...?"), in the tokenizer's chat template:
the share of prompts whose greedy reply is empty (the end of turn comes first), the median log-probability of
that end-of-turn token at the reply's first position, and the median length of the greedy reply in tokens.

Usage: python benchmarks/evaluation/chat_turn.py MODEL [MODEL ...] [--prompts 50] [--max-new-tokens 48] [--out FILE.json]
(MODEL as `svdllm eval` takes it; $SVDLLM_DATA_DIR must point at the data folder)
"""
import argparse
import json
import statistics
import sys

import torch

from svdllm.data import resolve_data_dir
from svdllm.utils.atomic import atomic_write_text
from svdllm import load_model


def prompts(n: int) -> list[str]:
    path = resolve_data_dir(None) / "piqa" / "valid.jsonl"
    with path.open() as f:
        return [json.loads(line)["goal"] for line, _ in zip(f, range(n))]


@torch.no_grad()
def chat_turn(model, tok, goals: list[str], max_new_tokens: int) -> dict:
    ends = {tok.eos_token_id} | set(torch.tensor(model.generation_config.eos_token_id or []).flatten().tolist())
    end = tok.eos_token_id
    first_logp, lengths, empty, replies = [], [], 0, []
    for goal in goals:
        text = tok.apply_chat_template([{"role": "user", "content": goal}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        first_logp.append(model(ids).logits[0, -1].float().log_softmax(-1)[end].item())
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=end)[0, ids.shape[1]:]
        stop = next((i for i, t in enumerate(out.tolist()) if t in ends), len(out))
        lengths.append(stop)
        empty += stop == 0
        replies.append(tok.decode(out[:stop]))
    return {"prompts": len(goals), "empty_reply_share": empty / len(goals),
            "median_end_of_turn_logp_first": statistics.median(first_logp),
            "median_reply_tokens": statistics.median(lengths), "max_new_tokens": max_new_tokens,
            "examples": [{"prompt": g, "reply": r} for g, r in zip(goals[:3], replies[:3])]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out")
    a = p.parse_args(argv)
    goals = prompts(a.prompts)
    results = {}
    for name in a.models:
        model, tok = load_model(name)
        model.eval()
        r = results[name] = chat_turn(model, tok, goals, a.max_new_tokens)
        print(f"{name}: empty replies {r['empty_reply_share']:.0%}, median log p(end of turn first) "
              f"{r['median_end_of_turn_logp_first']:.2f}, median reply {r['median_reply_tokens']} tokens; "
              f"{r['examples'][0]['prompt']!r} -> {r['examples'][0]['reply'][:80]!r}", flush=True)
    if a.out:
        atomic_write_text(a.out, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
