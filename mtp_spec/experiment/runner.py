"""`mtp-spec run CONFIG`: a resumable sweep that logs one record per request.

results/<run-id>/
  config.yaml       the resolved config (a resume must match it)
  env.json          versions, device, dtype, git commit, which FP8 path ran
  requests.jsonl    one record per request, appended and flushed as each finishes
  summary.csv       derived metrics per strategy x k x width x temperature x batch x length x category
A run killed at any point resumes with `--resume RUN_DIR`: finished requests are skipped, a batch cut
short is run again and only its missing requests are written, so nothing is lost or duplicated.
At T=0 every request is checked against the vanilla output of the same prompt: a mismatch is a
lossless violation, shown in the summary and in the exit code.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from mtp_spec.experiment import schema
from mtp_spec.experiment.records import read_records, repair_tail
from mtp_spec.experiment.schema import Cell, Experiment
from mtp_spec.io import atomic_write_text


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
        kmax = max((max(s.k) * (max(s.tree_width) if s.name == "mtp-tree" else 1) for s in exp.strategies), default=1)
        self.dtype = dtype_of(exp.dtype)
        max_len = max(len(i) for i in self.ids) + max_new + kmax + 8
        self.model = load(self.model_dir, device=exp.device, dtype=self.dtype, max_len=max_len,
                          mtp_hidden=exp.mtp_hidden, compile=exp.compile)
        self.draft = None
        if exp.draft_model:
            self.draft = load(schema.resolve_model(exp.draft_model), device=exp.device, dtype=self.dtype,
                              part="main", max_len=self.model.max_len, compile=exp.compile)

    def proposer(self, cell: Cell):
        from mtp_spec.decoding.strategies import make_proposer

        spec = next((s for s in self.exp.strategies if s.name == cell.strategy), None)
        return make_proposer(cell.strategy, self.model, cell.k, cell.tree_width, self.draft,
                             spec.ngram_max if spec else 3)

    def generate(self, cell: Cell, idx: list[int]):
        from mtp_spec.decoding.engine import Engine
        from mtp_spec.decoding.sampling import SamplingParams

        if cell.strategy in schema.PEERS:
            return self.peer(cell, idx)
        sp = SamplingParams(cell.temperature, self.exp.sweep.top_k, self.exp.sweep.top_p)
        engine = Engine(self.model, self.proposer(cell))
        t0 = time.perf_counter()
        res = engine.generate([self.ids[i] for i in idx], cell.max_new_tokens, sp,
                              seed=cell.seed * 7919 + idx[0], eos_id=self.tok.eos_id)
        if self.exp.device.startswith("cuda"):
            torch.cuda.synchronize()
        return res, time.perf_counter() - t0

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

    def warmup(self) -> None:
        seen = set()
        for cell in schema.cells(self.exp):
            key = (cell.strategy, cell.k, cell.tree_width)
            if key not in seen:
                seen.add(key)
                for _ in range(self.exp.warmup):
                    self.generate(Cell(cell.strategy, cell.k, cell.tree_width, 0.0, 1, 4, 0, 0), [0])


def plan(exp: Experiment, n_prompts: int) -> list[tuple[Cell, list[int]]]:
    """(cell, prompt indices) batches, in run order."""
    out = []
    for cell in schema.cells(exp):
        for lo in range(0, n_prompts, cell.batch_size):
            out.append((cell, list(range(lo, min(lo + cell.batch_size, n_prompts)))))
    return out


def run(config: str | Path, out: str | Path = "results", resume: str | Path | None = None,
        dry_run: bool = False, progress: bool = True) -> Path | None:
    from tqdm import tqdm

    from mtp_spec.experiment.report import write_summary
    from mtp_spec.loader import weights_path

    exp = schema.load(config)
    if resume:
        run_dir = Path(resume)
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise schema.ExperimentConfigError(f"{run_dir}: not a run directory (no config.yaml)")
        old = yaml.safe_load(saved.read_text())
        if old.get("config_hash") != config_hash(exp):
            raise schema.ExperimentConfigError(
                f"{run_dir}: refusing to resume with a different config than {saved} (hash {old.get('config_hash')}"
                f" != {config_hash(exp)})")
    else:
        run_dir = Path(out) / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dry_run:
        n = sum(min(exp.prompts_per_suite or 10**9, len(schema.load_prompts(schema.resolve_suite(s))))
                for s in exp.suites)
        batches = plan(exp, n)
        print(f"{exp.name}: {len(schema.cells(exp))} cells x {n} prompts = "
              f"{sum(len(b) for _, b in batches)} requests in {len(batches)} batches -> {run_dir}")
        return None
    runner = Runner(exp)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"config_hash": config_hash(exp), **exp.to_dict()},
                                                            sort_keys=False))
        (run_dir / "env.json").write_text(json.dumps(environment(exp, weights_path(runner.model)), indent=2))
    req_path = run_dir / "requests.jsonl"
    repair_tail(req_path)
    records = read_records(req_path)
    done = {(r["cell"], r["prompt_id"]) for r in records}
    vanilla = {(Cell(**r["cell_fields"]).key(), r["prompt_id"]): r["token_ids"] for r in records
               if r["strategy"] == "vanilla"}
    batches = plan(exp, len(runner.prompts))
    todo = [(c, idx) for c, idx in batches if any((c.key(), runner.prompts[i]["id"]) not in done for i in idx)]
    total = sum(len(idx) for _, idx in batches)
    if todo:
        runner.warmup()
    bar = tqdm(total=total, initial=total - sum(len(i) for _, i in todo), disable=not progress, desc=exp.name,
               dynamic_ncols=True)
    accepted = drafts = 0
    with open(req_path, "a") as fh:
        for cell, idx in todo:
            res, wall = runner.generate(cell, idx)
            batch_tokens = sum(len(r.token_ids) for r in res)
            for i, r in zip(idx, res):
                p = runner.prompts[i]
                if (cell.key(), p["id"]) in done:
                    continue
                rec = _record(cell, p, r, wall, batch_tokens, runner)
                ref = vanilla.get((cell.baseline().key(), p["id"]))
                if cell.strategy == "vanilla":
                    vanilla[(cell.key(), p["id"])] = r.token_ids
                elif cell.strategy in schema.PEERS:  # another implementation: not a lossless check
                    rec["same_as_vanilla"] = None if ref is None else r.token_ids == ref
                elif cell.temperature == 0 and ref is not None:
                    rec["lossless"] = r.token_ids == ref
                    if not rec["lossless"]:
                        rec["divergence"] = runner.divergence(runner.ids[i], ref, r.token_ids)
                        rec["lossless"] = "tie" if rec["divergence"]["tie"] else False
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                accepted += r.metrics.num_accepted_tokens
                drafts += r.metrics.num_drafts
                bar.update(1)
            bar.set_postfix(AL=f"{1 + accepted / drafts:.2f}" if drafts else "-")
    bar.close()
    env_file = run_dir / "env.json"
    if env_file.exists():  # how the step path ran, compile time included, for the report
        env = json.loads(env_file.read_text())
        env["steps"] = runner.model.steps.summary()
        atomic_write_text(env_file, json.dumps(env, indent=2))
    violations = write_summary(run_dir)
    if violations:
        print(f"LOSSLESS CHECK FAILED: {violations} request(s) differ from vanilla at T=0 (see {run_dir}/summary.csv)",
              file=sys.stderr)
    return run_dir


def _record(cell: Cell, prompt: dict, r, wall: float, batch_tokens: int, runner: Runner) -> dict:
    m = r.metrics
    return {
        "cell": cell.key(), "cell_fields": cell.__dict__, "prompt_id": prompt["id"], "category": prompt["category"],
        "strategy": cell.strategy, "k": cell.k, "tree_width": cell.tree_width, "temperature": cell.temperature,
        "batch_size": cell.batch_size, "max_new_tokens": cell.max_new_tokens, "seed": cell.seed,
        "repeat": cell.repeat, "prompt_len": len(runner.ids[runner.prompts.index(prompt)]),
        "token_ids": r.token_ids, "finish_reason": r.finish_reason, "num_generated": m.num_generated,
        "num_steps": m.num_steps, "num_drafts": m.num_drafts, "num_draft_tokens": m.num_draft_tokens,
        "num_accepted_tokens": m.num_accepted_tokens, "accepted_per_pos": m.accepted_per_pos,
        "acceptance_len": m.acceptance_len, "acceptance_rate": m.acceptance_rate, "ttft_s": m.ttft_s,
        "tpot_s": m.tpot_s, "total_s": m.total_s, "tokens_per_s": m.tokens_per_s, "batch_wall_s": wall,
        "batch_tokens_per_s": batch_tokens / wall if wall > 0 else 0.0, "lossless": None, "lossy": r.lossy,
        "device": runner.exp.device, "dtype": runner.exp.dtype,
    }
