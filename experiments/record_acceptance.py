"""Record a model's MTP acceptance per draft position, for `--k auto` to start from.

Runs the MTP chain at a fixed depth k (greedy, batch 1) over prompts spread across the given suites,
and writes the conditional acceptance p_j = P(draft j accepted | drafts 1..j-1 accepted) to
`acceptance.json` beside the checkpoint (or --out; for smollm2-135m the shipped copy in
mtp_spec/assets/smollm2, which the import refreshes). Without it `auto` starts at 0.5 per position
and learns the rest online. The prompts are spread over each suite from line --offset; some of them
are among the benchmarks' and studies' prompts too.

    python experiments/record_acceptance.py --model smollm2-135m --suites code,chat [--n 16] [--k 4]
        [--max-new 64] [--out mtp_spec/assets/smollm2/acceptance.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mtp_spec
from mtp_spec.decoding.cost import PRIOR_FILE
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.strategies import make_proposer
from mtp_spec.experiment.schema import load_prompts, resolve_suite
from mtp_spec.io import atomic_write_text
from mtp_spec.loader import SMOLLM2_MTP, resolve_model
from mtp_spec.metrics import SpecMetrics
from mtp_spec.tokenizer import load_tokenizer


def conditional(m: SpecMetrics, k: int) -> list[float]:
    """p_1..p_k from a fixed-depth run's counts; a position reached but never accepted is 0, one never
    reached repeats the last rate."""
    counts = m.accepted_per_pos + [0] * (k - len(m.accepted_per_pos))
    out, reached = [], m.num_drafts
    for c in counts[:k]:
        out.append(c / reached if reached else (out[-1] if out else 0.0))
        reached = c
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--suites", default="code,chat")
    ap.add_argument("--n", type=int, default=16, help="prompts per suite")
    ap.add_argument("--offset", type=int, default=2, help="first line taken in each suite")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help=f"default: {PRIOR_FILE} in the model's directory")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    if tok is None:
        sys.exit(f"--model {path}: no tokenizer.json to encode the suites' prompts with")
    model = mtp_spec.load(path, max_len=1024, compile="auto")
    if model.mtp is None:
        sys.exit(f"--model {path}: no MTP layer to record acceptance of")
    engine = Engine(model, make_proposer("mtp", model, a.k))
    per_suite, total = {}, SpecMetrics()
    t0 = time.perf_counter()
    for suite in a.suites.split(","):
        rows = load_prompts(resolve_suite(suite))
        rows = rows[a.offset:: max(1, (len(rows) - a.offset) // a.n)][: a.n]
        prompts = [tok.encode(r["prompt"]) if "prompt" in r else tok.chat(r["messages"]) for r in rows]
        m = SpecMetrics()
        for p in prompts:  # batch 1, as `generate` runs one prompt
            m = m.merge(engine.generate([p], a.max_new, eos_id=tok.eos_id)[0].metrics)
        per_suite[suite] = {"prompts": len(prompts), "drafts": m.num_drafts, "conditional": conditional(m, a.k),
                            "acceptance_len": m.acceptance_len}
        total = total.merge(m)
        print(f"{suite}: {len(prompts)} prompts, AL {m.acceptance_len:.2f}, conditional "
              + " ".join(f"{p:.3f}" for p in per_suite[suite]["conditional"]))
    if not total.num_drafts:
        sys.exit("no step drafted anything: nothing to record")
    out = {"conditional": [round(p, 4) for p in conditional(total, a.k)],
           "source": f"mtp k={a.k}, greedy, batch 1, {a.max_new} new tokens, {a.n} prompts per suite "
                     f"(offset {a.offset}) of {a.suites}; experiments/record_acceptance.py",
           "acceptance_len": round(total.acceptance_len, 4), "suites": per_suite,
           "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    # the import directory's copy of SmolLM2's file is replaced by the shipped one on every load
    shipped = SMOLLM2_MTP.with_name(PRIOR_FILE) if a.model == "smollm2-135m" else path / PRIOR_FILE
    dst = Path(a.out) if a.out else shipped
    atomic_write_text(dst, json.dumps(out, indent=1) + "\n")
    print(f"all: AL {total.acceptance_len:.2f}, conditional {out['conditional']} -> {dst}")


if __name__ == "__main__":
    main()
