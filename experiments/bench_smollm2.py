"""SmolLM2-135M-Instruct with its post-hoc MTP layer, on the CPU: where speculation pays.

Every ratio is measured in this one run, strategies interleaved per prompt (rotating order):

1. per suite (held-out code completions, chat requests): vanilla, mtp k=1..3, mtp-tree, mtp-ngram, ngram and
   transformers (plain `generate`, prompt lookup) on the same weights; tokens/s, AL, AR, per-position
   acceptance, the median per-prompt speedup over our vanilla with a 95% CI, and the lossless column
   (outputs equal to our vanilla, with numerical ties reported separately);
2. step costs: a verify of s tokens and the MTP steps relative to one decode step;
3. float32 weights: vanilla vs mtp on a few prompts (must be equal: 0 divergences);
4. with --kernels, where the CPU has AVX-512 BF16: vanilla and mtp k=1..3 on the code prompts with
   each kernel for bf16 weights (kernels/cpu_linear.py), interleaved, and the step costs of each.

    python experiments/bench_smollm2.py [--n-code 9] [--n-chat 6] [--max-new 96] [--strategies mtp:3,ngram:3]
        [--no-transformers] [--kernels] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _bench import interleaved, peer_runners, predicted_speedup, step_costs, summary  # noqa: E402

import mtp_spec  # noqa: E402
import mtp_spec.kernels.cpu_linear as C  # noqa: E402
from mtp_spec.decoding.engine import Engine  # noqa: E402
from mtp_spec.decoding.strategies import make_proposer  # noqa: E402
from mtp_spec.experiment.schema import load_prompts, resolve_suite  # noqa: E402
from mtp_spec.loader import resolve_model  # noqa: E402
from mtp_spec.tokenizer import load_tokenizer  # noqa: E402

STRATEGIES = [("mtp", 1), ("mtp", 2), ("mtp", 3), ("mtp-tree", 3), ("mtp-ngram", 2), ("mtp-ngram", 3), ("ngram", 3)]


def transformers_runners(path: Path, tok, max_new: int) -> dict:
    """transformers' LlamaForCausalLM on the same directory, bf16: greedy generate and prompt lookup.
    (transformers has no MTP path for Llama models.)"""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return peer_runners(hf, tok.eos_id, max_new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-code", type=int, default=9)
    ap.add_argument("--n-chat", type=int, default=6)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--strategies", help="e.g. mtp:3,mtp-ngram:3 (default: every one of STRATEGIES; mtp k=1..3 "
                                         "are always run, for the predicted-speedup check)")
    ap.add_argument("--kernels", action="store_true", help="also compare the two bf16 kernels (section 4)")
    ap.add_argument("--json", help="write every number here too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    model = mtp_spec.load(path, dtype=torch.bfloat16, max_len=1024, compile="auto")
    print(f"# {path.name}: bf16 weights, fp32 activations, CPU kernel {C.kind()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, batch 1, greedy, {a.max_new} new tokens\n")
    suites = {"code": load_prompts(resolve_suite("code"))[:: max(1, 120 // a.n_code)][: a.n_code],
              "chat": load_prompts(resolve_suite("chat"))[:: max(1, 60 // a.n_chat)][: a.n_chat]}
    report: dict = {"model": str(path), "max_new": a.max_new, "suites": {}}
    hf = {} if a.no_transformers else transformers_runners(path, tok, a.max_new)
    strategies = STRATEGIES
    if a.strategies:
        strategies = [(s.split(":")[0], int(s.split(":")[1])) for s in a.strategies.split(",")]
        strategies = [("mtp", k) for k in (1, 2, 3) if ("mtp", k) not in strategies] + strategies

    def ours(strategy, k):
        eng = Engine(model, make_proposer(strategy, model, k, 2) if strategy != "vanilla" else None)
        return lambda p: eng.generate([p], a.max_new, eos_id=tok.eos_id)[0]

    for name, rows in suites.items():
        prompts = [tok.chat(r["messages"]) if "messages" in r else tok.encode(r["prompt"]) for r in rows]
        runners = {"vanilla": ours("vanilla", 0)}
        runners.update({f"{s} k={k}" + (" w=2" if s == "mtp-tree" else ""): ours(s, k) for s, k in strategies})
        runners.update(hf)
        recs = interleaved(prompts, runners)
        base = recs["vanilla"]
        print(f"## {name}: {len(prompts)} held-out prompts")
        print(f"{'strategy':22s} {'tok/s':>7s} {'AL':>5s} {'AR':>5s}  {'speedup (median, 95% CI)':27s} "
              f"{'==vanilla':>9s}  per-position acceptance")
        rows_out = {}
        for n, r in recs.items():
            s = summary(r, base)
            ties = ""
            if n != "vanilla" and s["equal"] < len(r):
                ties = _ties(model, prompts, base, r)
                s["divergences"] = ties
            rows_out[n] = {k: v for k, v in s.items()}
            lo, hi = s["speedup_ci"]
            print(f"{n:22s} {s['tokens_per_s']:7.1f} {s['AL']:5.2f} {s['AR']:5.2f}  "
                  f"{s['speedup_median']:5.2f}x [{lo:4.2f}, {hi:4.2f}] (total {s['speedup_total']:4.2f}x) "
                  f"{s['equal']:>4d}/{len(r):<4d}  {' '.join(f'{x:.2f}' for x in s['per_pos'])}"
                  + (f"  {ties}" if ties else ""))
        report["suites"][name] = rows_out
        print()

    costs = step_costs(model, ctx=160)
    one = costs["verify1"]
    print("## step costs at 160 cached tokens, batch 1 (relative to one decode step)")
    for key, v in costs.items():
        print(f"   {key:12s} {v * 1000:7.2f} ms  x{v / one:.2f}")
    print("\n   predicted vs measured speedup (code suite), predicted = (1 + sum of per-position acceptance) / cost")
    code = report["suites"]["code"]
    for k in (1, 2, 3):
        row = code[f"mtp k={k}"]
        pred = predicted_speedup(row["per_pos"], k, costs)
        print(f"   mtp k={k}: predicted {pred:.2f}x  measured {row['speedup_total']:.2f}x  "
              f"measured/predicted {row['speedup_total'] / pred:.2f}")
    report["step_costs"] = costs

    fp32 = mtp_spec.load(path, dtype=torch.float32, max_len=1024, compile="auto")
    prompts = [tok.encode(r["prompt"]) for r in suites["code"][:3]]
    prompts += [tok.chat(r["messages"]) for r in suites["chat"][:2]]
    van = [Engine(fp32).generate([p], a.max_new, eos_id=tok.eos_id)[0].token_ids for p in prompts]
    div = {}
    for k in (1, 3):
        spec = [Engine(fp32, make_proposer("mtp", fp32, k)).generate([p], a.max_new, eos_id=tok.eos_id)[0].token_ids
                for p in prompts]
        div[k] = sum(x != y for x, y in zip(van, spec))
    print(f"\n## float32 weights: divergences from vanilla over {len(prompts)} prompts: "
          + ", ".join(f"mtp k={k}: {v}" for k, v in div.items()))
    report["fp32_divergences"] = div
    if a.kernels and C.bf16_dot_kernel() is not None:
        code = [tok.encode(r["prompt"]) for r in suites["code"]]
        report["kernels"] = kernel_ab(model, code, lambda m, s, k, p: _run(m, s, k, p, a.max_new, tok.eos_id))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=str))


def _run(model, strategy: str, k: int, prompt, max_new: int, eos_id: int):
    proposer = make_proposer(strategy, model, k, 2) if strategy != "vanilla" else None
    return Engine(model, proposer).generate([prompt], max_new, eos_id=eos_id)[0]


def kernel_ab(model, prompts, run) -> dict:
    """Vanilla and mtp k=1..3 with each kernel for bf16 weights, interleaved per prompt; step costs."""
    dot, default = C.bf16_dot_kernel(), C._build_dot()

    def with_kernel(lib, strategy, k):
        def go(p):
            C._dot = lib
            try:
                return run(model, strategy, k, p)
            finally:
                C._dot = default
        return go

    kernels = {"avx512-bf16-dot": dot, "avx2": None}
    runners = {f"{s} k={k} [{kn}]": with_kernel(lib, s, k) for kn, lib in kernels.items()
               for s, k in [("vanilla", 0), ("mtp", 1), ("mtp", 2), ("mtp", 3)]}
    recs = interleaved(prompts, runners)
    print(f"\n## the two kernels for bf16 weights: {len(prompts)} code prompts, interleaved")
    print(f"{'runner':30s} {'tok/s':>7s} {'AL':>5s} {'speedup vs its vanilla':>23s} {'dot / avx2 tok/s':>17s}")
    out: dict = {"runs": {}, "step_costs": {}}
    for n, r in recs.items():
        kn = n.split("[")[1][:-1]
        s = summary(r, recs[f"vanilla k=0 [{kn}]"])
        other = summary(recs[n.replace(kn, "avx2")])["tokens_per_s"]
        out["runs"][n] = {k: v for k, v in s.items() if k != "speedup_ci"}
        print(f"{n:30s} {s['tokens_per_s']:7.1f} {s['AL']:5.2f} {s['speedup_median']:22.2f}x "
              f"{s['tokens_per_s'] / other:16.2f}x")
    rounds: dict = {kn: [] for kn in kernels}
    for _ in range(3):  # the kernels take turns, a median over the turns
        for kn, lib in kernels.items():
            C._dot = lib
            rounds[kn].append(step_costs(model, ctx=160))
            C._dot = default
    for kn, runs in rounds.items():
        costs = out["step_costs"][kn] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"   step costs [{kn}]: decode {costs['verify1'] * 1e3:.2f} ms; verify of 2..5 tokens "
              + " ".join(f"x{costs[f'verify{i}'] / costs['verify1']:.2f}" for i in range(2, 6))
              + f"; draft step x{costs['draft_step'] / costs['verify1']:.2f}")
    return out


def _ties(model, prompts, base, recs) -> str:
    """Divergences from vanilla: position and vanilla's top-2 margin there (bf16 weights round at ~2^-8)."""
    out = []
    for p, b, r in zip(prompts, base, recs):
        if b["token_ids"] == r["token_ids"]:
            continue
        pos = next((j for j, (x, y) in enumerate(zip(b["token_ids"], r["token_ids"])) if x != y), None)
        if pos is None:
            out.append("length")
            continue
        ids = torch.tensor([p + b["token_ids"][:pos]])
        with torch.no_grad():
            top = model(ids, logits_at=torch.tensor([[ids.shape[1] - 1]])).logits[0, 0].float().topk(2).values
        out.append(f"@{pos} margin {float(top[0] - top[1]):.4f}")
    return "divergences: " + ", ".join(out)


if __name__ == "__main__":
    main()
