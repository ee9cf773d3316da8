"""Building blocks: RMSNorm, an FP8-aware Linear, and YaRN rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtp_spec.config import ModelArgs, yarn_mscale
from mtp_spec.kernels import FP8


class RMSNorm(nn.Module):
    """Normalises in fp32 and casts back before the weight, as HF's DeepseekV3RMSNorm does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Module):
    """y = x W^T. W is in the model dtype, or stays e4m3 with a 128x128 `scale` (weight_scale_inv)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scale: torch.Tensor | None = None  # set by the loader when the weight is kept in fp8

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in a float dtype (dequantised when it is fp8)."""
        if self.weight.dtype == FP8:
            from mtp_spec.kernels import weight_dequant

            return weight_dequant(self.weight, self.scale).to(dtype or torch.bfloat16)
        return self.weight if dtype is None else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == FP8:
            from mtp_spec.kernels import fp8_linear

            return fp8_linear(x, self.weight, self.scale)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.weight.dtype}"


def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary dims (YaRN-corrected when configured) and the cos/sin scale."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not args.rope_scaling:
        return freqs, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: keep the original (extrapolated) frequency; ramp 1: interpolate by the factor.
    freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    if args.mscale and args.mscale_all_dim:
        cs_scale = yarn_mscale(args.rope_factor, args.mscale) / yarn_mscale(args.rope_factor, args.mscale_all_dim)
    else:
        cs_scale = yarn_mscale(args.rope_factor)
    return freqs, cs_scale


def softmax_scale(args: ModelArgs) -> float:
    scale = args.qk_head_dim ** -0.5
    if args.rope_scaling and args.mscale_all_dim:
        scale *= yarn_mscale(args.rope_factor, args.mscale_all_dim) ** 2
    return scale


class Rotary(nn.Module):
    """cos/sin tables for positions [0, max_len); pairs (x[2j], x[2j+1]) rotate together."""

    def __init__(self, args: ModelArgs, max_len: int):
        super().__init__()
        inv_freq, cs_scale = rope_inv_freq(args)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos() * cs_scale, persistent=False)
        self.register_buffer("sin", angles.sin() * cs_scale, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (b, s, [h,] d) rotated at positions (b, s). Output is laid out [even' | odd'], like HF's
        interleaved path; q and k get the same layout, so their dot products are unchanged."""
        if int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the rotary table ({self.cos.shape[0]})")
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        if x.dim() == 4:
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
