"""Decode on a GPU at realistic sizes, with random weights built on the device (no files).

1. `decode`: vanilla greedy tokens/s of a model with the 16B preset's shapes plus one MTP layer, at
   several batch sizes, FP8 (Triton kernels) vs dequantised BF16; each step's time against the bytes
   it must read (weights touched + KV cache) as a fraction of the measured copy bandwidth.
2. `spec`: the cost side of speculation. Random weights make real acceptance meaningless, so each
   row accepts its first n drafts with n drawn for a fixed per-position rate (an engine whose
   acceptance is forced; the forwards, cache moves and read-backs are speculation's own), for
   k = 1..4: measured speedup over vanilla, against verify(k+1)/step and MTP-step/step costs timed
   directly, eager and captured in CUDA graphs. Also: how often a verify's argmax at a position equals
   a single step's (batch invariance in bf16: what greedy losslessness rests on).
3. `layers`: one decode step of a DeepSeek-V3-shaped MoE layer (MLA + 256 experts, top-8) and of the
   real-shaped MTP module (eh_proj + layer + norm + 129,280-token head), FP8, at batch 1 and 32.

Eager PyTorch (the reference path): the times include launch overhead and the MoE router's host sync.

    python experiments/bench_gpu_decode.py [--sections decode,spec,layers] [--out results/gpu_decode.json]
    python experiments/bench_gpu_decode.py --smoke   # tiny shapes on the CPU: plumbing only
"""

# ruff: noqa: B023  (the timed closures run inside the loop iteration that builds them)
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from mtp_spec.config import ModelArgs
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import OracleProposer
from mtp_spec.decoding.verify import Accepted
from mtp_spec.model.attention import make_step
from mtp_spec.random_model import random_model


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, reps: int = 10) -> float:
    """Median seconds of fn() after one warm-up."""
    fn()
    sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def graphed(fn, dev: torch.device):
    """fn captured in a CUDA graph (replay), or None with the reason where capture fails."""
    if dev.type != "cuda":
        return None, "not CUDA"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay, None
    except Exception as e:  # a host sync inside the step, most likely
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


class FixedAcceptance(Engine):
    """Speculation with forced acceptance: each row keeps its first n drafts, n truncated-geometric
    with per-position rate `rate`, whatever the logits say; the bonus token is the target's argmax
    after them. Every forward, cache move and read-back is real speculation's: a cost model only."""

    def __init__(self, model, proposer, rate: float, seed: int = 0):
        super().__init__(model, proposer)
        self.rate, self.rng = rate, random.Random(seed)

    def accept(self, st, drafts, out, run):
        cache = self.last_cache
        before = cache.lengths.clone()
        real = super().accept(st, drafts, out, run)  # the real verification work, then overridden
        b, n = drafts.tokens.shape
        forced = []
        for _ in range(b):
            a = 0
            while a < n and self.rng.random() < self.rate:
                a += 1
            forced.append(a)
        nacc = torch.minimum(torch.tensor(forced, device=st.device), real.drafted)
        token = out.logits.argmax(-1).gather(1, nacc[:, None])[:, 0]
        cache.lengths.copy_(torch.where(st.active_t, before + 1 + nacc, before))
        st.n_acc, st.last = nacc, token
        path = torch.arange(n, device=st.device)[None].expand(b, n)
        return Accepted(nacc, path, token, real.drafted)


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30) if dev.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    return 2 * n / timed(lambda: b.copy_(a), dev, reps=20)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def step_bytes(model, batch: int, ctx: int) -> float:
    """Bytes one decode step must read: every weight outside the routed experts, the experts a batch
    touches (expected distinct experts for uniform top-k routing), the KV cache."""
    args = model.args
    seen, expert, rest = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen or name.startswith("mtp."):
            continue
        seen.add(id(p))
        b = nbytes(p) + sum(nbytes(m.scale) for m in [model.get_submodule(name.rpartition(".")[0])]
                            if getattr(m, "scale", None) is not None)
        if ".experts." in name:
            expert += b
        elif name != "embed.weight":  # one row of it is read
            rest += b
    e, k = args.n_routed_experts, args.n_activated_experts
    touched = e * (1 - (1 - k / e) ** batch) / e if e else 0
    kv = model.new_cache(1, ctx).nbytes()  # attention reads the whole (bucketed) cache under a mask
    return rest + expert * touched + batch * kv


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def generate_time(eng: Engine, ps, new: int, dev) -> tuple[float, list]:
    sync(dev)
    t0 = time.perf_counter()
    res = eng.generate(ps, max_new_tokens=new)
    sync(dev)
    return time.perf_counter() - t0, res


def decode_section(a, dev) -> list[dict]:
    args = ModelArgs.from_name(a.preset).with_(n_mtp_layers=1, fp8=True)
    bw = copy_bandwidth(dev)
    rows = []
    for mode in ("fp8", "bf16"):
        model = random_model(args, dev, fp8=mode == "fp8", dtype=torch.bfloat16 if dev.type == "cuda"
                             else torch.float32, max_len=a.prompt + a.new + 64, mtp=False)
        eng = Engine(model)
        for b in a.batches:
            ps = prompts(b, a.prompt, args.vocab_size, seed=b)
            generate_time(eng, ps, 4, dev)  # warm-up: kernels compiled, caches sized
            t1, _ = generate_time(eng, ps, 1, dev)
            tn, res = generate_time(eng, ps, a.new, dev)
            step = (tn - t1) / (a.new - 1)
            need = step_bytes(model, b, a.prompt + a.new // 2)
            g_step, why = step_in_graph(model, dev, b, a.prompt)
            rows.append({"mode": mode, "batch": b, "tok_s": b / step, "step_ms": step * 1e3,
                         "bytes_gb": need / 1e9, "achieved_gbs": need / step / 1e9, "of_copy_bw": need / step / bw,
                         "graph_step_ms": g_step and g_step * 1e3, "graph_error": why,
                         "graph_of_copy_bw": g_step and need / g_step / bw})
            gtxt = f"graph {g_step * 1e3:6.2f} ms ({need / g_step / bw:.1%})" if g_step else f"graph: {why}"
            print(f"decode {mode:4} b={b:3d}: {b / step:8.1f} tok/s, {step * 1e3:7.2f} ms/step, "
                  f"{need / 1e9:6.2f} GB/step -> {need / step / 1e9:7.1f} GB/s ({need / step / bw:.1%} of copy); "
                  f"{gtxt}", flush=True)
        del model, eng
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r["copy_bw_gbs"] = bw / 1e9
    return rows


@torch.no_grad()
def step_in_graph(model, dev, batch: int, ctx: int) -> tuple[float | None, str | None]:
    """Seconds of one decode step (one token per row over a ctx-long cache) replayed from a CUDA graph."""
    cache = model.new_cache(batch, ctx + 16)
    cache.lengths[:] = ctx
    t = torch.randint(10, model.args.vocab_size, (batch, 1), device=dev)
    run, why = graphed(lambda: model(t, cache=cache, step=True), dev)
    return (timed(run, dev, reps=20), None) if run else (None, why)


@torch.no_grad()
def forward_costs(model, dev, batch: int, ctx: int, sizes: list[int]) -> dict:
    """Seconds of one main forward of s tokens per row over a ctx-long cache, and of one MTP step."""
    cache = model.new_cache(batch, ctx + 16)
    toks = torch.randint(10, model.args.vocab_size, (batch, ctx), device=dev)
    out = model(toks, cache=cache)
    cache.lengths[:] = ctx
    costs, graphs = {}, {}
    for s in sizes:
        t = toks[:, :s].contiguous()
        costs[f"main_{s}"] = timed(lambda: model(t, cache=cache, step=True), dev)
        run, why = graphed(lambda: model(t, cache=cache, step=True), dev)
        graphs[f"main_{s}"] = timed(run, dev, reps=20) if run else why
    mcache = model.mtp.new_cache(batch, ctx + 16)
    model.mtp(toks[:, 1:], out.hidden_states[:, :-1], cache=mcache)
    mcache.lengths[:] = ctx - 1
    h = out.hidden_states[:, -1:].contiguous()
    costs["mtp_1"] = timed(lambda: model.mtp(toks[:, :1], h, cache=mcache, step=True), dev)
    run, why = graphed(lambda: model.mtp(toks[:, :1], h, cache=mcache, step=True), dev)
    graphs["mtp_1"] = timed(run, dev, reps=20) if run else why
    costs["graph"] = graphs
    return costs


@torch.no_grad()
def invariance(model, dev, batch: int, ctx: int, ks: list[int]) -> dict:
    """Argmax agreement between a one-token step and the first position of a (k+1)-token verify,
    over `batch` random contexts; and the largest logit difference relative to the logits' spread."""
    cache = model.new_cache(batch, ctx + 16)
    toks = torch.randint(10, model.args.vocab_size, (batch, ctx + 8), device=dev)
    model(toks[:, :ctx], cache=cache)
    cache.lengths[:] = ctx
    one = model(toks[:, ctx:ctx + 1], cache=cache, step=True).logits[:, 0].float()
    res = {}
    for k in ks:
        many = model(toks[:, ctx:ctx + k + 1], cache=cache, step=True).logits[:, 0].float()
        res[k + 1] = {"argmax_equal": float((one.argmax(-1) == many.argmax(-1)).float().mean()),
                      "bitwise_equal_rows": float((one == many).all(-1).float().mean()),
                      "max_diff_over_std": float((one - many).abs().max() / one.std())}
    print("invariance (step vs verify, position 0): " + ", ".join(
        f"s={s}: argmax {v['argmax_equal']:.0%}, bit-equal rows {v['bitwise_equal_rows']:.0%}, "
        f"max diff {v['max_diff_over_std']:.1e} std" for s, v in res.items()), flush=True)
    return res


def spec_section(a, dev) -> dict:
    args = ModelArgs.from_name(a.preset).with_(n_mtp_layers=1, fp8=True)
    model = random_model(args, dev, fp8=True, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                         max_len=a.prompt + a.new + 64)
    out = {"rate": a.rate, "rows": []}
    costs = forward_costs(model, dev, 1, a.prompt, [1, 2, 3, 4, 5])
    out["costs_s"] = costs
    c1 = costs["main_1"]
    print("forward costs (batch 1): " + ", ".join(f"{k} {v * 1e3:.2f} ms ({v / c1:.2f}x)" for k, v in costs.items()
                                            if k != "graph"),
          flush=True)
    g = costs["graph"]
    if all(isinstance(v, float) for v in g.values()):
        print("  in CUDA graphs: " + ", ".join(f"{k} {v * 1e3:.2f} ms ({v / g['main_1']:.2f}x)" for k, v in g.items()),
              flush=True)
    out["invariance"] = invariance(model, dev, 32, a.prompt, a.ks)
    for b in a.spec_batches:
        ps = prompts(b, a.prompt, args.vocab_size, seed=100 + b)
        van = Engine(model)
        generate_time(van, ps, 4, dev)
        t_van, res = generate_time(van, ps, a.new, dev)
        junk = [p + prompts(1, a.new + 8, args.vocab_size, seed=7)[0] for p in ps]  # drafts' values do not matter
        for k in a.ks:
            eng = FixedAcceptance(model, OracleProposer(junk, k, args.vocab_size), a.rate, seed=k)
            generate_time(eng, ps, 4, dev)
            eng.rng.seed(k)
            t, res_k = generate_time(eng, ps, a.new, dev)
            steps = sum(r.metrics.num_steps for r in res_k) / b
            al = a.new / max(steps, 1)
            cv = costs[f"main_{k + 1}"] / c1
            cm = costs["mtp_1"] / c1
            row = {"batch": b, "k": k, "speedup": t_van / t, "al": al, "verify_cost": cv, "mtp_cost": cm,
                   "predicted_no_draft_cost": al / cv, "predicted_mtp": al / (cv + k * cm)}
            if isinstance(g.get(f"main_{k + 1}"), float) and isinstance(g.get("mtp_1"), float):
                gv, gm = g[f"main_{k + 1}"] / g["main_1"], g["mtp_1"] / g["main_1"]
                row.update(graph_verify_cost=gv, graph_mtp_cost=gm, graph_predicted_mtp=al / (gv + k * gm))
            out["rows"].append(row)
            print(f"spec b={b} k={k}: AL {al:.2f}, measured {t_van / t:.2f}x (no draft cost), "
                  f"AL/verify {al / cv:.2f}x, "
                  f"with k MTP steps AL/(verify+k*mtp) {al / (cv + k * cm):.2f}x"
                  + (f"; in graphs {row['graph_predicted_mtp']:.2f}x" if "graph_predicted_mtp" in row else ""),
                  flush=True)
    return out


@torch.no_grad()
def layers_section(a, dev) -> list[dict]:
    """One V3 MoE layer and the MTP module, real shapes, random FP8 weights."""
    name = "tiny" if a.smoke else "deepseek-v3-671b"
    args = ModelArgs.from_name(name).with_(n_layers=1, n_dense_layers=0, n_mtp_layers=1)
    ctx = 1024 if not a.smoke else 32
    model = random_model(args, dev, fp8=True, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                         max_len=ctx + 64)
    layer = model.layers[0]
    rows = []
    for b in (1, 32):
        cache = model.new_cache(b, ctx + 16)
        cache.lengths[:] = ctx
        tok = torch.randint(10, args.vocab_size, (b, 1), device=dev)
        dt = next(p for p in model.norm.parameters()).dtype
        x = torch.randn(b, 1, args.dim, device=dev, dtype=torch.float32 if dev.type == "cpu" else dt)
        step = make_step(tok, None, cache, rotary=model.rotary)
        t_layer = timed(lambda: layer(x, step, cache.layer(0)), dev)
        t_head = timed(lambda: model.head(model.norm(x)), dev)
        mcache = model.mtp.new_cache(b, ctx + 16)
        mcache.lengths[:] = ctx
        t_mtp = timed(lambda: model.mtp(tok, x, cache=mcache, step=True), dev)
        row = {"batch": b, "ctx": ctx, "main_layer_ms": t_layer * 1e3, "head_ms": t_head * 1e3,
               "mtp_module_ms": t_mtp * 1e3, "mtp_over_layer": t_mtp / t_layer}
        g_layer, why = graphed(lambda: layer(x, step, cache.layer(0)), dev)
        g_mtp, why2 = graphed(lambda: model.mtp(tok, x, cache=mcache, step=True), dev)
        if g_layer and g_mtp:
            gl, gm = timed(g_layer, dev, reps=20), timed(g_mtp, dev, reps=20)
            row.update(graph_layer_ms=gl * 1e3, graph_mtp_ms=gm * 1e3, graph_mtp_over_layer=gm / gl)
        else:
            row["graph_error"] = why or why2
        rows.append(row)
        gtxt = (f"; in graphs {row['graph_layer_ms']:.3f} / {row['graph_mtp_ms']:.3f} ms = "
                f"{row['graph_mtp_over_layer']:.2f}" if "graph_layer_ms" in row else f"; graph: {row['graph_error']}")
        print(f"V3 shapes b={b}: MoE layer {t_layer * 1e3:.2f} ms, norm+head {t_head * 1e3:.2f} ms, MTP module "
              f"{t_mtp * 1e3:.2f} ms = {t_mtp / t_layer:.2f} main layers{gtxt}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="decode,spec,layers")
    ap.add_argument("--preset", default="deepseek-v2-lite-16b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--spec-batches", default="1")
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--rate", type=float, default=0.8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default="results/gpu_decode.json")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: plumbing only")
    a = ap.parse_args()
    a.batches = [int(x) for x in a.batches.split(",")]
    a.spec_batches = [int(x) for x in a.spec_batches.split(",")]
    a.ks = [int(x) for x in a.ks.split(",")]
    if a.smoke:
        a.preset, a.prompt, a.new, dev = "tiny", 16, 8, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu_decode needs a CUDA GPU (or --smoke)")
        dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "preset": a.preset, "prompt": a.prompt, "new": a.new}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for sec, fn in (("decode", decode_section), ("spec", spec_section), ("layers", layers_section)):
        if sec in a.sections.split(","):
            t0 = time.time()
            try:
                res[sec] = fn(a, dev)
            except Exception as e:  # keep the other sections' numbers; the error is reported
                import traceback

                traceback.print_exc()
                res[sec] = {"error": f"{type(e).__name__}: {e}"}
            res[f"{sec}_wall_s"] = time.time() - t0
            out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
