"""Where a CPU forward of s tokens spends its time, and the CPU kernels against an earlier build.

1. One forward of s = 1, 2, 4, 8 new tokens after 160 cached ones (batch 1, step path): the whole
   forward, the small-M linear kernel's calls and the attention kernel's calls (timers around them;
   the rest is the other ops and Python).
   Then forwards with parts of the kernels off, taking turns: the row ops of kernels/cpu_rows.py,
   and the AVX-512 BF16 linear against the AVX2 one where the CPU has it.
2. With --base REV: the kernels of kernels/cpu_linear.py at REV (built from that revision's source)
   against today's, in one run: each layer shape at M = 1..8 with bf16 weights cycled through 96 MB
   (every call reads cold weights, as in a forward), and the attention kernel at S = 1..8. Today's
   AVX-512 BF16 kernel, where there is one, in a third column ("equal" compares old and new AVX2).

3. With --ops: torch.profiler's table of the ops of one forward of s = 1 and 4 tokens (self CPU time
   and calls per forward): what "other" is made of.

    python experiments/profile_cpu_step.py [--model smollm2-135m] [--base 3a9985a] [--ops] [--compile auto]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import mtp_spec
import mtp_spec.kernels.cpu_linear as C
import mtp_spec.kernels.cpu_rows as R
from mtp_spec.loader import resolve_model


def forward_breakdown(model, label: str, ctx: int = 160, reps: int = 10) -> None:
    spent: dict = defaultdict(float)
    lin, att = C.linear, C.attention

    def timed(name, fn):
        def run(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            spent[name] += time.perf_counter() - t0
            return out
        return run

    C.linear, C.attention = timed("linear", lin), timed("attention", att)  # step_linear calls C.linear
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, 256)
    print(f"## {label}: one forward after {ctx} cached tokens (median of {reps}; kernels: mean per forward)")
    print(f"{'s':>3} {'forward ms':>11} {'linear ms':>10} {'attention ms':>13} {'other ms':>9} {'x s=1':>6}")
    try:
        with torch.no_grad():
            model(torch.randint(0, model.args.vocab_size, (1, ctx), generator=g), cache=cache)
            cache.lengths += ctx
            first = None
            for s in (1, 2, 4, 8):
                x = torch.randint(0, model.args.vocab_size, (1, s), generator=g)
                for _ in range(3):
                    model(x, cache=cache, step=True)
                spent.clear()
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    model(x, cache=cache, step=True)
                    ts.append(time.perf_counter() - t0)
                f, li, at = statistics.median(ts), spent["linear"] / reps, spent["attention"] / reps
                first = first or f
                print(f"{s:3d} {f * 1e3:11.2f} {li * 1e3:10.2f} {at * 1e3:13.2f} {(f - li - at) * 1e3:9.2f} "
                      f"{f / first:6.2f}")
    finally:
        C.linear, C.attention = lin, att


def op_table(model, ctx: int = 160, reps: int = 10, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, 256)
    with torch.no_grad():
        model(torch.randint(0, model.args.vocab_size, (1, ctx), generator=g), cache=cache)
        cache.lengths += ctx
        for s in (1, 4):
            x = torch.randint(0, model.args.vocab_size, (1, s), generator=g)
            for _ in range(3):
                model(x, cache=cache, step=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    model(x, cache=cache, step=True)
            ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ev) / reps / 1e3
            print(f"\n## ops of one forward of s={s} (torch.profiler, mean of {reps}; {total:.2f} ms of self time"
                  f" in {sum(e.count for e in ev) // reps} ops, profiler overhead included)")
            print(f"{'op':44s} {'calls':>6s} {'self ms':>8s} {'us/call':>8s}")
            for e in ev[:rows]:
                print(f"{e.key[:44]:44s} {e.count // reps:6d} {e.self_cpu_time_total / reps / 1e3:8.3f} "
                      f"{e.self_cpu_time_total / e.count:8.1f}")


def forward_variants(model, ctx: int = 160, reps: int = 15, base=None) -> None:
    """Forwards of s tokens with today's kernels and with parts of them off, taking turns: the
    AVX-512 BF16 linear (where the CPU has it) or the AVX2 one, with or without kernels/cpu_rows,
    and (with --base) the linear and attention kernels of that revision."""
    dot, rows_usable, lib = C.bf16_dot_kernel(), R.usable, C._build()
    variants = {"AVX2 linear, torch row ops": (None, lambda x: False, lib),
                "AVX2 linear, C row ops": (None, rows_usable, lib)}
    if dot is not None:
        variants["BF16-dot linear, C row ops"] = (dot, rows_usable, lib)
    if base is not None:
        variants[f"kernels at {base[0]}, C row ops"] = (None, rows_usable, base[1])
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, 256)
    xs = {s: torch.randint(0, model.args.vocab_size, (1, s), generator=g) for s in (1, 2, 4, 8)}
    ts: dict = {(n, s): [] for n in variants for s in xs}
    with torch.no_grad():
        model(torch.randint(0, model.args.vocab_size, (1, ctx), generator=g), cache=cache)
        cache.lengths += ctx
        try:
            for rep in range(reps + 1):
                for n, (dl, usable, kl) in variants.items():
                    C._dot, R.usable, C._lib = dl, usable, kl
                    for s, x in xs.items():
                        t0 = time.perf_counter()
                        model(x, cache=cache, step=True)
                        if rep:
                            ts[(n, s)].append(time.perf_counter() - t0)
        finally:
            C._dot, R.usable, C._lib = C._build_dot(), rows_usable, lib
    print(f"\n## forwards with parts of the kernels off, taking turns (median of {reps}, ms, x s=1)")
    for n in variants:
        one = statistics.median(ts[(n, 1)])
        print(f"{n:28s} " + "  ".join(f"s={s}: {statistics.median(ts[(n, s)]) * 1e3:6.2f} "
                                      f"(x{statistics.median(ts[(n, s)]) / one:.2f})" for s in xs))


def build_at(rev: str):
    """The kernels' C source at `rev`, compiled into a temporary library."""
    text = subprocess.run(["git", "show", f"{rev}:kernels/cpu_linear.py"], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent).stdout
    pre = re.search(r'PRELUDE = r"""(.*?)"""', text, re.S)  # the shared C helpers, where the revision has them
    m = re.search(r'\n_SOURCE = (PRELUDE \+ )?r"""(.*?)"""', text, re.S)
    src = (pre.group(1) if m.group(1) else "") + m.group(2)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "k.c").write_text(src)
    subprocess.run(["gcc", "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(tmp / "k.c"),
                    "-o", str(tmp / "k.so")], check=True)
    lib = ctypes.CDLL(str(tmp / "k.so"))
    lib.small_m_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 13 + [ctypes.c_float, ctypes.c_int]
    return lib


def compare_kernels(model, rev: str) -> None:
    old, new, dot = build_at(rev), C._build(), C.bf16_dot_kernel()
    nt = torch.get_num_threads()
    fns = {"old": lambda x, w, y, m, n, k: old.small_m_linear(x, w, y, m, n, k, 1, nt),
           "new": lambda x, w, y, m, n, k: new.small_m_linear(x, w, y, m, n, k, 1, nt)}
    if dot is not None:
        fns["dot"] = lambda x, w, y, m, n, k: dot.small_m_linear_bf16_dot(x, w, y, m, n, k, nt)
    a = model.args
    hd = getattr(a, "head_dim", a.dim // a.n_heads)
    shapes = {"qkv": ((a.n_heads + 2 * a.n_kv_heads) * hd, a.dim), "o": (a.dim, a.dim),
              "gate_up": (2 * a.inter_dim, a.dim), "down": (a.dim, a.inter_dim), "head": (a.vocab_size, a.dim)}
    print(f"\n## kernels at {rev} (old) against today's AVX2 (new) and AVX-512 BF16 (dot) kernels, "
          "bf16 weights read cold, median us")
    print(f"{'shape':16s} {'M':>2s} {'old us':>8s} {'new us':>8s} {'dot us':>8s} {'new/old':>7s} {'dot/old':>7s} "
          f"{'dot GB/s':>8s} equal")
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k).to(torch.bfloat16) for _ in range(max(2, (96 << 20) // (n * k * 2)))]
        for m in (1, 2, 3, 4, 5, 6, 8):
            x = torch.randn(m, k)
            ys = {nm: torch.empty(m, n) for nm in fns}
            ts: dict = {nm: [] for nm in fns}
            order = list(fns)
            for rep in range(max(3, 60 // len(ws))):
                for nm in order[rep % len(order):] + order[: rep % len(order)]:  # rotate who goes first
                    for w in ws:  # a whole cycle through 96 MB per kernel: each call reads cold weights
                        t0 = time.perf_counter()
                        fns[nm](x.data_ptr(), w.data_ptr(), ys[nm].data_ptr(), m, n, k)
                        ts[nm].append(time.perf_counter() - t0)
            med = {nm: statistics.median(t) for nm, t in ts.items()}
            o, nw, d = med["old"], med["new"], med.get("dot", float("nan"))
            print(f"{name + f' {n}x{k}':16s} {m:2d} {o * 1e6:8.1f} {nw * 1e6:8.1f} {d * 1e6:8.1f} {nw / o:7.2f} "
                  f"{d / o:7.2f} {n * k * 2 / d / 1e9:8.1f} {torch.equal(ys['old'], ys['new'])}")
    kvh = a.n_kv_heads
    for s in (1, 2, 4, 8):
        q = torch.randn(1, s, a.n_heads, hd)
        kv = torch.randn(1, 256, 2 * kvh, hd)
        k, v = kv[:, :, :kvh], kv[:, :, kvh:]
        mask = torch.zeros(1, s, 256, dtype=torch.bool)
        mask[..., :160] = True
        res = {}
        for nm, lib in (("old", old), ("new", new)):
            C._lib = lib
            for _ in range(5):
                C.attention(q, k, v, mask, 0.125)
            ts = []
            for _ in range(200):
                t0 = time.perf_counter()
                C.attention(q, k, v, mask, 0.125)
                ts.append(time.perf_counter() - t0)
            res[nm] = statistics.median(ts)
        C._lib = new
        print(f"attention S={s} ({a.n_heads} heads, {kvh} KV heads, 160 of 256 slots): "
              f"old {res['old'] * 1e6:.1f} us, new {res['new'] * 1e6:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--base", help="a git revision whose kernels to compare against")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops", action="store_true", help="also torch.profiler's op table (section 3)")
    ap.add_argument("--compile", default="auto", choices=["off", "auto", "on"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not C.available():
        sys.exit("the CPU kernels are not available on this machine (no C compiler or no AVX2)")
    model = mtp_spec.load(resolve_model(a.model), dtype=torch.bfloat16, max_len=1024, compile=a.compile)
    print(f"# {a.model}, bf16 weights, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"compile {a.compile}\n")
    forward_breakdown(model, f"{C.kind()} kernel")
    forward_variants(model, base=(a.base, build_at(a.base)) if a.base else None)
    if a.ops:
        op_table(model)
    if a.base:
        compare_kernels(model, a.base)


if __name__ == "__main__":
    main()
