"""Experiment configs, resumable runs, lossless checks, reports and the Spec-Bench prompt format."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from mtp_spec.experiment import schema
from mtp_spec.experiment.report import load_costs, load_requests, report, summarize
from mtp_spec.experiment.runner import read_records, run
from mtp_spec.tokenizer import write_byte_tokenizer


@pytest.fixture(scope="module")
def setup(tiny_fp8, tmp_path_factory):
    write_byte_tokenizer(tiny_fp8)
    d = tmp_path_factory.mktemp("exp")
    prompts = d / "suite.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": "code" if i % 2 else "prose",
                                           "prompt": f"def f{i}(x):\n    return x + {i}\n" * (1 + i % 3)}) + "\n"
                               for i in range(6)))
    return tiny_fp8, prompts, d


def _config(setup, path, **over):
    model, prompts, _ = setup
    cfg = {"name": "t", "model": str(model), "suites": [str(prompts)], "prompts_per_suite": 6,
           "strategies": [{"name": "mtp", "k": [1, 2]}, {"name": "ngram", "k": [3]},
                          {"name": "mtp-tree", "k": [2], "tree_width": [2]}],
           "sweep": {"temperature": [0.0], "batch_size": [1, 3], "max_new_tokens": [12]}, "warmup": 1}
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c.update(stratgies=[]), "stratgies"),
    (lambda c: c["strategies"][0].update(kk=[1]), "strategies[0]"),
    (lambda c: c["strategies"][0].update(name="medusa"), "strategies[0].name"),
    (lambda c: c["sweep"].update(batch_size=["two"]), "sweep.batch_size[0]"),
    (lambda c: c.update(suites=["/nope.jsonl"]), "/nope.jsonl"),
    (lambda c: c.update(model="/nope"), "model"),
    (lambda c: c["strategies"].append({"name": "draft-model"}), "draft_model"),
])
def test_bad_config_is_named(setup, tmp_path, mutate, msg):
    p = _config(setup, tmp_path / "c.yaml")
    cfg = yaml.safe_load(p.read_text())
    mutate(cfg)
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(schema.ExperimentConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        schema.load(p)


def test_sweeps_are_cartesian_with_vanilla_first(setup, tmp_path):
    exp = schema.load(_config(setup, tmp_path / "c.yaml"))
    cells = schema.cells(exp)
    assert [c.strategy for c in cells[:2]] == ["vanilla", "vanilla"]
    assert len(cells) == 2 * (1 + 2 + 1 + 1)


def test_run_records_every_request_checks_losslessness_and_reports(setup, tmp_path):
    run_dir = run(_config(setup, tmp_path / "c.yaml"), out=tmp_path / "results", progress=False)
    recs = read_records(run_dir / "requests.jsonl")
    assert len(recs) == 6 * 2 * 5
    assert len({(r["cell"], r["prompt_id"]) for r in recs}) == len(recs)
    assert all(r["lossless"] is True for r in recs if r["strategy"] != "vanilla")
    env = json.loads((run_dir / "env.json").read_text())
    assert {"torch", "commit", "device", "weights"} <= set(env)
    s = summarize(load_requests(run_dir))
    assert set(s["category"]) == {"code", "prose"}
    assert (s[s["strategy"] == "vanilla"]["speedup"] == 1.0).all()
    assert (run_dir / "summary.csv").exists()
    s2, files = report([run_dir, run_dir], tmp_path / "plots")
    # one temperature: no acceptance-vs-temperature plot (a plot whose axis has one value is skipped)
    assert {f.name for f in files} == {"acceptance_per_position.png", "al_speedup_vs_k.png",
                                       "speedup_vs_batch.png", "speedup_vs_batch_by_policy.png", "per_category.png"}
    assert all(f.stat().st_size > 1000 for f in files)


def test_a_lossless_violation_is_loud(setup, tmp_path, monkeypatch):
    from mtp_spec.decoding import engine as eng

    real = eng.Engine.generate

    def corrupt(self, prompts, *a, **k):
        res = real(self, prompts, *a, **k)
        if self.proposer.name == "ngram":
            res[0].token_ids[-1] = (res[0].token_ids[-1] + 1) % 512
        return res

    monkeypatch.setattr(eng.Engine, "generate", corrupt)
    from mtp_spec.cli import main

    rc = main(["run", str(_config(setup, tmp_path / "c.yaml")), "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 3


def test_refuses_to_resume_with_a_different_config(setup, tmp_path):
    cfg = _config(setup, tmp_path / "c.yaml", strategies=[{"name": "ngram", "k": [2]}])
    run_dir = run(cfg, out=tmp_path / "r", progress=False)
    other = _config(setup, tmp_path / "d.yaml", strategies=[{"name": "ngram", "k": [3]}])
    with pytest.raises(schema.ExperimentConfigError, match="refusing to resume"):
        run(other, resume=run_dir, progress=False)


def test_a_run_killed_with_sigkill_resumes_without_losing_or_duplicating(setup, tmp_path):
    cfg = _config(setup, tmp_path / "c.yaml", sweep={"temperature": [0.0, 0.8], "batch_size": [1, 2],
                                                     "max_new_tokens": [24]})
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "mtp_spec.cli", "run", str(cfg), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    req = None
    while time.time() < deadline:  # wait until some, not all, requests are written
        dirs = list(out.glob("t-*"))
        if dirs and (dirs[0] / "requests.jsonl").exists():
            req = dirs[0] / "requests.jsonl"
            if len(req.read_text().splitlines()) >= 10:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_records(req)
    total = 6 * 4 * 5
    assert 10 <= len(before) < total, "the kill came too late to test anything"
    run_dir = run(cfg, resume=req.parent, progress=False)
    after = read_records(run_dir / "requests.jsonl")
    keys = [(r["cell"], r["prompt_id"]) for r in after]
    assert len(keys) == total == len(set(keys))
    assert after[: len(before)] == before  # what was there is kept as it was
    assert all(r["lossless"] is True for r in after if r["strategy"] != "vanilla" and r["temperature"] == 0)
    # the cost table measured at warm-up gives every fixed-k mtp cell a predicted speedup
    s = summarize(load_requests(run_dir), load_costs(run_dir))
    mtp = s[s["strategy"] == "mtp"]
    assert len(mtp) and mtp["predicted"].gt(0).all(), mtp[["k", "temperature", "batch_size", "predicted"]]
    assert s.loc[s["strategy"] != "mtp", "predicted"].isna().all()


def test_spec_bench_question_format_is_accepted(tmp_path):
    p = tmp_path / "question.jsonl"
    p.write_text(json.dumps({"question_id": 81, "category": "writing",
                             "turns": ["Compose a travel blog post about Hawaii.", "Rewrite it."]}) + "\n"
                 + json.dumps({"question_id": 101, "category": "math_reasoning", "turns": ["What is 2+2?"]}) + "\n")
    rows = schema.load_prompts(p)
    assert rows[0] == {"id": "81", "category": "writing",
                       "messages": [{"role": "user", "content": "Compose a travel blog post about Hawaii."}]}
    assert rows[1]["category"] == "math_reasoning"


def test_dry_run_prints_the_plan(setup, tmp_path, capsys):
    from mtp_spec.cli import main

    assert main(["run", str(_config(setup, tmp_path / "c.yaml")), "--dry-run"]) == 0
    assert "10 cells x 6 prompts = 60 requests" in capsys.readouterr().out
