"""Pure-torch references for DeepSeek's block FP8 format (e4m3, 128x128 weight scales, 1x128 activation scales).

`weight_scale_inv` is a multiplier: W = W_fp8 * scale_inv, block by block. Everything computes in fp32
because CPU torch has no float8 arithmetic.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4  # as DeepSeek's act_quant: an all-zero block gets a finite scale


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    n, k = w.shape
    pn, pk = (-n) % block, (-k) % block
    return torch.nn.functional.pad(w, (0, pk, 0, pn)) if pn or pk else w


def weight_quant_ref(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) e4m3 and (ceil(N/128), ceil(K/128)) fp32 scale_inv; edges zero-padded for amax."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant: w must be 2-D, got shape {tuple(w.shape)}")
    n, k = w.shape
    wp = _pad_to_blocks(w.float(), block)
    nb, kb = wp.shape[0] // block, wp.shape[1] // block
    blocks = wp.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR)
    scale_inv = amax / torch.full_like(amax, FP8_MAX)  # a tensor divisor: CUDA turns a scalar one into a
    # multiply by its reciprocal, which rounds differently from the CPU; the kernels divide correctly rounded
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale_inv.contiguous()


def weight_dequant_ref(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(N, K) e4m3 and block scale_inv -> fp32 (N, K)."""
    n, k = w.shape
    expect = (-(-n // block), -(-k // block))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(f"weight_dequant: scale_inv has shape {tuple(scale_inv.shape)}, expected {expect} "
                         f"for a weight of shape {(n, k)}")
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def act_quant_ref(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dim in 1x128 groups: (..., K) -> e4m3 (..., K) and fp32 scales (..., K/128)."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"act_quant: last dim K={k} is not a multiple of block_size={block}")
    g = x.float().reshape(*x.shape[:-1], k // block, block)
    amax = g.abs().amax(-1).clamp(min=AMAX_FLOOR)
    s = amax / torch.full_like(amax, FP8_MAX)  # correctly rounded on every device, as in the kernel
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    y = (g / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return y.reshape(x.shape), s


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 block: int = BLOCK) -> torch.Tensor:
    """C = A @ B^T, accumulated in fp32 one 128-wide K block at a time with its two scales."""
    k = a.shape[-1]
    a2 = a.reshape(-1, k).float()
    as2 = a_s.reshape(-1, a_s.shape[-1]).float()
    b2 = b.float()
    out = torch.zeros(a2.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    bs_rows = b_s.float().repeat_interleave(block, 0)[: b.shape[0]]  # (N, K/128)
    for kb in range(0, k, block):
        i = kb // block
        out += (a2[:, kb:kb + block] @ b2[:, kb:kb + block].T) * as2[:, i:i + 1] * bs_rows[:, i][None, :]
    return out.reshape(*a.shape[:-1], b.shape[0])
