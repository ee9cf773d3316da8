"""FP8 kernels, installed as `mtp_spec.kernels` (never as a top-level `kernels`, a name HF uses).

Each public function runs the Triton kernel on CUDA with compute capability >= 8.9, or under the
interpreter when TRITON_INTERPRET=1, and the pure-torch reference otherwise. MTP_SPEC_KERNELS=torch
or =triton forces a backend (for A/B tests); `backend(t)` says which one a tensor would get.
"""

from __future__ import annotations

import os

import torch

from .reference import FP8, FP8_MAX, act_quant_ref, fp8_gemm_ref, weight_dequant_ref, weight_quant_ref

BLOCK = 128


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend(t: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor on its device, honouring MTP_SPEC_KERNELS."""
    forced = os.environ.get("MTP_SPEC_KERNELS", "auto")
    if forced not in ("auto", "torch", "triton"):
        raise ValueError(f"MTP_SPEC_KERNELS must be auto, torch or triton, got {forced!r}")
    if forced == "torch":
        return "torch"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    cuda = t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9)
    if (cuda or interp) and _triton_ok():
        return "triton"
    if forced == "triton":
        raise RuntimeError("MTP_SPEC_KERNELS=triton, but Triton cannot run here (needs CUDA sm>=89 or "
                           "TRITON_INTERPRET=1, and the triton package)")
    return "torch"


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_fp8(name: str, t: torch.Tensor) -> None:
    _need(t.dtype == FP8, f"{name} must be torch.float8_e4m3fn, got {t.dtype}")
    _need(t.is_contiguous(), f"{name} must be contiguous")


def _check_scale(name: str, s: torch.Tensor, shape: tuple[int, ...]) -> None:
    _need(s.dtype == torch.float32, f"{name} must be float32, got {s.dtype}")
    _need(tuple(s.shape) == tuple(shape), f"{name} has shape {tuple(s.shape)}, expected {tuple(shape)}")
    _need(s.is_contiguous(), f"{name} must be contiguous")


def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dim in 1x128 groups: e4m3 values and fp32 scales (power-of-two with ue8m0)."""
    _need(x.is_floating_point() and x.dtype != FP8, f"x must be a float tensor, got {x.dtype}")
    _need(x.is_contiguous(), "x must be contiguous")
    _need(x.shape[-1] % block_size == 0, f"x: last dim K={x.shape[-1]} is not a multiple of block_size={block_size}")
    _need(scale_fmt in (None, "ue8m0"), f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    if backend(x) == "triton":
        from .triton_fp8 import act_quant as impl

        return impl(x, block_size, scale_fmt)
    return act_quant_ref(x, block_size, scale_fmt)


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """e4m3 (N, K) weight times its (ceil(N/128), ceil(K/128)) block scales, in fp32."""
    _check_fp8("w_fp8", w_fp8)
    _need(w_fp8.dim() == 2, f"w_fp8 must be 2-D, got shape {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    _check_scale("scale_inv", scale_inv, (-(-n // BLOCK), -(-k // BLOCK)))
    if backend(w_fp8) == "triton":
        from .triton_fp8 import weight_dequant as impl

        return impl(w_fp8, scale_inv)
    return weight_dequant_ref(w_fp8, scale_inv)


def _check_gemm(a, a_s, b, b_s, grouped: bool = False) -> None:
    _check_fp8("a_fp8", a)
    _check_fp8("b_fp8", b)
    k = a.shape[-1]
    _need(k % BLOCK == 0, f"a_fp8: K={k} is not a multiple of 128")
    _need(b.shape[-1] == k, f"b_fp8: K={b.shape[-1]} does not match a_fp8's K={k}")
    _check_scale("a_scales", a_s, (*a.shape[:-1], k // BLOCK))
    lead = (b.shape[0],) if grouped else ()
    _check_scale("b_scale_inv", b_s, (*lead, -(-b.shape[-2] // BLOCK), k // BLOCK))


def fp8_gemm(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C = A @ B^T with 1x128 activation scales and 128x128 weight scales, fp32 accumulation."""
    _check_gemm(a_fp8, a_scales, b_fp8, b_scale_inv)
    if backend(a_fp8) == "triton":
        from .triton_fp8 import fp8_gemm as impl

        return impl(a_fp8, a_scales, b_fp8, b_scale_inv, out_dtype)
    return fp8_gemm_ref(a_fp8, a_scales, b_fp8, b_scale_inv).to(out_dtype)


def grouped_fp8_gemm(a_fp8: torch.Tensor, a_scales: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor,
                     expert_of_row: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                     routing: tuple | None = None) -> torch.Tensor:
    """out[i] = A[i] @ W[expert_of_row[i]]^T for all rows and experts in one launch (MoE). `routing`
    (Triton only) is `triton_fp8.route(expert_of_row, E)`, shared by GEMMs with the same routing."""
    _check_gemm(a_fp8, a_scales, w_fp8, w_scale_inv, grouped=True)
    _need(a_fp8.dim() == 2 and w_fp8.dim() == 3, "a_fp8 must be (T, K) and w_fp8 (E, N, K)")
    _need(expert_of_row.shape == (a_fp8.shape[0],), f"expert_of_row must have shape ({a_fp8.shape[0]},)")
    if backend(a_fp8) == "triton":
        from .triton_fp8 import grouped_fp8_gemm as impl

        return impl(a_fp8, a_scales, w_fp8, w_scale_inv, expert_of_row, out_dtype, routing)
    out = torch.zeros(a_fp8.shape[0], w_fp8.shape[1], dtype=out_dtype, device=a_fp8.device)
    for e in expert_of_row.unique().tolist():
        rows = (expert_of_row == e).nonzero().flatten()
        out[rows] = fp8_gemm_ref(a_fp8[rows], a_scales[rows], w_fp8[e], w_scale_inv[e]).to(out_dtype)
    return out


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x @ W^T for an e4m3 W kept in memory: act_quant + block GEMM with Triton, else dequantise."""
    if x.shape[-1] % BLOCK == 0 and backend(w) == "triton":
        xq, xs = act_quant(x.contiguous())
        return fp8_gemm(xq, xs, w, scale_inv, out_dtype=x.dtype)
    return torch.nn.functional.linear(x, weight_dequant(w, scale_inv).to(x.dtype))


__all__ = ["BLOCK", "FP8", "FP8_MAX", "act_quant", "act_quant_ref", "backend", "fp8_gemm", "fp8_gemm_ref",
           "fp8_linear", "grouped_fp8_gemm", "weight_dequant", "weight_dequant_ref", "weight_quant_ref"]
