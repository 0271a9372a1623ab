"""Fine-tuning data: Alpaca-style instruction records, or plain text cut into windows.

Instruction records are formatted with the prompt template of the Stanford Alpaca release; the loss is taken on
the response tokens only (the prompt's labels are -100), as in LLM-Pruner's post-training recipe that SVD-LLM uses.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SvdllmError
from .texts import CORPORA, load_text, resolve_data_dir

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_FILE = "alpaca/alpaca_data.json"
IGNORE = -100


def alpaca_prompt(record: dict) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def _read_records(path: Path) -> list[dict]:
    from .sources import read_records

    records = read_records(path)
    if not all("instruction" in r and "output" in r for r in records):
        raise SvdllmError(f"{path} must be a JSON list (or JSONL) of records with 'instruction', 'output' and "
                          "optionally 'input' keys, as in Alpaca.")
    return records


def load_records(data: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """`data` is "alpaca" (the data directory's copy, else the hub's tatsu-lab/alpaca) or a .json/.jsonl path."""
    if data != "alpaca":
        path = Path(data).expanduser()
        if not path.is_file():
            raise SvdllmError(f"Data {data!r} is neither 'alpaca', a corpus name ({', '.join(CORPORA)}) nor an "
                              "existing .json/.jsonl file of instruction records.")
        return _read_records(path)
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = root / ALPACA_FILE
        if not path.is_file():
            raise SvdllmError(f"Missing {path}: the data directory {root} has no Alpaca copy ({ALPACA_FILE}).")
        return _read_records(path)
    from .texts import hub_reachable

    if not hub_reachable():
        raise SvdllmError("No data directory was given for Alpaca and the Hugging Face hub is not reachable: pass "
                          "--data-dir (a folder with alpaca/alpaca_data.json) or set $SVDLLM_DATA_DIR.")
    try:
        import datasets

        return [dict(r) for r in datasets.load_dataset("tatsu-lab/alpaca", split="train")]
    except Exception as e:  # the hub raises many types (connection, missing package)
        raise SvdllmError(f"Could not fetch Alpaca from the Hugging Face hub ({e}); without network, pass "
                          "--data-dir (a folder with alpaca/alpaca_data.json).") from e


def _user_turn(record: dict) -> str:
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def conversation_text(tokenizer, record: dict) -> str:
    """A record as one finished exchange in the model's chat template (Alpaca's prompt when it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return alpaca_prompt(record) + record["output"] + (tokenizer.eos_token or "")
    return tokenizer.apply_chat_template([{"role": "user", "content": _user_turn(record)},
                                          {"role": "assistant", "content": record["output"]}], tokenize=False)


def conversation_windows(tokenizer, data: str, nsamples: int, seqlen: int, seed: int, data_dir=None) -> torch.Tensor:
    """`nsamples` consecutive windows of `seqlen` tokens over instruction records written as conversations."""
    records = load_records(data, data_dir)
    return _consecutive_windows(tokenizer, [lambda r=r: conversation_text(tokenizer, r) for r in records], data,
                                nsamples, seqlen, seed)


def chat_windows(tokenizer, chats: list[list[dict]], label: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The same over chats ({'role', 'content'} turns), each written in the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise SvdllmError(f"{label} holds chats ('messages'), and this model's tokenizer has no chat template; give "
                          "the text as 'text' records or a plain-text file instead.")
    return _consecutive_windows(tokenizer, [lambda c=c: tokenizer.apply_chat_template(c, tokenize=False)
                                            for c in chats], label, nsamples, seqlen, seed)


def _consecutive_windows(tokenizer, renders: list, label: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Consecutive windows over texts drawn in a random order from `seed`. Only as many texts as the windows need
    are rendered and tokenized: Alpaca's 52,002 would take a minute."""
    order = torch.randperm(len(renders), generator=torch.Generator().manual_seed(seed)).tolist()
    need, ids = nsamples * seqlen, []
    for i in order:
        ids += tokenizer(renders[i](), add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            return torch.tensor(ids[:need]).view(nsamples, seqlen)
    raise SvdllmError(f"{label} has {len(ids)} tokens as conversations, fewer than the {nsamples} × {seqlen} the "
                      "calibration windows need; lower --nsamples or --seqlen.")


def tokenize_record(tokenizer, record: dict, max_len: int, train_on_inputs: bool = False,
                    template: str = "alpaca") -> dict:
    """Token ids and labels of one record; the loss is on the response (and its end of turn) only.

    template="alpaca": Alpaca's prompt, then the response and EOS (the paper's recipe); "chat": the exchange in the
    model's chat template, so a model that will be chatted with is trained on the markup it will see.
    """
    if template == "chat":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": _user_turn(record)}], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer(conversation_text(tokenizer, record), add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    else:
        prompt = alpaca_prompt(record)
        full = tokenizer(prompt + record["output"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not full or full[-1] != tokenizer.eos_token_id):
            full = full + [tokenizer.eos_token_id]
        n_prompt = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    full = full[:max_len]  # a truncated example keeps no EOS, as in the Alpaca/LLM-Pruner recipe
    labels = list(full)
    if not train_on_inputs:
        labels[:n_prompt] = [IGNORE] * min(n_prompt, len(labels))
    return {"input_ids": full, "labels": labels}


def text_examples(tokenizer, name: str, max_len: int, data_dir=None) -> list[dict]:
    """A corpus (wikitext2, ptb, c4) as consecutive windows of `max_len` tokens, loss on every token."""
    ids = tokenizer(load_text(name, "validation", data_dir), add_special_tokens=True)["input_ids"]
    n = len(ids) // max_len
    return [{"input_ids": ids[i * max_len:(i + 1) * max_len], "labels": ids[i * max_len:(i + 1) * max_len]}
            for i in range(n)]


def load_items(tokenizer, data: str, max_len: int, data_dir=None, train_on_inputs: bool = False,
               template: str = "alpaca"):
    """The raw items of a fine-tuning set and a function that turns a selection of them into examples.

    Instruction records are tokenized only once selected; an example whose response was cut away entirely
    (a prompt longer than `max_len`) teaches nothing and is dropped.
    """
    if data in CORPORA:
        return text_examples(tokenizer, data, max_len, data_dir), list
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise SvdllmError("--template chat needs a tokenizer with a chat template, and this model's has none; use "
                          "--template alpaca.")

    def prepare(records):
        examples = [tokenize_record(tokenizer, r, max_len, train_on_inputs, template) for r in records]
        return [e for e in examples if any(t != IGNORE for t in e["labels"][1:])]

    return load_records(data, data_dir), prepare


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
