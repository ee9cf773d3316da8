"""Shared by the benchmark scripts: interleaved timing (every strategy on a prompt back to back, in
rotating order, so drift and neighbours land on every strategy alike) and per-prompt speedups."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def suite_prompts(tok, suite: str, n: int) -> list[list[int]]:
    """n prompts spread over a shipped suite (or JSONL file), as token ids (chat ones templated)."""
    from mtp_spec.experiment.schema import load_prompts, resolve_suite

    rows = load_prompts(resolve_suite(suite))
    return [tok.encode(p["prompt"]) if "prompt" in p else tok.chat(p["messages"])
            for p in rows[:: max(1, len(rows) // n)][:n]]


def interleaved(prompts: list, runners: dict[str, Callable], warmup: int = 1) -> dict[str, list[dict]]:
    """runners: name -> fn(prompt) returning a Result-like object (token_ids, metrics). Every prompt
    runs every runner, starting at a rotating offset. Returns per-runner lists of per-prompt records."""
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n](prompts[0])
    out: dict[str, list[dict]] = {n: [] for n in names}
    for i, p in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            r = runners[n](p)
            wall = time.perf_counter() - t0
            m = getattr(r, "metrics", None)
            out[n].append({"prompt": i, "tokens": len(r.token_ids), "wall_s": wall, "token_ids": r.token_ids,
                           "drafts": m.num_drafts if m else 0, "draft_tokens": m.num_draft_tokens if m else 0,
                           "accepted": m.num_accepted_tokens if m else 0,
                           "per_pos": list(m.accepted_per_pos) if m else []})
    return out


def peer_runners(hf, eos_id: int, max_new: int, names=("transformers", "transformers-lookup")) -> dict:
    """transformers' greedy `generate` and its prompt lookup (3 tokens) as runners for `interleaved`."""
    from types import SimpleNamespace

    from mtp_spec.decoding.strategies import peer_generate

    def run(prompt, lookup=None):
        return SimpleNamespace(token_ids=peer_generate(hf, prompt, max_new, eos_id, lookup), metrics=None)

    return {names[0]: run, names[1]: lambda p: run(p, 3)}


def summary(recs: list[dict], base: list[dict] | None = None) -> dict:
    tokens = sum(r["tokens"] for r in recs)
    wall = sum(r["wall_s"] for r in recs)
    drafts = sum(r["drafts"] for r in recs)
    dtoks = sum(r["draft_tokens"] for r in recs)
    acc = sum(r["accepted"] for r in recs)
    width = max((len(r["per_pos"]) for r in recs), default=0)
    per_pos = [sum(r["per_pos"][i] for r in recs if i < len(r["per_pos"])) / drafts if drafts else 0.0
               for i in range(width)]
    s = {"tokens_per_s": tokens / wall if wall else 0.0, "AL": 1 + acc / drafts if drafts else 1.0,
         "AR": acc / dtoks if dtoks else float("nan"), "per_pos": [round(x, 3) for x in per_pos]}
    if base is not None:
        ratios = [(b["wall_s"] / b["tokens"]) / (r["wall_s"] / r["tokens"]) for r, b in zip(recs, base)]
        s["speedup_median"] = statistics.median(ratios)
        s["speedup_ci"] = ci(ratios)
        s["speedup_total"] = s["tokens_per_s"] / summary(base)["tokens_per_s"]
        s["equal"] = sum(r["token_ids"] == b["token_ids"] for r, b in zip(recs, base))
    return s


def ci(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """A bootstrap confidence interval of the median (fixed seed)."""
    if len(xs) < 2:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(xs, dtype=torch.float64)
    idx = torch.randint(0, len(xs), (2000, len(xs)), generator=g)
    meds = t[idx].median(dim=1).values.sort().values
    lo, hi = int((1 - level) / 2 * 2000), int((1 + level) / 2 * 2000) - 1
    return (float(meds[lo]), float(meds[hi]))


@torch.no_grad()
def step_costs(model, ctx: int = 128, sizes=(1, 2, 3, 4, 5), reps: int = 9) -> dict:
    """Median seconds of one main forward of s new tokens after `ctx` cached ones (batch 1, step path),
    and of the MTP layer's draft step (1 token) and extend (s tokens, one logit row), interleaved."""
    g = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    ctx = min(ctx, model.max_len - 2 * max(sizes) - 2)  # every position inside the rotary table
    cache = model.new_cache(1, ctx + 64)
    model(torch.randint(0, model.args.vocab_size, (1, ctx), generator=g).to(dev), cache=cache)
    cache.lengths += ctx
    runs: dict = {f"verify{s}": [] for s in sizes}
    inputs = {s: torch.randint(0, model.args.vocab_size, (1, s), generator=g).to(dev) for s in sizes}
    mtp = model.mtp
    if mtp is not None:
        mcache = mtp.new_cache(1, ctx + 64)
        mcache.lengths += ctx
        h = torch.randn(1, max(sizes), model.args.dim, generator=g).to(dev)
        runs["draft_step"] = []
        runs.update({f"extend{s}": [] for s in sizes if s > 1})
    for rep in range(reps + 1):
        for s in sizes:
            t0 = time.perf_counter()
            model(inputs[s], cache=cache, step=True)
            if rep:
                runs[f"verify{s}"].append(time.perf_counter() - t0)
        if mtp is not None:
            t0 = time.perf_counter()
            mtp(inputs[1], h[:, :1], cache=mcache, step=True)
            if rep:
                runs["draft_step"].append(time.perf_counter() - t0)
            for s in sizes[1:]:
                t0 = time.perf_counter()
                mtp(inputs[s], h[:, :s], cache=mcache, logits_at=torch.tensor([[s - 1]], device=dev), step=True)
                if rep:
                    runs[f"extend{s}"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in runs.items()}


def predicted_speedup(per_pos: list[float], k: int, costs: dict) -> float:
    """Expected tokens per step (1 + the unconditional per-position acceptance, summed) over the step's
    cost in decode steps: verify of k+1 tokens, the extend and k-1 draft steps."""
    tokens = 1 + sum(per_pos[:k])
    one = costs["verify1"]
    cost = costs[f"verify{k + 1}"] + costs.get(f"extend{k + 1}", 0.0) + (k - 1) * costs.get("draft_step", 0.0)
    return tokens / (cost / one)
