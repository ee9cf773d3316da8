"""The parallel code path at world size 1 against the plain single-process path (issue 13, item 7).

One model, one process, a process group of one (NCCL on CUDA, gloo on the CPU). "single" is the code
path of a plain `mtp-spec` process and of `torchrun --nproc-per-node 1` (at world size 1 the parallel
layers have the plain shapes and skip their collectives). "collectives" forces every all-reduce and
all-gather of the parallel layers to run anyway: the launch cost that world sizes > 1 pay per step
on top of the transfers. The two are timed alternately, in rotating order, on the same prompts;
their outputs must be identical.

    python experiments/bench_parallel.py --device cuda                   # V3 shapes, 4 layers + MTP, FP8
    python experiments/bench_parallel.py --device cuda --compile         # steps compiled
    python experiments/bench_parallel.py --device cpu --preset tiny      # plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

import mtp_spec.parallel as parallel
from mtp_spec.config import ModelArgs
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.strategies import make_proposer
from mtp_spec.random_model import random_model


def model_args(preset: str, layers: int) -> ModelArgs:
    args = ModelArgs.from_name(preset)
    if layers:  # V3's shapes with fewer layers: dense layers first, then MoE, as in the real model
        args = args.with_(n_layers=layers, n_dense_layers=min(args.n_dense_layers, layers - 1))
    return args


def tokens_per_s(engine: Engine, prompts: list[list[int]], new: int, dev: torch.device) -> tuple[float, list]:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = engine.generate(prompts, max_new_tokens=new)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0), [r.token_ids for r in res]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="deepseek-v3-671b")
    ap.add_argument("--layers", type=int, default=4, help="main layers (0: the preset's own count)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--strategies", default="vanilla,mtp:1,mtp:3")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="steps through torch.compile (the functional collectives traced); MODE default, or "
                         "reduce-overhead for CUDA graphs (on an H200, torch 2.11, they crash the MTP steps)")
    ap.add_argument("--modes", default="single,collectives")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    args = model_args(a.preset, a.layers)
    t0 = time.perf_counter()
    model = random_model(args, dev, seed=0, fp8=True, max_len=512)
    if a.compile:
        model.compile_steps(blocks=True, mode=a.compile if dev.type == "cuda" and a.compile != "default" else None)
    print(f"model: {a.preset} with {args.n_layers} layers + {args.n_mtp_layers} MTP, built in "
          f"{time.perf_counter() - t0:.1f} s on {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""), flush=True)
    g = torch.Generator().manual_seed(0)
    batches = [int(x) for x in a.batches.split(",")]
    prompts = [torch.randint(0, args.vocab_size, (32,), generator=g).tolist() for _ in range(max(batches))]
    worlds = {m: w for m, w in (("single", parallel.World()), ("collectives", parallel.World(0, 1, grouped=True)))
              if m in a.modes.split(",")}
    rows = []
    for b in batches:
        for spec in a.strategies.split(","):
            name, _, k = spec.partition(":")
            times: dict[str, list[float]] = {m: [] for m in worlds}
            outs: dict[str, list] = {}
            for rep in range(a.repeats + 1):  # the first round warms up (Triton compiles, caches)
                order = list(worlds) if rep % 2 == 0 else list(reversed(worlds))
                for mode in order:
                    parallel.set_world(worlds[mode])
                    eng = Engine(model, make_proposer(name, model, int(k or 1)))
                    tps, out = tokens_per_s(eng, prompts[:b], a.new, dev)
                    if rep:
                        times[mode].append(tps)
                    outs.setdefault(mode, out)
            parallel.set_world(worlds["single"])
            s, gr = (statistics.median(times[m]) if m in times else math.nan for m in ("single", "collectives"))
            same = outs.get("single", outs.get("collectives")) == outs.get("collectives", outs.get("single"))
            rows.append(dict(batch=b, strategy=spec, single_tok_s=s, collectives_tok_s=gr, ratio=gr / s,
                             same_output=same))
            print(f"b={b:<3} {spec:<9} single {s:8.1f} tok/s | collectives {gr:8.1f} tok/s | ratio "
                  f"{gr / s:.3f} | same output {same}", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": str(dev), "preset": a.preset, "compile": a.compile, "layers": args.n_layers,
                       "rows": rows}, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
