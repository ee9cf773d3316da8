"""Measurements that survive a noisy machine: interleaved rounds, per-prompt median speedups with an
order-statistics interval, a vanilla drift check at the end, and prompts sampled across categories."""

import json
import random

import pandas as pd
import pytest
import yaml

from mtp_spec.experiment import runner as runner_mod
from mtp_spec.experiment import schema
from mtp_spec.experiment.records import RECHECK, read_records
from mtp_spec.experiment.report import DRIFT_THRESHOLD, drift, load_requests, median_ci, summarize, table
from mtp_spec.experiment.runner import RECHECK_BATCHES, groups, plan, run
from mtp_spec.tokenizer import write_byte_tokenizer


@pytest.fixture(scope="module")
def suite(tiny_fp8, tmp_path_factory):
    write_byte_tokenizer(tiny_fp8)
    p = tmp_path_factory.mktemp("interleave") / "suite.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "category": ["code", "prose"][i % 2],
                                     "prompt": f"x{i} = {i}\ny = x{i} * {i + 1}\n"}) + "\n" for i in range(6)))
    return tiny_fp8, p


def _config(suite, path, strategies, batch_size=(1,)):
    model, prompts = suite
    path.write_text(yaml.safe_dump({
        "name": "il", "model": str(model), "suites": [str(prompts)], "prompts_per_suite": 6, "warmup": 0,
        "strategies": strategies,
        "sweep": {"temperature": [0.0], "batch_size": list(batch_size), "max_new_tokens": [8]}}))
    return path


def _calls(monkeypatch, wall=None, stop_at=None):
    """Log every generate call as (cell key, prompt indices); optionally fake its wall time from the
    call's index, or stop the run (as a kill would) at call `stop_at`."""
    calls = []
    real = runner_mod.Runner.generate

    def logged(self, cell, idx):
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append((cell.key(), tuple(idx)))
        res, t = real(self, cell, idx)
        return res, (wall(len(calls) - 1, cell) if wall else t)

    monkeypatch.setattr(runner_mod.Runner, "generate", logged)
    return calls


def test_plan_runs_each_batch_under_every_member_back_to_back_in_rotating_order(suite, tmp_path):
    exp = schema.load(_config(suite, tmp_path / "c.yaml", [{"name": "mtp", "k": [1, 2]}, {"name": "ngram", "k": [3]}],
                              batch_size=(1, 2)))
    rounds = plan(exp, 6)
    for members in groups(exp):
        mine = [r for r in rounds if r.cells[0].baseline() == members[0]]
        assert len(mine) == -(-6 // members[0].batch_size)
        n = len(members)
        for r in mine:
            assert sorted(map(str, r.cells)) == sorted(map(str, members))  # everyone, once, on the same batch
            i = members.index(r.cells[0])
            assert list(r.cells) == members[i:] + members[:i]  # a rotation of the group
        firsts = [members.index(r.cells[0]) for r in mine]
        for lo in range(0, len(firsts) - n + 1, n):  # every member starts once in each block of n rounds
            assert sorted(firsts[lo:lo + n]) == list(range(n))
    assert [c.batch_size for c in groups(exp)[0]] == [1] * 4  # one group per baseline, vanilla first
    assert plan(exp, 6) == rounds  # deterministic, so a resume finds the same rounds


def test_two_members_on_two_categories_do_not_always_start_alike():
    """Round-robin categories have period 2; plain alternation would put vanilla first on one of them."""
    firsts = runner_mod.starts(2, 40, seed=0)
    assert {firsts[j] for j in range(0, 40, 2)} == {0, 1} and {firsts[j] for j in range(1, 40, 2)} == {0, 1}


def test_a_drifting_machine_cancels_out_of_the_median_ratio_and_is_flagged(suite, tmp_path, monkeypatch, capsys):
    # The machine slows by 10% of its first speed with every call; mtp takes half vanilla's time.
    calls = _calls(monkeypatch, wall=lambda i, cell: (0.5 if cell.strategy == "mtp" else 1.0) * (1 + 0.1 * i))
    run_dir = run(_config(suite, tmp_path / "c.yaml", [{"name": "mtp", "k": [1]}]), out=tmp_path / "r",
                  progress=False)
    exp = schema.load(tmp_path / "c.yaml")
    main = [(c.key(), r.idx) for r in plan(exp, 6) for c in r.cells]
    again = [(c.key(), tuple(idx)) for c, idx in runner_mod.recheck_plan(exp, 6)]
    assert calls == main + again  # the runner follows the interleaved plan, then re-measures vanilla
    recs = read_records(run_dir / "requests.jsonl")
    want = [(c.key(), r.index, pos) for r in plan(exp, 6) for pos, c in enumerate(r.cells)]
    got = [(r["cell"], r["round"], r["round_pos"]) for r in recs]
    assert sorted(got) == sorted(want)
    assert [g[1] for g in got] == [w[1] for w in want]  # written round by round (mtp waits for vanilla's output)
    assert all(r["lossless"] is True for r in recs if r["strategy"] == "mtp")

    s = summarize(load_requests(run_dir)).set_index("strategy")
    # Per-prompt ratios taken one call apart stay near the true 2x; vanilla first then mtp (as before
    # interleaving) would have compared calls six apart: 2 * 1.25 / 1.85, about 1.35.
    mtp = s[s["category"] == "code"].loc["mtp"]
    assert abs(mtp["speedup_median_all"] - 2.0) < 0.1 and mtp["speedup_pairs_all"] == 6
    assert mtp["speedup_median_all_lo"] <= mtp["speedup_median_all"] <= mtp["speedup_median_all_hi"]
    assert mtp["speedup_pairs"] == 3 and pd.isna(mtp["speedup_median_lo"])  # 3 per category: no 95% interval
    assert (s.loc["vanilla", "speedup_median"] == 1.0).all()
    # The rechecks ran at calls 12-14 (2.2x-2.4x the first speed) against vanilla's first calls.
    assert len(read_records(run_dir / RECHECK)) == RECHECK_BATCHES
    assert s["vanilla_drift"].iloc[0] < -0.3 and s["drift_flag"].all() and (s["vanilla_rechecked"] == 3).all()
    assert "VANILLA DRIFT" in capsys.readouterr().err
    text = table(summarize(load_requests(run_dir)))
    assert "median_ratio" in text and "all categories:" in text and "DRIFT" in text
    written = pd.read_csv(run_dir / "summary.csv")
    assert {"speedup", "speedup_lo", "speedup_median", "speedup_median_lo", "vanilla_drift"} <= set(written)


def test_a_run_cut_mid_round_resumes_without_losing_or_duplicating(suite, tmp_path, monkeypatch):
    cfg = _config(suite, tmp_path / "c.yaml", [{"name": "mtp", "k": [1]}, {"name": "ngram", "k": [3]}])
    exp = schema.load(cfg)
    rounds = plan(exp, 6)
    # cut inside the first round where vanilla is not first: the members before vanilla wait for its
    # output, so the cut loses their work (run again) but never writes them unchecked
    j = next(j for j, r in enumerate(rounds) if r.cells[0].strategy != "vanilla")
    cut = sum(len(r.cells) for r in rounds[:j]) + 1
    _calls(monkeypatch, stop_at=cut)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out=tmp_path / "r", progress=False)
    monkeypatch.undo()
    run_dir = next((tmp_path / "r").iterdir())
    before = read_records(run_dir / "requests.jsonl")
    assert len(before) == 3 * j and not (run_dir / RECHECK).exists()

    calls = _calls(monkeypatch)
    run(cfg, resume=run_dir, progress=False)
    after = read_records(run_dir / "requests.jsonl")
    keys = [(r["cell"], r["prompt_id"]) for r in after]
    assert len(keys) == 6 * 3 == len(set(keys))
    assert after[: len(before)] == before
    assert calls[0] == (rounds[j].cells[0].key(), rounds[j].idx)  # the cut round again, in its own order
    assert all(r["lossless"] is True for r in after if r["strategy"] != "vanilla")
    assert len(read_records(run_dir / RECHECK)) == RECHECK_BATCHES
    calls.clear()
    run(cfg, resume=run_dir, progress=False)  # a finished run resumes to nothing
    assert calls == [] and read_records(run_dir / "requests.jsonl") == after


def test_median_interval_is_the_distribution_free_one():
    assert median_ci(range(1, 11)) == (5.5, 2, 9)  # x(2), x(9): P(Bin(10, 1/2) <= 1) = 11/1024 per side
    assert median_ci([3.0, 1.0, 2.0, 9.0, 4.0, 5.0]) == (3.5, 1.0, 9.0)  # n=6: min and max (96.9%)
    med, lo, hi = median_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert med == 3.0 and pd.isna(lo) and pd.isna(hi)  # below 6 values nothing reaches 95%
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):  # coverage on a skewed distribution whose median is 1
        _, lo, hi = median_ci([rng.lognormvariate(0, 1) for _ in range(15)])
        hits += lo <= 1 <= hi
    assert hits / 2000 >= 0.94


def test_drift_is_flagged_beyond_the_threshold_only():
    def frame(change):
        rows = [{"run": "r", "cell": "vanilla|b1", "prompt_id": str(i), "strategy": "vanilla", "temperature": 0.0,
                 "batch_size": 1, "max_new_tokens": 8, "seed": 0, "repeat": 0, "round": i,
                 "batch_tokens_per_s": 100.0, "recheck_tokens_per_s": 100.0 * (1 + change) if i < 3 else None}
                for i in range(6)]
        return pd.DataFrame(rows)

    assert DRIFT_THRESHOLD == 0.05
    ok, bad = drift(frame(-0.04)).iloc[0], drift(frame(0.06)).iloc[0]
    assert not ok["drift_flag"] and abs(ok["vanilla_drift"] + 0.04) < 1e-9 and ok["vanilla_rechecked"] == 3
    assert bad["drift_flag"] and abs(bad["vanilla_drift"] - 0.06) < 1e-9


def test_prompts_per_suite_samples_categories_round_robin(tmp_path):
    p = tmp_path / "question.jsonl"
    cats = ["writing"] * 4 + ["math"] * 3 + ["coding"] * 2  # grouped, as Spec-Bench's file is
    p.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"q{i}"]}) + "\n"
                         for i, c in enumerate(cats)))
    assert [r["id"] for r in schema.load_prompts(p, 5)] == ["0", "4", "7", "1", "5"]
    assert [r["id"] for r in schema.load_prompts(p, 8)] == ["0", "4", "7", "1", "5", "8", "2", "6"]
    assert [r["id"] for r in schema.load_prompts(p)] == [str(i) for i in range(9)]  # no limit: file order
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}"}) + "\n" for i in range(5)))
    assert [r["id"] for r in schema.load_prompts(one, 3)] == ["0", "1", "2"]  # one category: the first N


def test_auto_cells_record_their_chooser_step_by_step(suite, tmp_path):
    run_dir = run(_config(suite, tmp_path / "c.yaml", [{"name": "mtp", "k": [1, "auto"]}], batch_size=(2,)),
                  tmp_path / "out", progress=False)
    recs = read_records(run_dir / "requests.jsonl")
    auto = [r for r in recs if r["k"] == "auto"]
    assert auto and all(r["auto_trace"] is None for r in recs if r["k"] != "auto")
    for r in auto:  # one entry per step the chooser ran, each [k, predicted ratio, pace, the depth's ratio]
        assert r["auto_trace"] and all(len(e) == 4 and -1 <= e[0] <= 4 for e in r["auto_trace"])
        assert len(r["auto_trace"]) <= r["num_steps"]
    assert "auto" in table(summarize(load_requests(run_dir)))  # the report reads the records as before
