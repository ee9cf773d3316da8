"""Does `mtp-spec project` predict this CPU's MTP speedup? One run, three measurements:

1. a cost table for the shipped model on this CPU (the format `project --costs` reads): a main forward
   of n = 1..5 new tokens at batch b over a KV cache the size the engine allocates, and one MTP draft
   step at batch b; the median of repeats spread between the decode runs (same machine load);
2. fixed-k MTP decoding (k = 1..4) and plain decoding through the Engine on held-out code prompts,
   interleaved per prompt; the measured speedup is decode tokens/s (prefill excluded) over plain's;
3. the per-position acceptance of those runs, pooled over k (`plan.acceptance_from_counts`).

It prints, per k, the speedup `plan.project` predicts from (1) and (3) beside the measured one and
their ratio, twice: A from the forwards alone, B adding the host work per step (sampling, read-back,
the loop) that plain decoding shows beyond its forward (`project --overhead-us`). The check "within
10% for every k" reads the ratio columns. Timings on a shared machine drift: everything is
interleaved so drift lands on every k alike. Default runtime: about 2.5 minutes on 2 busy cores.

    python experiments/validate_projection.py [--n-prompts 6] [--max-new 200] [--batch 1] [--reps 40] \
        [--costs-out costs.json] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mtp_spec
from mtp_spec import plan
from mtp_spec.decoding.engine import CACHE_STEP, Engine
from mtp_spec.decoding.strategies import make_proposer
from mtp_spec.experiment.schema import load_prompts, resolve_suite
from mtp_spec.loader import resolve_model
from mtp_spec.tokenizer import load_tokenizer

KS = (1, 2, 3, 4)


class CostProbe:
    """Seconds of a main forward of n tokens per row and of one MTP draft step, at `batch` rows whose
    caches hold `context` tokens in a `cache_len` allocation (attention reads the whole of it).
    `sample` is called between decode runs, so the table sees the same machine load as they do."""

    def __init__(self, model, batch: int, cache_len: int, context: int, sizes=(1, 2, 3, 4, 5)):
        g = torch.Generator().manual_seed(0)
        self.model, self.batch, self.cache_len = model, batch, cache_len
        self.cache = model.new_cache(batch, cache_len)
        self.cache.lengths.fill_(context)
        self.mcache = model.mtp.new_cache(batch, cache_len + max(sizes) + 1)
        self.mcache.lengths.fill_(context)
        self.toks = {n: torch.randint(0, model.args.vocab_size, (batch, n), generator=g) for n in sizes}
        self.hidden = torch.randn(batch, 1, model.args.dim, generator=g)
        self.times: dict = {("verify", n): [] for n in sizes} | {("draft", 1): []}
        self.sample(1, keep=False)  # warm-up

    @torch.no_grad()
    def sample(self, reps: int, keep: bool = True) -> None:
        for _ in range(reps):
            for key in self.times:
                t0 = time.perf_counter()
                if key[0] == "verify":
                    self.model(self.toks[key[1]], cache=self.cache, step=True)
                else:
                    self.model.mtp(self.toks[1], self.hidden, depth=1, cache=self.mcache,
                                   start=self.mcache.lengths, step=True)
                if keep:
                    self.times[key].append(time.perf_counter() - t0)

    def table(self) -> dict:
        """The medians, in the cost-table format `mtp-spec project --costs` reads."""
        med = {k: statistics.median(v) for k, v in self.times.items()}
        b = self.batch
        return {"device": f"cpu ({torch.get_num_threads()} threads), shipped model, batch {b}, cache {self.cache_len}",
                "verify": [[n, b, s] for (kind, n), s in med.items() if kind == "verify"],
                "draft": [[b, med[("draft", 1)]]]}


def decode_runs(model, prompts: list[list[int]], batch: int, max_new: int, probe: CostProbe,
                reps: int) -> dict[int, list]:
    """Per k (0 = plain decoding): the Results of every batch of prompts, interleaved per batch in
    rotating order after one warm-up each; `reps` cost samples spread between the batches."""
    engines = {0: Engine(model)} | {k: Engine(model, make_proposer("mtp", model, k)) for k in KS}
    groups = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    for eng in engines.values():
        eng.generate(groups[0], 8)
    out: dict[int, list] = {k: [] for k in engines}
    order = list(engines)
    for i, grp in enumerate(groups):
        for k in order[i % len(order):] + order[: i % len(order)]:
            out[k] += engines[k].generate(grp, max_new)  # no eos: every request runs max_new tokens
            probe.sample(-(-reps // (len(groups) * len(order))))
    return out


def decode_rate(results) -> float:
    """Tokens per second after the first token (the decode phase: prefill excluded)."""
    tokens = sum(r.metrics.num_generated - 1 for r in results)
    return tokens / sum(r.metrics.total_s - r.metrics.ttft_s for r in results)


def step_seconds(results) -> float:
    """Seconds per verify step in the decode phase."""
    return sum(r.metrics.total_s - r.metrics.ttft_s for r in results) / sum(r.metrics.num_steps for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=6)
    ap.add_argument("--max-new", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=40, help="cost samples in all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    ap.add_argument("--costs-out", help="write the measured cost table here")
    ap.add_argument("--json", help="write predicted vs measured here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve_model(None)
    model = mtp_spec.load(path, compile="auto")
    tok = load_tokenizer(path)
    rows = load_prompts(resolve_suite("code"))[: a.n_prompts]
    prompts = [tok.encode(r["prompt"]) for r in rows]
    # the engine's cache: prompt + max_new + k + 2 positions, rounded up to 128; attention reads all of
    # it, so a plain run in a smaller cache than the k=4 run would skew the ratio
    lens = {min(model.max_len, -(-(len(p) + a.max_new + k + 2) // CACHE_STEP) * CACHE_STEP)
            for p in prompts for k in (0, *KS)}
    if len(lens) > 1:
        print(f"warning: cache lengths {sorted(lens)} differ across prompts or k; pick --max-new so they agree")
    cache_len = max(lens)
    context = int(statistics.median(len(p) for p in prompts)) + a.max_new // 2

    t0 = time.perf_counter()
    probe = CostProbe(model, a.batch, cache_len, context)
    runs = decode_runs(model, prompts, a.batch, a.max_new, probe, a.reps)
    costs = plan.MeasuredCosts.from_json(probe.table(), "measured")
    wall = time.perf_counter() - t0
    records = [{"k": k, "num_drafts": r.metrics.num_drafts, "accepted_per_pos": r.metrics.accepted_per_pos}
               for k in KS for r in runs[k]]
    cond = plan.acceptance_from_counts(records)
    base = decode_rate(runs[0])
    plain_step = step_seconds(runs[0])
    # host work per step (sampling, read-back, the Python loop), seen on plain decoding only
    overhead = max(0.0, plain_step - costs.verify[(1, a.batch)])
    bare = {c.k: c for c in plan.project(costs, cond, (0, *KS), [a.batch])}
    host = {c.k: c for c in plan.project(costs, cond, (0, *KS), [a.batch], overhead)}

    print(f"{costs.describe()}; {len(prompts)} code prompts, {a.max_new} new tokens, measured in {wall:.0f} s")
    print("cost table (ms): verify n=1..5: " + " ".join(f"{s * 1e3:.2f}" for s in costs.verify.values())
          + f" | draft: {costs.draft[a.batch] * 1e3:.2f}")
    print("acceptance (conditional per position, pooled over k): " + " ".join(f"{p:.3f}" for p in cond))
    print(f"plain decoding: {base:.1f} tokens/s, {plain_step * 1e3:.2f} ms per step, of which "
          f"{costs.verify[(1, a.batch)] * 1e3:.2f} ms the forward: host overhead {overhead * 1e3:.2f} ms per step")
    print("\npredicted A: forwards only (the cost table); B: plus the host overhead per step measured on plain "
          "decoding")
    print(f"{'k':>3} {'AL meas':>8} {'tok/step':>8} {'ms A':>7} {'ms B':>7} {'ms meas':>7} {'pred A':>7} "
          f"{'pred B':>7} {'meas':>7} {'A/meas':>7} {'B/meas':>7}")
    out = []
    for k in KS:
        m = runs[k]
        al = 1 + sum(r.metrics.num_accepted_tokens for r in m) / max(1, sum(r.metrics.num_drafts for r in m))
        measured = decode_rate(m) / base
        pa, pb = bare[k], host[k]
        print(f"{k:>3} {al:8.2f} {pa.tokens_per_step:8.2f} {pa.step_s * 1e3:7.2f} {pb.step_s * 1e3:7.2f} "
              f"{step_seconds(m) * 1e3:7.2f} {pa.speedup:7.2f} {pb.speedup:7.2f} {measured:7.2f} "
              f"{pa.speedup / measured:7.2f} {pb.speedup / measured:7.2f}")
        out.append({"k": k, "al_measured": al, "tokens_per_step": pa.tokens_per_step, "step_s": pa.step_s,
                    "step_s_with_overhead": pb.step_s, "measured_step_s": step_seconds(m),
                    "predicted": pa.speedup, "predicted_with_overhead": pb.speedup, "measured": measured})
    if a.costs_out:
        Path(a.costs_out).write_text(json.dumps(costs.to_json(), indent=2) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"costs": costs.to_json(), "acceptance": cond, "overhead_s": overhead,
                                            "rows": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
