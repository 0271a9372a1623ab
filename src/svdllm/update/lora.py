"""SVD-LLM's parameter update with sequential low-rank approximation (paper §3.2, Algorithm 1).

LoRA on the factors themselves, W_u ← W_u + B_u·A_u and W_v ← W_v + B_v·A_v, never on their product, so the
low-rank structure survives. The two are trained one after the other: first every W_u with every W_v frozen, the
adapters merged, then every W_v with the new W_u frozen, since updating both at once lets each undo the other's
progress (the paper's Table 15). The adapters come from `peft`; merged back, the model keeps its ranks and size.

Checkpoints (adapter, optimizer, scheduler, RNG, position) are written atomically every `save_every` steps, so an
interrupted run resumes to the bit-identical result of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.instructions import IGNORE, collate, load_items
from ..errors import SvdllmError
from ..nn.low_rank import LowRankLinear
from ..utils.atomic import atomic_path, atomic_write_text, save_figure
from ..utils.extras import available

log = logging.getLogger(__name__)
STATE_NAME = "state.pt"


@dataclass
class FinetuneConfig:
    """Defaults: the GPU recipe SVD-LLM takes from LLM-Pruner (Alpaca, 2 epochs, lr 1e-4, batch 64, LoRA r 8)."""

    data: str = "alpaca"  # "alpaca", a .json/.jsonl of instruction records, or a corpus name (wikitext2, ptb, c4)
    data_dir: str | None = None
    samples: int | None = None  # training examples drawn from the data (None: all but the validation ones)
    val_samples: int = 2000
    epochs: float = 2.0
    lr: float = 1e-4
    warmup_steps: int = 100
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seq_len: int = 256  # examples are cut to this many tokens
    batch_size: int = 64  # examples per optimizer step
    micro_batch: int = 4  # examples per forward/backward (gradient accumulation makes up the batch)
    max_steps: int | None = None  # per stage; caps `epochs`
    stages: str = "sequential"  # "sequential": W_u then W_v (the paper); "joint": both at once (plain LoRA)
    train_on_inputs: bool = False
    # how instruction records are written: "alpaca" (the paper's prompt) or "chat" (the tokenizer's chat template,
    # for an instruct model that will be used in chat)
    template: str = "alpaca"
    seed: int = 42
    save_every: int = 50
    # equal norms for the two factors of every component before training (LowRankLinear.balance_): Adam's step is
    # about lr per element whatever the weight's scale, so on kfac-svd's split (W_u ~10⁵ × W_v) stage 1 could not
    # move W_u and stage 2 threw W_v about; False keeps the method's split (SVD-LLM's W_u = U·Σ^½)
    balance: bool = True

    def validate(self) -> None:
        checks = [(self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
                  (self.lr > 0, f"--lr must be positive, got {self.lr}"),
                  (self.lora_r >= 1, f"--lora-r must be at least 1, got {self.lora_r}"),
                  (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
                  (self.seq_len >= 8, f"--seq-len must be at least 8 tokens, got {self.seq_len}"),
                  (self.batch_size >= 1 and self.micro_batch >= 1, "--batch-size and --micro-batch must be >= 1"),
                  (self.samples is None or self.samples >= 1, f"--samples must be at least 1, got {self.samples}"),
                  (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
                  (self.val_samples >= 0, f"--val-samples must be >= 0, got {self.val_samples}"),
                  (self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}"),
                  (self.stages in STAGES, f"--stages must be one of {', '.join(STAGES)}, got {self.stages!r}"),
                  (self.template in TEMPLATES,
                   f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")]
        for ok, message in checks:
            if not ok:
                raise SvdllmError(message + ".")


TEMPLATES = ("alpaca", "chat")
STAGES = {"sequential": [("u",), ("v",)], "joint": [("u", "v")]}

# cpu: sized for SmolLM2-135M to finish in about half an hour on 2 cores (measured in BENCHMARKS.md).
PRESETS = {
    "paper": {},
    "cpu": dict(samples=1024, val_samples=64, epochs=1.0, lr=3e-4, warmup_steps=4, batch_size=16, micro_batch=4,
                save_every=8),
}


def default_config(device: torch.device | str = "cpu", **overrides) -> FinetuneConfig:
    """The paper's recipe on a GPU, the CPU preset otherwise."""
    return preset("paper" if torch.device(device).type == "cuda" else "cpu", **overrides)


def preset(name: str, **overrides) -> FinetuneConfig:
    if name not in PRESETS:
        raise SvdllmError(f"Unknown fine-tuning preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return FinetuneConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def low_rank_names(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not names:
        raise SvdllmError("The model has no low-rank layers to fine-tune; compress it first (svdllm compress).")
    return names


def _split(config: FinetuneConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """Seeded held-out and training examples; only the records drawn are tokenized (Alpaca has 52K)."""
    items, prepare = load_items(tokenizer, config.data, config.seq_len, config.data_dir, config.train_on_inputs,
                                 config.template)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_val = min(config.val_samples, len(items) // 10) if config.val_samples else 0
    val = prepare([items[i] for i in order[:n_val]])
    rest = order[n_val:] if config.samples is None else order[n_val:n_val + config.samples]
    train = prepare([items[i] for i in rest])
    if not train:
        raise SvdllmError("No training examples are left; use more data or fewer --val-samples.")
    return train, val


class _Epochs:
    """Examples of optimizer step k: consecutive slices of one seeded permutation per epoch, so any step's batch
    is known without replaying the ones before it (what resuming needs)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.perms = n, seed, {}

    def batch(self, step: int, size: int) -> list[int]:
        out = []
        for pos in range(step * size, (step + 1) * size):
            epoch, i = divmod(pos, self.n)
            if epoch not in self.perms:
                self.perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(self.perms[epoch][i]))
        return out


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype == torch.float16
    return contextlib.nullcontext(), False  # float32 on the CPU


class _HeadAtRows(nn.Module):
    """The LM head applied only where a next-token label exists. The prompt's and the padding's logits are never
    scored, and with a large vocabulary they are much of the work (SmolLM2: the head is 28M of 135M parameters)."""

    def __init__(self, head: nn.Module, rows: torch.Tensor):
        super().__init__()
        self.head, self.rows = head, rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden[self.rows])


def _loss_sum(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]
    rows = torch.zeros_like(batch["labels"], dtype=torch.bool)
    rows[:, :-1] = targets != IGNORE  # position t predicts token t + 1
    head = model.get_output_embeddings()
    model.set_output_embeddings(_HeadAtRows(head, rows))
    try:  # what follows the head in the model (Gemma's soft-capping) is elementwise: rows or not, the same values
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        model.set_output_embeddings(head)
    loss = nn.functional.cross_entropy(logits.float(), targets[targets != IGNORE], reduction="sum")
    return loss, int(rows.sum())


@torch.no_grad()
def _val_loss(model, val: list[dict], config: FinetuneConfig, pad_id: int, device) -> float | None:
    if not val:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    val = sorted(val, key=lambda ex: len(ex["input_ids"]))  # less padding; the mean is the same
    for i in range(0, len(val), config.micro_batch):
        loss, n = _loss_sum(model, collate(val[i:i + config.micro_batch], pad_id), device)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def _atomic_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _identity(config: FinetuneConfig, names: list[str], model: nn.Module) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("save_every", "data_dir")}
    ranks = {n: model.get_submodule(n).rank for n in names}
    return {"config": cfg, "ranks": ranks}


def finetune(model: nn.Module, tokenizer, config: FinetuneConfig | None = None,
             checkpoint_dir: str | os.PathLike | None = None, progress: bool = True, callback=None) -> dict:
    """Sequential LoRA on the factors of a compressed `model`, merged back in place. Returns the history.

    `checkpoint_dir`: where checkpoints go and where an interrupted run is resumed from (same settings only).
    `callback(stage, step, loss)` is called after every optimizer step (a progress hook; it may raise to stop).
    """
    from ..utils.extras import require

    require("peft", "LoRA fine-tuning (--update lora, svdllm finetune)")
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    config = config or FinetuneConfig()
    config.validate()
    names = low_rank_names(model)
    from ..quantization.quantize import is_quantized

    if any(is_quantized(p) for p in model.parameters()):
        raise SvdllmError("The model is quantized; fine-tune the unquantized compressed model, then quantize it.")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type == "cpu" and dtype != torch.float32:
        model.float()  # half-precision training on the CPU is slow and loses small updates: master weights fp32
    if config.balance:  # before anything is measured or resumed: an interrupted run balances the same way again
        for n in names:
            model.get_submodule(n).balance_()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train, val = _split(config, tokenizer)
    steps = max(1, math.ceil(config.epochs * len(train) / config.batch_size))
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    identity = _identity(config, names, model)
    state = None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        if (ckpt / STATE_NAME).is_file():
            try:  # our own file: optimizer state and RNG need the full pickle format
                state = torch.load(ckpt / STATE_NAME, weights_only=False)
            except Exception as e:  # a truncated or foreign file raises whatever unpickling meets
                raise SvdllmError(f"The checkpoint {ckpt / STATE_NAME} is damaged ({type(e).__name__}); remove "
                                  f"{ckpt} to start afresh.") from e
            if not isinstance(state, dict) or state.get("identity") != identity:
                raise SvdllmError(f"The checkpoint in {ckpt} was written by a run with other settings or another "
                                  "model; remove that directory (or choose another) to start afresh.")
            log.info("Resuming fine-tuning from %s (stage %d, step %d)", ckpt, state["stage"], state["step"])
    history = state["history"] if state else {"train": [], "val": [], "steps_per_stage": steps,
                                              "train_examples": len(train), "val_examples": len(val)}
    autocast, use_scaler = _autocast(device)
    epochs = _Epochs(len(train), config.seed)
    t0 = time.perf_counter()
    wall_before = state["wall_s"] if state else 0.0
    if not state and val:
        history["val"].append({"stage": 0, "when": "before", "loss": _val_loss(model, val, config, pad_id, device)})

    for si, factors in enumerate(STAGES[config.stages]):
        if state and si < state["stage"]:  # finished before the interruption: its merged factors are on disk
            done = torch.load(ckpt / f"stage-{si}.pt", weights_only=True)
            with torch.no_grad():
                for k, v in done.items():
                    model.get_submodule(k).weight.copy_(v)  # k: a factor's module name
            continue
        torch.manual_seed(config.seed + si)
        targets = [f"{n}.{f}" for n in names for f in factors]
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, bias="none")
        peft_model = get_peft_model(model, lora)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
        scheduler = get_linear_schedule_with_warmup(optimizer, min(config.warmup_steps, steps // 10 + 1), steps)
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        start = 0
        if state and si == state["stage"] and "adapter" in state:  # (a stage-boundary state has no adapter yet)
            set_peft_model_state_dict(peft_model, state["adapter"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            start = state["step"]
        peft_model.train()
        label = "W_" + "+W_".join(factors)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"LoRA on {label}", disable=not progress)
        for step in bar:
            # micro-batches of similar length pad less; the step's gradient (one sum over its tokens) is the same
            idx = sorted(epochs.batch(step, config.batch_size), key=lambda i: len(train[i]["input_ids"]))
            chunks = [[train[i] for i in idx[j:j + config.micro_batch]] for j in range(0, len(idx), config.micro_batch)]
            batches = [collate(c, pad_id) for c in chunks]
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            total = 0.0
            for b in batches:
                with autocast:
                    loss, _ = _loss_sum(peft_model, b, device)
                loss = loss / max(n_tokens, 1)
                (scaler.scale(loss) if scaler else loss).backward()
                total += loss.item()
            if not math.isfinite(total):
                where = f" The last checkpoint in {ckpt} is intact." if ckpt else ""
                raise SvdllmError(f"The training loss became {total} at stage {si + 1} ({label}), step {step + 1}: "
                                  f"lower --lr (now {config.lr:g}) or train in float32.{where}")
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history["train"].append({"stage": si, "step": step + 1, "loss": total, "lr": scheduler.get_last_lr()[0],
                                     "tokens": n_tokens})
            bar.set_postfix(loss=f"{total:.4f}")
            if ckpt is not None and ((step + 1) % config.save_every == 0 or step + 1 == steps):
                _atomic_save({"identity": identity, "stage": si, "step": step + 1,
                              "adapter": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                              "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                              "history": history, "wall_s": wall_before + time.perf_counter() - t0},
                             ckpt / STATE_NAME)
            if callback is not None:
                callback(si, step + 1, total)
        bar.close()
        peft_model.merge_and_unload()  # W ← W + (alpha/r)·B·A in every targeted factor, adapters removed
        if "peft_config" in model.__dict__:  # left behind by peft; it would be saved into nothing but confuses reloads
            del model.peft_config
        state = None
        if val:
            history["val"].append({"stage": si, "when": "after", "loss": _val_loss(model, val, config, pad_id, device)})
        if ckpt is not None:
            merged = {t: model.get_submodule(t).weight.detach().clone() for t in targets}
            _atomic_save(merged, ckpt / f"stage-{si}.pt")
            _atomic_save({"identity": identity, "stage": si + 1, "step": 0, "history": history,
                          "wall_s": wall_before + time.perf_counter() - t0}, ckpt / STATE_NAME)
    model.eval()
    if dtype != next(model.parameters()).dtype:
        model.to(dtype)
    history["wall_s"] = wall_before + time.perf_counter() - t0
    history["config"] = dataclasses.asdict(config)
    return history


def plot_history(history: dict, path: str | os.PathLike) -> Path:
    """Training loss per step (both stages, the boundary marked) and the validation loss at each stage's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    offset, bounds = 0, []
    for si in sorted({r["stage"] for r in history["train"]}):
        rows = [r for r in history["train"] if r["stage"] == si]
        xs = [offset + r["step"] for r in rows]
        ax.plot(xs, [r["loss"] for r in rows], lw=1, label=f"train, stage {si + 1}")
        offset = xs[-1] if xs else offset
        bounds.append(offset)
    for b in bounds[:-1]:
        ax.axvline(b, color="grey", ls=":", lw=1)
    val = history.get("val", [])
    if val:
        vx = [0 if v["when"] == "before" else bounds[min(v["stage"], len(bounds) - 1)] for v in val]
        ax.plot(vx, [v["loss"] for v in val], "ko--", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_title("Sequential LoRA fine-tuning of the low-rank factors")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def summary(history: dict) -> dict:
    """The numbers a closing note needs: losses at the stage boundaries, steps, wall time."""
    val = {f"{v['when']}_stage{v['stage'] + 1}" if v["when"] == "after" else "before": v["loss"]
           for v in history.get("val", [])}
    return {"steps_per_stage": history["steps_per_stage"], "train_examples": history["train_examples"],
            "val_loss": val, "final_train_loss": history["train"][-1]["loss"] if history["train"] else None,
            "wall_s": history.get("wall_s")}


def write_history(history: dict, out_dir: str | os.PathLike) -> None:
    out = Path(out_dir)

    atomic_write_text(out / "finetune_history.json", json.dumps(history, indent=1))
    if available("matplotlib"):
        plot_history(history, out / "finetune_loss.png")
    else:
        log.info("No loss plot: matplotlib is not installed (pip install 'svdllm[plots]'); the history is in JSON.")


def finetune_and_save(model: nn.Module, tokenizer, config: FinetuneConfig, manifest: dict, update: str,
                      out: str | os.PathLike | None, overwrite: bool = False, progress: bool = True,
                      checkpoint_dir: str | os.PathLike | None = None, **extra) -> dict:
    """Fine-tune in place, record it in the manifest, and (with `out`) save the model beside its loss curve.
    Checkpoints go to `.<out>.finetune` beside `out` and are removed once the model is saved."""
    import shutil

    from ..io.checkpoint import save

    ckpt = checkpoint_dir or (None if out is None else Path(out).parent / f".{Path(out).name}.finetune")
    history = finetune(model, tokenizer, config, checkpoint_dir=ckpt, progress=progress)
    manifest.update(update=update, finetune=dict(summary(history), config=history["config"], **extra))
    if out is not None:
        save(model, tokenizer, out, manifest, overwrite=overwrite)
        write_history(history, out)
        shutil.rmtree(ckpt, ignore_errors=True)
    return history
