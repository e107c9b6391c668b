"""The shared LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, untied embeddings, SDPA attention.

Two things go beyond a textbook LLaMA, because the methods need them:

* attention takes an additive per-key bias (PonderLM-3 adds log w to every query's logit toward a
  latent key) and a key-validity mask (pruned, halted or padded slots are not keys);
* the KV cache is addressed by *slot*, not by RoPE position: several slots (a token and its latent
  thoughts) can share one position id. Keys are rotated at their own position before caching.

Given the same weights and ``ponder_init=False``, logits equal ``transformers.LlamaForCausalLM``
(tests/test_backbone.py). Every block and head call reports its real work to the compute ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness import compute
from models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as LLaMA does) so bf16 training keeps the same statistics.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


class Rotary(nn.Module):
    """RoPE with LLaMA's rotate-half layout; positions are explicit so slots can share them."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, n] -> cos, sin [B, 1, n, head_dim] in float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values per layer, addressed by slot; a slot's RoPE position is applied before caching.

    ``key_bias[b, s]`` is added to every query's logit toward slot s (0 for ordinary tokens, log w for
    PonderLM-3's latent slots); ``key_valid[b, s]`` is False for slots that are not keys (padding, or a
    row of the batch that skipped a step). Capacity doubles as needed.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, capacity: int = 64):
        self.n_layers, self.batch_size = n_layers, batch_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.key_bias = torch.zeros(batch_size, capacity, device=self.device)
        self.key_valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=self.device)
        self.has_bias = False  # stays False while every bias is 0 and every slot valid (fast path)

    def allocate(self, n: int, key_bias: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> int:
        """Reserve n new slots (with their bias and validity) and return the first slot index."""
        start = self.length
        if start + n > self.capacity:
            self._grow(max(2 * self.capacity, start + n))
        if key_bias is not None:
            self.key_bias[:, start:start + n] = key_bias.to(self.key_bias.dtype)
            self.has_bias = True
        if key_valid is not None:
            self.key_valid[:, start:start + n] = key_valid
            self.has_bias = self.has_bias or not bool(key_valid.all())
        else:
            self.key_valid[:, start:start + n] = True
        self.length = start + n
        return start

    def _grow(self, capacity: int) -> None:
        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity
            out = t.new_zeros(shape)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        self.keys = [None if k is None else grown(k, 2) for k in self.keys]
        self.values = [None if v is None else grown(v, 2) for v in self.values]
        self.key_bias = grown(self.key_bias, 1)
        self.key_valid = grown(self.key_valid, 1)
        self.capacity = capacity

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, n, D] at slots start.. and return all keys and values so far."""
        if self.keys[layer] is None:
            shape = (self.batch_size, self.n_kv_heads, self.capacity, self.head_dim)
            self.keys[layer] = torch.zeros(shape, device=self.device, dtype=k.dtype)
            self.values[layer] = torch.zeros(shape, device=self.device, dtype=v.dtype)
        n = k.shape[2]
        self.keys[layer][:, :, start:start + n] = k
        self.values[layer][:, :, start:start + n] = v
        return self.keys[layer][:, :, :self.length], self.values[layer][:, :, :self.length]


@dataclass
class AttentionPlan:
    """Everything every layer of one decoder call shares: rotary tables, mask and counts.

    Built once per call by :meth:`Decoder.plan`, so the mask is not rebuilt per layer.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # additive float [B, 1, n, S] or None
    is_causal: bool
    queries: float  # real (valid) query positions, for the ledger
    key_pairs: float  # visible (query, key) pairs over valid queries
    cache: KVCache | None = None
    cache_start: int = 0
    # Optional (layer, k, v) -> (k, v) replacing the cache write: for methods whose keys are not just
    # "the new slots appended" (AdaPonder reuses halted tokens' K/V from an earlier iteration).
    kv_hook: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    _cast: dict = field(default_factory=dict)

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.mask is None or self.mask.dtype == dtype:
            return self.mask
        if dtype not in self._cast:
            self._cast[dtype] = self.mask.to(dtype).clamp_min(torch.finfo(dtype).min)
        return self._cast[dtype]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project(self, x: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, d] -> rotated q [B, H, n, D], k and v [B, Hkv, n, D]."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, plan.cos, plan.sin), apply_rotary(k, plan.cos, plan.sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Scaled dot-product attention over the given keys; returns the projected output [B, n, d]."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.mask_as(q.dtype), is_causal=plan.is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads)
        b, _, n, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, plan: AttentionPlan, layer: int) -> torch.Tensor:
        q, k, v = self.project(x, plan)
        if plan.kv_hook is not None:
            k, v = plan.kv_hook(layer, k, v)
        elif plan.cache is not None:
            k, v = plan.cache.write(layer, plan.cache_start, k, v)
        return self.attend(q, k, v, plan)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.matmul_params = compute.block_matmul_params(
            cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff)
        self.attn_width = cfg.n_heads * cfg.head_dim

    def forward(self, x: torch.Tensor, plan: AttentionPlan, layer: int) -> torch.Tensor:
        compute.record_block(self.matmul_params, self.attn_width, plan.queries, plan.key_pairs)
        x = x + self.self_attn(self.input_layernorm(x), plan, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding, L blocks, final norm and an untied LM head.

    Parameter names mirror ``transformers``' LLaMA (``layers.i.self_attn.q_proj`` ...), so converting
    a checkpoint is a prefix rename. Methods use the pieces: :meth:`embed`, :meth:`plan`,
    :meth:`run_blocks`, :attr:`norm`, :meth:`head`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        std = math.sqrt(2.0 / (5.0 * cfg.d_model)) if cfg.ponder_init else cfg.init_std
        out_std = std / math.sqrt(2.0 * cfg.n_layers) if cfg.ponder_init else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    # -- pieces ---------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * self.cfg.embed_scale if self.cfg.ponder_init else x

    def head(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of already-normalised hidden states h [..., d]; rows where ``valid`` is False
        (padding) are neither computed nor counted and get zero logits."""
        if valid is None or bool(valid.all()):
            compute.record_head(self.cfg.d_model, self.cfg.vocab_size, h.numel() // h.shape[-1])
            return self.lm_head(h)
        compute.record_head(self.cfg.d_model, self.cfg.vocab_size, compute.as_count(valid))
        logits = h.new_zeros(*h.shape[:-1], self.cfg.vocab_size)
        logits[valid] = self.lm_head(h[valid]).to(logits.dtype)
        return logits

    def plan(self, positions: torch.Tensor, *, cache: KVCache | None = None,
             key_bias: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
             allowed: torch.Tensor | None = None, query_valid: torch.Tensor | None = None) -> AttentionPlan:
        """Attention plan for n new slots at RoPE ``positions`` [B, n] (or [n]).

        Keys are the cached slots plus the new ones; query i sees keys up to its own slot (causal in
        slot order) that are valid, with ``key_bias`` [B, n] added toward the new keys (the cache keeps
        the bias of older keys). ``allowed`` [B, n, S] replaces slot-order causality by an explicit
        visibility pattern, for methods whose keys are not simply "everything before me"; without a
        cache, ``key_bias``/``key_valid`` then describe its S keys. ``query_valid`` [B, n] marks the
        queries that count (default: the new slots that are valid keys).
        """
        if positions.dim() == 1:
            if cache is None:  # the batch size would be unknown and the ledger would undercount
                raise ValueError("Decoder.plan: pass positions as [B, n] when there is no cache")
            positions = positions[None]
        b = cache.batch_size if cache is not None else positions.shape[0]
        positions = positions.expand(b, -1)
        n = positions.shape[1]
        cos, sin = self.rotary(positions)
        start = 0
        if cache is not None:
            start = cache.allocate(n, key_bias, key_valid)
        if query_valid is None and key_valid is not None and key_valid.shape[1] == n:
            query_valid = key_valid  # a new slot that is not a key is not a real query either
        n_queries = float(b * n) if query_valid is None else compute.as_count(query_valid)

        plain = key_bias is None and key_valid is None and allowed is None and query_valid is None
        if plain and (cache is None or not cache.has_bias):
            if start == 0:  # causal over the new slots only
                return AttentionPlan(cos, sin, None, n > 1, n_queries, float(b * compute.causal_key_pairs(n)),
                                     cache, start)
            if n == 1:  # one query that sees everything cached
                return AttentionPlan(cos, sin, None, False, n_queries, float(b * (start + 1)), cache, start)

        total = start + n
        if allowed is None:
            slot = torch.arange(total, device=positions.device)
            allowed = (slot[None, :] <= (start + torch.arange(n, device=positions.device))[:, None])[None]
            allowed = allowed.expand(b, n, total)
        if cache is not None:
            bias, valid = cache.key_bias[:, :total], cache.key_valid[:, :total]
        else:
            n_keys = allowed.shape[-1]
            bias = key_bias if key_bias is not None else torch.zeros(b, n_keys, device=positions.device)
            valid = key_valid if key_valid is not None else torch.ones(b, n_keys, dtype=torch.bool,
                                                                       device=positions.device)
        allowed = allowed & valid[:, None, :]
        counted = allowed if query_valid is None else allowed & query_valid[:, :, None]
        key_pairs = compute.as_count(counted)
        # finfo.min, not -inf: a fully masked row (a padding query) then stays finite instead of NaN.
        floor = torch.finfo(torch.float32).min
        mask = torch.where(allowed, bias.float()[:, None, :].expand_as(allowed), floor)[:, None]
        return AttentionPlan(cos, sin, mask, False, n_queries, key_pairs, cache, start)

    def run_blocks(self, x: torch.Tensor, plan: AttentionPlan, layers: range | None = None,
                   cache_layer_offset: int = 0) -> torch.Tensor:
        """Residual stream through ``layers`` (default all); cache layer index = offset + position."""
        indices = range(len(self.layers)) if layers is None else layers
        for i in indices:
            x = self.layers[i](x, plan, cache_layer_offset + i)
        return x

    def new_cache(self, batch_size: int, n_stacks: int = 1, device=None, dtype=None) -> KVCache:
        """A cache for ``n_stacks`` passes of the block stack (looped models keep one per loop)."""
        p = self.lm_head.weight
        return KVCache(self.cfg.n_layers * n_stacks, batch_size, self.cfg.n_kv_heads, self.cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Plain LLaMA: token ids [B, n] -> logits [B, n, V]; with a cache, continues after its slots."""
        if positions is None:
            offset = 0 if cache is None else cache.length
            positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
        plan = self.plan(positions.expand(input_ids.shape[0], -1), cache=cache, key_valid=valid)
        return self.head(self.norm(self.run_blocks(self.embed(input_ids), plan)), valid)

    # -- analytic compute -----------------------------------------------------------------------

    @property
    def block_matmul_params(self) -> int:
        return self.layers[0].matmul_params

    def analytic_forward_flops(self, block_queries: float, key_pairs: float, head_positions: float,
                               n_block_passes: float = 1.0) -> float:
        """FLOPs of ``n_block_passes`` passes of the L-block stack plus the head (DESIGN.md section 4)."""
        per_stack = self.cfg.n_layers * compute.block_flops(
            self.block_matmul_params, self.cfg.n_heads * self.cfg.head_dim, block_queries, key_pairs)
        return n_block_passes * per_stack + compute.head_flops(self.cfg.d_model, self.cfg.vocab_size,
                                                               head_positions)

    def num_params(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed_tokens.weight.numel() if non_embedding else total


__all__ = ["Attention", "AttentionPlan", "Block", "Decoder", "KVCache", "RMSNorm", "Rotary", "SwiGLU",
           "apply_rotary"]
