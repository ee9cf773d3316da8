"""`mtp-spec run CONFIG`: a resumable sweep that logs one record per request.

results/<run-id>/
  config.yaml            the resolved config (a resume must match it)
  env.json               versions, device, dtype, git commit, which FP8 path ran
  requests.jsonl         one record per request, appended and flushed as each finishes
  vanilla_recheck.jsonl  vanilla batches measured again at the end of the run (drift check)
  summary.csv            derived metrics per strategy x k x width x temperature x batch x length x category

How it measures. Cells that share a baseline (temperature, batch size, length, seed, repeat) form a
group: vanilla and every strategy and peer of that setting. A group runs in rounds, one batch of
prompts each; in a round every member runs that batch back to back, so a speedup compares runs taken
seconds apart and a machine that drifts or gets busy over minutes moves both sides alike. The order
rotates from round to round: every member starts once in each block of n rounds (n members), in a
seeded shuffled order per block, so no member is always first. Each request records its `round` and
`round_pos` (its place in the round's order). At the end, the first RECHECK_BATCHES batches of every
vanilla cell run again; report.py compares them with their first measurement and flags drift beyond
report.DRIFT_THRESHOLD.

A run killed at any point resumes with `--resume RUN_DIR`: finished requests are skipped, a batch cut
short is run again and only its missing requests are written, so nothing is lost or duplicated. The
rest of a cut round runs in the round's own order; its vanilla keeps its first measurement.
At T=0 every request is checked against the vanilla output of the same prompt: a mismatch is a
lossless violation, shown in the summary and in the exit code. A member that runs before vanilla in
its round holds its records until vanilla's output is known (a kill there only costs the rerun).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import mtp_spec.parallel as parallel
from mtp_spec.experiment import schema
from mtp_spec.experiment.records import COSTS, RECHECK, REQUESTS, read_records, repair_tail
from mtp_spec.experiment.schema import Cell, Experiment
from mtp_spec.io import atomic_write_text

RECHECK_BATCHES = 3  # per vanilla cell: a few prompts, enough for a median, cheap next to the run


def config_hash(exp: Experiment) -> str:
    return hashlib.sha256(json.dumps(exp.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(exp: Experiment, weights: str) -> dict:
    import mtp_spec

    env = {"mtp_spec": mtp_spec.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "device": exp.device, "dtype": exp.dtype, "commit": git_commit(),
           "threads": torch.get_num_threads(), "weights": weights, "compile": exp.compile}
    if exp.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


class Runner:
    def __init__(self, exp: Experiment):
        from mtp_spec.loader import dtype_of, load
        from mtp_spec.tokenizer import load_tokenizer

        self.exp = exp
        self.model_dir = schema.resolve_model(exp.model)
        self.tok = load_tokenizer(self.model_dir)
        if self.tok is None:
            raise schema.ExperimentConfigError(f"{self.model_dir}: experiments need a tokenizer.json")
        self.prompts = []
        for s in exp.suites:
            self.prompts += schema.load_prompts(schema.resolve_suite(s), exp.prompts_per_suite)
        self.ids = [self.tok.chat(p["messages"]) if "messages" in p else self.tok.encode(p["prompt"])
                    for p in self.prompts]
        max_new = max(exp.sweep.max_new_tokens)
        from mtp_spec.decoding.strategies import AUTO_K_MAX

        depth = lambda s: max(AUTO_K_MAX if k == "auto" else k for k in s.k)
        kmax = max((depth(s) * (max(s.tree_width) if s.name == "mtp-tree" else 1) for s in exp.strategies), default=1)
        self.dtype = dtype_of(exp.dtype)
        max_len = max(len(i) for i in self.ids) + max_new + kmax + 8
        self.model = load(self.model_dir, device=exp.device, dtype=self.dtype, max_len=max_len,
                          mtp_hidden=exp.mtp_hidden, compile=exp.compile)
        self.auto: dict[int, object] = {}  # k=auto proposers by draft vocabulary (see proposer)
        self.trace: list | None = None  # the last k=auto batch's chooser, step by step (see generate)
        self.heads = None  # draft vocabularies (draft_vocab), each sub-head built on first use
        if any(n for s in exp.strategies for n in s.draft_vocab):
            from mtp_spec.draft_vocab import DraftHeads

            self.heads = DraftHeads(self.model, self.model_dir, where=f"{exp.name}: draft_vocab")
        self.draft = None
        if exp.draft_model:
            self.draft = load(schema.resolve_model(exp.draft_model), device=exp.device, dtype=self.dtype,
                              part="main", max_len=self.model.max_len, compile=exp.compile)

    def proposer(self, cell: Cell):
        from mtp_spec.decoding.strategies import make_proposer

        spec = next((s for s in self.exp.strategies if s.name == cell.strategy), None)
        if self.heads is not None and cell.strategy in schema.MTP_DRAFTERS:
            self.heads.use(cell.draft_vocab)  # before the proposer: k=auto measures the draft step it gets
        if cell.k == "auto":  # one per draft vocabulary: its cost table is measured once, and its
            # acceptance prior learns from every request it serves (reset() starts each batch)
            if cell.draft_vocab not in self.auto:  # measured at the run's batch sizes, not extrapolated
                self.auto[cell.draft_vocab] = make_proposer(cell.strategy, self.model, "auto",
                                                            batches=sorted(set(self.exp.sweep.batch_size)))
            return self.auto[cell.draft_vocab]
        return make_proposer(cell.strategy, self.model, cell.k, cell.tree_width, self.draft,
                             spec.ngram_max if spec else 3)

    def generate(self, cell: Cell, idx: list[int]):
        from mtp_spec.decoding.engine import Engine
        from mtp_spec.decoding.sampling import SamplingParams

        if cell.strategy in schema.PEERS:
            return self.peer(cell, idx)
        sp = SamplingParams(cell.temperature, self.exp.sweep.top_k, self.exp.sweep.top_p)
        proposer = self.proposer(cell)
        engine = Engine(self.model, proposer)
        t0 = time.perf_counter()
        res = engine.generate([self.ids[i] for i in idx], cell.max_new_tokens, sp,
                              seed=cell.seed * 7919 + idx[0], eos_id=self.tok.eos_id)
        if self.exp.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        trace = getattr(proposer, "trace", None)  # k=auto: what its chooser saw, step by step
        self.trace = list(trace) if trace is not None else None
        return res, wall

    @torch.no_grad()
    def peer(self, cell: Cell, idx: list[int]):
        """transformers on the same directory and prompts, greedy (with prompt lookup for
        'transformers-lookup'), one prompt at a time; timed like our requests."""
        from mtp_spec.decoding.engine import Result
        from mtp_spec.decoding.strategies import peer_generate
        from mtp_spec.metrics import SpecMetrics

        if getattr(self, "hf", None) is None:
            import transformers

            try:
                self.hf = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).eval()
            except Exception as e:  # transformers' own errors, e.g. FP8 weights on a CPU
                raise schema.ExperimentConfigError(f"peers: transformers cannot run {self.model_dir} ({e}); "
                                                   "use a bf16 checkpoint (mtp-spec convert --to bf16)") from None
        out, t0 = [], time.perf_counter()
        for i in idx:
            s0 = time.perf_counter()
            new = peer_generate(self.hf, self.ids[i], cell.max_new_tokens, self.tok.eos_id,
                                3 if cell.strategy == "transformers-lookup" else None)
            m = SpecMetrics(num_steps=len(new), num_generated=len(new), total_s=time.perf_counter() - s0)
            out.append(Result(new, "eos" if new and new[-1] == self.tok.eos_id else "length", m))
        return out, time.perf_counter() - t0

    @torch.no_grad()
    def divergence(self, prompt: list[int], ref: list[int], got: list[int]) -> dict:
        """Where a greedy output first left vanilla's, and vanilla's top-2 logit margin there. A margin
        within the rounding of the weights' dtype is a numerical tie: a forward of k+1 tokens need not
        round like one of a single token (unless every kernel is batch-invariant), so either token
        is the model's greedy choice. A larger margin is a real violation."""
        pos = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        ids = torch.tensor([prompt + ref[:pos]], device=next(self.model.parameters()).device)
        top = self.model(ids, logits_at=torch.tensor([[ids.shape[1] - 1]], device=ids.device)).logits[0, 0]
        best = top.float().topk(2)
        margin = float(best.values[0] - best.values[1])
        eps = torch.finfo(self.dtype).eps * float(best.values.abs().max()) * 8  # 8: accumulated rounding
        return {"position": pos, "vanilla_token": ref[pos] if pos < len(ref) else None,
                "token": got[pos] if pos < len(got) else None, "margin": margin, "tie_threshold": eps,
                "tie": margin <= eps}

    def measure_costs(self):
        """The cost table (decoding/cost.py) at the run's batch sizes and depths, full draft head:
        the report predicts each fixed-k MTP cell's speedup from it and the cell's acceptance."""
        from mtp_spec.decoding.cost import measure

        ks = [k for s in self.exp.strategies if s.name == "mtp" for k in s.k if k != "auto"]
        if not ks or self.model.mtp is None:
            return None
        if self.heads is not None:
            self.heads.use(0)
        return measure(self.model, sorted(set(self.exp.sweep.batch_size)), range(1, max(ks) + 2),
                       max_len=min(256, self.model.max_len))

    def warmup(self) -> None:
        seen = set()
        for cell in schema.cells(self.exp):
            key = (cell.strategy, cell.k, cell.tree_width, cell.draft_vocab)
            if key not in seen:
                seen.add(key)
                for _ in range(self.exp.warmup):
                    self.generate(Cell(cell.strategy, cell.k, cell.tree_width, 0.0, 1, 4, 0, 0, cell.draft_vocab), [0])


@dataclass(frozen=True)
class Round:
    """One batch of prompts under every cell of a group, run back to back in `cells` order."""

    index: int  # the round's number within its group
    cells: tuple[Cell, ...]
    idx: tuple[int, ...]


def groups(exp: Experiment) -> list[list[Cell]]:
    """Cells that share a baseline (vanilla first), in sweep order."""
    out: dict[Cell, list[Cell]] = {}
    for cell in schema.cells(exp):
        out.setdefault(cell.baseline(), []).append(cell)
    return list(out.values())


def starts(n_members: int, n_rounds: int, seed: int) -> list[int]:
    """Which member starts each round: each member once in every block of n_members rounds, the
    blocks shuffled with a fixed seed. Plain j mod n would line up with a period in the prompts
    (categories sampled round-robin), e.g. vanilla always first on one of two categories."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n_rounds:
        block = list(range(n_members))
        rng.shuffle(block)
        out += block
    return out[:n_rounds]


def plan(exp: Experiment, n_prompts: int) -> list[Round]:
    """Rounds in run order: each group's batches in turn, each round's members rotated (`starts`)."""
    out = []
    for g, members in enumerate(groups(exp)):
        b = members[0].batch_size
        los = range(0, n_prompts, b)
        for j, (lo, r) in enumerate(zip(los, starts(len(members), len(los), seed=g))):
            out.append(Round(j, tuple(members[r:] + members[:r]), tuple(range(lo, min(lo + b, n_prompts)))))
    return out


def recheck_plan(exp: Experiment, n_prompts: int) -> list[tuple[Cell, list[int]]]:
    """Vanilla batches to measure again at the end: each vanilla cell's first few, the earliest it ran."""
    return [(r.cells[0].baseline(), list(r.idx)) for r in plan(exp, n_prompts) if r.index < RECHECK_BATCHES]


class Log:
    """Appends records to requests.jsonl as they finish, checking each against vanilla's output."""

    def __init__(self, fh, runner: Runner, records: list[dict], bar):
        self.fh, self.runner, self.bar = fh, runner, bar
        self.done = {(r["cell"], r["prompt_id"]) for r in records}
        self.vanilla = {(r["cell"], r["prompt_id"]): r["token_ids"] for r in records if r["strategy"] == "vanilla"}
        self.accepted = self.drafts = 0

    def missing(self, cell: Cell, idx: tuple[int, ...]) -> bool:
        return any((cell.key(), self.runner.prompts[i]["id"]) not in self.done for i in idx)

    def round(self, rnd: Round) -> None:
        held = []  # records waiting for this round's vanilla output
        for pos, cell in enumerate(rnd.cells):
            if not self.missing(cell, rnd.idx):
                continue
            res, wall = self.runner.generate(cell, list(rnd.idx))
            batch_tokens = sum(len(r.token_ids) for r in res)
            for i, r in zip(rnd.idx, res):
                p = self.runner.prompts[i]
                if (cell.key(), p["id"]) in self.done:
                    continue
                rec = {**_record(cell, p, r, wall, batch_tokens, self.runner), "round": rnd.index, "round_pos": pos}
                if cell.strategy == "vanilla":
                    self.vanilla[(cell.key(), p["id"])] = r.token_ids
                    self.write(cell, i, rec)
                elif cell.temperature == 0 and (cell.baseline().key(), p["id"]) not in self.vanilla:
                    held.append((cell, i, rec))
                else:
                    self.write(cell, i, rec)
            if cell.strategy == "vanilla":
                held = self.flush(held)
            self.bar.set_postfix(AL=f"{1 + self.accepted / self.drafts:.2f}" if self.drafts else "-")
        self.flush(held)  # every round has vanilla, so nothing is left here; kept so that nothing is dropped

    def flush(self, held: list) -> list:
        for args in held:
            self.write(*args)
        return []

    def write(self, cell: Cell, i: int, rec: dict) -> None:
        ref = self.vanilla.get((cell.baseline().key(), rec["prompt_id"]))
        got = rec["token_ids"]
        if cell.strategy in schema.PEERS:  # another implementation: not a lossless check
            rec["same_as_vanilla"] = None if ref is None else got == ref
        elif cell.strategy != "vanilla" and cell.temperature == 0 and ref is not None:
            rec["lossless"] = got == ref
            if not rec["lossless"]:
                rec["divergence"] = self.runner.divergence(self.runner.ids[i], ref, got)
                rec["lossless"] = "tie" if rec["divergence"]["tie"] else False
        _append(self.fh, rec)
        self.done.add((rec["cell"], rec["prompt_id"]))
        self.accepted += rec["num_accepted_tokens"]
        self.drafts += rec["num_drafts"]
        self.bar.update(1)


def _append(fh, rec: dict) -> None:
    if fh is None:  # ranks > 0 write nothing
        return
    fh.write(json.dumps(rec) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def recheck(runner: Runner, path: Path | None, vanilla: dict, done: set) -> None:
    """Run the recheck plan's missing batches (`done`: the (cell, prompt) pairs already in `path`); each
    request's line holds the new batch throughput. path None: run them, write nothing (ranks > 0)."""
    with open(path, "a") if path else nullcontext() as fh:
        for cell, idx in recheck_plan(runner.exp, len(runner.prompts)):
            ids = [runner.prompts[i]["id"] for i in idx]
            if all((cell.key(), p) in done for p in ids):
                continue
            res, wall = runner.generate(cell, idx)
            tps = sum(len(r.token_ids) for r in res) / wall if wall > 0 else 0.0
            for p, r in zip(ids, res):
                if (cell.key(), p) not in done and fh:
                    _append(fh, {"cell": cell.key(), "prompt_id": p, "batch_wall_s": wall, "batch_tokens_per_s": tps,
                                 "same_tokens": r.token_ids == vanilla.get((cell.key(), p))})


def _on_main(fn):
    """fn() on rank 0 only, its result (or its error) on every rank: under torchrun rank 0 alone reads
    and writes the run directory, and every rank must take the same path through the run."""
    out = err = None
    if parallel.is_main():
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (re-raised on every rank below)
            err = e
    out, err = parallel.broadcast_object((out, err))
    if err is not None:
        err.every_rank = err.same_on_every_rank = True  # the CLI reports it once, from rank 0
        raise err
    return out


def _check_resume(exp: Experiment, run_dir: Path) -> None:
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise schema.ExperimentConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    old = yaml.safe_load(saved.read_text())
    if old.get("config_hash") != config_hash(exp):
        raise schema.ExperimentConfigError(
            f"{run_dir}: refusing to resume with a different config than {saved} (hash {old.get('config_hash')}"
            f" != {config_hash(exp)})")
    env = run_dir / "env.json"
    size = json.loads(env.read_text()).get("world_size", 1) if env.exists() else 1
    if size != parallel.world().size:  # timings from two world sizes would mix in one table
        raise schema.ExperimentConfigError(f"{run_dir}: started at world size {size}; resume it at the same size "
                                           f"(torchrun --nproc-per-node ...), not {parallel.world().size}")


def _open_run(exp: Experiment, run_dir: Path, resume: bool, weights: str) -> tuple[list[dict], set, bool]:
    """Create or reopen the run directory; the records so far, the (cell, prompt) pairs rechecked and
    whether the cost table was measured."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({"config_hash": config_hash(exp), **exp.to_dict()},
                                                                  sort_keys=False))
        env = {**environment(exp, weights), "world_size": parallel.world().size}
        atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2))
    repair_tail(run_dir / REQUESTS)
    repair_tail(run_dir / RECHECK)
    rechecked = {(r["cell"], r["prompt_id"]) for r in read_records(run_dir / RECHECK)}
    return read_records(run_dir / REQUESTS), rechecked, (run_dir / COSTS).exists()


def run(config: str | Path, out: str | Path = "results", resume: str | Path | None = None,
        dry_run: bool = False, progress: bool = True) -> Path | None:
    """Run (or resume) an experiment. Under torchrun every rank runs every request in the same order
    (the model is split across them); rank 0 alone reads and writes the run directory."""
    from tqdm import tqdm

    from mtp_spec.experiment.report import DRIFT_THRESHOLD, write_summary
    from mtp_spec.loader import weights_path

    exp = schema.load(config)
    if resume:
        run_dir = Path(resume)
        _on_main(lambda: _check_resume(exp, run_dir))
    else:  # rank 0's clock names the directory
        run_dir = _on_main(lambda: Path(out) / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if dry_run:
        n = sum(len(schema.load_prompts(schema.resolve_suite(s), exp.prompts_per_suite)) for s in exp.suites)
        rounds = plan(exp, n)
        print(f"{exp.name}: {len(schema.cells(exp))} cells x {n} prompts = "
              f"{sum(len(r.cells) * len(r.idx) for r in rounds)} requests in {sum(len(r.cells) for r in rounds)} "
              f"batches ({len(rounds)} interleaved rounds, {len(recheck_plan(exp, n))} vanilla rechecks) -> {run_dir}")
        return None
    runner = Runner(exp)
    main = parallel.is_main()
    records, rechecked, has_costs = _on_main(lambda: _open_run(exp, run_dir, bool(resume), weights_path(runner.model)))
    req_path = run_dir / REQUESTS
    rounds = plan(exp, len(runner.prompts))
    total = sum(len(r.cells) * len(r.idx) for r in rounds)
    bar = tqdm(total=total, initial=len(records), disable=not progress or not main, desc=exp.name, dynamic_ncols=True)
    with open(req_path, "a") if main else nullcontext() as fh:
        log = Log(fh, runner, records, bar)
        todo = [r for r in rounds if any(log.missing(c, r.idx) for c in r.cells)]
        if todo or any((c.key(), runner.prompts[i]["id"]) not in rechecked
                       for c, idx in recheck_plan(exp, len(runner.prompts)) for i in idx):
            runner.warmup()
            cost = None if has_costs else runner.measure_costs()  # every rank: the forwards are collective
            if cost is not None and main:
                cost.save(run_dir / COSTS)
        for rnd in todo:
            log.round(rnd)
    bar.close()
    recheck(runner, run_dir / RECHECK if main else None, log.vanilla, rechecked)
    if not main:
        return run_dir
    env_file = run_dir / "env.json"
    if env_file.exists():  # how the step path ran, compile time included, for the report
        env = json.loads(env_file.read_text())
        env["steps"] = runner.model.steps.summary()
        atomic_write_text(env_file, json.dumps(env, indent=2))
    s = write_summary(run_dir)
    violations = int(s["lossless_violations"].sum())
    if violations:
        print(f"LOSSLESS CHECK FAILED: {violations} request(s) differ from vanilla at T=0 (see {run_dir}/summary.csv)",
              file=sys.stderr)
    for drift in s.loc[s["drift_flag"], "vanilla_drift"].unique():
        print(f"VANILLA DRIFT: vanilla measured again at the end of the run is {drift:+.1%} off its first "
              f"measurement (threshold {DRIFT_THRESHOLD:.0%}): the machine changed speed during the run; "
              f"prefer the per-prompt median speedups (see {run_dir}/summary.csv)", file=sys.stderr)
    return run_dir


def _record(cell: Cell, prompt: dict, r, wall: float, batch_tokens: int, runner: Runner) -> dict:
    m = r.metrics
    return {
        "cell": cell.key(), "cell_fields": cell.__dict__, "prompt_id": prompt["id"], "category": prompt["category"],
        "strategy": cell.strategy, "k": cell.k, "tree_width": cell.tree_width, "draft_vocab": cell.draft_vocab,
        "temperature": cell.temperature,
        "batch_size": cell.batch_size, "max_new_tokens": cell.max_new_tokens, "seed": cell.seed,
        "repeat": cell.repeat, "prompt_len": len(runner.ids[runner.prompts.index(prompt)]),
        "token_ids": r.token_ids, "finish_reason": r.finish_reason, "num_generated": m.num_generated,
        "num_steps": m.num_steps, "num_drafts": m.num_drafts, "num_draft_tokens": m.num_draft_tokens,
        "num_accepted_tokens": m.num_accepted_tokens, "accepted_per_pos": m.accepted_per_pos,
        "steps_per_k": m.steps_per_k,
        "acceptance_len": m.acceptance_len, "acceptance_rate": m.acceptance_rate, "ttft_s": m.ttft_s,
        "tpot_s": m.tpot_s, "total_s": m.total_s, "tokens_per_s": m.tokens_per_s, "batch_wall_s": wall,
        "batch_tokens_per_s": batch_tokens / wall if wall > 0 else 0.0, "lossless": None, "lossy": r.lossy,
        "device": runner.exp.device, "dtype": runner.exp.dtype,
        # k=auto: the batch's chooser per step, [k chosen (-1: drafting off for the batch), predicted
        # tokens/s of the best depth > 0 over plain decoding's, the machine's pace (step times over the
        # cost table's), that depth's step time over its table time (its own ratio, else the pace)]
        "auto_trace": runner.trace if cell.k == "auto" else None,
    }
