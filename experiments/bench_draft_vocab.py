"""Sub-vocabulary draft head (FR-Spec): the MTP head scores only the N most frequent tokens. For each N,
one run measures, interleaved (every N on a prompt back to back, rotating order, so drift lands on all
alike):

- the step costs: one main decode step (1 token, after `--ctx` cached ones) and one MTP draft step
  (1 token), each followed by its argmax, timed alternately as decoding runs them (so the caches hold
  what a real run leaves there), and their ratio; also the draft step's head alone (the full head, or
  the sub-head and its scatter into the vocabulary), after another decode step: the part N changes;
- generation: AL, tokens/s and the speedup over vanilla (median of per-prompt ratios) with MTP at
  depth `--k`, and whether the output equals vanilla's (greedy: it must).

    python experiments/bench_draft_vocab.py [--model shipped] [--suite code] [--n-prompts 6] \
        [--max-new 64] [--k 2] [--sizes full,4096,2048,1024,512]

The frequencies are the model's `token_counts.json` (or `--counts FILE`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _bench import interleaved, suite_prompts, summary  # noqa: E402

import mtp_spec  # noqa: E402
from mtp_spec.decoding.engine import Engine  # noqa: E402
from mtp_spec.decoding.strategies import make_proposer  # noqa: E402
from mtp_spec.draft_vocab import DraftHeads, read_counts  # noqa: E402
from mtp_spec.loader import resolve_model  # noqa: E402
from mtp_spec.tokenizer import load_tokenizer  # noqa: E402


def head_only(layer, x: torch.Tensor) -> torch.Tensor:
    """What MTP.forward does after the block's norm: the head, or the sub-head scattered into the vocabulary."""
    if not layer.sub_head:
        return layer.head(x)
    sub = layer.sub_head[0](x)
    return sub.new_full((*sub.shape[:-1], layer.vocab_size), float("-inf")).scatter(-1, layer.sub_ids.expand_as(sub),
                                                                                   sub)


@torch.no_grad()
def step_costs(model, heads: DraftHeads, sizes: dict, ctx: int, reps: int) -> dict:
    """Median seconds of a main decode step, an MTP draft step and its head alone per size, interleaved."""
    g = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    V = model.args.vocab_size
    cache = model.new_cache(1, ctx + reps + 8)
    model(torch.randint(0, V, (1, ctx), generator=g).to(dev), cache=cache)
    cache.lengths += ctx
    mcache = model.mtp.new_cache(1, ctx + reps + 8)
    mcache.lengths += ctx
    h = torch.randn(1, 1, model.args.dim, generator=g).to(dev)
    x = torch.randint(0, V, (1, 1), generator=g).to(dev)
    names = list(sizes)
    times: dict = {n: {"decode": [], "draft": [], "head": []} for n in names}
    layer = model.mtp.layers[0]
    for rep in range(reps + 1):  # rep 0 warms up
        for n in names[rep % len(names):] + names[: rep % len(names)]:
            heads.use(sizes[n])
            t0 = time.perf_counter()
            model(x, cache=cache, step=True).logits.argmax(-1)
            t1 = time.perf_counter()
            model.mtp(x, h, cache=mcache, step=True).logits.argmax(-1)
            t2 = time.perf_counter()
            model(x, cache=cache, step=True).logits.argmax(-1)  # evicts the head as the next step would
            t3 = time.perf_counter()
            head_only(layer, h).argmax(-1)
            t4 = time.perf_counter()
            if rep:
                times[n]["decode"].append(t1 - t0)
                times[n]["draft"].append(t2 - t1)
                times[n]["head"].append(t4 - t3)
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--counts", default=None, help="token_counts.json (default: the model's own)")
    ap.add_argument("--suite", default="code")
    ap.add_argument("--n-prompts", type=int, default=6)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--k", default="2", help="MTP depth, or auto")
    ap.add_argument("--sizes", default="full,4096,2048,1024,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", default="auto")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--json", default="results/bench_draft_vocab.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    prompts = suite_prompts(tok, a.suite, a.n_prompts)
    model = mtp_spec.load(path, max_len=max(max(map(len, prompts)) + a.max_new + 32, a.ctx + a.reps + 16),
                          compile=a.compile)
    heads = DraftHeads(model, read_counts(a.counts or path, model.args.vocab_size))
    sizes = [None if s == "full" else int(s) for s in a.sizes.split(",")]
    for n in sizes:  # each sub-head built once, before anything is timed
        heads.use(n)
    k = a.k if a.k == "auto" else int(a.k)
    label = {n: "full" if n is None else str(n) for n in sizes}

    def runner(n):
        def run(p):
            heads.use(n)
            return eng[n].generate([p], a.max_new, eos_id=tok.eos_id)[0]
        return run

    eng = {}
    for n in sizes:  # proposers built under their own size (k=auto measures its draft step cost there)
        heads.use(n)
        eng[n] = Engine(model, make_proposer("mtp", model, k))
    vanilla = Engine(model, None)
    runners = {"vanilla": lambda p: vanilla.generate([p], a.max_new, eos_id=tok.eos_id)[0]}
    runners.update({f"N={label[n]}": runner(n) for n in sizes})
    t0 = time.perf_counter()
    recs = interleaved(prompts, runners)
    costs = step_costs(model, heads, {label[n]: n for n in sizes}, a.ctx, a.reps)
    took = time.perf_counter() - t0
    base = recs["vanilla"]
    van = summary(base, base)
    print(f"# {path.name} (vocab {model.args.vocab_size}), {next(model.parameters()).dtype}, compile={a.compile}, "
          f"{a.threads} threads, batch 1, greedy, MTP k={a.k}, {len(prompts)} '{a.suite}' prompts x {a.max_new} "
          f"new tokens, step costs at ctx {a.ctx} (median of {a.reps}), torch {torch.__version__}, {took:.0f} s")
    print(f"{'N':>7} {'draft step ms':>13} {'(head ms)':>9} {'decode step ms':>14} {'ratio':>6} {'AL':>5} "
          f"{'tok/s':>7} {'speedup (median, 95% CI)':>25} {'==vanilla':>9}")
    print(f"{'vanilla':>7} {'':>13} {'':>9} {'':>14} {'':>6} {1.0:5.2f} {van['tokens_per_s']:7.1f} {'1.00x':>12}")
    out = {"model": str(path), "k": a.k, "threads": a.threads, "compile": a.compile, "n_prompts": len(prompts),
           "max_new": a.max_new, "torch": torch.__version__, "vanilla_tokens_per_s": van["tokens_per_s"], "rows": []}
    for n in sizes:
        s = summary(recs[f"N={label[n]}"], base)
        c = costs[label[n]]
        lo, hi = s["speedup_ci"]
        print(f"{label[n]:>7} {c['draft'] * 1e3:13.3f} {c['head'] * 1e3:9.3f} {c['decode'] * 1e3:14.3f} "
              f"{c['draft'] / c['decode']:6.3f} {s['AL']:5.2f} {s['tokens_per_s']:7.1f} "
              f"{s['speedup_median']:11.2f}x [{lo:4.2f}, {hi:4.2f}] {s['equal']:>6}/{len(prompts)}")
        out["rows"].append({"N": label[n], "draft_step_s": c["draft"], "head_s": c["head"],
                            "decode_step_s": c["decode"], "ratio": c["draft"] / c["decode"], **{key: s[key] for key in (
                                "AL", "AR", "per_pos", "tokens_per_s", "speedup_median", "speedup_ci",
                                "speedup_total", "equal")}})
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
