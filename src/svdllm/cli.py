"""The `svdllm` command: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .errors import SvdllmError

log = logging.getLogger("svdllm")


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratio takes numbers separated by commas, e.g. 0.2,0.4; got {text!r}")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key.strip():
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER, e.g. attn_keep=0.5; got {text!r}")


def _widths(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bit widths such as 3,4,8; got {text!r}")


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    try:
        if not sep or not 0 <= int(k) < int(n):
            raise ValueError
        return int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, e.g. 0/4 for the first of four; got {text!r}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="built-in name (smollm2-135m, gemma3-270m), a .gguf file, a model directory "
                        "(including one written by `svdllm compress`) or a Hugging Face hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model weights (the compression mathematics always runs in float64)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder with the shared data layout (wikitext2_raw/, ptb/, c4/); default $SVDLLM_DATA_DIR, "
                        "else the Hugging Face hub")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


# The calibration flags, declared once: (flag, CalibrationConfig field, argparse keywords). A flag's default is the
# field's default in config.py unless a command passes its own (the demo's smaller calibration).
CALIBRATION_ARGS = [
    ("calib-dataset", "dataset", dict(
        metavar="SOURCE[,SOURCE...]",
        help="calibration text: wikitext2, ptb, c4, alpaca, your own file (plain text; .jsonl/.json records with "
             "'text', 'messages' chats or 'instruction'/'output'), or a Hugging Face dataset "
             "hf:DATASET[:CONFIG]:SPLIT:COLUMN; a comma-separated mix shares the windows evenly, e.g. "
             "wikitext2,alpaca for an instruct model (default %(default)s)")),
    ("nsamples", "nsamples", dict(type=int, help="calibration windows (default %(default)s)")),
    ("seqlen", "seqlen", dict(type=int, help="tokens per calibration window (default %(default)s)")),
    ("seed", "seed", dict(type=int)),
    ("batch-size", "batch_size", dict(type=int, help="calibration windows per forward")),
    ("grad-samples", "grad_samples", dict(
        type=int, help="windows for the gradient pass that fwsvd and the dipsvd/global allocators need (default "
                       "%(default)s, at most --nsamples; cached)")),
    ("calib-mode", "mode", dict(  # choices: config.CALIBRATION_MODES
        help="original: every layer sees the dense model's activations (one pass serves all ratios); "
             "sequential: each layer sees the already-compressed layers' outputs")),
]


def _add_calibration_args(p: argparse.ArgumentParser, flags: tuple[str, ...] | None = None,
                          helps: dict[str, str] | None = None, **defaults) -> None:
    """Add the calibration flags (all, or those named in `flags`) to a subcommand; each default is
    CalibrationConfig's unless `defaults` gives the command's own (by field name), `helps` another help text."""
    import dataclasses

    from .config import CALIBRATION_MODES, CalibrationConfig

    fields = {f.name: f.default for f in dataclasses.fields(CalibrationConfig)}
    chosen = [a for a in CALIBRATION_ARGS if flags is None or a[0] in flags]
    assert set(defaults) <= {name for _, name, _ in chosen}, defaults
    for flag, name, kwargs in chosen:
        kwargs = {**kwargs, "default": defaults.get(name, fields[name])}
        if name == "mode":
            kwargs["choices"] = list(CALIBRATION_MODES)
        if helps and flag in helps:
            kwargs["help"] = helps[flag]
        p.add_argument(f"--{flag}", **kwargs)
    p.set_defaults(calibration_args=[(flag.replace("-", "_"), name) for flag, name, _ in chosen])


def _calibration_config(args):
    """The CalibrationConfig of a command's calibration flags (and --data-dir); the flags it lacks keep the
    config's defaults."""
    from .config import CalibrationConfig

    return CalibrationConfig(**{name: getattr(args, dest) for dest, name in args.calibration_args},
                             data_dir=args.data_dir)


FINETUNE_ARGS = [  # (name, type, help); every default comes from the preset
    ("data", str, "alpaca (default), a .json/.jsonl of instruction/input/output records, or wikitext2/ptb/c4"),
    ("samples", int, "training examples (default: the preset's; paper: all)"),
    ("val-samples", int, "held-out examples for the validation loss at each stage's end"),
    ("epochs", float, "passes over the training examples, per stage"),
    ("lr", float, "peak learning rate (linear warmup and decay)"),
    ("warmup-steps", int, "warmup steps"),
    ("lora-r", int, "LoRA rank of the adapters on each factor"),
    ("lora-alpha", int, "LoRA alpha (the adapter is scaled by alpha/r)"),
    ("lora-dropout", float, "dropout on the adapters' input"),
    ("seq-len", int, "examples are cut to this many tokens"),
    ("batch-size", int, "examples per optimizer step"),
    ("micro-batch", int, "examples per forward/backward (gradient accumulation fills the batch)"),
    ("max-steps", int, "optimizer steps per stage at most (a quick run)"),
    ("save-every", int, "checkpoint every this many steps"),
]


def _add_finetune_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from .update.lora import PRESETS, STAGES, TEMPLATES

    p.add_argument(f"--{prefix}preset", dest="ft_preset", default="auto", choices=["auto", *PRESETS],
                   help="fine-tuning recipe: paper (SVD-LLM/LLM-Pruner on a GPU: Alpaca, 2 epochs, batch 64, lr 1e-4, "
                        "r 8) or cpu (about 30 min for SmolLM2 on 2 cores); auto: paper on CUDA, else cpu")
    p.add_argument(f"--{prefix}stages", dest="ft_stages", default=None, choices=sorted(STAGES),
                   help="sequential: W_u then W_v (the paper, default); joint: both at once (plain LoRA)")
    p.add_argument(f"--{prefix}no-balance", dest="ft_balance", action="store_const", const=False, default=None,
                   help="keep the method's split of each component between W_u and W_v (SVD-LLM's U·Σ^½, Σ^½·Vᵀ·S⁻¹) "
                        "instead of equal norms; the product is the same, LoRA's steps are not")
    p.add_argument(f"--{prefix}template", dest="ft_template", default=None, choices=TEMPLATES,
                   help="how instruction records are written: alpaca (the paper's prompt, default) or chat (the "
                        "tokenizer's chat template: for an instruct model that will be chatted with)")
    for name, kind, text in FINETUNE_ARGS:
        p.add_argument(f"--{prefix}{name}", dest="ft_" + name.replace("-", "_"), type=kind, default=None, help=text)


def _finetune_config(args, device):
    from .update.lora import default_config, preset

    overrides = {name.replace("-", "_"): getattr(args, "ft_" + name.replace("-", "_"))
                 for name, _, _ in FINETUNE_ARGS}
    overrides.update(stages=args.ft_stages, data_dir=args.data_dir, balance=args.ft_balance,
                     template=args.ft_template)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = default_config(device or "cpu", **overrides) if args.ft_preset == "auto" else preset(args.ft_preset,
                                                                                                 **overrides)
    config.validate()
    return config


def build_parser() -> argparse.ArgumentParser:
    from .allocation import ALLOCATORS
    from .factorization import METHODS
    from .update import UPDATES

    import svdllm

    parser = argparse.ArgumentParser(prog="svdllm", description="Compress causal LMs by low-rank factorization.")
    parser.add_argument("--version", action="version", version=f"svdllm {svdllm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="calibrate, factorize and save a compressed model")
    _add_model_args(c)
    c.add_argument("--preset", default="best", choices=["best", "paper"],
                   help="best (default): the lowest perplexity for the size measured so far (kfac-svd with the "
                        "global allocator, and the closed-form update from R = 0.5; svd-llm + global where kfac-svd's "
                        "output Grams would take more than half the free disk under the cache); paper: SVD-LLM (W) "
                        "as published "
                        "(svd-llm, uniform ranks). --method, --alloc and --update override the preset's choice")
    c.add_argument("--method", default=None, choices=sorted(METHODS))
    c.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="a method option, e.g. --method kfac-svd --method-arg shrink_outputs=0.2 (repeatable; "
                        "see `svdllm methods`)")
    c.add_argument("--ratio", type=_ratios, default=[0.4],
                   help="fraction of the compressed matrices' parameters to remove; several, comma-separated, "
                        "share one calibration pass (e.g. 0.2,0.4,0.6)")
    c.add_argument("--alloc", default=None, choices=sorted(ALLOCATORS),
                   help="rank allocation (see `svdllm allocators`); any allocator works with any method")
    c.add_argument("--alloc-arg", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="an allocator option, e.g. --alloc lorap --alloc-arg attn_keep=0.5 (repeatable)")
    c.add_argument("--rank-multiple", type=int, default=1,
                   help="round every rank to a multiple of this (8, 16, 32 suit fast kernels); the budget still holds")
    c.add_argument("--bits", type=_widths, default=None, metavar="B[,B...]",
                   help="choose each matrix's rank and bit width together (the global allocator), among these "
                        "widths (3, 4, 8) and float; --ratio is then the fraction of the compressed linears' float32 "
                        "bytes removed (e.g. --ratio 0.85 --bits 3,4,8 keeps 15%% of them), and the model is "
                        "quantized by GPTQ as allocated")
    c.add_argument("--group-size", type=int, default=32, help="with --bits: input channels per int4/int3 scale")
    c.add_argument("--gram-dtype", default=None, choices=["float64", "float32"],
                   help="how kfac-svd's output-gradient Grams are stored on disk (summed in float64 either way); "
                        "default float64, float32 when they would take more than half the free disk under the cache")
    c.add_argument("--update", default=None, choices=sorted(UPDATES),
                   help="after truncation: closed-form (least-squares W_u on the compressed model's inputs, as "
                        "SVD-LLM), closed-form-drift (attention fitted to the dense model's outputs), lora (sequential "
                        "LoRA fine-tuning, options --ft-*), or closed-form+lora")
    _add_calibration_args(c)
    _add_data_args(c)
    c.add_argument("--cache-dir", default=None, help="statistics cache (default $SVDLLM_CACHE_DIR or ~/.cache/svdllm)")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write cached calibration statistics")
    c.add_argument("--layerwise", action="store_true",
                   help="models bigger than memory: read one decoder layer at a time from the safetensors shards and "
                        "write each compressed layer at once (peak memory about one layer)")
    c.add_argument("--targets", type=_patterns, default=None, metavar="REGEX[,REGEX...]",
                   help="compress only the linears whose full name matches one of these regular expressions (e.g. "
                        "'mlp' or 'layers\\.([0-9]|1[0-5])\\.'); a model type svdllm does not list is compressed by "
                        "patterns: every nn.Linear of its decoder layers unless --targets narrows it")
    c.add_argument("--ignore", type=_patterns, default=None, metavar="REGEX[,REGEX...]",
                   help="leave dense the linears whose full name matches one of these (e.g. 'down_proj')")
    c.add_argument("--layers-path", default=None, metavar="MODULE",
                   help="where the decoder layers are (e.g. transformer.h), for a model whose list of layers is not "
                        "found by itself")
    c.add_argument("--out", required=True, help="output directory (with several ratios: one ratio-<R>/ each)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_finetune_args(c, prefix="ft-")
    _add_output_args(c)

    f = sub.add_parser("finetune", help="sequential LoRA fine-tuning of a compressed model's factors (SVD-LLM §3.2)")
    f.add_argument("run_dir", help="a model directory written by `svdllm compress`")
    f.add_argument("--out", required=True, help="where the fine-tuned model is saved (same ranks and size)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    f.add_argument("--checkpoint-dir", default=None,
                   help="checkpoints, and where an interrupted run resumes from (default: .<out>.finetune beside --out)")
    f.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    _add_data_args(f)
    _add_finetune_args(f)
    _add_output_args(f)

    x = sub.add_parser("export", help="write a compressed model in another form (--dense: factors multiplied back; "
                       "--format compressed-tensors: a quantized model for plain transformers)")
    x.add_argument("run_dir", help="a model directory written by `svdllm compress` or `svdllm quantize`")
    x.add_argument("--out", required=True)
    x.add_argument("--format", choices=["dense", "compressed-tensors"], default=None,
                   help="dense: a plain Hugging Face checkpoint (W = W_u·W_v), for tools that take only dense models; "
                        "compressed-tensors: a quantized model's codes in that format, which transformers loads "
                        "(trust_remote_code=True for the low-rank layers)")
    x.add_argument("--dense", action="store_const", const="dense", dest="format", help="the same as --format dense")
    x.add_argument("--overwrite", action="store_true")
    _add_output_args(x)

    qz = sub.add_parser("quantize", help="weight-only int8/int4/int3 quantization of the factors (or of a dense model), round-to-nearest or GPTQ")
    qz.add_argument("--model", required=True, help="a directory written by `svdllm compress`, or any model "
                    "`compress` accepts (a dense model, for the comparison at equal memory)")
    qz.add_argument("--scheme", default="int8", choices=["int8", "int4", "int3"])
    qz.add_argument("--group-size", type=int, default=32, help="int4/int3: input channels per scale (default 32)")
    qz.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                    help="rtn: round-to-nearest, no data (torchao); gptq: error feedback through each linear's input "
                         "Gram, from a calibration pass over the model being quantized (a factor pair's W_u also "
                         "takes up W_v's error)")
    _add_calibration_args(qz, ("calib-dataset", "nsamples", "seqlen", "seed"),
                          helps={"calib-dataset": "gptq's calibration text (as `compress` takes it)",
                                 "nsamples": "gptq: calibration windows (default %(default)s)",
                                 "seqlen": "gptq: tokens per window (default %(default)s)"})
    _add_data_args(qz)
    qz.add_argument("--out", required=True)
    qz.add_argument("--overwrite", action="store_true")
    _add_output_args(qz)

    e = sub.add_parser("eval", help="perplexity of a dense or compressed model by the protocol")
    _add_model_args(e)
    e.add_argument("--ppl", type=_csv, default=None,
                   help="perplexity test sets, comma-separated: wikitext2,ptb,c4 (none: skip; default wikitext2, "
                        "or none when --tasks is given)")
    e.add_argument("--tasks", type=_csv, default=[],
                   help="zero-shot tasks scored by lm-eval on the local data, comma-separated, or 'paper' for the seven "
                        "of the SVD-LLM paper: openbookqa,arc_easy,arc_challenge,winogrande,hellaswag,piqa,mathqa")
    e.add_argument("--limit", type=int, default=None, help="zero-shot: only the first N examples per task (quick check)")
    e.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="zero-shot: score only documents i with i %% N == K (run shards in parallel or on different "
                        "days into one --scores-dir; the last one to finish reports the full sets)")
    e.add_argument("--scores-dir", default=None,
                   help="zero-shot: keep the per-document scores here (small JSON lines, portable between machines); "
                        "default: the cache directory, per model")
    e.add_argument("--no-resume", action="store_true",
                   help="score everything afresh instead of reusing what an earlier, interrupted run on the same "
                        "weights kept in the cache directory (perplexity batches, zero-shot requests)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (quick check)")
    e.add_argument("--batch-size", type=int, default=1)
    _add_data_args(e)
    _add_output_args(e)

    g = sub.add_parser("generate", help="generation from a prompt (greedy, or --sample)")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    g.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--kv-cache", default="dynamic", choices=["dynamic", "low-rank"],
                   help="low-rank: cache the rank-r intermediates W_v·x of low-rank k/v projections instead of the "
                        "keys and values, re-projected on use (SVD-LLM §4.4)")
    _add_output_args(g)

    d = sub.add_parser("demo", help="compress a built-in model and show perplexity and generations before/after")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--ratio", type=float, default=0.3,
                   help="0.3 (default): the highest ratio at which the default still answers the prompt correctly at the "
                        "demo's settings (benchmarks/results/demo_ratios/ratios.json)")
    _add_calibration_args(d, ("calib-dataset", "nsamples", "seqlen", "grad-samples"),
                          helps={"calib-dataset": "calibration text (default %(default)s: chat turns keep an instruct "
                                                  "model answering)"},
                          dataset="wikitext2,alpaca", nsamples=16, seqlen=1024, grad_samples=4)
    d.add_argument("--max-windows", type=int, default=8)
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("--out", default="runs/demo")
    _add_data_args(d)
    _add_output_args(d)

    b = sub.add_parser("bench", help="prefill/decode throughput and peak memory, against the dense model in the same run")
    _add_model_args(b)
    b.add_argument("--baseline", default="auto",
                   help="the dense model to compare with: auto (the base model recorded in a compressed model's "
                        "manifest), a model spec, or none")
    b.add_argument("--batch-sizes", type=_csv, default=["1", "4"])
    b.add_argument("--prompt-lens", type=_csv, default=["128", "512"])
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3, help="timed runs per measurement within a round (median)")
    b.add_argument("--rounds", type=int, default=3,
                   help="dense and compressed are measured alternately this many times, each in a fresh process; "
                        "speedups are the median of the per-round ratios")
    b.add_argument("--kv-lengths", type=_csv, default=["2048"],
                   help="prefill lengths at which the KV cache's bytes are measured (dynamic, and low-rank where "
                        "k/v are low-rank); none to skip")
    b.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # measure one model in this process
    _add_output_args(b)

    r = sub.add_parser("report", help="print the ranks of a compressed model and plot them per layer and matrix type")
    r.add_argument("run_dir", help="a directory written by `svdllm compress` (or its parent, with ratio-*/ inside)")
    r.add_argument("--png", default=None, help="where to write the plot (default RUN_DIR/ranks.png)")
    _add_output_args(r)

    cm = sub.add_parser("compare", help="runs side by side (ranks, perplexity, zero-shot, speed) with PNG plots")
    cm.add_argument("run_dirs", nargs="+", metavar="RUN_DIR_OR_JSON",
                    help="directories written by `svdllm compress` (or their parents), or JSON files written by "
                         "`svdllm eval --json` (of a dense model too: it is drawn as the reference line)")
    cm.add_argument("--out", default="compare", help="where compare.md and the plots go (default ./compare)")
    _add_output_args(cm)

    sub.add_parser("methods", help="list the factorization methods")
    sub.add_parser("allocators", help="list the rank allocators")
    return parser


def _patterns(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def _load(args):
    from .io.loader import load_model

    model, tok = load_model(args.model, args.dtype, layerwise=getattr(args, "layerwise", False),
                            layers_path=getattr(args, "layers_path", None))
    if getattr(args, "device", None):
        from .models.lazy import is_lazy, to_device

        to_device(model, args.device) if is_lazy(model) else model.to(args.device)
    return model, tok


def cmd_compress(args) -> dict:
    from .config import CompressConfig
    from .pipeline import compress, summarize

    # the arguments map onto the config one to one; the library resolves the preset (svdllm.compress does the same)
    config = CompressConfig(
        ratio=args.ratio, preset=args.preset, method=args.method, method_options=dict(args.method_arg),
        alloc=args.alloc, update=args.update, alloc_options=dict(args.alloc_arg), rank_multiple=args.rank_multiple,
        calibration=_calibration_config(args), cache_dir="" if args.no_cache else args.cache_dir,
        gram_dtype=args.gram_dtype, targets=args.targets, ignore=args.ignore, layers_path=args.layers_path,
        bits=args.bits, group_size=args.group_size,
    )
    if (args.update or "").endswith("lora"):
        config.finetune = _finetune_config(args, args.device)
    config.validate(args.out, args.overwrite)  # fail on bad input before loading the model
    from .calibration import distributed

    device = distributed.init_from_env()  # under torchrun: data-parallel calibration, one GPU per rank if any
    if device and not args.device:
        args.device = device
    model, tok = _load(args)
    results = compress(model, tok, config, out=args.out, overwrite=args.overwrite,
                       progress=not args.quiet and distributed.is_main())
    rows = summarize(results)
    if not distributed.is_main():
        return {"command": "compress", "rank": distributed.rank()}
    for row, res in zip(rows, results):
        m = res.manifest
        print(f"ratio {row['ratio']:.2f} ({m['method']} + {m['alloc']}, update {m['update']}): parameters "
              f"{row['model_before']:,} → {row['model_after']:,} ({100 * row['achieved_ratio']:.2f}% of the compressed "
              f"linears removed); saved to {row['out']}")
        if "linear_bytes" in row:
            print(f"  quantized as allocated: {', '.join(f'{n} × {w}' for w, n in row['widths'].items())}; "
                  f"{row['linear_bytes'] / 2**20:.1f} MiB of decoder linears, {row['bits_per_weight']:.2f} bits per "
                  "quantized weight")
    t = results[0].timings
    print(f"calibration {t['calibration_s']:.1f} s, factorization {t['factorization_s']:.1f} s, "
          f"peak RSS {t['peak_rss_mb']:.0f} MB")
    if "gradient_pass_s" in t:
        print(f"gradient pass {t['gradient_pass_s']:.1f} s, peak RSS by its end {t['peak_rss_after_gradients_mb']:.0f} MB")
    return {"command": "compress", "model": args.model, "preset": args.preset,
            "method": results[0].manifest["method"], "results": rows}


def cmd_finetune(args) -> dict:
    from pathlib import Path

    from .io.checkpoint import check_out_dir, load, read_manifest
    from .update.lora import finetune_and_save, summary

    config = _finetune_config(args, args.device)
    manifest = read_manifest(args.run_dir)
    check_out_dir(args.out, args.overwrite)
    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f".{out.name}.finetune"
    model, tok = load(args.run_dir, device=args.device, with_tokenizer=True)
    print(f"fine-tuning {args.run_dir}: {config.stages} LoRA (r {config.lora_r}, lr {config.lr:g}, batch "
          f"{config.batch_size}, {config.samples or 'all'} examples of {config.data}); checkpoints in {ckpt}")
    previous = manifest.get("update", "none")
    history = finetune_and_save(model, tok, config, manifest, "lora" if previous == "none" else f"{previous}+lora",
                                out, overwrite=args.overwrite, progress=not args.quiet, checkpoint_dir=ckpt,
                                source=str(args.run_dir))
    s = summary(history)
    val = ", ".join(f"{k} {v:.4f}" for k, v in s["val_loss"].items())
    print(f"done in {history['wall_s'] / 60:.1f} min ({s['steps_per_stage']} steps per stage); validation loss: "
          f"{val or 'not measured'}; saved to {out} (loss curve: {out / 'finetune_loss.png'})")
    return {"command": "finetune", "run_dir": str(args.run_dir), "out": str(out), **s}


def cmd_quantize(args) -> dict:
    from .config import QuantizeConfig
    from .io.quantize import quantize

    config = QuantizeConfig(scheme=args.scheme, group_size=args.group_size, method=args.method,
                            calibration=_calibration_config(args))
    res = quantize(args.model, config, out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    info = res.info
    print(f"{args.scheme} ({args.method}, {info['quantize_s']:.0f} s): {info['matrices']} matrices, "
          f"{info['bits_per_weight']:.2f} bits per weight ({info['memory_bits_per_weight']:.2f} in memory), "
          f"{res.bytes_on_disk / 2**20:.1f} MiB of weights on disk; saved to {args.out}")
    return {"command": "quantize", "model": args.model, "out": args.out, "bytes_on_disk": res.bytes_on_disk,
            **res.summary()}


def cmd_export(args) -> dict:
    from .io.export import export

    res = export(args.run_dir, args.out, args.format, overwrite=args.overwrite)
    if res.get("format") == "compressed-tensors":
        print(f"compressed-tensors export of {args.run_dir}: {res['bytes_on_disk'] / 2**20:.1f} MiB of weights, "
              f"written to {args.out}; load with transformers: "
              f"AutoModelForCausalLM.from_pretrained({str(args.out)!r}, trust_remote_code=True)")
    else:
        print(f"dense export of {args.run_dir}: {res['params']:,} parameters, written to {res['out']}")
    return {"command": "export", **res}


def cmd_eval(args) -> dict:
    from .evaluation.api import EvalConfig, evaluate
    from .evaluation.zeroshot import markdown_table

    config = EvalConfig(ppl=args.ppl, tasks=args.tasks, limit=args.limit, seqlen=args.seqlen,
                        max_windows=args.max_windows, batch_size=args.batch_size, data_dir=args.data_dir,
                        resume=not args.no_resume, shard=args.shard, scores_dir=args.scores_dir)

    def show(name: str, r: dict) -> None:  # each result as it is known
        if name == "zero_shot":
            print(markdown_table(r))
            return
        partial = "" if r["windows"] == r["total_windows"] else f"  [--max-windows {r['windows']} of {r['total_windows']}]"
        print(f"{name}: perplexity {r['ppl']:.3f} over {r['windows']} windows of {r['seqlen']} tokens{partial}")

    res = evaluate(args.model, config, dtype=args.dtype, device=args.device, progress=not args.quiet, on_result=show)
    return {"command": "eval", **res}


def cmd_generate(args) -> dict:
    from .evaluation.generation import generate_timed

    model, tok = _load(args)
    r = generate_timed(model, tok, args.prompt, args.max_new_tokens, chat=not args.no_chat, sample=args.sample,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, kv_cache=args.kv_cache)
    print(r["text"])
    kv = f", KV cache {r['kv_cache_bytes'] / 2**10:.0f} KiB ({args.kv_cache})" if r.get("kv_cache_bytes") else ""
    print(f"[{r['new_tokens']} tokens in {r['seconds']:.2f} s: {r['tokens_per_s']:.1f} tokens/s, "
          f"{'sampled' if args.sample else 'greedy'}{kv}]", file=sys.stderr)
    return {"command": "generate", "model": args.model, "prompt": args.prompt, **r}


def cmd_demo(args) -> dict:
    """Dense, SVD-LLM as published and svdllm's default at the same parameter count, on the same test windows,
    with one reply each: what the product does, in about 10 minutes on 2 CPU cores."""
    from pathlib import Path

    from .config import CompressConfig
    from .evaluation import generate, perplexity
    from .io.loader import load_model
    from .nn.low_rank import swap_back
    from .pipeline import compress
    from .utils.atomic import atomic_write_text

    progress = not args.quiet
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"[demo] loaded {args.model} in {time.perf_counter() - t0:.0f} s")

    def measure(label: str, params: int, seconds: float | None, achieved: float = 0.0) -> dict:
        ppl = perplexity(model, tok, "wikitext2", args.data_dir, 2048, args.max_windows, progress=progress)
        reply = generate(model, tok, args.prompt, args.max_new_tokens)
        return {"model": label, "params": params, "achieved_ratio": achieved, "ppl": ppl["ppl"], "windows": ppl["windows"],
                "total_windows": ppl["total_windows"], "reply": reply, "compress_s": seconds}

    rows = [measure("dense", sum(p.numel() for p in model.parameters()), None)]
    cal = _calibration_config(args)
    for label, preset in (("SVD-LLM (--preset paper)", "paper"), ("svdllm default (--preset best)", "best")):
        t = time.perf_counter()
        res = compress(model, tok, CompressConfig(ratio=args.ratio, preset=preset, calibration=cal),
                       out=Path(args.out) / preset, overwrite=True, progress=progress)[0]
        m = res.manifest
        rows.append(measure(f"{label}: {m['method']} + {m['alloc']}", res.params["model_after"],
                            time.perf_counter() - t, res.params["achieved_ratio"]))
        swap_back(model, res.originals)  # dense again for the next one
    note = (f"R = {args.ratio}; demo settings: calibration {args.nsamples} × {args.seqlen} tokens of "
            f"{args.calib_dataset}, {args.grad_samples} gradient windows (protocol: 64 × 2048 of wikitext2, 8); "
            f"WikiText-2 test perplexity on the first {rows[0]['windows']} of {rows[0]['total_windows']} windows "
            "of 2048 (protocol: all)")
    print()
    print(f"{args.model} compressed by {100 * args.ratio:.0f}% of its projection weights   [{note}]")
    print()
    print("| model | parameters | of the projections removed | WikiText-2 ppl | compression time |")
    print("|---|---|---|---|---|")
    for r in rows:
        secs = f"{r['compress_s']:.0f} s" if r["compress_s"] is not None else ""
        print(f"| {r['model']} | {r['params']:,} | {100 * r['achieved_ratio']:.1f}% | {r['ppl']:.2f} | {secs} |")
    print()
    print(f"prompt: {args.prompt}")
    for r in rows:
        print(f"  {r['model']}:\n    {r['reply']}")
    result = {"command": "demo", "model": args.model, "note": note, "ratio": args.ratio, "prompt": args.prompt,
              "rows": rows, "wall_s": time.perf_counter() - t0}
    atomic_write_text(Path(args.out) / "demo.json", json.dumps(result, indent=1))
    print(f"\nmodels and demo.json (these figures) saved under {args.out}; total {result['wall_s']:.0f} s")
    return result


def cmd_bench(args) -> dict:
    import subprocess

    from .evaluation import bench

    try:
        sizes = [int(x) for x in args.batch_sizes]
        lens = [int(x) for x in args.prompt_lens]
        kv_lens = [] if args.kv_lengths == ["none"] else [int(x) for x in args.kv_lengths]
    except ValueError:
        raise SvdllmError("--batch-sizes, --prompt-lens and --kv-lengths take integers separated by commas, "
                          "e.g. 1,4 (--kv-lengths none to skip the KV-cache measurement).")
    if min(sizes + lens + kv_lens + [args.repeats, args.rounds]) < 1:
        raise SvdllmError("Batch sizes, prompt lengths, --kv-lengths, --repeats and --rounds must be at least 1.")
    if args.new_tokens < 2:
        raise SvdllmError(f"--new-tokens must be at least 2 (the first new token comes from the prefill; decode "
                          f"speed is timed over the rest), got {args.new_tokens}.")
    if args.single:
        model, _ = _load(args)
        rows = bench.measure(model, sizes, lens, args.new_tokens, args.repeats)
        kv = bench.kv_cache_bytes(model, kv_lens) if kv_lens else []
        return {"model": args.model, **bench.model_facts(model, args.model), "rows": rows, "kv_cache": kv}

    def child(spec: str, kv: bool) -> dict:
        # each model in a fresh process, so one model's freed memory never counts against the other's peak
        cmd = [sys.executable, "-m", "svdllm.cli", "bench", "--single", "--json", "-q", "--model", spec, "--dtype",
               args.dtype, "--batch-sizes", ",".join(args.batch_sizes), "--prompt-lens", ",".join(args.prompt_lens),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--kv-lengths", ",".join(args.kv_lengths) if kv else "none"]
        if args.device:
            cmd += ["--device", args.device]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SvdllmError(f"benchmarking {spec} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    baseline = bench.default_baseline(args.model) if args.baseline == "auto" else args.baseline
    # Dense and compressed alternate, round after round, so a slow spell of a shared machine hits both; every
    # speedup is the median over rounds of the ratio within a round.
    dense_runs, runs = [], []
    for i in range(args.rounds):
        if baseline and baseline != "none":
            dense_runs.append(child(baseline, kv=i == 0))
        runs.append(child(args.model, kv=i == 0))
    dense = bench.merge_rounds(dense_runs) if dense_runs else None
    result = bench.merge_rounds(runs)
    if dense:
        result["rows"] = bench.with_ratios(runs, dense_runs)
        result["params_ratio"] = result["params"] / dense["params"]
        if result.get("disk_bytes") and dense.get("disk_bytes"):
            result["disk_ratio"] = result["disk_bytes"] / dense["disk_bytes"]
    print(f"{args.model}: {result['params']:,} parameters" + (f" ({result['params_ratio']:.3f} of dense)" if dense else "")
          + (f", {result['disk_bytes'] / 2**20:.1f} MiB on disk" if result.get("disk_bytes") else "")
          + (f" ({result['disk_ratio']:.3f} of dense)" if "disk_ratio" in result else ""))
    print("| batch | prompt | prefill tok/s | decode tok/s | peak MB |" + (" prefill × | decode × | memory × |" if dense else ""))
    print("|---|---|---|---|---|" + ("---|---|---|" if dense else ""))
    for r in result["rows"]:
        line = (f"| {r['batch']} | {r['prompt_len']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                f"{r['peak_mem_mb'] or float('nan'):.0f} |")
        if dense:
            line += f" {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} | {r.get('peak_mem_ratio', float('nan')):.2f} |"
        print(line)
    for k in result.get("kv_cache", []):
        low = (f", low-rank {k['low_rank_bytes'] / 2**20:.2f} MiB ({k['low_rank_ratio']:.3f} of dynamic)"
               if "low_rank_bytes" in k else "")
        print(f"KV cache after {k['tokens']} tokens: dynamic {k['dynamic_bytes'] / 2**20:.2f} MiB{low}")
    out = {"command": "bench", "model": args.model, "baseline": baseline, "dense": dense, "result": result,
           "machine": bench.machine()}
    bench.keep_bench_result(args.model, {k: v for k, v in out.items() if k != "command"})
    return out


def cmd_compare(args) -> dict:
    from .evaluation.report import compare

    return compare(args.run_dirs, args.out)


def cmd_report(args) -> dict:
    from .evaluation.report import report

    return report(args.run_dir, args.png)


def cmd_methods(args) -> dict:
    from .factorization import METHODS

    for m in METHODS.values():
        print(f"{m.name:12s} {m.summary}")
        for opt, help_text in m.options().items():
            print(f"{'':12s}   --method-arg {opt}=…  {help_text}")
    return {}


def cmd_allocators(args) -> dict:
    from .allocation import ALLOCATOR_SUMMARIES

    from .allocation import ALLOCATORS

    for name, text in ALLOCATOR_SUMMARIES.items():
        print(f"{name:12s} {text}")
        for opt, help_text in ALLOCATORS[name].options().items():
            print(f"{'':12s}   --alloc-arg {opt}=…  {help_text}")
    return {}


COMMANDS = {"compress": cmd_compress, "finetune": cmd_finetune, "export": cmd_export, "quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "demo": cmd_demo,
            "methods": cmd_methods, "allocators": cmd_allocators, "report": cmd_report, "bench": cmd_bench, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # torchao (pulled in by transformers/peft when present) logs every GPU kernel library a CPU build lacks
    for noisy in ("transformers", "huggingface_hub", "accelerate", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:  # transformers draws its own bar while loading weights, whatever the logging level
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        result = COMMANDS[args.command](args)
    except SvdllmError as e:
        print(f"svdllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdllm: interrupted; nothing half-written was left behind, and the calibration statistics of the "
              "layers already done are cached: the same command resumes from them", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
