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

# Tile configs bucketed by M (tokens): decode and verification (M <= 16) want narrow M tiles, wide N
# coverage and split K (a (1, 7168) x (576, 7168) product has only a handful of N tiles, too few to
# keep the memory system busy); prefill wants square-ish tiles.
# (BLOCK_M, BLOCK_N, num_warps, num_stages, waves): `waves` asks for about waves x SMs programs by
# splitting K; 0 never splits. Rows of one M bucket share one config, so a row's result does not
# depend on how many other rows share the launch (the verifier relies on that).
M_BUCKETS = [(16, (16, 64, 4, 4, 2)), (64, (64, 128, 4, 3, 0)), (256, (64, 64, 4, 4, 1)),
             (1 << 62, (64, 128, 4, 4, 0))]
# DeepSeek-V3's own shapes where another config won clearly, per bucket (None: the default), from
# the sweep in experiments/kernels/bench_kernels.py on an H200 (torch 2.11, Triton 3.6).
TUNED: dict[tuple[int, int], list[tuple | None]] = {
    (1536, 7168): [(16, 128, 4, 4, 1), (32, 64, 4, 4, 0), (64, 128, 4, 3, 0), None],  # q_a
    (24576, 1536): [(16, 64, 4, 4, 0), None, None, None],  # q_b
    (576, 7168): [(16, 64, 4, 4, 1), (32, 64, 4, 4, 0), (64, 128, 4, 3, 0), None],  # kv_a
    (32768, 512): [(16, 128, 4, 4, 0), None, (128, 128, 8, 3, 0), None],  # kv_b
    (7168, 16384): [None, (32, 64, 4, 4, 1), None, (128, 128, 8, 4, 0)],  # o
    (18432, 7168): [None, (64, 64, 4, 4, 1), None, (128, 128, 8, 4, 0)],  # dense gate|up
    (7168, 18432): [(16, 64, 4, 4, 4), (64, 64, 4, 4, 1), (64, 128, 4, 3, 1), None],  # dense down
    (2048, 7168): [None, (32, 64, 4, 4, 0), None, None],  # expert / shared gate, up
    (7168, 2048): [(16, 32, 4, 4, 0), None, None, None],  # expert / shared down
}
_SMS: dict[int, int] = {}


def config_for_m(m: int, n: int | None = None, k: int | None = None) -> tuple[int, int, int, int, int]:
    """The tile config for M rows (of an (N, K) weight, where a tuned entry exists)."""
    i = next(i for i, (limit, _) in enumerate(M_BUCKETS) if m <= limit)
    return TUNED.get((n, k), [None] * 4)[i] or M_BUCKETS[i][1]


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; under the interpreter an H100's 132, so that the tests take
    the same split-K decisions as the GPU."""
    if device.type != "cuda":
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def split_k(tiles: int, k_blocks: int, waves: int, sms: int) -> int:
    """K splits so that tiles x splits reaches about waves x sms programs, each split >= 2 K blocks."""
    if waves <= 0 or tiles >= waves * sms:
        return 1
    want = min(-(-waves * sms // tiles), max(1, k_blocks // 2))
    per = -(-k_blocks // want)
    return -(-k_blocks // per)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, n_groups, UE8M0: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offs).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x)), 1e-4)  # an all-zero group gets a finite scale
    # Correctly rounded divisions: Triton's plain `/` on fp32 is an approximate one on the GPU
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if UE8M0:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    y = tl.clamp(tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * s), -448.0, 448.0)
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
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, KB_PER_SPLIT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PROMOTE: tl.constexpr = True):
    """One (M, N) tile over the K blocks of split program_id(2); with several splits c is a
    (splits, M, N) fp32 buffer of partial sums, added up afterwards in a fixed order."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    kb_total = K // BLOCK_K
    kb0 = pid_k * KB_PER_SPLIT
    kb1 = tl.minimum(kb0 + KB_PER_SPLIT, kb_total)
    a_rows = a_ptr + rm[:, None].to(tl.int64) * K
    b_rows = b_ptr + rn[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        a = tl.load(a_rows + kb * BLOCK_K + rk[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(b_rows + kb * BLOCK_K + rk[None, :], mask=n_ok[:, None], other=0.0)
        if PROMOTE:
            a_s = tl.load(as_ptr + rm * kb_total + kb, mask=m_ok, other=0.0)
            b_s = tl.load(bs_ptr + (rn // BLOCK_K) * kb_total + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        else:  # timing diagnostic only (wrong numbers): what the per-block scaling costs
            acc = tl.dot(a, tl.trans(b), acc)
    c_ptrs = c_ptr + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.float32, config: tuple | None = None, _promote: bool = True
             ) -> torch.Tensor:
    """`config` overrides the M bucket's (BLOCK_M, BLOCK_N, num_warps, num_stages, waves) (tuning);
    `_promote=False` drops the scales (a timing diagnostic: the numbers are wrong)."""
    k = a.shape[-1]
    m = a.numel() // k
    n = b.shape[0]
    bm, bn, warps, stages, waves = config or config_for_m(m, n, k)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    kb = k // BLOCK
    splits = split_k(tiles, kb, waves, sm_count(a.device))
    per = triton.cdiv(kb, splits)
    c = torch.empty(*a.shape[:-1], n, dtype=out_dtype, device=a.device)
    dst = c if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    _fp8_gemm_kernel[grid](a, b, dst, a_s, b_s, m, n, k, per, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK,
                           PROMOTE=_promote, num_warps=warps, num_stages=stages)
    if splits > 1:
        c.view(m, n).copy_(dst.sum(0))
    return c


@triton.jit
def _grouped_fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, row_ids_ptr, block_expert_ptr, N, K,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each M tile holds rows of one expert (rows sorted by expert, each group padded to BLOCK_M);
    padding rows have id -1 and are neither read nor written."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # a spare block: the grid is sized for the worst case, so no count is read back
        return
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
    of every block (-1 for spare blocks). Computed on the device with sizes fixed by the row count
    (ceil(T / block_m) + min(E, T) blocks bound any routing), so nothing is read back to the host and
    a decode step can be captured in a CUDA graph. Empty experts get no block."""
    t = expert_of_row.numel()
    dev = expert_of_row.device
    nb = -(-t // block_m) + min(n_experts, t)
    e = expert_of_row.long()
    counts = torch.zeros(n_experts, dtype=torch.long, device=dev).scatter_add_(0, e, torch.ones_like(e))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    block_start, row_start = block_end - blocks, torch.cumsum(counts, 0) - counts
    order = torch.argsort(e, stable=True)
    j = torch.arange(nb, device=dev)
    be = torch.searchsorted(block_end, j, right=True)  # the expert whose blocks cover block j
    valid = be < n_experts
    be = be.clamp(max=n_experts - 1)
    off = (j - block_start[be])[:, None] * block_m + torch.arange(block_m, device=dev)[None, :]
    ok = valid[:, None] & (off < counts[be][:, None])
    src = (row_start[be][:, None] + off).clamp(max=max(t - 1, 0))
    row_ids = torch.where(ok, order[src] if t else src, -1).to(torch.int32).flatten()
    return row_ids, torch.where(valid, be, -1).to(torch.int32)


def grouped_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
                     expert_of_row: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                     routing: tuple | None = None) -> torch.Tensor:
    """out[i] = a[i] @ w[expert_of_row[i]]^T for every row, all experts in one launch.
    a (T, K) e4m3, a_s (T, K/128), w (E, N, K) e4m3, w_s (E, ceil(N/128), K/128). `routing` is
    `route(expert_of_row, E)` when several GEMMs share one routing (an MoE's two projections)."""
    t, k = a.shape
    e, n, _ = w.shape
    out = torch.zeros(t, n, dtype=out_dtype, device=a.device)
    if t == 0:
        return out
    row_ids, block_expert, (bm, bn, warps, stages, _) = routing or route(expert_of_row, e)
    grid = (len(block_expert), triton.cdiv(n, bn))
    _grouped_fp8_gemm_kernel[grid](a, w, out, a_s, w_s, row_ids, block_expert, n, k, BLOCK_M=bm, BLOCK_N=bn,
                                   BLOCK_K=BLOCK, num_warps=warps, num_stages=stages)
    return out


def route(expert_of_row: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The grouped GEMM's tile config for this many rows per expert, and the rows sorted into its blocks."""
    cfg = config_for_m(max(1, expert_of_row.numel() // max(1, n_experts)))
    return (*sort_by_expert(expert_of_row, n_experts, cfg[0]), cfg)
