"""Quality of a trained model on held-out data: perplexity of the main model and of the MTP head
(predicting t+2), MTP acceptance at k=1 and acceptance length at k=3 (greedy, batch 1), per suite,
and a few sample continuations.

    python experiments/eval_quality.py [--model DIR] [--n-prompts 50] [--out results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import mtp_spec
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer
from mtp_spec.experiment.schema import load_prompts, resolve_suite
from mtp_spec.loader import default_model
from mtp_spec.tokenizer import load_tokenizer
from mtp_spec.train import corpus


@torch.no_grad()
def perplexities(model, tok, texts: list[str], window: int = 256, max_windows: int = 40) -> tuple[float, float]:
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_bos=False) + [tok.eos_id]
    main_nll = mtp_nll = 0.0
    n_main = n_mtp = 0
    for w in range(min(max_windows, len(ids) // (window + 1))):
        x = torch.tensor([ids[w * (window + 1):(w + 1) * (window + 1)]])
        inp = x[:, :-1]
        out = model(inp)
        main_nll += F.cross_entropy(out.logits[0], x[0, 1:], reduction="sum").item()
        n_main += window
        h = out.hidden_states if model.mtp.hidden_input == "post" else out.prenorm_hidden
        logits = model.mtp(inp[:, 1:], h[:, :-1]).logits
        mtp_nll += F.cross_entropy(logits[0], x[0, 2:], reduction="sum").item()
        n_mtp += window - 1
    return math.exp(main_nll / n_main), math.exp(mtp_nll / n_mtp)


def acceptance(model, tok, prompts: list[list[int]], k: int, max_new: int) -> dict:
    res = [Engine(model, MTPProposer(model, k)).generate([p], max_new, eos_id=tok.eos_id)[0] for p in prompts]
    drafts = sum(r.metrics.num_drafts for r in res)
    dtoks = sum(r.metrics.num_draft_tokens for r in res)
    acc = sum(r.metrics.num_accepted_tokens for r in res)
    return {"AR": acc / dtoks, "AL": 1 + acc / drafts, "requests": len(res)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--n-prompts", type=int, default=50)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--out", default="results/quality.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    path = Path(a.model) if a.model else default_model()
    tok = load_tokenizer(path)
    model = mtp_spec.load(path, dtype=torch.float32, max_len=1024)
    _, held = corpus.split(corpus.stdlib_docs())
    texts = {"code": [d.text for d in held if not d.is_topic], "prose": [d.text for d in held if d.is_topic]}
    out: dict = {"model": str(path)}
    print(f"held-out data, greedy, batch 1, {a.n_prompts} prompts per suite x {a.max_new} new tokens")
    print(f"{'suite':6} {'main ppl':>9} {'MTP ppl':>8} {'AR k=1':>7} {'AL k=1':>7} {'AR k=3':>7} {'AL k=3':>7}")
    for suite in ("code", "prose"):
        ppl_main, ppl_mtp = perplexities(model, tok, texts[suite])
        prompts = [tok.encode(p["prompt"]) for p in load_prompts(resolve_suite(suite), a.n_prompts)]
        k1 = acceptance(model, tok, prompts, 1, a.max_new)
        k3 = acceptance(model, tok, prompts, 3, a.max_new)
        out[suite] = {"ppl_main": ppl_main, "ppl_mtp": ppl_mtp, "k1": k1, "k3": k3}
        print(f"{suite:6} {ppl_main:9.2f} {ppl_mtp:8.2f} {k1['AR']:7.3f} {k1['AL']:7.2f} {k3['AR']:7.3f} "
              f"{k3['AL']:7.2f}")
    samples = []
    for p in load_prompts(resolve_suite("code"), 3):
        ids = tok.encode(p["prompt"])
        r = Engine(model, MTPProposer(model, 3)).generate([ids], 48, eos_id=tok.eos_id)[0]
        samples.append({"prompt": p["prompt"], "continuation": tok.decode(r.token_ids),
                        "AL": r.metrics.acceptance_len})
    out["samples"] = samples
    for s in samples:
        print(f"\n--- prompt ---\n{s['prompt']}--- continuation (AL {s['AL']:.2f}) ---\n{s['continuation']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
