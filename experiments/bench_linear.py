"""The CPU small-M linear (kernels/cpu_linear.py) against torch's F.linear (MKL / oneDNN), per layer shape
of the shipped model and of SmolLM2-135M, at M = 1..8 rows: microseconds and effective weight GB/s,
beside this machine's memory bandwidth measured in the same run (a streaming sum of 256 MB).

Weights larger than the last-level cache are read from memory every call; small ones stay cached,
which is why their GB/s can exceed the bandwidth line.

    python experiments/bench_linear.py [--threads 2] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtp_spec.kernels import cpu_linear

SHAPES = {  # (out, in) of every distinct linear, fused where the model fuses them
    "shipped": [("wq_a|wkv_a", 128 + 80, 256), ("wq_b", 4 * 48, 128), ("wo", 256, 128), ("dense w1|w3", 1536, 256),
                ("dense w2", 256, 768), ("experts w1|w3 x8", 8 * 384, 256), ("experts w2 x8", 256, 8 * 192),
                ("head", 8192, 256)],
    "smollm2": [("wq|wk|wv", 960, 576), ("wo", 576, 576), ("w1|w3", 3072, 576), ("w2", 576, 1536),
                ("head (tied)", 49152, 576), ("draft head 8192", 8192, 576)],
}


def bench(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not cpu_linear.available():
        raise SystemExit("the kernel is unavailable here (no C compiler or no AVX2)")
    big = torch.randn(64 * 2**20)
    bw = big.numel() * 4 / bench(lambda: big.sum(), 10) / 1e9
    print(f"# {a.threads} threads, torch {torch.__version__}, "
          f"memory bandwidth (streaming sum of 256 MB): {bw:.1f} GB/s")
    print(f"{'model':8s} {'layer':16s} {'dtype':8s} {'MB':>6s} {'M':>3s} {'F.linear us':>12s} {'GB/s':>6s} "
          f"{'kernel us':>10s} {'GB/s':>6s} {'speedup':>8s}")
    for model, shapes in SHAPES.items():
        for name, n, k in shapes:
            for dt in (torch.float32, torch.bfloat16):
                w = torch.randn(n, k).to(dt)
                mb = w.numel() * w.element_size() / 1e6
                for m in (1, 2, 4, 8):
                    x = torch.randn(m, k)
                    xt = x.to(dt)  # torch's own path for these weights: F.linear in their dtype
                    ref = bench(lambda xt=xt, w=w: torch.nn.functional.linear(xt, w), a.reps)
                    ker = bench(lambda x=x, w=w: cpu_linear.linear(x, w), a.reps)
                    print(f"{model:8s} {name:16s} {str(dt)[6:]:8s} {mb:6.2f} {m:3d} {ref * 1e6:12.0f} "
                          f"{mb / 1e3 / ref:6.1f} {ker * 1e6:10.0f} {mb / 1e3 / ker:6.1f} {ref / ker:7.2f}x")


if __name__ == "__main__":
    main()
