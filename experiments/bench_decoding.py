"""Decoding benchmark on the shipped DeepSeek-V3-architecture model: every ratio is measured in this one
run, on the same prompts, strategies interleaved per prompt in rotating order.

1. per step path (eager reference, fast = CPU kernels, compiled = kernels + torch.compile): tokens/s per
   strategy and k at batch 1, T=0, speedup over that path's vanilla (median of per-prompt ratios),
   and whether outputs equal the eager vanilla's;
2. ours (eager and fast) vs transformers `generate` on the same BF16 checkpoint;
3. step costs per path: a verify of s tokens and the MTP steps relative to one decode step, and the
   predicted speedup (1 + sum of per-position acceptance) / cost beside the measured one;
4. a batch sweep (fast path), vanilla vs MTP k=2, throughput.

    python experiments/bench_decoding.py [--model DIR] [--n-prompts 8] [--max-new 64] \
        [--paths eager,fast,compiled]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _bench import interleaved, peer_runners, predicted_speedup, step_costs, suite_prompts, summary  # noqa: E402

import mtp_spec  # noqa: E402
from mtp_spec.decoding.engine import Engine  # noqa: E402
from mtp_spec.decoding.strategies import make_proposer  # noqa: E402
from mtp_spec.loader import resolve_model  # noqa: E402
from mtp_spec.tokenizer import load_tokenizer  # noqa: E402

PATHS = {"eager": "off", "fast": "auto", "compiled": "on"}
CONFIGS = [("mtp", 1), ("mtp", 2), ("mtp", 3), ("mtp", 4), ("mtp-tree", 3), ("ngram", 3)]


def runners(model, eos: int, max_new: int) -> dict:
    def make(strategy, k):
        eng = Engine(model, make_proposer(strategy, model, k, 2) if strategy != "vanilla" else None)
        return lambda p: eng.generate([p], max_new, eos_id=eos)[0]

    out = {"vanilla": make("vanilla", 0)}
    out.update({f"{s} k={k}": make(s, k) for s, k in CONFIGS})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--suite", default="code")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="eager,fast,compiled")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default="results/bench_decoding.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    prompts = suite_prompts(tok, a.suite, a.n_prompts)
    max_len = max(max(map(len, prompts)) + a.max_new + 32, 256)
    report: dict = {"model": str(path), "threads": a.threads, "n_prompts": len(prompts), "max_new": a.max_new,
                    "torch": torch.__version__, "paths": {}}
    print(f"# {path.name}, fp32 weights from FP8, {a.threads} threads, batch 1, greedy, {len(prompts)} "
          f"'{a.suite}' prompts x {a.max_new} new tokens, torch {torch.__version__}")
    models, reference = {}, None
    for name in a.paths.split(","):
        t0 = time.perf_counter()
        model = models[name] = mtp_spec.load(path, max_len=max_len, compile=PATHS[name])
        recs = interleaved(prompts, runners(model, tok.eos_id, a.max_new))
        took = time.perf_counter() - t0
        base = recs["vanilla"]
        reference = reference or base
        costs = step_costs(model)
        print(f"\n## 1. path '{name}' (compile={PATHS[name]}): {model.steps.summary()}, wall {took:.0f} s")
        print(f"{'strategy':16s} {'tok/s':>7s} {'AL':>5s}  {'speedup (median, 95% CI)':>26s}  {'predicted':>9s} "
              f"{'meas/pred':>9s}  ==eager vanilla")
        out = {}
        for n, r in recs.items():
            s = summary(r, base)
            s["equal_eager_vanilla"] = sum(x["token_ids"] == y["token_ids"] for x, y in zip(r, reference))
            k = int(n.split("k=")[1]) if n.startswith("mtp k=") else 0
            pred = predicted_speedup(s["per_pos"], k, costs) if k else float("nan")
            s["predicted"] = pred
            out[n] = s
            lo, hi = s["speedup_ci"]
            ratio = s["speedup_total"] / pred if k else float("nan")
            print(f"{n:16s} {s['tokens_per_s']:7.1f} {s['AL']:5.2f}  {s['speedup_median']:6.2f}x [{lo:4.2f}, "
                  f"{hi:4.2f}] (tot {s['speedup_total']:4.2f})  {pred:9.2f} {ratio:9.2f}"
                  f"  {s['equal_eager_vanilla']}/{len(r)}")
        one = costs["verify1"]
        print("   step costs (x one decode step): " + ", ".join(f"{key} {v / one:.2f}" for key, v in costs.items())
              + f"; decode {one * 1e3:.2f} ms")
        report["paths"][name] = {"strategies": out, "step_costs_s": costs, "compile": model.steps.summary(),
                                 "wall_s": took}

    if not a.skip_hf:
        hf_compare(path, prompts, tok.eos_id, a.max_new, max_len, report)

    fast = models.get("fast") or next(iter(models.values()))
    print("\n## 4. batch sweep (the fast path), throughput = generated tokens / wall, vanilla vs mtp k=2")
    print(f"{'batch':>5} {'vanilla tok/s':>13} {'mtp k=2 tok/s':>13} {'speedup':>8}")
    report["batch"] = {}
    pool = (prompts * 16)[:16]
    for b in map(int, a.batch_sizes.split(",")):
        tps = {}
        for strategy, k in (("vanilla", 1), ("mtp", 2)):
            eng = Engine(fast, make_proposer(strategy, fast, k))
            eng.generate(pool[:b], 4)
            t0 = time.perf_counter()
            res = eng.generate(pool[:b], a.max_new, eos_id=tok.eos_id)
            tps[strategy] = sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0)
        report["batch"][b] = tps
        print(f"{b:5d} {tps['vanilla']:13.1f} {tps['mtp']:13.1f} {tps['mtp'] / tps['vanilla']:8.2f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2, default=str))


def hf_compare(path, prompts, eos, max_new, max_len, report) -> None:
    """transformers `generate` (greedy, prompt lookup) against ours on one BF16 copy of the checkpoint."""
    import transformers

    from mtp_spec.checkpoint import convert_to_bf16

    with tempfile.TemporaryDirectory() as tmp:
        bf16 = convert_to_bf16(path, Path(tmp) / "bf16")
        hf = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()

        run = peer_runners(hf, eos, max_new, names=("transformers", "transformers lookup 3"))
        for name, mode in (("ours eager", "off"), ("ours fast", "auto")):
            m = mtp_spec.load(bf16, dtype=torch.float32, part="main", max_len=max_len, compile=mode)
            for strategy, k in (("vanilla", 1), ("ngram", 3)):
                eng = Engine(m, make_proposer(strategy, m, k))
                run[f"{name} {strategy}"] = lambda p, eng=eng: eng.generate([p], max_new, eos_id=eos)[0]
        recs = interleaved(prompts, run)
        base = recs["transformers"]
        print("\n## 2. ours vs transformers generate, same BF16 checkpoint (fp32 compute), batch 1, greedy")
        print(f"{'':28s} {'tok/s':>7s} {'vs transformers greedy (median)':>32s} {'same output':>12s}")
        report["transformers"] = {}
        for n, r in recs.items():
            s = summary(r, base)
            report["transformers"][n] = s
            print(f"{n:28s} {s['tokens_per_s']:7.1f} {s['speedup_median']:31.2f}x {s['equal']:>8d}/{len(r)}")


if __name__ == "__main__":
    main()
