"""Low-rank KV cache (SVD-LLM §4.4): keep z = W_v·x, the rank-r intermediate of k_proj and v_proj, instead of the
keys and values themselves, and re-project the cached tokens on use.

For a layer whose k_proj and v_proj are LowRankLinear of ranks r_k and r_v, a dense cache holds
2 · kv_heads · head_dim numbers per token; this one holds r_k + r_v. The keys are rebuilt exactly as the attention
built them: W_u·z (+ bias), the per-head norm where the family has one (Qwen3, Gemma 3), then the rotary embedding
of each cached token's own position. The rotary tables are kept once per attention type, not per layer, so they
cost head_dim numbers per token for the whole model. Sliding-window layers, and layers whose k/v stayed dense,
keep transformers' own cache layers.

It plugs into transformers' cache interface (a `DynamicCache` whose full-attention layers are replaced), so
`model.generate(..., cache=cache)` (`past_key_values=` before transformers 5.24) works unchanged:

    with low_rank_kv_cache(model) as cache:
        model.generate(ids, **{CACHE_KW: cache}, max_new_tokens=32)
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import SvdllmError
from .low_rank import LowRankLinear
from ..models.families import FAMILIES, family_of


def _cache_kw() -> str:
    # transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name
    # warns on every call and goes in 5.40); the releases before it know only the old name
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_KW = _cache_kw()


def output_cache(output):
    """The KV cache a model output carries, under either name."""
    return getattr(output, CACHE_KW)


class _Rotary:
    """The cos/sin of every cached position, per attention type, appended once per forward step."""

    def __init__(self):
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lengths: dict[str, int] = {}

    def record(self, kind: str, cos: torch.Tensor, sin: torch.Tensor, seen: int) -> None:
        if self.lengths.get(kind, 0) > seen:  # another layer of this type already recorded this step
            return
        old = self.tables.get(kind)
        self.tables[kind] = (cos, sin) if old is None else (torch.cat([old[0], cos], 1), torch.cat([old[1], sin], 1))
        self.lengths[kind] = self.tables[kind][0].shape[1]

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() * 2 for c, _ in self.tables.values())


class LowRankKVLayer(DynamicLayer):
    is_croppable = False

    def __init__(self, attn: nn.Module, kind: str, rotary: _Rotary):
        super().__init__()
        self.attn, self.kind, self.rotary = attn, kind, rotary
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.z_k = self.z_v = None  # (batch, tokens, r)
        self.pending: dict[str, torch.Tensor] = {}
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def _keys(self, z: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Keys of cached tokens [start, end) rebuilt from z exactly as the attention module builds them."""
        b, t, _ = z.shape
        k = self.attn.k_proj.u(z).view(b, t, -1, self.attn.head_dim)
        if hasattr(self.attn, "k_norm"):
            k = self.attn.k_norm(k)
        cos, sin = self.rotary.tables[self.kind]
        _, k = self.rope(k.transpose(1, 2), k.transpose(1, 2), cos[:, start:end], sin[:, start:end])
        return k

    def _values(self, z: torch.Tensor) -> torch.Tensor:
        b, t, _ = z.shape
        return self.attn.v_proj.u(z).view(b, t, -1, self.attn.head_dim).transpose(1, 2)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if "k" not in self.pending or "v" not in self.pending:
            raise SvdllmError("The low-rank KV cache saw no k/v intermediates: use it inside low_rank_kv_cache().")
        z_k, z_v = self.pending.pop("k"), self.pending.pop("v")
        old = self.length
        if old:
            keys = torch.cat([self._keys(self.z_k, 0, old), key_states], dim=-2)
            values = torch.cat([self._values(self.z_v), value_states], dim=-2)
        else:
            keys, values = key_states, value_states
        self.z_k = z_k if self.z_k is None else torch.cat([self.z_k, z_k], 1)
        self.z_v = z_v if self.z_v is None else torch.cat([self.z_v, z_v], 1)
        self.length += key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self.z_k = self.z_k.index_select(0, beam_idx.to(self.z_k.device))
            self.z_v = self.z_v.index_select(0, beam_idx.to(self.z_v.device))

    def reset(self) -> None:
        self.z_k = self.z_v = None
        self.length = 0

    def nbytes(self) -> int:
        return sum(z.numel() * z.element_size() for z in (self.z_k, self.z_v) if z is not None)


def cache_nbytes(cache) -> int:
    """Bytes held by a cache: low-rank layers' z, dense layers' keys/values, and the shared rotary tables."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, LowRankKVLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    rotary = getattr(cache, "svdllm_rotary", None)
    return total + (rotary.nbytes() if rotary is not None else 0)


@contextlib.contextmanager
def low_rank_kv_cache(model: nn.Module):
    """A transformers cache for `model` that stores k/v intermediates where k_proj and v_proj are low-rank."""
    family = family_of(model)
    layers = family.decoder_layers(model)
    # the k/v rebuild below (per-head norm, rotary embedding) is the LLaMA layout's; other layouts keep their cache
    llama = FAMILIES["llama"]
    llama_layout = family.layers == llama.layers and family.groups.get("attn_in") == llama.groups["attn_in"]
    cache = DynamicCache(config=model.config)
    rotary = _Rotary()
    cache.svdllm_rotary = rotary
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(layers)
    handles, replaced = [], 0
    for i, layer in enumerate(layers if llama_layout else []):
        attn = layer.self_attn
        low = isinstance(attn.k_proj, LowRankLinear) and isinstance(attn.v_proj, LowRankLinear)
        if not low or type(cache.layers[i]) is not DynamicLayer:  # sliding-window or dense k/v: the usual cache
            continue
        kv = LowRankKVLayer(attn, types[i], rotary)
        cache.layers[i] = kv
        replaced += 1

        def grab(key, kv=kv):
            def hook(module, args, out):
                kv.pending[key] = out.detach()
            return hook

        def positions(module, args, kwargs, kv=kv):
            cos, sin = kwargs["position_embeddings"]
            kv.rotary.record(kv.kind, cos, sin, kv.length)

        handles += [attn.k_proj.v.register_forward_hook(grab("k")), attn.v_proj.v.register_forward_hook(grab("v")),
                    attn.register_forward_pre_hook(positions, with_kwargs=True)]
    if not llama_layout:
        raise SvdllmError(f"The low-rank KV cache rebuilds keys and values the LLaMA way (q/k/v_proj, rotary); "
                          f"{family.name} is laid out otherwise: evaluate it without --kv-cache.")
    if not replaced:
        raise SvdllmError("No layer has low-rank k_proj and v_proj (or all are sliding-window layers): the "
                          "low-rank KV cache needs a model compressed by svdllm.")
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()
