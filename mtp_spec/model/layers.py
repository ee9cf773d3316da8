"""Building blocks: RMSNorm, an FP8-aware Linear, and YaRN rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import mtp_spec.parallel as parallel
from mtp_spec.config import ModelArgs, yarn_mscale
from mtp_spec.kernels import FP8, cpu_linear, cpu_rows


class RMSNorm(nn.Module):
    """Normalises in fp32 and casts back before the weight, as HF's DeepseekV3RMSNorm does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.small_m = False  # set by compile_steps(): CPU steps use kernels/cpu_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small_m and cpu_rows.rms_norm_usable(x, self.weight):
            return cpu_rows.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused op instead of six
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def activation_dtype(weight: torch.Tensor) -> torch.dtype:
    """Activations run in fp32 on the CPU whatever the weights' dtype (bf16 weights halve the bytes a
    step reads; CPU bf16 arithmetic is slow and rounds every op), in the weights' dtype elsewhere."""
    return torch.float32 if weight.device.type == "cpu" else weight.dtype


class Linear(nn.Module):
    """y = x W^T. W is in the model dtype, or stays e4m3 with a 128x128 `scale` (weight_scale_inv)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scale: torch.Tensor | None = None  # set by the loader when the weight is kept in fp8
        self.small_m = False  # set by compile_steps(): few-row CPU products go to kernels/cpu_linear
        self.shard: tuple[int, int, int] | None = None  # (dim, start, end) of the checkpoint tensor this rank holds

    @classmethod
    def concat(cls, parts: list[Linear]) -> Linear | None:
        """One Linear whose output is the parts' outputs side by side; each part's weight becomes a view
        of the fused weight (no copy stays behind). None where the parts cannot share one weight: FP8
        blocks would straddle a part boundary, or dtypes differ."""
        ws = [p.weight for p in parts]
        if len({w.dtype for w in ws}) != 1 or len({w.shape[1] for w in ws}) != 1:
            return None
        fp8 = ws[0].dtype == FP8
        if fp8 and any(w.shape[0] % 128 for w in ws[:-1]):
            return None
        out = cls(ws[0].shape[1], sum(w.shape[0] for w in ws))
        out.weight = nn.Parameter(torch.cat([w.data for w in ws]), requires_grad=False)
        if fp8:
            out.scale = torch.cat([p.scale for p in parts])
        row = 0
        for p in parts:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(out.weight.data[row:row + n], requires_grad=False)
            if fp8:
                p.scale = out.scale[row // 128:(row + n + 127) // 128]
            row += n
        return out

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
        if self.small_m and cpu_linear.usable(x, self.weight):
            return cpu_linear.step_linear(x, self.weight)
        if x.dtype != self.weight.dtype:  # bf16 weights, fp32 activations (the CPU): the same math, upcast
            return F.linear(x, self.weight.to(x.dtype))
        return F.linear(x, self.weight)


class ColumnParallelLinear(Linear):
    """Output features split across ranks; each rank returns its slice (`gather`: all of them)."""

    def __init__(self, in_features: int, out_features: int, what: str = "out_features", gather: bool = False):
        w = parallel.world()
        start, end = w.part(out_features, what)
        super().__init__(in_features, end - start)
        self.shard = (0, start, end) if w.size > 1 else None
        self.gather = gather

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return parallel.all_gather_last(y) if self.gather else y


class RowParallelLinear(Linear):
    """Input features split across ranks; the partial products are summed by one all-reduce (`reduce`
    False leaves that to the caller, who folds several partial sums into one)."""

    def __init__(self, in_features: int, out_features: int, what: str = "in_features", reduce: bool = True):
        w = parallel.world()
        start, end = w.part(in_features, what)
        super().__init__(end - start, out_features)
        self.shard = (1, start, end) if w.size > 1 else None
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return parallel.all_reduce(y) if self.reduce else y


class ParallelEmbedding(nn.Embedding):
    """Vocabulary rows split across ranks: a rank looks up the tokens in its range, zeros elsewhere,
    and one all-reduce puts every row together (exact: one non-zero term per entry)."""

    def __init__(self, vocab_size: int, dim: int):
        w = parallel.world()
        self.start, end = w.part(vocab_size, "vocab_size")
        super().__init__(end - self.start, dim)
        self.shard = (0, self.start, end) if w.size > 1 else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return super().forward(tokens)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        y = super().forward(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
        return parallel.all_reduce(y)


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
    """cos/sin tables for positions [0, max_len). DeepSeek rotates pairs (x[2j], x[2j+1]) (YaRN when
    configured); the Llama family rotates halves (x[j], x[j + d/2]), HF's rotate_half layout."""

    def __init__(self, args, max_len: int):
        super().__init__()
        self.half = args.family == "llama"
        if self.half:
            d = args.head_dim
            inv_freq, cs_scale = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 1.0
        else:
            inv_freq, cs_scale = rope_inv_freq(args)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos() * cs_scale, persistent=False)
        self.register_buffer("sin", angles.sin() * cs_scale, persistent=False)
        self.small_m = False  # set by compile_steps(): CPU steps rotate in kernels/cpu_rows

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at positions (b, s), shaped (b, s, 1, d/2) to broadcast over heads, gathered once
        per forward for every layer. Positions must lie inside the table: the engine checks that from
        lengths it knows (no read-back here)."""
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (b, s, [h,] d) rotated by rope = tables(positions). DeepSeek's output is laid out
        [even' | odd'], like HF's interleaved path; q and k get the same layout, so their dot products
        are unchanged."""
        cos, sin = rope
        if self.small_m and cpu_rows.usable(x) and cos.dtype == torch.float32:
            return cpu_rows.rope(x, cos, sin, pairs=not self.half)
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if x.dim() == 3:  # one head, no head axis (MLA's shared roped key)
            cos, sin = cos[:, :, 0], sin[:, :, 0]
        if self.half:
            x1, x2 = x.chunk(2, dim=-1)
        else:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
