"""Multi-head latent attention (MLA), naive and absorbed.

Both paths read the same latent cache (normalised c_kv and the roped k_pe). The naive path expands
c_kv into per-head keys and values with wkv_b; the absorbed path folds wkv_b into the query and the
output instead, so it never materialises per-head K/V. They must agree; absorbed is the default.

A forward is a function of fixed shapes: it writes the new tokens' latents at their slots and reads
the first `kv_len` slots of every row under a mask (see `make_step`), so the same compiled code
serves every step whose shapes match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import mtp_spec.parallel as parallel
from mtp_spec.cache import KVCache
from mtp_spec.config import ModelArgs
from mtp_spec.kernels import cpu_linear
from mtp_spec.model.layers import ColumnParallelLinear, Linear, RMSNorm, Rotary, RowParallelLinear, softmax_scale


@dataclass
class Step:
    """What every attention layer needs to know about one forward call."""

    positions: torch.Tensor  # (b, s) rotary positions of the new tokens
    mask: torch.Tensor  # (b, s, kv_len) bool: query i may attend to key slot j
    slots: torch.Tensor | None = None  # (b, s) cache slots the new tokens are written to
    absorb: bool = True
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin at `positions`, shared by all layers
    rows: torch.Tensor | None = None  # (b, s) row index of every new token, for cache writes

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]


def make_step(tokens: torch.Tensor, start: torch.Tensor | None, cache: KVCache | None,
              tree_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
              absorb: bool = True, rotary: Rotary | None = None) -> Step:
    """Mask and positions for new tokens (b, s) appended to every row of the cache at per-row `start`.

    Attention reads every slot of the preallocated cache (masked), so shapes never depend on lengths;
    the caller guarantees start + s <= the cache length, from lengths it knows on the host, so nothing
    here reads a tensor back. tree_mask (b, s, s) or (s, s) says which new tokens see which (default
    causal); positions default to start + arange(s), a tree passes start + depth."""
    b, s = tokens.shape
    dev = tokens.device
    ar = torch.arange(s, device=dev)
    if cache is None:
        start = torch.zeros(b, dtype=torch.long, device=dev) if start is None else start
        kv_len = s
    else:
        start = cache.lengths if start is None else start
        kv_len = cache.max_len
    slots = start[:, None] + ar
    if positions is None:
        positions = slots
    rel = torch.arange(kv_len, device=dev)[None, None, :] - start[:, None, None]  # key slot - first new slot
    mask = rel <= ar[None, :, None]  # causal: past tokens, and new tokens up to oneself
    if tree_mask is not None:
        tm = tree_mask.to(dev).bool().expand(b, s, s)
        new = (rel >= 0) & (rel < s)
        idx = rel.clamp(0, s - 1).expand(b, s, kv_len)
        mask = torch.where(new, torch.gather(tm, 2, idx), rel < 0)
    return Step(positions=positions, mask=mask, slots=slots if cache is not None else None, absorb=absorb,
                rope=None if rotary is None else rotary.tables(positions),
                rows=None if cache is None else torch.arange(b, device=dev)[:, None].expand(b, s))


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """Attention runs in fp32 on the CPU (CPU bf16 matmuls are slow, and the cache is fp32 there),
    in the model's dtype elsewhere."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def cache_dtype(param: torch.Tensor) -> torch.dtype:
    """The KV cache's dtype for a model whose weights look like `param`."""
    if param.device.type == "cpu":
        return torch.float32
    return param.dtype if param.is_floating_point() and param.element_size() > 1 else torch.bfloat16


def cache_widths(args: ModelArgs) -> dict[str, int]:
    """What MLA caches per token, side by side in one row: the normalised latent c_kv and the roped key
    shared by all heads. In the absorbed form that row is the key of a single KV head, and its first
    kv_lora_rank entries are the value."""
    return {"ckv": args.kv_lora_rank + args.qk_rope_head_dim}


class MLA(nn.Module):
    """Under tensor parallelism each rank runs n_heads / world of the heads (wq_b, wkv_b split by
    heads, wo by its input); the latent projections and the latent cache are the same on every rank."""

    def __init__(self, args: ModelArgs, rotary: Rotary):
        super().__init__()
        w = parallel.world()
        w.part(args.n_heads, "num_attention_heads")  # refuses an uneven split by name
        self.n_heads = args.n_heads // w.size  # this rank's heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk, heads = args.qk_head_dim, args.n_heads
        if self.q_lora_rank == 0:
            self.wq = ColumnParallelLinear(args.dim, heads * qk)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = ColumnParallelLinear(self.q_lora_rank, heads * qk)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.rope)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = ColumnParallelLinear(self.kv_lora_rank, heads * (self.nope + self.v_dim))
        self.wo = RowParallelLinear(heads * self.v_dim, args.dim)
        self.softmax_scale = softmax_scale(args)
        self.rotary = [rotary]  # a list keeps the shared table out of this module's state
        self.fused: list[Linear] = []  # wq_a and wkv_a as one projection, set at load (outside the state dict)
        self.small_m = False  # set by compile_steps(): few-query attention on the CPU uses the C kernel

    def fuse(self) -> None:
        """One projection for wq_a and wkv_a; the two keep their weights as views of the fused one."""
        if self.q_lora_rank and (f := Linear.concat([self.wq_a, self.wkv_a])) is not None:
            self.fused = [f]

    def forward(self, x: torch.Tensor, step: Step, cache: tuple[torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        if self.q_lora_rank == 0:
            q, kv_a = self.wq(x), self.wkv_a(x)
        else:
            if self.fused:
                q_a, kv_a = self.fused[0](x).split([self.q_lora_rank, self.kv_lora_rank + self.rope], dim=-1)
            else:
                q_a, kv_a = self.wq_a(x), self.wkv_a(x)
            q = self.wq_b(self.q_norm(q_a))
        q = q.view(b, s, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        rot = self.rotary[0]
        rope = step.rope or rot.tables(step.positions)
        q_pe = rot(q_pe, rope)
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)
        k_pe = rot(k_pe, rope)
        if cache is not None:
            (ckv,) = cache
            ckv.index_put_((step.rows, step.slots), torch.cat([kv, k_pe], -1).to(ckv.dtype))
            kv, k_pe = ckv[..., : self.kv_lora_rank], ckv[..., self.kv_lora_rank:]
        dt = attention_dtype(x)
        q_nope, q_pe, kv, k_pe = q_nope.to(dt), q_pe.to(dt), kv.to(dt), k_pe.to(dt)
        wkv_b = self.wkv_b.dense_weight(dt).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        key = None if cache is None else ckv[:, :, None]  # one KV head: key [c_kv | k_pe], value c_kv
        if (self.small_m and step.absorb and key is not None and s <= cpu_linear.MAX_M
                and cpu_linear.attention_usable(key, key) and not torch.compiler.is_compiling()):
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.nope])  # the query: [q_nope wkv_b | q_pe]
            o = cpu_linear.attention(torch.cat([q_lat, q_pe], -1), key, key[..., : self.kv_lora_rank], step.mask,
                                     self.softmax_scale)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, self.nope:])
            return self.wo(o.reshape(b, s, self.n_heads * self.v_dim).to(x.dtype))
        if step.absorb:
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.nope])
            scores = torch.einsum("bshc,btc->bsht", q_lat, kv) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        else:
            k_nope = torch.einsum("btc,hdc->bthd", kv, wkv_b[:, : self.nope])
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
            scores = torch.einsum("bshd,bthd->bsht", torch.cat([q_nope, q_pe], dim=-1), k)
        scores = scores * self.softmax_scale
        scores = scores.masked_fill(~step.mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(dt)
        if step.absorb:
            o = torch.einsum("bsht,btc->bshc", probs, kv)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, self.nope:])
        else:
            v = torch.einsum("btc,hdc->bthd", kv, wkv_b[:, self.nope:])
            o = torch.einsum("bsht,bthd->bshd", probs, v)
        return self.wo(o.reshape(b, s, self.n_heads * self.v_dim).to(x.dtype))
