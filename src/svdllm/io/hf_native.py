"""What makes a saved model usable outside svdllm: the Hugging Face remote-code files, a model card, dense export.

A saved directory carries `modeling_svdllm.py`, a dozen lines generated for its architecture, and a config.json
with the rank of every matrix (`svdllm_ranks`) and an `auto_map` entry, so that plain
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` rebuilds the low-rank layers. `svdllm.load`
needs none of that (it reads the manifest), and `export_dense` multiplies the factors back for tools that only
take dense checkpoints.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..nn.low_rank import LowRankLinear
from ..models.families import set_submodule

MODELING_FILE = "modeling_svdllm.py"
AUTO_CLASS = "modeling_svdllm.SvdllmForCausalLM"

# The modeling file is self-contained on purpose: whoever loads the checkpoint needs transformers, not svdllm.
_MODELING_TEMPLATE = '''"""Low-rank {base} written by svdllm: every matrix named in config.svdllm_ranks is W_u·W_v of that rank.

Load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), or with svdllm.load(path).
"""
import torch
from torch import nn
from transformers import {base} as _Base


class LowRankLinear(nn.Module):
    def __init__(self, in_features, out_features, rank, bias=False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.u(self.v(x))


{experts}
class SvdllmForCausalLM(_Base):
    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "svdllm_unfused_experts", False):  # one nn.Linear pair per expert, as svdllm saved them
            unfuse_experts(self)
        for name, rank in (getattr(config, "svdllm_ranks", None) or {{}}).items():
            if rank is None:
                continue
            parent, _, child = name.rpartition(".")
            dense = getattr(self.get_submodule(parent), child)
            setattr(self.get_submodule(parent), child,
                    LowRankLinear(dense.in_features, dense.out_features, rank, bias=dense.bias is not None))
'''


def _unfused(model: nn.Module) -> bool:
    return getattr(getattr(model, "_svdllm_family", None), "experts", False)


def modeling_source(model: nn.Module) -> str:
    experts = ""
    if _unfused(model):  # the unfusing code itself, so that the file still needs transformers alone
        import inspect

        from ..models import experts as module

        experts = "\n" + inspect.getsource(module).split('"""', 2)[2].replace("import torch\nfrom torch import nn\n", "")
    return _MODELING_TEMPLATE.format(base=type(model).__name__, experts=experts)


def native_config(model: nn.Module, ranks: dict[str, int | None]):
    """The model's config plus what the remote code needs; the model's own config is left untouched."""
    config = copy.deepcopy(model.config)
    config.svdllm_ranks = {k: v for k, v in ranks.items() if v is not None}
    if _unfused(model):
        config.svdllm_unfused_experts = True
    config.auto_map = {"AutoModelForCausalLM": AUTO_CLASS}
    return config


def strip_native(config) -> None:
    """svdllm.load builds the layers itself: no remote code, no stale rank map on the in-memory config."""
    for attr in ("auto_map", "svdllm_ranks", "svdllm_unfused_experts"):
        if hasattr(config, attr):
            delattr(config, attr)


# the hub datasets a calibration source came from (a user's own file has none)
CALIBRATION_DATASETS = {"wikitext2": "Salesforce/wikitext", "ptb": "ptb-text-only/ptb_text_only", "c4": "allenai/c4",
                        "alpaca": "tatsu-lab/alpaca"}
PPL_DATASETS = {"wikitext2": ("WikiText-2 (test)", "Salesforce/wikitext"), "ptb": ("PTB (test)", "ptb_text_only"),
                "c4": ("C4 (validation, first 256 documents)", "allenai/c4")}


def _front_matter(manifest: dict, results: dict | None) -> list[str]:
    """The model card's YAML header as the Hub reads it: base model, license, task, calibration datasets, and the
    perplexities `svdllm eval` measured as model-index results."""
    low_rank = manifest.get("method") not in (None, "dense")
    source = manifest.get("source_model") or {}
    lines = ["library_name: transformers", "pipeline_tag: text-generation"]
    if source.get("hub_id"):
        lines.append(f"base_model: {source['hub_id']}")
    if source.get("license"):
        lines.append(f"license: {source['license']}")
    cal = manifest.get("calibration") or {}
    datasets = [CALIBRATION_DATASETS[s.strip()] for s in str(cal.get("dataset") or "").split(",")
                if cal.get("used") and s.strip() in CALIBRATION_DATASETS]
    datasets += [o["dataset"] for o in cal.get("origins") or [] if cal.get("used") and o.get("kind") == "hub dataset"]
    if datasets:
        lines += ["datasets:", *(f"- {d}" for d in dict.fromkeys(datasets))]
    lines += ["tags:", "- svdllm", *(["- low-rank"] if low_rank else []),
              *(["- quantized"] if manifest.get("quantization") else []), "- compressed"]
    ppl = {k: r for k, r in ((results or {}).get("ppl") or {}).items() if k.split("[")[0] in PPL_DATASETS}
    if ppl:
        title = f"{source.get('hub_id') or manifest.get('base_model') or 'model'} (svdllm, R = {manifest.get('ratio')})"
        lines += ["model-index:", f"- name: \"{title}\"", "  results:"]
        for key, r in sorted(ppl.items()):
            label, hub = PPL_DATASETS[key.split("[")[0]]
            partial = "" if r.get("windows") == r.get("total_windows") else f", first {r.get('windows')} windows"
            lines += ["  - task:", "      type: text-generation", "    dataset:", f"      name: \"{label}\"",
                      f"      type: {hub}", "    metrics:", "    - type: perplexity",
                      f"      value: {round(float(r['ppl']), 2)}",
                      f"      name: \"perplexity ({r.get('seqlen')}-token windows{partial})\""]
    return lines


def model_card(manifest: dict, results: dict | None = None) -> str:
    """A README.md in the Hugging Face model-card layout, from the manifest and any measured results."""
    p = manifest.get("params", {})
    q = manifest.get("quantization") or {}
    low_rank = manifest.get("method") not in (None, "dense")
    name = manifest.get("base_model") or manifest.get("model_type", "model")
    lines = ["---", *_front_matter(manifest, results), "---", ""]
    if low_rank:
        lines += [f"# {name}, compressed by svdllm", "",
                  f"Low-rank factorization of every compressed linear layer (W ≈ W_u·W_v) by svdllm "
                  f"{manifest.get('svdllm_version', '')}.", "", "| | |", "|---|---|",
                  f"| method | `{manifest.get('method')}` {manifest.get('method_options') or ''} |",
                  f"| allocation | `{manifest.get('alloc')}` {manifest.get('alloc_options') or ''} |",
                  f"| update | `{manifest.get('update')}` |",
                  f"| compression ratio R (of the compressed linears' parameters) | {manifest.get('ratio')} "
                  f"(achieved {p.get('achieved_ratio', float('nan')):.4f}) |"
                  if not (manifest.get("widths") or (manifest.get("alloc_options") or {}).get("bits")) else
                  f"| compression ratio R (of the compressed linears' float32 bytes; ranks and widths chosen "
                  f"together) | {manifest.get('ratio')} (parameters: {p.get('achieved_ratio', float('nan')):.4f} "
                  "removed) |"]
    else:
        lines += [f"# {name}, quantized by svdllm", "",
                  f"The dense model with its decoder linears quantized by svdllm {manifest.get('svdllm_version', '')}; "
                  "no low-rank factorization.", "", "| | |", "|---|---|"]
    lines.append(f"| parameters | {p.get('model_before', 0):,} → {p.get('model_after', 0):,} |")
    if q:
        how = "GPTQ (error feedback)" if q.get("method") == "gptq" else "round-to-nearest"
        stored = "compressed-tensors" if q.get("format") == "compressed-tensors" else "torchao"
        lines.append(f"| quantization | {q.get('scheme')} weights of the decoder linears ({stored}, {how}"
                     + (f", groups of {q['group_size']}" if q.get("group_size") else ", per output channel") + ") |")
    cal = manifest.get("calibration") or {}
    if cal.get("used"):
        lines.append(f"| calibration | {cal.get('nsamples')} × {cal.get('seqlen')} tokens of {cal.get('dataset')}, "
                     f"seed {cal.get('seed')} |")
        for o in cal.get("origins") or []:  # a user's own text: the file and its hash, or the dataset's column
            if o.get("sha256"):
                name = Path(o["path"]).name if o.get("path") else f"{o.get('count')} {o.get('kind')} (Python)"
                lines.append(f"| calibration text | {name}, SHA-256 {o['sha256'][:16]}… |")
            elif o.get("kind") == "hub dataset":
                lines.append(f"| calibration text | {o['dataset']} ({o.get('config') or 'default'}), split "
                             f"{o['split']}, column {o['column']} |")
    for dataset, r in sorted(((results or {}).get("ppl") or {}).items()):
        windows = "" if r.get("windows") == r.get("total_windows") else f", first {r.get('windows')} windows"
        lines.append(f"| perplexity, {dataset} ({r.get('seqlen')}-token windows{windows}) | {r.get('ppl'):.2f} |")
    if q and q.get("format") == "compressed-tensors":
        lines += ["", "## Use", "", "Needs `pip install compressed-tensors`; transformers unpacks the weights on load.",
                  "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
        return "\n".join(lines)
    if q:
        lines += ["", "torchao's quantized weights are stored flattened; only svdllm rebuilds them.", "",
                  "## Use", "", "```python", "import svdllm",
                  "model, tokenizer = svdllm.load(PATH, with_tokenizer=True)", "```", ""]
        return "\n".join(lines)
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)", "# or, without remote code: import svdllm; "
              "model = svdllm.load(PATH)", "```", ""]
    return "\n".join(lines)


@torch.no_grad()
def export_dense(model: nn.Module) -> nn.Module:
    """Multiply every LowRankLinear back into an nn.Linear (W = W_u·W_v, in float64 then the model's dtype)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            u, v = module.u, module.v
            dense = nn.Linear(module.in_features, module.out_features, bias=u.bias is not None,
                              device=u.weight.device, dtype=u.weight.dtype)
            dense.weight.copy_((u.weight.double() @ v.weight.double()).to(u.weight.dtype))
            if u.bias is not None:
                dense.bias.copy_(u.bias)
            set_submodule(model, name, dense)
    return model


def write_card(directory: str | Path, manifest: dict, results: dict | None = None) -> None:
    from ..utils.atomic import atomic_write_text

    atomic_write_text(Path(directory) / "README.md", model_card(manifest, results))
