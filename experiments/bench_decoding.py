"""Decoding benchmark: every ratio below is measured in this one run, on the same prompts.

1. tokens/s per strategy and k at batch 1, T=0, with speedup over our vanilla;
2. ours vs transformers `generate` on the same BF16 checkpoint (greedy, and prompt lookup);
3. the cost of a verify forward over k+1 tokens, and of an MTP draft step, relative to one decode step;
4. a batch-size sweep (1..16), vanilla vs MTP.

    python experiments/bench_decoding.py [--model DIR] [--n-prompts 8] [--max-new 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mtp_spec
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.strategies import make_proposer
from mtp_spec.experiment.schema import load_prompts, resolve_suite
from mtp_spec.loader import default_model
from mtp_spec.tokenizer import load_tokenizer


def timed(fn, reps: int = 1) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_strategy(model, prompts, strategy, k, max_new, eos, width=2, draft=None):
    prop = make_proposer(strategy, model, k, width) if strategy != "draft-model" else None
    if strategy == "draft-model":
        from mtp_spec.decoding.proposers import DraftModelProposer

        prop = DraftModelProposer(draft, k)
    eng = Engine(model, prop)
    eng.generate(prompts[:1], 8)  # warm-up
    t0 = time.perf_counter()
    res = [eng.generate([p], max_new, eos_id=eos)[0] for p in prompts]
    wall = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in res)
    drafts = sum(r.metrics.num_drafts for r in res)
    acc = sum(r.metrics.num_accepted_tokens for r in res)
    return {"tokens": n, "wall_s": wall, "tokens_per_s": n / wall, "AL": 1 + acc / drafts if drafts else 1.0,
            "outputs": [r.token_ids for r in res]}


@torch.no_grad()
def step_costs(model, ctx: int = 128, reps: int = 20) -> dict:
    """Seconds for one main forward of s new tokens after `ctx` cached ones, s = 1..5, and one MTP step."""
    ids = torch.randint(0, model.args.vocab_size, (1, ctx + 8), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, ctx + 16)
    model(ids[:, :ctx], cache=cache)
    cache.lengths[:] = ctx
    out = {}
    for s in range(1, 6):
        out[f"main_{s}"] = timed(lambda s=s: model(ids[:, ctx:ctx + s], cache=cache), reps)
    if model.mtp is not None:
        mc = model.mtp.new_cache(1, ctx + 16)
        h = torch.zeros(1, 1, model.args.dim)
        model.mtp(ids[:, 1:ctx + 1], torch.zeros(1, ctx, model.args.dim), cache=mc)
        mc.lengths[:] = ctx
        out["mtp_1"] = timed(lambda: model.mtp(ids[:, ctx:ctx + 1], h, cache=mc), reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--draft-model")
    ap.add_argument("--suite", default="code")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="results/bench_decoding.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = Path(a.model) if a.model else default_model()
    tok = load_tokenizer(path)
    prompts = [tok.encode(p["prompt"]) for p in load_prompts(resolve_suite(a.suite), a.n_prompts)]
    model = mtp_spec.load(path, dtype=torch.float32, max_len=max(max(map(len, prompts)) + a.max_new + 32, 160))
    draft = None
    if a.draft_model:
        draft = mtp_spec.load(a.draft_model, dtype=torch.float32, part="main", max_len=model.max_len)
    eos = tok.eos_id
    report: dict = {"model": str(path), "threads": a.threads, "n_prompts": len(prompts), "max_new": a.max_new,
                    "torch": torch.__version__}

    # 1. strategies
    configs = [("vanilla", 0), ("mtp", 1), ("mtp", 2), ("mtp", 3), ("mtp", 4), ("mtp-tree", 3), ("ngram", 3)]
    if draft is not None:
        configs.append(("draft-model", 3))
    rows = {}
    for strategy, k in configs:
        rows[f"{strategy} k={k}"] = run_strategy(model, prompts, strategy, max(k, 1), a.max_new, eos, draft=draft)
    base = rows["vanilla k=0"]
    print(f"\n1. batch 1, greedy, {len(prompts)} '{a.suite}' prompts x {a.max_new} new tokens, fp32, "
          f"{a.threads} threads")
    print(f"{'strategy':16} {'tokens/s':>9} {'AL':>5} {'speedup':>8} {'== vanilla':>10}")
    for name, r in rows.items():
        print(f"{name:16} {r['tokens_per_s']:9.1f} {r['AL']:5.2f} {r['tokens_per_s'] / base['tokens_per_s']:8.2f} "
              f"{str(r['outputs'] == base['outputs']):>10}")
    report["strategies"] = {n: {k: v for k, v in r.items() if k != "outputs"} for n, r in rows.items()}

    # 3. step costs and the predicted speedup
    costs = step_costs(model)
    report["step_costs_s"] = costs
    print("\n3. step costs at 128 cached tokens, batch 1 (relative to one single-token decode step)")
    for s in range(1, 6):
        print(f"   verify {s} tokens: {costs[f'main_{s}'] * 1e3:7.2f} ms  x{costs[f'main_{s}'] / costs['main_1']:.2f}")
    if "mtp_1" in costs:
        print(f"   MTP draft step:   {costs['mtp_1'] * 1e3:7.2f} ms  x{costs['mtp_1'] / costs['main_1']:.2f}")
        print(f"\n   {'mtp k':6} {'AL':>5} {'predicted':>9} {'measured':>9} {'measured/predicted':>18}")
        for k in (1, 2, 3, 4):
            r = rows[f"mtp k={k}"]
            verify = costs[f"main_{k + 1}"]
            predicted = r["AL"] / (1 + k * costs["mtp_1"] / verify)  # the model: AL / (1 + draft/verify)
            measured = r["tokens_per_s"] / base["tokens_per_s"]
            print(f"   {k:<6} {r['AL']:5.2f} {predicted:9.2f} {measured:9.2f} {measured / predicted:18.2f}")

    # 2. transformers on the same BF16 checkpoint
    if not a.skip_hf:
        import transformers

        from mtp_spec.checkpoint import convert_to_bf16

        with tempfile.TemporaryDirectory() as tmp:
            bf16 = convert_to_bf16(path, Path(tmp) / "bf16")
            ours = mtp_spec.load(bf16, dtype=torch.float32, part="main", max_len=model.max_len)
            hf = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
            hf_rows = {}
            for name, kw in [("greedy", {}), ("prompt lookup 3", {"prompt_lookup_num_tokens": 3})]:
                def gen(p, kw=kw):
                    x = torch.tensor([p])
                    return hf.generate(x, max_new_tokens=a.max_new, do_sample=False, eos_token_id=eos,
                                       pad_token_id=eos, **kw)[0, len(p):].tolist()

                gen(prompts[0][:4])
                t0 = time.perf_counter()
                outs = [gen(p) for p in prompts]
                wall = time.perf_counter() - t0
                hf_rows[name] = {"tokens_per_s": sum(map(len, outs)) / wall, "outputs": outs}
            ours_v = run_strategy(ours, prompts, "vanilla", 1, a.max_new, eos)
            ours_ng = run_strategy(ours, prompts, "ngram", 3, a.max_new, eos)
            print("\n2. ours vs transformers generate, same BF16 checkpoint (fp32 compute), batch 1, greedy")
            print(f"{'':28} {'tokens/s':>9} {'ours/transformers':>17}")
            print(f"{'transformers greedy':28} {hf_rows['greedy']['tokens_per_s']:9.1f}")
            print(f"{'ours vanilla':28} {ours_v['tokens_per_s']:9.1f} "
                  f"{ours_v['tokens_per_s'] / hf_rows['greedy']['tokens_per_s']:17.2f}")
            print(f"{'transformers prompt lookup':28} {hf_rows['prompt lookup 3']['tokens_per_s']:9.1f}")
            print(f"{'ours ngram k=3':28} {ours_ng['tokens_per_s']:9.1f} "
                  f"{ours_ng['tokens_per_s'] / hf_rows['prompt lookup 3']['tokens_per_s']:17.2f}")
            same = sum(o == h for o, h in zip(ours_v["outputs"], hf_rows["greedy"]["outputs"]))
            print(f"   identical greedy outputs, ours vs transformers: {same}/{len(prompts)}")
            report["transformers"] = {"hf_greedy": hf_rows["greedy"]["tokens_per_s"],
                                      "hf_prompt_lookup": hf_rows["prompt lookup 3"]["tokens_per_s"],
                                      "ours_vanilla": ours_v["tokens_per_s"], "ours_ngram": ours_ng["tokens_per_s"],
                                      "identical_outputs": same}

    # 4. batch sweep
    print("\n4. batch sweep: throughput (generated tokens / wall), vanilla vs mtp k=2")
    print(f"{'batch':>5} {'vanilla tok/s':>13} {'mtp k=2 tok/s':>13} {'speedup':>8}")
    report["batch"] = {}
    pool = (prompts * 16)[:16]
    for b in map(int, a.batch_sizes.split(",")):
        tps = {}
        for strategy, k in (("vanilla", 1), ("mtp", 2)):
            eng = Engine(model, make_proposer(strategy, model, k))
            eng.generate(pool[:b], 4)
            t0 = time.perf_counter()
            res = eng.generate(pool[:b], a.max_new, eos_id=eos)
            tps[strategy] = sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0)
        report["batch"][b] = tps
        print(f"{b:5d} {tps['vanilla']:13.1f} {tps['mtp']:13.1f} {tps['mtp'] / tps['vanilla']:8.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
