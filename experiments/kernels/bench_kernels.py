"""FP8 kernel benchmarks for a GPU (H100/H200): TFLOPS and GB/s on DeepSeek-V3's shapes.

Sections (all by default): `check`, the kernels against their references on the GPU (act_quant
byte for byte, the GEMMs' relative error against float64 on the same bytes); `gemm`, our Triton
block-FP8 GEMM at every candidate tile config (the shipped one, "before", included) vs torch BF16
matmul (cuBLAS) vs torch._scaled_mm blockwise, at M in {1, 4, 16, 64, 128, 512, 4096} on
DeepSeek-V3's shapes, and the config each M bucket should ship (one per bucket: a row's result must
not depend on its batch); `moe`, one MoE layer (grouped kernel vs a loop of BF16 experts).
Weights rotate through a pool larger than L2; M <= 16 is timed inside CUDA graphs.
Writes JSON after each section and prints tables. `--smoke` runs tiny shapes on the CPU (plumbing).

    python experiments/kernels/bench_kernels.py [--sections check,gemm,moe] [--out results/bench_kernels.json]
"""

# ruff: noqa: B023  (the timed closures run inside the loop iteration that builds them)
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import triton

from mtp_spec import kernels as K

SHAPES = {  # name: (N, K) of DeepSeek-V3's projections
    "q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512), "o": (7168, 16384),
    "dense_gate_up": (18432, 7168), "dense_down": (7168, 18432), "expert_gate_up": (2048, 7168),
    "expert_down": (7168, 2048), "shared_gate_up": (2048, 7168), "shared_down": (7168, 2048),
}
MS = [1, 4, 16, 64, 128, 512, 4096]
L2_BYTES = 50 << 20


def bench(fn, device: str, reps: int = 50, graph: bool = False) -> float:
    """Median seconds per call."""
    if device != "cuda":
        fn()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            fn()
            with torch.cuda.graph(g):
                fn()
        torch.cuda.synchronize()
        run = g.replay
    else:
        run = fn
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


class Rotating:
    """Copies of a weight, cycled on every call so each read comes from HBM, not L2."""

    def __init__(self, make, nbytes: int):
        self.items = [make() for _ in range(max(2, -(-2 * L2_BYTES // max(nbytes, 1))))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


SCALED_MM_ERROR: list[str] = []


def scaled_mm_blockwise(a_fp8, a_s, w_fp8, w_s):
    """torch._scaled_mm with DeepSeek blockwise scales (1x128 x 128x128; cuBLASLt >= 12.9 on sm_90):
    activation scales column-major (M, K/128), weight scales as (K/128, N/128). None where unsupported."""
    try:
        return torch._scaled_mm(a_fp8, w_fp8.t(), scale_a=a_s, scale_b=w_s.t(), out_dtype=torch.bfloat16)
    except Exception as e:
        SCALED_MM_ERROR[:] = [f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"]
        return None


def col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


# Candidate tile configs per M: (BLOCK_M, BLOCK_N, num_warps, num_stages, waves); see triton_fp8.
SMALL = [(16, bn, 4, 4, w) for bn in (32, 64, 128) for w in (0, 1, 2, 4)]
CANDIDATES = {
    1: SMALL, 4: SMALL, 16: SMALL,
    64: [(32, 64, 4, 4, 0), (32, 64, 4, 4, 1), (32, 64, 4, 4, 2), (64, 64, 4, 4, 1), (64, 128, 4, 3, 0),
         (16, 64, 4, 4, 1)],
    128: [(64, 128, 4, 3, 0), (64, 128, 4, 3, 1), (64, 64, 4, 4, 1), (128, 128, 8, 3, 0), (128, 128, 4, 3, 0)],
    512: [(128, 128, 8, 3, 0), (128, 128, 4, 3, 0), (128, 256, 8, 3, 0), (64, 256, 4, 3, 0), (128, 128, 8, 4, 0),
          (64, 128, 4, 4, 0)],
}
CANDIDATES[4096] = CANDIDATES[512]
BEFORE = {16: (16, 64, 4, 4, 0), 64: (32, 64, 4, 4, 0), 256: (64, 128, 4, 3, 0), 1 << 62: (128, 128, 8, 3, 0)}
BUCKETS = [16, 64, 256, 1 << 62]


def bucket_of(m: int) -> int:
    return next(b for b in BUCKETS if m <= b)


def _shape_rows(device: str, name: str, n: int, k: int, ms: list[int], smoke: bool) -> list[dict]:
    from mtp_spec.kernels import triton_fp8 as T

    wq, ws = K.weight_quant_ref(torch.randn(n, k, device=device) * 0.02)
    fp8 = Rotating(lambda: (wq.clone(), ws.clone()), n * k)
    bf16 = Rotating(lambda: (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16), 2 * n * k)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        xq, xs = K.act_quant(x.float().contiguous())
        graph = m <= 16 and device == "cuda"
        configs = [BEFORE[bucket_of(m)]] + [c for c in CANDIDATES.get(m, []) if c != BEFORE[bucket_of(m)]]
        if smoke:
            configs = configs[:2]
        times = {}
        for cfg in configs:
            def ours(cfg=cfg):
                w, s = fp8.next()
                return T.fp8_gemm(xq, xs, w, s, out_dtype=torch.bfloat16, config=cfg)
            times[str(cfg)] = bench(ours, device, graph=graph)
        t_bf16 = bench(lambda: x @ bf16.next().t(), device, graph=graph)
        pad = (-m) % 4  # cuBLAS wants M % 4 == 0
        xqp = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
        xsp = col_major(torch.nn.functional.pad(xs, (0, 0, 0, pad), value=1.0))
        t_sm = None
        if device == "cuda" and scaled_mm_blockwise(xqp, xsp, *fp8.items[0]) is not None:
            t_sm = bench(lambda: scaled_mm_blockwise(xqp, xsp, *fp8.next()), device, graph=graph)
        rows.append({"shape": name, "M": m, "N": n, "K": k, "weight_bytes": n * k, "configs_s": times,
                     "before_s": times[str(BEFORE[bucket_of(m)])], "bf16_s": t_bf16, "scaled_mm_s": t_sm})
    return rows


def choose(rows: list[dict]) -> dict[int, str]:
    """Per M bucket, the config with the lowest geometric mean of time / best time over its rows."""
    out = {}
    for b in BUCKETS:
        rs = [r for r in rows if bucket_of(r["M"]) == b]
        common = set.intersection(*(set(r["configs_s"]) for r in rs)) if rs else set()
        if not common:
            continue
        def score(c):
            return math.prod(r["configs_s"][c] / min(r["configs_s"].values()) for r in rs) ** (1 / len(rs))
        out[b] = min(sorted(common), key=score)
    return out


def gemm_section(device: str, shapes: dict, ms: list[int], smoke: bool) -> dict:
    rows = [r for name, (n, k) in shapes.items() for r in _shape_rows(device, name, n, k, ms, smoke)]
    chosen = choose(rows)
    for r in rows:
        t = r["configs_s"][chosen[bucket_of(r["M"])]]
        m, n, k = r["M"], r["N"], r["K"]
        r.update(tuned=chosen[bucket_of(m)], tuned_s=t, tflops=2 * m * n * k / t / 1e12,
                 weight_gbs=n * k / t / 1e9, before_weight_gbs=n * k / r["before_s"] / 1e9,
                 bf16_weight_gbs=2 * n * k / r["bf16_s"] / 1e9, vs_before=r["before_s"] / t, vs_bf16=r["bf16_s"] / t,
                 vs_scaled_mm=(r["scaled_mm_s"] / t) if r["scaled_mm_s"] else None)
    return {"rows": rows, "chosen": {str(b): c for b, c in chosen.items()}, "scaled_mm_error": SCALED_MM_ERROR[:1]}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def check_section(device: str, smoke: bool) -> dict:
    """On the GPU, compiled: act_quant must equal the reference byte for byte; the GEMMs must equal
    float64 products of the same e4m3 bytes to accumulator precision, at every tile config."""
    from mtp_spec.kernels import triton_fp8 as T

    g = torch.Generator(device=device).manual_seed(0)
    res = {"act_quant": [], "gemm": [], "grouped": []}
    for rows, k, spread in ((1, 7168, 1.0), (64, 7168, 10.0), (4096, 2048, 1e-3), (33, 18432, 100.0)):
        x = torch.randn(rows, k, device=device, generator=g) * spread
        x *= torch.rand(rows, k // 128, 1, device=device, generator=g).repeat_interleave(128, -1).view(rows, k) * 4
        for fmt in (None, "ue8m0"):
            y, s = T.act_quant(x, 128, fmt)
            ry, rs = K.act_quant_ref(x, 128, fmt)
            diff = int((y.view(torch.uint8) != ry.view(torch.uint8)).sum())
            res["act_quant"].append({"shape": [rows, k], "fmt": fmt, "bytes_differ": diff,
                                     "scales_equal": bool(torch.equal(s, rs))})
    for n, k in ((576, 7168), (7168, 2048), (24576, 1536)):
        wq, ws = K.weight_quant_ref(torch.randn(n, k, device=device, generator=g) * 0.02)
        wd = K.weight_dequant_ref(wq, ws).double()
        for m in (1, 5, 16, 64, 200, 1024):
            xq, xs = K.act_quant_ref(torch.randn(m, k, device=device, generator=g))
            ref = (xq.double().view(m, -1, 128) * xs.double()[..., None]).view(m, k) @ wd.T
            for cfg in {T.config_for_m(m), *CANDIDATES.get(m, [])[:4]}:
                out = T.fp8_gemm(xq, xs, wq, ws, config=cfg)
                res["gemm"].append({"M": m, "N": n, "K": k, "config": str(cfg), "rel_err": _rel(out, ref),
                                    "finite": bool(torch.isfinite(out).all())})
    e, n, k = 16, 512, 1024
    w = torch.randn(e, n, k, device=device, generator=g) * 0.02
    qs = [K.weight_quant_ref(w[i]) for i in range(e)]
    wq, ws = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    for counts in ([0] * 15 + [40], [3, 0, 5, 1] * 4, [1] * 16, [0] * 16):
        er = torch.cat([torch.full((c,), i, device=device) for i, c in enumerate(counts)]) if sum(counts) else \
            torch.empty(0, dtype=torch.long, device=device)
        t = len(er)
        xq, xs = K.act_quant_ref(torch.randn(max(t, 1), k, device=device, generator=g))
        xq, xs = xq[:t].contiguous(), xs[:t].contiguous()
        out = T.grouped_fp8_gemm(xq, xs, wq, ws, er)
        if t:
            ref = torch.stack([(xq[i].double().view(-1, 128) * xs[i].double()[:, None]).view(k)
                               @ K.weight_dequant_ref(wq[er[i]], ws[er[i]]).double().T for i in range(t)])
            err = _rel(out, ref)
        else:
            err = 0.0 if out.shape == (0, n) else float("nan")
        res["grouped"].append({"counts": counts, "rel_err": err})
    worst_aq = max(r["bytes_differ"] for r in res["act_quant"])
    worst = max(r["rel_err"] for r in res["gemm"])
    print(f"check: act_quant bytes differing (worst case) {worst_aq}, scales equal "
          f"{all(r['scales_equal'] for r in res['act_quant'])}; GEMM rel err vs float64 worst {worst:.2e}; "
          f"grouped worst {max(r['rel_err'] for r in res['grouped']):.2e}", flush=True)
    return res


def diag_section(device: str, smoke: bool) -> list[dict]:
    """Where large-M time goes: the shipped config with and without the per-block scale promotion
    (without it the numbers are wrong: timing only), against _scaled_mm blockwise and BF16."""
    from mtp_spec.kernels import triton_fp8 as T

    rows = []
    for name in (("kv_a",) if smoke else ("o", "dense_gate_up", "expert_down")):
        n, k = SHAPES[name] if not smoke else (576, 256)
        m = 64 if smoke else 4096
        wq, ws = K.weight_quant_ref(torch.randn(n, k, device=device) * 0.02)
        xq, xs = K.act_quant(torch.randn(m, k, device=device))
        wb = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        xb = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        cfg = T.config_for_m(m, n, k)
        t = {"promoted": bench(lambda: T.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16), device),
             "no_scales": bench(lambda: T.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, _promote=False), device),
             "bf16": bench(lambda: xb @ wb.t(), device)}
        xsp = col_major(xs)
        if device == "cuda" and scaled_mm_blockwise(xq, xsp, wq, ws) is not None:
            t["scaled_mm"] = bench(lambda: scaled_mm_blockwise(xq, xsp, wq, ws), device)
        row = {"shape": name, "M": m, "N": n, "K": k, "config": str(cfg),
               **{f"{key}_tflops": 2 * m * n * k / v / 1e12 for key, v in t.items()}}
        rows.append(row)
        print(f"diag {name} M={m} {cfg}: " + ", ".join(f"{key} {2 * m * n * k / v / 1e12:.0f} TFLOPS"
                                                     for key, v in t.items()), flush=True)
    return rows


def moe_row(device: str, tokens: int, e: int = 256, top: int = 8, dim: int = 7168, inter: int = 2048) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.stack([torch.randperm(e, generator=g, device=device)[:top] for _ in range(tokens)])
    qs = [K.weight_quant_ref(torch.randn(inter, dim, device=device, generator=g) * 0.02) for _ in range(e)]
    w, s = torch.stack([q for q, _ in qs]), torch.stack([x for _, x in qs])
    del qs
    x = torch.randn(tokens, dim, device=device)
    xq, xs = K.act_quant(x)
    rows = torch.arange(tokens, device=device).repeat_interleave(top)
    a, a_s = xq.view(torch.uint8)[rows].view(torch.float8_e4m3fn), xs[rows].contiguous()
    t_grouped = bench(lambda: K.grouped_fp8_gemm(a, a_s, w, s, idx.flatten()), device, reps=20,
                      graph=device == "cuda")  # routing is sorted on the device: capturable
    wb = w.float().to(torch.bfloat16) if device == "cuda" else w.float()
    xb = x.to(wb.dtype)

    def loop():
        for ex in idx.flatten().unique().tolist():
            sel = (idx == ex).any(-1)
            xb[sel] @ wb[ex].t()

    t_loop = bench(loop, device, reps=5)
    touched = len(idx.flatten().unique())
    return {"tokens": tokens, "experts": e, "top_k": top, "experts_touched": touched, "grouped_fp8_s": t_grouped,
            "bf16_loop_s": t_loop, "speedup": t_loop / t_grouped,
            "grouped_weight_gbs": touched * inter * dim / t_grouped / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench_kernels.json")
    ap.add_argument("--sections", default="check,gemm,diag,moe")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter): plumbing")
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU (or --smoke)")
    shapes = {"kv_a": (576, 256), "expert_down": (256, 384)} if a.smoke else SHAPES
    ms = [1, 17] if a.smoke else MS
    from mtp_spec.kernels import triton_fp8 as T

    res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda,
           "sms": T.sm_count(torch.empty(1, device=device).device), "backend": K.backend(torch.empty(1, device=device))}
    print(f"device {res['device']}, torch {res['torch']}, triton {res['triton']}, CUDA {res['cuda']}, "
          f"{res['sms']} SMs, backend {res['backend']}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = a.sections.split(",")
    tokens = [4] if a.smoke else [1, 32, 128]
    todo = {"check": lambda: check_section(device, a.smoke),
            "gemm": lambda: gemm_section(device, shapes, ms, a.smoke),
            "diag": lambda: diag_section(device, a.smoke),
            "moe": lambda: [moe_row(device, t, *((8, 2, 256, 128) if a.smoke else ())) for t in tokens]}
    for name, fn in todo.items():
        if name not in sections or (a.smoke and name == "check"):
            continue
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception as e:  # keep the other sections' numbers; the error is reported
            import traceback

            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        res[f"{name}_wall_s"] = time.time() - t0
        out.write_text(json.dumps(res, indent=2))
        if name == "gemm" and "rows" in res[name]:
            print_gemm(res["gemm"])
        if name == "moe" and isinstance(res[name], list):
            for r in res["moe"]:
                print(f"MoE layer, {r['tokens']} tokens ({r['experts_touched']} experts): grouped FP8 "
                      f"{r['grouped_fp8_s'] * 1e3:.3f} ms ({r['grouped_weight_gbs']:.0f} GB/s of expert weights) "
                      f"vs BF16 loop {r['bf16_loop_s'] * 1e3:.3f} ms ({r['speedup']:.2f}x)")


def print_gemm(g: dict) -> None:
    print("chosen per M bucket: " + ", ".join(f"<={b}: {c}" for b, c in g["chosen"].items()))
    if g["scaled_mm_error"]:
        print(f"_scaled_mm blockwise unavailable: {g['scaled_mm_error'][0]}")
    print(f"{'shape':15} {'M':>5} {'TFLOPS':>7} {'GB/s':>6} {'before':>6} {'bf16':>6} {'vs bef':>6} {'vs bf16':>7} "
          f"{'vs smm':>6}")
    for r in g["rows"]:
        sm = f"{r['vs_scaled_mm']:.2f}" if r["vs_scaled_mm"] else "n/a"
        print(f"{r['shape']:15} {r['M']:5d} {r['tflops']:7.1f} {r['weight_gbs']:6.0f} {r['before_weight_gbs']:6.0f} "
              f"{r['bf16_weight_gbs']:6.0f} {r['vs_before']:6.2f} {r['vs_bf16']:7.2f} {sm:>6}")


if __name__ == "__main__":
    main()
