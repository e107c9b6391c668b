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

import contextlib
import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm of x [..., d] with ``weight`` (:class:`RMSNorm`, and the compiled blocks)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # One fused call (the weight inside): the same arithmetic as below, fewer kernel launches.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Normalise in float32 and scale in the input dtype, as LLaMA does, so bf16 keeps its statistics.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class Rotary(nn.Module):
    """RoPE with LLaMA's rotate-half layout; positions are explicit so slots can share them.

    cos and sin are looked up in a float32 table over positions 0..P-1 (grown by doubling), computed
    with the same arithmetic as computing them per call, so each decoder call costs one lookup instead
    of six kernels. The table folds rotate-half's sign into sin: ``sin_signed = [-sin_1, sin_2]`` over
    the two halves, so rotating is ``x * cos + roll(x, D/2) * sin_signed`` (no negation or slicing).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin_signed) [P, head_dim]
        self._table_dtype = inv_freq.dtype  # the table is rebuilt if the module is cast (.to(dtype))

    def table(self, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_signed) [P, head_dim] in float32 for at least ``n_positions`` positions."""
        table = self._table
        if (table is None or table[0].shape[0] < n_positions or table[0].device != self.inv_freq.device
                or self._table_dtype != self.inv_freq.dtype):
            size = max(256, 1 << max(0, n_positions - 1).bit_length())
            positions = torch.arange(size, device=self.inv_freq.device, dtype=torch.float32)
            freqs = positions[:, None] * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            sin[:, :freqs.shape[-1]].neg_()
            table = self._table = (cos, sin)
            self._table_dtype = self.inv_freq.dtype
        return table

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, n] -> cos, sin_signed [B, 1, n, head_dim] in float32."""
        if positions.numel() == 0:
            cos, sin = self.table(1)
            shape = (*positions.shape, cos.shape[-1])
            return cos.new_empty(shape)[:, None], sin.new_empty(shape)[:, None]
        if positions.is_floating_point():  # fractional positions: compute, as the table cannot index them
            freqs = positions.to(torch.float32)[..., None] * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]
            half = freqs.shape[-1]
            return emb.cos(), torch.cat((-emb[..., :half].sin(), emb[..., half:].sin()), dim=-1)
        cos, sin = self.table(int(positions.max()) + 1)  # one sync: the table size depends on it
        return cos[positions][:, None], sin[positions][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Textbook RoPE with rotate-half (plain ``sin``); the model uses :func:`rotate` (same values)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE as ``x * cos + roll(x, D/2) * sin_signed``: bit-identical to :func:`apply_rotary`.

    roll swaps the halves, and the sign rotate-half puts on the first half lives in ``sin_signed``
    (negating a product is exact), so there is no slicing, negation or concatenation to run.
    """
    return (x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed).type_as(x)


def compiled_steps_available(device: torch.device | str) -> bool:
    """Whether torch.compile can build code here: inductor needs a C++ compiler on CPU, Triton on CUDA."""
    return _compiler_found(torch.device(device).type)


@functools.cache
def _compiler_found(device_type: str) -> bool:
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return False
        if device_type == "cpu":
            from torch._inductor import cpp_builder

            cpp_builder.get_cpp_compiler()  # raises when no compiler is found
            return True
        if device_type == "cuda":
            from torch.utils._triton import has_triton

            return has_triton()
    except Exception:  # no compiler, or a torch build without inductor
        return False
    return False


# Per decoder: (its compiled make_slot_step, parameter versions, its weights, the parameters), outside the
# module so that state_dict, copies and pickles never see them.
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Per backbone shape (n_heads, n_kv_heads, head_dim, d_ff, eps): its compiled make_block_step, shared by every
# decoder of that shape (the graphs depend on shapes, not on which parameters are passed).
_TRAINING_STEPS: dict[tuple, Callable[..., torch.Tensor]] = {}
TRAINING_RECOMPILE_LIMIT = 64  # graphs per backbone shape: input shapes x key bias or not x dtypes
# Per-region recompile limits (torch.compile's recompile_limit and isolate_recompiles): without them every
# shape would share dynamo's one limit per code object, so the training path needs them.
_ISOLATED_REGIONS = "isolate_recompiles" in inspect.signature(torch.compile).parameters


@contextlib.contextmanager
def _eager_backward_compilation() -> Iterator[None]:
    """Compile a block's backward with its forward, not at the first backward: a compiler failure then
    surfaces inside :meth:`Decoder.run_blocks`, which falls back to eager, not in ``loss.backward()``."""
    from torch._functorch import config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        yield
        return
    with functorch_config.patch(force_non_lazy_backward_lowering=True):
        yield


def make_slot_step(n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int, eps: float) -> Callable[..., torch.Tensor]:
    """The decoding step of one backbone shape, for torch.compile (``Decoder._compiled_step_and_weights``).

    The returned ``step(weights, x, cos, sin_signed, mask, keys, values, start)`` runs one new slot per
    row through every block and the final norm at cache slot ``start``: what
    ``Decoder.norm(Decoder.run_blocks(x, plan))`` computes for a one-slot decoding plan, written as pure
    tensor operations on explicit weights, so that torch.compile traces it without module attributes to
    guard on; the shape is closed over, so it compiles as constants, not as symbolic sizes. The same
    operations as :meth:`Block.forward` (RMSNorm, RoPE by :func:`rotate`, the cache write, SDPA with the
    plan's mask, SwiGLU), except that q, k and v come from one matmul on their concatenated weights and
    gate and up from another (a one-row matmul costs as much call overhead as arithmetic).
    """
    q_width, kv_width, gqa = n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads != n_heads

    def step(weights: list[torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
             mask: torch.Tensor | None, keys: list[torch.Tensor], values: list[torch.Tensor],
             start: int) -> torch.Tensor:
        b, n, d = x.shape
        total = start + 1
        for i in range(len(keys)):
            norm_in, w_qkv, w_o, norm_post, w_gate_up, w_down = weights[6 * i:6 * i + 6]
            q, k, v = F.linear(F.rms_norm(x, (d,), norm_in, eps), w_qkv).split((q_width, kv_width, kv_width), -1)
            q = rotate(q.view(b, n, n_heads, head_dim).transpose(1, 2), cos, sin_signed)
            keys[i][:, :, start:total] = rotate(k.view(b, n, n_kv_heads, head_dim).transpose(1, 2), cos, sin_signed)
            values[i][:, :, start:total] = v.view(b, n, n_kv_heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys[i][:, :, :total], values[i][:, :, :total], attn_mask=mask,
                                                 enable_gqa=gqa)
            x = x + F.linear(out.transpose(1, 2).reshape(b, n, q_width), w_o)
            gate, up = F.linear(F.rms_norm(x, (d,), norm_post, eps), w_gate_up).split((d_ff, d_ff), -1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        return F.rms_norm(x, (d,), weights[-1], eps)

    return step


def make_block_step(n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int,
                    eps: float) -> Callable[..., torch.Tensor]:
    """One block's training forward for one backbone shape, for torch.compile (``Decoder.compile_training_blocks``).

    The returned ``step(x, norm_in, w_q, w_k, w_v, w_o, norm_post, w_gate, w_up, w_down, cos, sin_signed,
    key_bias, is_causal)`` computes what :meth:`Block.forward` computes for a plan without cache, mask or
    kv_hook: plain (causal) attention, or causal attention with PonderLM-3's per-key bias through the
    key-bias channel (:func:`attend_with_key_bias`). The same functions run (:func:`rms_norm`, :func:`rotate`
    in the projections' [B, n, H, D] layout as :meth:`Attention.project`, SDPA with GQA, SwiGLU), on the
    block's own parameters (:meth:`Block.step_weights`, not copies), so autograd reaches them; the shape is
    closed over, so it compiles as constants.
    """
    q_width, gqa = n_heads * head_dim, n_kv_heads != n_heads

    def step(x: torch.Tensor, norm_in: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
             w_o: torch.Tensor, norm_post: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
             w_down: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, key_bias: torch.Tensor | None,
             is_causal: bool) -> torch.Tensor:
        b, n, _ = x.shape
        h = rms_norm(x, norm_in, eps)
        cos, sin_signed = cos.transpose(1, 2), sin_signed.transpose(1, 2)
        q = rotate(F.linear(h, w_q).view(b, n, n_heads, head_dim), cos, sin_signed).transpose(1, 2)
        k = rotate(F.linear(h, w_k).view(b, n, n_kv_heads, head_dim), cos, sin_signed).transpose(1, 2)
        v = F.linear(h, w_v).view(b, n, n_kv_heads, head_dim).transpose(1, 2)
        if key_bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
        else:
            # Measured (profiler, one thread, pico): inductor writes the rotated q/k straight into contiguous
            # [B, H, n, D+1] buffers (eager's strides, no extra copies) and SDPA takes the same time as in
            # eager; PonderLM-3 gains a little less than PonderLM-2 only because its 17-wide attention kernel,
            # which compiling leaves as it is, is a larger share of its step.
            out = attend_with_key_bias(q, k, v, key_bias)
        x = x + F.linear(out.transpose(1, 2).reshape(b, n, q_width), w_o)
        h = rms_norm(x, norm_post, eps)
        return x + F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)

    return step


IGNORE_INDEX = -100  # targets with this value are left out of the loss (as models.base.IGNORE_INDEX)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy of ``h @ weight.T`` without materialising all logits.

    The rows are processed in chunks of about ``chunk_bytes`` of logits; each chunk's loss *and* its
    gradients (softmax minus one-hot, times the head weight and the hidden states) are computed at
    once in the forward, while the chunk is in cache, and the backward only scales them. It computes
    what ``F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100)`` does (mean over
    non-ignored targets, NaN when there are none) with the same matmuls, but skips writing and
    re-reading the [N, V] logits, their log-softmax, its gradient and the zero-filled one-hot
    gradient: on CPU the head and loss of a CPU-sized model then take ~2x less time (the memory-bound
    passes over [N, V] cost more than the matmuls). Single backward only (no double backward).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_rows: int) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        safe = targets.clamp_min(0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h_rows, t_rows = h[rows], safe[rows, None]
            logits = h_rows @ weight.t()
            lse = torch.logsumexp(logits, dim=-1)
            keep = valid[rows].to(logits.dtype)
            total += ((lse - logits.gather(1, t_rows)[:, 0]) * keep).sum()
            if need_h or need_w:  # d loss / d logits = (softmax - onehot) / count, 0 for ignored rows
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, t_rows, -keep[:, None])
                probs.mul_((keep / count)[:, None])
                if need_h:
                    torch.mm(probs, weight, out=grad_h[rows])
                if need_w:
                    grad_w.addmm_(probs.t(), h_rows)
        ctx.save_for_backward(grad_h if need_h else h.new_empty(0), grad_w if need_w else h.new_empty(0))
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if ctx.needs_input_grad[0] else None,
                grad_w * grad_out if ctx.needs_input_grad[1] else None, None, None)


class KVCache:
    """Keys and values per layer, addressed by slot; a slot's RoPE position is applied before caching.

    ``key_bias[b, s]`` is added to every query's logit toward slot s (0 for ordinary tokens, log w for
    PonderLM-3's latent slots); ``key_valid[b, s]`` is False for slots that are not keys (padding, or a
    row of the batch that skipped a step). Capacity doubles as needed. Unallocated slots hold
    ``key_valid`` True, so allocating ordinary slots (all valid) writes nothing; they are never read
    before they are allocated.
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
        self.key_valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=self.device)
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
        self.length = start + n
        return start

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` slots now (storage grows; the slots and their contents stay)."""
        if capacity > self.capacity:
            self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        def grown(t: torch.Tensor, dim: int, fill: float = 0) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity
            out = t.new_full(shape, fill)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        self.keys = [None if k is None else grown(k, 2) for k in self.keys]
        self.values = [None if v is None else grown(v, 2) for v in self.values]
        self.key_bias = grown(self.key_bias, 1)
        self.key_valid = grown(self.key_valid, 1, fill=True)
        self.capacity = capacity

    def buffers(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value storage [B, Hkv, capacity, D] of ``layer``, allocated on first use."""
        if self.keys[layer] is None:
            shape = (self.batch_size, self.n_kv_heads, self.capacity, self.head_dim)
            self.keys[layer] = torch.zeros(shape, device=self.device, dtype=dtype)
            self.values[layer] = torch.zeros(shape, device=self.device, dtype=dtype)
        return self.keys[layer], self.values[layer]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, n, D] at slots start.. and return all keys and values so far."""
        keys, values = self.buffers(layer, k.dtype)
        n = k.shape[2]
        keys[:, :, start:start + n] = k
        values[:, :, start:start + n] = v
        return keys[:, :, :self.length], values[:, :, :self.length]


@dataclass
class AttentionPlan:
    """Everything every layer of one decoder call shares: rotary tables, mask and counts.

    Built once per call by :meth:`Decoder.plan`, so the mask is not rebuilt per layer.
    """

    cos: torch.Tensor  # [B, 1, n, head_dim] float32
    sin_signed: torch.Tensor  # sin with rotate-half's sign folded in (see :class:`Rotary`)
    mask: torch.Tensor | None  # additive float [B, 1, n, S] or None
    is_causal: bool
    queries: float  # real (valid) query positions, for the ledger
    key_pairs: float  # visible (query, key) pairs over valid queries
    cache: KVCache | None = None
    cache_start: int = 0
    # Per-key additive bias [B, S] (float32) applied on top of ``is_causal`` without building a mask:
    # see :meth:`Attention.attend`. Set by :meth:`Decoder.plan` for causal attention with a key bias.
    key_bias: torch.Tensor | None = None
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

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, d] -> q [B, H, n, D], k and v [B, Hkv, n, D], not yet rotated."""
        b, n, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        # Functional calls on the weights: the same matmuls without nn.Module call overhead, which
        # matters when decoding one slot at a time. (Fusing q/k/v into one matmul on concatenated
        # weights was measured: no faster on CPU, and its backward adds a concatenation of gradients.)
        q = F.linear(x, self.q_proj.weight).view(b, n, H, D).transpose(1, 2)
        k = F.linear(x, self.k_proj.weight).view(b, n, Hkv, D).transpose(1, 2)
        v = F.linear(x, self.v_proj.weight).view(b, n, Hkv, D).transpose(1, 2)
        return q, k, v

    def project(self, x: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, d] -> rotated q [B, H, n, D], k and v [B, Hkv, n, D]."""
        q, k, v = self.qkv(x)
        if q.shape[2] == 1:  # one slot (decoding): nothing to gain from the layout below
            return rotate(q, plan.cos, plan.sin_signed), rotate(k, plan.cos, plan.sin_signed), v
        # Rotate in the projections' own memory layout, [B, n, H, D] against cos [B, n, 1, D], and
        # transpose after: the same products (bit for bit), ~30% faster on CPU than through the
        # transposed [B, H, n, D] view, and the result has the strides the view-wise rotation gives.
        cos, sin_signed = plan.cos.transpose(1, 2), plan.sin_signed.transpose(1, 2)
        return (rotate(q.transpose(1, 2), cos, sin_signed).transpose(1, 2),
                rotate(k.transpose(1, 2), cos, sin_signed).transpose(1, 2), v)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, n, D] -> o_proj of the concatenated heads [B, n, d]."""
        b, _, n, _ = out.shape
        return F.linear(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim), self.o_proj.weight)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Scaled dot-product attention over the given keys; returns the projected output [B, n, d]."""
        if plan.key_bias is not None:
            out = attend_with_key_bias(q, k, v, plan.key_bias)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=plan.mask_as(q.dtype), is_causal=plan.is_causal,
                enable_gqa=self.n_kv_heads != self.n_heads)
        return self.output(out)

    @staticmethod
    def key_bias_width(head_dim: int, device: torch.device) -> int:
        """Head dimension with the key-bias channel: D + 1 on CPU (its kernel takes any width), else the
        next multiple of 8, which fused GPU kernels want."""
        return head_dim + 1 if device.type == "cpu" else (head_dim + 1 + 7) // 8 * 8

    def forward(self, x: torch.Tensor, plan: AttentionPlan, layer: int) -> torch.Tensor:
        q, k, v = self.project(x, plan)
        if plan.kv_hook is not None:
            k, v = plan.kv_hook(layer, k, v)
        elif plan.cache is not None:
            k, v = plan.cache.write(layer, plan.cache_start, k, v)
        return self.attend(q, k, v, plan)


def attend_with_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, H, n, D] over k, v [B, Hkv, n, D] with logit bias[b, j] toward key j, as
    one extra head channel (:meth:`Attention.attend`, and the compiled blocks).

    With q' = [q, 1, 0..], k' = [k, bias sqrt(D), 0..], v' = [v, 0..] and the scale kept at 1/sqrt(D),
    q'.k' / sqrt(D) = q.k / sqrt(D) + bias: the same logits as an additive mask, but SDPA runs its
    fused causal kernel instead of materialising [B, 1, n, n] masks and their gradient (PonderLM-3's
    soft mask: ~3x faster per layer on CPU, the bias still differentiable). The CPU kernel takes
    any head dimension, so one channel is added there; elsewhere zero channels pad the head
    dimension to a multiple of 8, which fused GPU kernels want (:meth:`Attention.key_bias_width`). (The
    value gets zero channels too: fused kernels need equal head dimensions.)
    """
    b, _, n, d = q.shape
    pad = Attention.key_bias_width(d, q.device) - d
    channel = (key_bias * math.sqrt(d)).to(k.dtype)[:, None, :, None].expand(b, k.shape[1], n, 1)
    q_parts, k_parts = [q, q.new_ones(b, q.shape[1], n, 1)], [k, channel]
    if pad > 1:
        q_parts.append(q.new_zeros(b, q.shape[1], n, pad - 1))
        k_parts.append(k.new_zeros(b, k.shape[1], n, pad - 1))
    q_ext, k_ext = torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1)
    v_ext = torch.cat((v, v.new_zeros(b, v.shape[1], n, pad)), dim=-1)
    out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, is_causal=True, scale=1.0 / math.sqrt(d),
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[..., :d]


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


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

    def forward(self, x: torch.Tensor, plan: AttentionPlan, layer: int,
                step: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """The block on the residual stream x [B, n, d]; with ``step`` (a compiled :func:`make_block_step`,
        passed by :meth:`Decoder.run_blocks`) through it. Called as a module either way, so hooks (FSDP's
        unsharding) run. The ledger is written after the step returns: a step that fails records nothing,
        and the eager rerun records the block once."""
        if step is not None:
            out = step(x, *self.step_weights(), plan.cos, plan.sin_signed, plan.key_bias, plan.is_causal)
            compute.record_block(self.matmul_params, self.attn_width, plan.queries, plan.key_pairs)
            return out
        compute.record_block(self.matmul_params, self.attn_width, plan.queries, plan.key_pairs)
        x = x + self.self_attn(self.input_layernorm(x), plan, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def step_weights(self) -> tuple[torch.Tensor, ...]:
        """The parameters :func:`make_block_step` takes, in its order (the Parameters themselves)."""
        attn, mlp = self.self_attn, self.mlp
        return (self.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                attn.o_proj.weight, self.post_attention_layernorm.weight, mlp.gate_proj.weight,
                mlp.up_proj.weight, mlp.down_proj.weight)


@torch.no_grad()
def init_weight(tensor: torch.Tensor, std: float, cfg: ModelConfig) -> torch.Tensor:
    """N(0, std^2) in place: truncated at +-3 std under ``ponder_init``, as every reference ``_init_weights``
    (PonderLM-2 repo, modeling_llama*.py: ``nn.init.trunc_normal_(w, std=std, a=-3*std, b=3*std)``), else
    untruncated, as transformers' LLaMA init."""
    if cfg.ponder_init:
        return nn.init.trunc_normal_(tensor, 0.0, std, -3.0 * std, 3.0 * std)
    return nn.init.normal_(tensor, 0.0, std)


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
        """Norm weights 1; o_proj and down_proj at ``cfg.output_std``, every other weight (embedding rows
        and LM head included) at ``cfg.weight_std``; truncated at +-3 std under ponder_init (init_weight)."""
        cfg = self.cfg
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                init_weight(p, cfg.output_std, cfg)
            else:
                init_weight(p, cfg.weight_std, cfg)

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

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the logits of h [..., d] against ``targets`` [...].

        Equal to ``models.base.next_token_loss(self.head(h), targets)`` (float32 loss, IGNORE_INDEX
        targets left out) and recorded in the ledger as the same head call. When gradients are
        wanted in float32 (CPU training) it runs :class:`LinearCrossEntropy`, which never holds the
        full logits; otherwise (evaluation, autocast) it computes the logits and the loss directly.
        """
        compute.record_head(self.cfg.d_model, self.cfg.vocab_size, h.numel() // h.shape[-1])
        weight = self.lm_head.weight
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        fused = (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
                 and h.dtype == torch.float32 and weight.dtype == torch.float32
                 and not torch.is_autocast_enabled(h.device.type))
        if not fused:
            return F.cross_entropy(F.linear(flat_h, weight).float(), flat_t, ignore_index=IGNORE_INDEX)
        # ~4 MB of logits per chunk stays in a CPU's cache; a GPU wants large chunks (few launches).
        chunk_bytes = (4 << 20) if h.device.type == "cpu" else (256 << 20)
        chunk_rows = max(16, chunk_bytes // (4 * self.cfg.vocab_size))
        return LinearCrossEntropy.apply(flat_h, weight, flat_t, chunk_rows)

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
        cos, sin_signed = self.rotary(positions)
        start = 0
        if cache is not None:
            start = cache.allocate(n, key_bias, key_valid)
        if query_valid is None and key_valid is not None and key_valid.shape[1] == n:
            query_valid = key_valid  # a new slot that is not a key is not a real query either
        n_queries = float(b * n) if query_valid is None else compute.as_count(query_valid)

        plain = key_bias is None and key_valid is None and allowed is None and query_valid is None
        if (cache is None and key_bias is not None and key_valid is None and allowed is None
                and query_valid is None):
            # Causal over the new slots with a per-key bias (PonderLM-3's training passes): no mask,
            # the bias rides along as an extra head channel (attend_with_key_bias).
            return AttentionPlan(cos, sin_signed, None, True, n_queries, float(b * compute.causal_key_pairs(n)),
                                 key_bias=key_bias.float())
        if plain and (cache is None or not cache.has_bias):
            if start == 0:  # causal over the new slots only
                return AttentionPlan(cos, sin_signed, None, n > 1, n_queries, float(b * compute.causal_key_pairs(n)),
                                     cache, start)
            if n == 1:  # one query that sees everything cached
                return AttentionPlan(cos, sin_signed, None, False, n_queries, float(b * (start + 1)), cache, start)

        total = start + n
        # finfo.min, not -inf: a fully masked row (a padding query) then stays finite instead of NaN.
        floor = torch.finfo(torch.float32).min
        if allowed is None and cache is not None and n == 1:
            # One new query (a decoding step): it sees every valid cached slot, so the mask is just the
            # cache's bias and validity -- no causal pattern to build.
            bias, valid = cache.key_bias[:, :total], cache.key_valid[:, :total]
            counted = valid if query_valid is None else valid & query_valid
            mask = torch.where(valid, bias.float(), floor)[:, None, None, :]
            return AttentionPlan(cos, sin_signed, mask, False, n_queries, compute.as_count(counted), cache, start)
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
        mask = torch.where(allowed, bias.float()[:, None, :].expand_as(allowed), floor)[:, None]
        return AttentionPlan(cos, sin_signed, mask, False, n_queries, key_pairs, cache, start)

    @staticmethod
    def positions_after(start: int, batch_size: int, n: int, device: torch.device | str) -> torch.Tensor:
        """RoPE positions [B, n] of n new tokens that follow ``start`` earlier ones."""
        return torch.arange(start, start + n, device=device).expand(batch_size, n)

    def run_blocks(self, x: torch.Tensor, plan: AttentionPlan, layers: range | None = None,
                   cache_layer_offset: int = 0) -> torch.Tensor:
        """Residual stream through ``layers`` (default all); cache layer index = offset + position.

        Each block runs the compiled training step when :meth:`compile_training_blocks` turned it on,
        gradients are wanted and the plan has no cache, mask or kv_hook; otherwise eagerly.
        """
        indices = range(len(self.layers)) if layers is None else layers
        step = self._training_step(plan) if self._compile_training_blocks else None
        with _eager_backward_compilation() if step is not None else contextlib.nullcontext():
            for i in indices:
                if step is not None:
                    try:
                        x = self.layers[i](x, plan, cache_layer_offset + i, step)
                        continue
                    except Exception as error:  # any compiler failure means: train eagerly
                        first = (str(error).strip().splitlines() or [""])[0][:300]  # inductor's are long
                        warnings.warn(f"compiled training blocks unavailable ({type(error).__name__}: {first}); "
                                      "training eagerly", RuntimeWarning, stacklevel=2)
                        self._compile_training_blocks = False
                        step = None
                x = self.layers[i](x, plan, cache_layer_offset + i)
        return x

    # -- training blocks, optionally compiled -------------------------------------------------------

    _compile_training_blocks = False  # set by compile_training_blocks (a class default: copies stay plain)

    def compile_training_blocks(self, enabled: bool = True) -> bool:
        """Run each block of a training forward through ``torch.compile``; True if on.

        Decided here: off by default (compiling costs tens of seconds per process and input shape, which
        only long jobs repay); on only where the compiler inductor needs exists (:func:`compiled_steps_available`)
        and torch keeps recompilation limits per compiled region (``torch.compile(isolate_recompiles=...)``),
        else this returns False and training stays eager. A block takes the compiled step
        (:func:`make_block_step`) when gradients are wanted and the plan has no cache, mask or kv_hook
        (training passes: causal, or causal with PonderLM-3's key bias); evaluation, decoding and masked
        plans stay eager. Values may differ from eager in the last bits (inductor fuses the elementwise
        ops and reorders reductions); the ledger counts the same blocks (tests/test_fast_paths.py).
        """
        self._compile_training_blocks = (bool(enabled) and _ISOLATED_REGIONS
                                         and compiled_steps_available(self.lm_head.weight.device))
        return self._compile_training_blocks

    def _training_step(self, plan: AttentionPlan) -> Callable[..., torch.Tensor] | None:
        """The compiled :func:`make_block_step` of this decoder's shape, or None where the plan does not take it."""
        if not torch.is_grad_enabled() or plan.cache is not None or plan.mask is not None or plan.kv_hook is not None:
            return None
        cfg = self.cfg
        shape = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.norm_eps)
        step = _TRAINING_STEPS.get(shape)
        if step is None:
            # One region per backbone shape, with its own recompile limit: dynamo counts compilations per code
            # object, which every make_block_step closure shares, and a process may hold several models (a
            # bench, the tests), each with a few input shapes (PonderLM's passes: n = T..(K+1)T, with and
            # without key bias) -- the default 8 would be reached. fullgraph: a graph break or the limit
            # raises (then a warning and eager), never a silent eager fallback inside dynamo.
            step = _TRAINING_STEPS[shape] = torch.compile(
                make_block_step(*shape), dynamic=False, fullgraph=True, recompile_limit=TRAINING_RECOMPILE_LIMIT,
                isolate_recompiles=True)
        return step

    # -- the decoding step: one new slot per row, optionally compiled ------------------------------

    _compile_slot_steps = False  # set by compile_slot_steps (a class default: __init__ and copies stay plain)

    def compile_slot_steps(self, enabled: bool = True) -> bool:
        """Run one-slot decoding steps (:meth:`blocks_and_norm`) through ``torch.compile``; True if on.

        Decided here: off by default (compiling costs tens of seconds once per process and shape
        family, which only long decoding repays); on only where the compiler inductor needs exists (a
        C++ compiler on CPU, Triton on CUDA), else this returns False and decoding stays eager. The
        compiled step (:func:`make_slot_step`) runs the eager step's operations; inductor
        fuses the elementwise ops between the matmuls and the step runs q|k|v and gate|up as one
        matmul each, so values may differ in the last bits (fused reductions), never the decoded tokens
        of the tests (tests/test_fast_paths.py).
        """
        self._compile_slot_steps = bool(enabled) and compiled_steps_available(self.lm_head.weight.device)
        return self._compile_slot_steps

    def blocks_and_norm(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """``norm(run_blocks(x, plan))``: the normalised outputs of all blocks; a one-slot decoding step
        takes the compiled path when :meth:`compile_slot_steps` turned it on."""
        if self._compile_slot_steps and self._compilable(x, plan):
            out = self._compiled_slot(x, plan)
            if out is not None:
                return out
        return self.norm(self.run_blocks(x, plan))

    def _compilable(self, x: torch.Tensor, plan: AttentionPlan) -> bool:
        cache = plan.cache
        # Slots 0 and 1 stay eager: torch.compile specialises the integers 0 and 1, which would cost
        # two extra compilations for two steps.
        return (cache is not None and plan.kv_hook is None and plan.key_bias is None and x.shape[1] == 1
                and plan.cache_start >= 2 and cache.n_layers == len(self.layers) and not plan.is_causal
                and (plan.mask is None or plan.mask.shape[-2] == 1) and not torch.is_grad_enabled()
                and x.dtype == cache.dtype == self.lm_head.weight.dtype == torch.float32
                and not torch.is_autocast_enabled(x.device.type))

    def _compiled_slot(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor | None:
        """The compiled step (:func:`make_slot_step`), counted in the ledger like the eager blocks; None (and
        eager from then on) if compiling fails."""
        step, weights = self._compiled_step_and_weights()
        cache = plan.cache
        # A full cache (every slot up to capacity in use) would be a case torch.compile specialises on
        # (keys[:, :, :total] is then the whole storage): one recompilation, tens of seconds. Never full.
        if cache.length >= cache.capacity:
            cache.reserve(2 * cache.capacity)
        buffers = [cache.buffers(i, x.dtype) for i in range(len(self.layers))]
        try:
            out = step(weights, x, plan.cos, plan.sin_signed, plan.mask_as(x.dtype), [k for k, _ in buffers],
                       [v for _, v in buffers], plan.cache_start)
        except Exception as error:  # any compiler failure means: decode eagerly
            warnings.warn(f"compiled decoding step unavailable ({type(error).__name__}: {error}); decoding "
                          "eagerly", RuntimeWarning, stacklevel=3)
            self._compile_slot_steps = False
            return None
        for layer in self.layers:
            compute.record_block(layer.matmul_params, layer.attn_width, plan.queries, plan.key_pairs)
        return out

    def _compiled_step_and_weights(self) -> tuple[Callable, list[torch.Tensor]]:
        """The compiled decoding step (:func:`make_slot_step`) and its weights: per block the two norm
        weights, q|k|v and gate|up concatenated (one matmul each instead of three and two) and o and down;
        then the final norm's. The concatenations are rebuilt when a parameter changed (training, loading)."""
        entry = _COMPILED_STEPS.get(self)
        params = entry[3] if entry is not None else list(self.parameters())
        version = tuple((p.data_ptr(), p._version) for p in params)
        if entry is None or entry[1] != version:
            weights = []
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                weights += [layer.input_layernorm.weight.detach(),
                            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                            attn.o_proj.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                            mlp.down_proj.weight.detach()]
            weights.append(self.norm.weight.detach())
            # fullgraph: a graph break raises (then eager), never a silently half-compiled step
            cfg = self.cfg
            step = entry[0] if entry is not None else torch.compile(
                make_slot_step(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.norm_eps),
                dynamic=True, fullgraph=True)
            entry = _COMPILED_STEPS[self] = (step, version, weights, params)
        return entry[0], entry[2]

    def new_cache(self, batch_size: int, n_stacks: int = 1, device=None, dtype=None, capacity: int = 64) -> KVCache:
        """A cache for ``n_stacks`` passes of the block stack (looped models keep one per loop).

        ``capacity``: slots preallocated (it doubles when exceeded); a caller that knows the length
        it will decode passes it, so the storage is allocated once.
        """
        p = self.lm_head.weight
        return KVCache(self.cfg.n_layers * n_stacks, batch_size, self.cfg.n_kv_heads, self.cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype, capacity=capacity)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Plain LLaMA: token ids [B, n] -> logits [B, n, V]; with a cache, continues after its slots."""
        return self.head(self.hidden(input_ids, positions, cache, valid), valid)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised final hidden states [B, n, d] that :meth:`forward` feeds to the LM head."""
        if positions is None:
            offset = 0 if cache is None else cache.length
            positions = self.positions_after(offset, input_ids.shape[0], input_ids.shape[1], input_ids.device)
        plan = self.plan(positions.expand(input_ids.shape[0], -1), cache=cache, key_valid=valid)
        return self.blocks_and_norm(self.embed(input_ids), plan)

    # -- analytic compute -----------------------------------------------------------------------

    @property
    def block_matmul_params(self) -> int:
        return self.layers[0].matmul_params

    def layers_flops(self, n_layers: float, queries: float, key_pairs: float,
                     matmul_params: int | None = None) -> float:
        """FLOPs of ``n_layers`` blocks over ``queries`` positions that see ``key_pairs`` keys in total
        (``matmul_params``: a block whose weights differ from the backbone's, e.g. an attention per recursion)."""
        params = self.block_matmul_params if matmul_params is None else matmul_params
        return n_layers * compute.block_flops(params, self.cfg.n_heads * self.cfg.head_dim, queries, key_pairs)

    def analytic_forward_flops(self, block_queries: float, key_pairs: float, head_positions: float,
                               n_block_passes: float = 1.0) -> float:
        """FLOPs of ``n_block_passes`` passes of the L-block stack plus the head.

        See docs/design.md, "Compute accounting".
        """
        per_stack = self.layers_flops(self.cfg.n_layers, block_queries, key_pairs)
        return n_block_passes * per_stack + compute.head_flops(self.cfg.d_model, self.cfg.vocab_size,
                                                               head_positions)



__all__ = ["Attention", "AttentionPlan", "Block", "Decoder", "IGNORE_INDEX", "KVCache", "LinearCrossEntropy",
           "RMSNorm", "Rotary", "SwiGLU", "apply_rotary", "attend_with_key_bias", "compiled_steps_available",
           "init_weight", "make_block_step", "make_slot_step", "rms_norm", "rotate"]
