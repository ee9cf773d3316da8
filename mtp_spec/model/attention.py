"""Multi-head latent attention (MLA), naive and absorbed.

Both paths read the same latent cache (normalised c_kv and the roped k_pe). The naive path expands
c_kv into per-head keys and values with wkv_b; the absorbed path folds wkv_b into the query and the
output instead, so it never materialises per-head K/V. They must agree; absorbed is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtp_spec.cache import KVCache
from mtp_spec.config import ModelArgs
from mtp_spec.model.layers import Linear, RMSNorm, Rotary, softmax_scale


@dataclass
class Step:
    """What every attention layer needs to know about one forward call."""

    positions: torch.Tensor  # (b, s) rotary positions of the new tokens
    mask: torch.Tensor  # (b, s, T) bool: query i may attend to key slot j
    cache: KVCache | None = None
    rows: torch.Tensor | None = None  # (b,) cache rows
    slots: torch.Tensor | None = None  # (b, s) cache slots the new tokens are written to
    absorb: bool = True

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]


def make_step(tokens: torch.Tensor, start: torch.Tensor | None, cache: KVCache | None,
              rows: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, absorb: bool = True) -> Step:
    """Causal (or tree) mask and positions for new tokens appended at per-sequence `start`.

    tree_mask (b, s, s) or (s, s) says which new tokens see which; it defaults to causal. positions
    default to start + arange(s); a tree passes start + depth instead."""
    b, s = tokens.shape
    dev = tokens.device
    if start is None:
        start = cache.lengths[rows] if cache is not None and rows is not None else (
            cache.lengths if cache is not None else torch.zeros(b, dtype=torch.long, device=dev))
    start = start.to(dev)
    ar = torch.arange(s, device=dev)
    slots = start[:, None] + ar
    if positions is None:
        positions = slots
    if cache is None:
        if bool((start != 0).any()):
            raise ValueError("a forward that starts past position 0 needs a cache")
        kv_len = s
    else:
        if rows is None:
            rows = torch.arange(b, device=dev)
        kv_len = int(slots.max()) + 1
        if kv_len > cache.max_len:
            raise ValueError(f"sequence needs {kv_len} cache slots but the cache holds {cache.max_len}")
    key = torch.arange(kv_len, device=dev)
    rel = key[None, None, :] - start[:, None, None]  # key slot relative to the first new token
    mask = rel <= ar[None, :, None]  # causal: past tokens, and new tokens up to oneself
    if tree_mask is not None:
        tm = tree_mask.to(dev).bool().expand(b, s, s)
        new = (rel >= 0) & (rel < s)
        idx = rel.clamp(0, s - 1).expand(b, s, kv_len)
        mask = torch.where(new, torch.gather(tm, 2, idx), rel < 0)
    return Step(positions=positions, mask=mask, cache=cache, rows=rows,
                slots=slots if cache is not None else None, absorb=absorb)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, rotary: Rotary):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk = args.qk_head_dim
        if self.q_lora_rank == 0:
            self.wq = Linear(args.dim, self.n_heads * qk)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * qk)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.rope)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim))
        self.wo = Linear(self.n_heads * self.v_dim, args.dim)
        self.softmax_scale = softmax_scale(args)
        self.rotary = [rotary]  # a list keeps the shared table out of this module's state

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, s, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        rot = self.rotary[0]
        q_pe = rot(q_pe, step.positions)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)
        k_pe = rot(k_pe, step.positions)
        if step.cache is not None:
            ck, cp = step.cache.kv[layer], step.cache.pe[layer]
            r = step.rows[:, None]
            ck[r, step.slots] = kv.to(ck.dtype)
            cp[r, step.slots] = k_pe.to(cp.dtype)
            kv = ck[step.rows, : step.kv_len].to(x.dtype)
            k_pe = cp[step.rows, : step.kv_len].to(x.dtype)
        wkv_b = self.wkv_b.dense_weight(x.dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        if step.absorb:
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.nope])
            scores = torch.einsum("bshc,btc->bsht", q_lat, kv) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        else:
            k_nope = torch.einsum("btc,hdc->bthd", kv, wkv_b[:, : self.nope])
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
            scores = torch.einsum("bshd,bthd->bsht", torch.cat([q_nope, q_pe], dim=-1), k)
        scores = scores * self.softmax_scale
        scores = scores.masked_fill(~step.mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        if step.absorb:
            o = torch.einsum("bsht,btc->bshc", probs, kv)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, self.nope:])
        else:
            v = torch.einsum("btc,hdc->bthd", kv, wkv_b[:, self.nope:])
            o = torch.einsum("bsht,bthd->bshd", probs, v)
        return self.wo(o.reshape(b, s, self.n_heads * self.v_dim))
