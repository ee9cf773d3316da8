"""Generation acceptance of MTP layer files for SmolLM2-135M: the first 8 code and 8 chat prompts of
the held-out suites, 96 tokens, greedy, bf16 weights, fast path, k = 1..3; AL, AR and tokens/s per
layer. Each file is tried in a copy of the imported model directory (/tmp/smol-NAME).

    python experiments/compare_mtp_layers.py NAME=PATH/mtp.safetensors [NAME2=PATH2 ...]
"""
import shutil
import sys
import time
from pathlib import Path

import torch

import mtp_spec
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer
from mtp_spec.experiment.schema import load_prompts, resolve_suite
from mtp_spec.loader import resolve_model
from mtp_spec.tokenizer import load_tokenizer


def main() -> None:
    torch.set_num_threads(2)
    base = resolve_model("smollm2-135m")
    tok = load_tokenizer(base)
    suites = {s: load_prompts(resolve_suite(s))[:n] for s, n in (("code", 8), ("chat", 8))}
    for name, f in [(a.split("=")[0], a.split("=")[1]) for a in sys.argv[1:]]:
        d = Path(f"/tmp/smol-{name}")
        if not d.exists():
            shutil.copytree(base, d)
        shutil.copyfile(f, d / "mtp.safetensors")
        model = mtp_spec.load(d, max_len=512, compile="auto")
        for suite, ps in suites.items():
            ids = [tok.chat(p["messages"]) if "messages" in p else tok.encode(p["prompt"], add_bos=False) for p in ps]
            for k in (1, 2, 3):
                acc = drafted = steps = gen = 0
                t0 = time.perf_counter()
                for x in ids:
                    r = Engine(model, MTPProposer(model, k)).generate([x], 96, eos_id=tok.eos_id)[0]
                    m = r.metrics
                    acc, drafted = acc + m.num_accepted_tokens, drafted + m.num_draft_tokens
                    steps, gen = steps + m.num_drafts, gen + len(r.token_ids)
                print(f"{name} {suite} k={k}: AL {1 + acc / max(steps, 1):.2f} AR {acc / max(drafted, 1):.3f} "
                      f"({gen / (time.perf_counter() - t0):.1f} tok/s)", flush=True)


if __name__ == "__main__":
    main()
