"""FP8 kernel benchmarks for a GPU (H100/H200): TFLOPS and GB/s on DeepSeek-V3's shapes.

Our Triton block-FP8 GEMM vs torch BF16 matmul (cuBLAS) vs torch._scaled_mm blockwise (where this
torch/CUDA has it), at M in {1, 4, 16, 64, 128, 512, 4096}; one MoE layer (grouped kernel vs a loop
of BF16 experts); one decode step of the real-shaped 671B MTP module with random FP8 weights vs BF16.
Weights rotate through a pool larger than L2; small M is timed inside CUDA graphs.
Writes JSON and prints a table. `--smoke` runs tiny shapes on the CPU to check the plumbing.

    python experiments/kernels/bench_kernels.py [--out results/bench_kernels.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

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


def scaled_mm_blockwise(a_fp8, a_s, w_fp8, w_s):
    """torch._scaled_mm with DeepSeek blockwise scales (1x128 x 128x128); None where unsupported."""
    try:
        return torch._scaled_mm(a_fp8, w_fp8.t(), scale_a=a_s, scale_b=w_s.t(), out_dtype=torch.bfloat16)
    except Exception:
        return None


def _time_m(device: str, fp8: Rotating, bf16: Rotating, m: int, k: int) -> tuple[float, float, float | None]:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    xq, xs = K.act_quant(x.float().contiguous())
    graph = m <= 16 and device == "cuda"

    def ours():
        w, s = fp8.next()
        return K.fp8_gemm(xq, xs, w, s, out_dtype=torch.bfloat16)

    t_ours = bench(ours, device, graph=graph)
    t_bf16 = bench(lambda: x @ bf16.next().t(), device, graph=graph)
    t_sm = None
    if device == "cuda" and scaled_mm_blockwise(xq, xs, *fp8.items[0]) is not None:
        pad = (-m) % 4  # cuBLAS wants M % 4 == 0
        xqp = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
        xsp = torch.nn.functional.pad(xs, (0, 0, 0, pad), value=1.0)
        t_sm = bench(lambda: scaled_mm_blockwise(xqp, xsp, *fp8.next()), device, graph=graph)
    return t_ours, t_bf16, t_sm


def _shape_rows(device: str, name: str, n: int, k: int, ms: list[int]) -> list[dict]:
    wq, ws = K.weight_quant_ref(torch.randn(n, k) * 0.02)
    wq, ws = wq.to(device), ws.to(device)
    fp8 = Rotating(lambda: (wq.clone(), ws.clone()), n * k)
    bf16 = Rotating(lambda: (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16), 2 * n * k)
    rows = []
    for m in ms:
        t_ours, t_bf16, t_sm = _time_m(device, fp8, bf16, m, k)
        rows.append({"shape": name, "M": m, "N": n, "K": k, "ours_s": t_ours, "bf16_s": t_bf16,
                     "scaled_mm_s": t_sm, "ours_tflops": 2 * m * n * k / t_ours / 1e12,
                     "ours_gbps": (n * k + m * k + 2 * m * n) / t_ours / 1e9,
                     "bf16_gbps": (2 * n * k + 2 * m * k + 2 * m * n) / t_bf16 / 1e9,
                     "vs_bf16": t_bf16 / t_ours, "vs_scaled_mm": (t_sm / t_ours) if t_sm else None})
    return rows


def gemm_rows(device: str, shapes: dict, ms: list[int]) -> list[dict]:
    return [r for name, (n, k) in shapes.items() for r in _shape_rows(device, name, n, k, ms)]


def moe_row(device: str, tokens: int, e: int = 256, top: int = 8, dim: int = 7168, inter: int = 2048) -> dict:
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(e, generator=g)[:top] for _ in range(tokens)]).to(device)
    w13 = [K.weight_quant_ref(torch.randn(inter, dim, generator=g) * 0.02) for _ in range(e)]
    w, s = torch.stack([q for q, _ in w13]).to(device), torch.stack([x for _, x in w13]).to(device)
    x = torch.randn(tokens, dim, device=device)
    xq, xs = K.act_quant(x)
    rows = torch.arange(tokens, device=device).repeat_interleave(top)
    a, a_s = xq.view(torch.uint8)[rows].view(torch.float8_e4m3fn), xs[rows].contiguous()
    t_grouped = bench(lambda: K.grouped_fp8_gemm(a, a_s, w, s, idx.flatten()), device, reps=20)
    wb = w.float().to(torch.bfloat16) if device == "cuda" else w.float()
    xb = x.to(wb.dtype)

    def loop():
        for ex in idx.flatten().unique().tolist():
            sel = (idx == ex).any(-1)
            xb[sel] @ wb[ex].t()

    t_loop = bench(loop, device, reps=5)
    return {"tokens": tokens, "experts": e, "top_k": top, "grouped_fp8_s": t_grouped, "bf16_loop_s": t_loop,
            "speedup": t_loop / t_grouped}


def _mtp_module(args, device: str, mode: str):
    from mtp_spec.model import Transformer
    from mtp_spec.model.layers import Linear, Rotary
    from mtp_spec.model.moe import MoE

    with torch.device("meta"):
        model = Transformer(args, max_len=256, main=False, mtp=True)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    layer = model.mtp.layers[0]
    keep_bf16 = {id(layer.head), id(layer.eh_proj)}  # as in the checkpoint
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            t = torch.randn(p.shape, device=device, generator=g, dtype=torch.float32) * 0.02
            if mode == "fp8" and isinstance(mod, Linear) and pname == "weight" and id(mod) not in keep_bf16:
                q, s = K.weight_quant_ref(t)
                mod.weight, mod.scale = torch.nn.Parameter(q, requires_grad=False), s
            else:
                setattr(mod, pname, torch.nn.Parameter(t.to(dt), requires_grad=False))
            del t
    real = Rotary(args, 256).to(device)
    model.rotary.cos, model.rotary.sin = real.cos, real.sin
    if mode == "fp8":
        for mod in model.modules():
            if isinstance(mod, MoE):
                mod.pack_fp8()
    return model, dt


@torch.no_grad()
def _mtp_step_time(args, device: str, mode: str) -> dict:
    model, dt = _mtp_module(args, device, mode)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = model.mtp.new_cache(1, 256, dtype=dt)
    tok = torch.tensor([[5]], device=device)
    h = torch.randn(1, 1, args.dim, device=device, dtype=dt)
    ctx = torch.randint(0, 100, (1, 128), device=device)
    model.mtp(ctx, torch.randn(1, 128, args.dim, device=device, dtype=dt), cache=cache)
    cache.lengths[:] = 128
    t = bench(lambda: model.mtp(tok, h, cache=cache), device, reps=20)
    return {"step_s": t, "weight_gb": weight_bytes / 1e9}


def mtp_step(device: str, smoke: bool) -> dict:
    """One decode step of the real-shaped 671B MTP module (random FP8 weights) vs the same in BF16."""
    from mtp_spec.config import ModelArgs

    args = ModelArgs.from_name("tiny" if smoke else "deepseek-v3-671b")
    out = {}
    for mode in ("fp8", "bf16"):
        out[mode] = _mtp_step_time(args, device, mode)
        if device == "cuda":
            torch.cuda.empty_cache()
    out["fp8_speedup"] = out["bf16"]["step_s"] / out["fp8"]["step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench_kernels.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (torch backend): plumbing only")
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU (or --smoke)")
    shapes = {"kv_a": (576, 256), "expert_down": (256, 384)} if a.smoke else SHAPES
    ms = [1, 17] if a.smoke else MS
    res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
           "backend": K.backend(torch.empty(1, device=device)), "gemm": gemm_rows(device, shapes, ms),
           "moe": [moe_row(device, t, *((8, 2, 256, 128) if a.smoke else ()))
                   for t in ([4] if a.smoke else [1, 16, 128])],
           "mtp_step": mtp_step(device, a.smoke)}
    print(f"device {res['device']}, torch {res['torch']}, backend {res['backend']}")
    print(f"{'shape':15} {'M':>5} {'ours TFLOPS':>11} {'ours GB/s':>9} {'bf16 GB/s':>9} {'vs bf16':>8} "
          f"{'vs _scaled_mm':>13}")
    for r in res["gemm"]:
        sm = f"{r['vs_scaled_mm']:.2f}" if r["vs_scaled_mm"] else "n/a"
        print(f"{r['shape']:15} {r['M']:5d} {r['ours_tflops']:11.2f} {r['ours_gbps']:9.0f} {r['bf16_gbps']:9.0f} "
              f"{r['vs_bf16']:8.2f} {sm:>13}")
    for r in res["moe"]:
        print(f"MoE layer, {r['tokens']} tokens: grouped FP8 {r['grouped_fp8_s'] * 1e3:.3f} ms vs BF16 loop "
              f"{r['bf16_loop_s'] * 1e3:.3f} ms ({r['speedup']:.2f}x)")
    m = res["mtp_step"]
    print(f"MTP module decode step: FP8 {m['fp8']['step_s'] * 1e3:.3f} ms ({m['fp8']['weight_gb']:.1f} GB) vs BF16 "
          f"{m['bf16']['step_s'] * 1e3:.3f} ms ({m['bf16']['weight_gb']:.1f} GB): {m['fp8_speedup']:.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
