"""Two GPU diagnostics for one decode step of a random 16B-shaped FP8 model (no files):

1. invariance: forward hooks record every module's output at the first new position for a one-token
   step and for a three-token verify over the same cache; the modules whose outputs first differ,
   in execution order, say which op is not batch-invariant.
2. profile: torch.profiler over eager decode steps at batch 1: kernels per step and the top ops by
   GPU and by CPU time (where an eager step's time goes).

    python experiments/gpu_probe.py [--out results/gpu_probe.txt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mtp_spec.config import ModelArgs
from mtp_spec.random_model import random_model


@torch.no_grad()
def first_differences(model, ctx: int, s: int, top: int = 12) -> list[str]:
    dev = next(model.parameters()).device
    cache = model.new_cache(1, ctx + 16)
    toks = torch.randint(10, model.args.vocab_size, (1, ctx + s), device=dev)
    model(toks[:, :ctx], cache=cache)
    cache.lengths[:] = ctx
    records: dict[str, list] = {"one": [], "many": []}
    mode = ["one"]

    def hook(name):
        def f(mod, inp, out):
            o = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
            if torch.is_tensor(o) and o.dim() >= 2:  # (1, s, ...) or, flattened, (s, ...): position 0
                first = o[:, :1] if o.dim() >= 3 else o[:1]
                records[mode[0]].append((name, first.float().clone()))
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not n.startswith("mtp")]
    model(toks[:, ctx:ctx + 1], cache=cache, step=True)
    mode[0] = "many"
    model(toks[:, ctx:ctx + s], cache=cache, step=True)
    for h in hs:
        h.remove()
    out = []
    for (n1, a), (n2, b) in zip(records["one"], records["many"]):
        if n1 != n2:
            out.append(f"call order differs at {n1} vs {n2}")
            break
        if a.shape != b.shape:
            continue
        d = float((a - b).abs().max())
        if d > 0:
            out.append(f"{n1}: max |diff| {d:.3e} (scale {float(a.abs().max()):.3e})")
            if len(out) >= top:
                break
    return out or ["no module output differs"]


@torch.no_grad()
def profile(model, ctx: int, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    dev = next(model.parameters()).device
    cache = model.new_cache(1, ctx + 16)
    toks = torch.randint(10, model.args.vocab_size, (1, ctx + 1), device=dev)
    model(toks[:, :ctx], cache=cache)
    cache.lengths[:] = ctx
    t = toks[:, ctx:]
    for _ in range(2):
        model(t, cache=cache, step=True)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            model(t, cache=cache, step=True)
        torch.cuda.synchronize()
    ev = p.key_averages()
    kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    gpu_us = sum(e.self_device_time_total for e in ev) / steps
    head = f"{kernels / steps:.0f} GPU kernels per step, {gpu_us / 1e3:.2f} ms of GPU time per step\n"
    return (head + ev.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=50)
            + "\n" + ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="deepseek-v2-lite-16b")
    ap.add_argument("--out", default="results/gpu_probe.txt")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--batches", default="1", help="also the step-vs-verify argmax agreement at these batch sizes")
    a = ap.parse_args()
    args = ModelArgs.from_name(a.preset).with_(n_mtp_layers=1, fp8=True)
    model = random_model(args, "cuda", fp8=True, max_len=256, mtp=False)
    text = []
    from bench_gpu_decode import invariance

    for b in [int(x) for x in a.batches.split(",")]:
        trials = max(1, 16 // b)  # at least 16 contexts in all
        runs = []
        for i in range(trials):
            torch.manual_seed(i)
            runs.append(invariance(model, torch.device("cuda"), b, 128, [1, 2, 3, 4]))
        agg = {s: {key: sum(r[s][key] for r in runs) / trials for key in ("argmax_equal", "bitwise_equal_rows")}
               for s in runs[0]}
        text.append(f"== batch {b}, {trials * b} contexts, step vs s-token verify: {agg}")
    for s in (2, 3, 5):
        text.append(f"== step vs {s}-token verify, first differing module outputs (position 0):")
        text += first_differences(model, 128, s)
    if not a.no_profile:
        text.append("== eager decode step, batch 1:")
        text.append(profile(model, 128))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
