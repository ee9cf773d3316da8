"""Triton kernels for DeepSeek's block FP8: activation quantisation, weight dequantisation, the
block-scaled GEMM and its grouped (MoE) variant.

They run on CUDA (sm >= 8.9 for e4m3 dots) or in Triton's CPU interpreter (TRITON_INTERPRET=1).
The GEMMs accumulate in fp32 one 128-wide K block at a time, each partial product scaled by its own
activation and weight scale before it is added: the scales are never hoisted out of the K loop,
which also gives DeepGEMM-style promotion out of Hopper's limited-precision FP8 accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128
FP8_MAX = 448.0

# Tile configs bucketed by M (tokens): decode and verification (M <= 16) want narrow M tiles and
# wide N coverage; prefill wants square-ish tiles. (BLOCK_M, BLOCK_N, num_warps, num_stages)
M_BUCKETS = [(16, (16, 64, 4, 4)), (64, (32, 64, 4, 4)), (256, (64, 128, 4, 3)), (1 << 62, (128, 128, 8, 3))]


def config_for_m(m: int) -> tuple[int, int, int, int]:
    return next(cfg for limit, cfg in M_BUCKETS if m <= limit)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, n_groups, UE8M0: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offs).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x)), 1e-4)  # an all-zero group gets a finite scale
    s = amax / 448.0
    if UE8M0:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    y = tl.clamp(x / s, -448.0, 448.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + pid, s)


def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    y = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    s = torch.empty(*x.shape[:-1], k // block_size, dtype=torch.float32, device=x.device)
    n = x.numel() // block_size
    if n:
        _act_quant_kernel[(n,)](x, y, s, n, UE8M0=scale_fmt == "ue8m0", BLOCK_SIZE=block_size)
    return y, s


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, M, N, BLOCK_SIZE: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    n_sb = tl.cdiv(N, BLOCK_SIZE)
    rm = pm * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    rn = pn * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pm * n_sb + pn)
    tl.store(y_ptr + offs, w * s, mask=mask)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    m, n = w.shape
    y = torch.empty(m, n, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(m, block_size), triton.cdiv(n, block_size))
    _weight_dequant_kernel[grid](w, s, y, m, n, BLOCK_SIZE=block_size)
    return y


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    kb_total = K // BLOCK_K
    a_rows = a_ptr + rm[:, None].to(tl.int64) * K
    b_rows = b_ptr + rn[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, kb_total):
        a = tl.load(a_rows + kb * BLOCK_K + rk[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(b_rows + kb * BLOCK_K + rk[None, :], mask=n_ok[:, None], other=0.0)
        a_s = tl.load(as_ptr + rm * kb_total + kb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptr + (rn // BLOCK_K) * kb_total + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = a.shape[-1]
    m = a.numel() // k
    n = b.shape[0]
    c = torch.empty(*a.shape[:-1], n, dtype=out_dtype, device=a.device)
    bm, bn, warps, stages = config_for_m(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _fp8_gemm_kernel[grid](a, b, c, a_s, b_s, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK,
                           num_warps=warps, num_stages=stages)
    return c


@triton.jit
def _grouped_fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, row_ids_ptr, block_expert_ptr, N, K,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each M tile holds rows of one expert (rows sorted by expert, each group padded to BLOCK_M);
    padding rows have id -1 and are neither read nor written."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = tl.load(row_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_ok = rows >= 0
    rows = tl.where(m_ok, rows, 0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    kb_total = K // BLOCK_K
    n_sb = tl.cdiv(N, BLOCK_K)
    b_base = b_ptr + expert * N * K
    bs_base = bs_ptr + expert * n_sb * kb_total
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, kb_total):
        a = tl.load(a_ptr + rows[:, None] * K + kb * BLOCK_K + rk[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(b_base + rn[:, None].to(tl.int64) * K + kb * BLOCK_K + rk[None, :], mask=n_ok[:, None],
                    other=0.0)
        a_s = tl.load(as_ptr + rows * kb_total + kb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_base + (rn // BLOCK_K) * kb_total + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    tl.store(c_ptr + rows[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def sort_by_expert(expert_of_row: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids grouped by expert, each group padded to a multiple of block_m with -1, and the expert
    of every block. Empty experts get no block."""
    counts = torch.bincount(expert_of_row, minlength=n_experts).tolist()
    order = torch.argsort(expert_of_row, stable=True)
    ids, experts, at = [], [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        blocks = -(-c // block_m)
        group = torch.full((blocks * block_m,), -1, dtype=torch.int32)
        group[:c] = order[at:at + c].to(torch.int32)
        ids.append(group)
        experts += [e] * blocks
        at += c
    dev = expert_of_row.device
    if not ids:
        return torch.empty(0, dtype=torch.int32, device=dev), torch.empty(0, dtype=torch.int32, device=dev)
    return torch.cat(ids).to(dev), torch.tensor(experts, dtype=torch.int32, device=dev)


def grouped_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
                     expert_of_row: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[i] = a[i] @ w[expert_of_row[i]]^T for every row, all experts in one launch.
    a (T, K) e4m3, a_s (T, K/128), w (E, N, K) e4m3, w_s (E, ceil(N/128), K/128)."""
    t, k = a.shape
    e, n, _ = w.shape
    out = torch.zeros(t, n, dtype=out_dtype, device=a.device)
    bm, bn, warps, stages = config_for_m(max(1, t // max(1, e)))
    row_ids, block_expert = sort_by_expert(expert_of_row, e, bm)
    if len(block_expert) == 0:
        return out
    grid = (len(block_expert), triton.cdiv(n, bn))
    _grouped_fp8_gemm_kernel[grid](a, w, out, a_s, w_s, row_ids, block_expert, n, k, BLOCK_M=bm, BLOCK_N=bn,
                                   BLOCK_K=BLOCK, num_warps=warps, num_stages=stages)
    return out
