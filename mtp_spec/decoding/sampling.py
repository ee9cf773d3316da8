"""Turning logits into probabilities and tokens. Temperature, top-k and top-p apply to target and
draft alike, so that rejection sampling compares like with like."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also false for nan
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """fp32 probabilities over the last dim after temperature, top-k and top-p."""
    x = logits.float() / max(sp.temperature, 1e-5)
    if sp.top_k and sp.top_k < x.shape[-1]:
        kth = x.topk(sp.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = x.softmax(-1)
    if sp.top_p < 1.0:
        sp_sorted, idx = p.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the line included)
        drop = sp_sorted.cumsum(-1) - sp_sorted >= sp.top_p
        sp_sorted = sp_sorted.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter(-1, idx, sp_sorted)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(p: torch.Tensor, gen: torch.Generator | None) -> int:
    """One draw from a 1-D distribution (need not be normalised)."""
    return int(torch.multinomial(p.float().cpu(), 1, generator=gen))


def uniform(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))
