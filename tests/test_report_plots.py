"""Report plots on synthetic runs: skipped one-value axes, integer k ticks, vanilla reference lines, no tuples."""

import json
import random
import re

import pandas as pd
import pytest
import yaml

from mtp_spec.experiment.report import SPEEDUP, figures, load_requests, plots, report, run_meta, summarize
from mtp_spec.experiment.schema import Cell

CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
              "translation", "summarization", "qa", "math_reasoning", "rag"]  # Spec-Bench's 13
STRATEGIES = [("mtp", [1, 2, 3, 4], [0]), ("mtp-tree", [3], [2, 3]), ("ngram", [3], [0])]
ALL_PNGS = {"acceptance_per_position.png", "al_speedup_vs_k.png", "acceptance_vs_temperature.png",
            "speedup_vs_batch.png", "speedup_vs_batch_by_policy.png", "per_category.png"}


def _record(cell: Cell, pid: str, category: str, rng: random.Random) -> dict:
    """One requests.jsonl line, with the keys and types that runner._record writes."""
    k = cell.k * (cell.tree_width or 1)
    steps = 20
    drafts = 0 if cell.strategy == "vanilla" else steps
    alpha = {"mtp": 0.8, "mtp-tree": 0.85, "ngram": 0.5}.get(cell.strategy, 0.0) * (1 - 0.3 * cell.temperature)
    alpha *= 1 - 0.4 * (sum(map(ord, category)) % 13) / 13 + rng.uniform(-0.05, 0.05)
    accepted_per_pos = [int(drafts * alpha ** (i + 1)) for i in range(cell.k)] if drafts else []
    while accepted_per_pos and not accepted_per_pos[-1]:  # the engine's list ends at the deepest acceptance
        accepted_per_pos.pop()
    accepted = sum(accepted_per_pos)
    gen = steps + accepted
    wall = 0.05 * steps * (1 + 0.1 * k) * rng.uniform(0.9, 1.1) * (1 + 0.2 * cell.batch_size * (1 + 0.3 * k))
    return {
        "cell": cell.key(), "cell_fields": dict(cell.__dict__), "prompt_id": pid, "category": category,
        "strategy": cell.strategy, "k": cell.k, "tree_width": cell.tree_width, "temperature": cell.temperature,
        "batch_size": cell.batch_size, "max_new_tokens": cell.max_new_tokens, "seed": cell.seed,
        "repeat": cell.repeat, "prompt_len": 12, "token_ids": list(range(gen)), "finish_reason": "length",
        "num_generated": gen, "num_steps": steps, "num_drafts": drafts, "num_draft_tokens": drafts * k,
        "num_accepted_tokens": accepted, "accepted_per_pos": accepted_per_pos,
        "acceptance_len": 1 + accepted / drafts if drafts else 1.0,
        "acceptance_rate": accepted / (drafts * k) if drafts else None, "ttft_s": 0.01, "tpot_s": wall / gen,
        "total_s": wall, "tokens_per_s": gen / wall, "batch_wall_s": wall,
        "batch_tokens_per_s": gen * cell.batch_size / wall, "lossless": True if cell.strategy != "vanilla"
        and cell.temperature == 0 else None, "lossy": False, "device": "cpu", "dtype": "float32",
    }


def _run(root, name, categories, temperatures, batches, repeats):
    d = root / name
    d.mkdir()
    rng = random.Random(name)
    cfg = {"name": name, "model": "shipped", "suites": ["/data/spec_bench/question.jsonl"], "device": "cpu",
           "dtype": "float32", "strategies": [{"name": n, "k": k} for n, k, _ in STRATEGIES]}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "env.json").write_text(json.dumps({"device": "cpu", "dtype": "float32", "torch": "x"}))
    cells = [Cell(s, k, w, t, b, 32, 0, r) for t in temperatures for b in batches for r in range(repeats)
             for s, ks, ws in [("vanilla", [0], [0]), *STRATEGIES] for k in ks for w in ws]
    lines = [json.dumps(_record(c, f"{cat}-{i}", cat, rng)) for c in cells for cat in categories for i in range(2)]
    (d / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Spec-Bench-like run (13 categories, 3 repeats, one batch size, one temperature) and a batch/T sweep."""
    root = tmp_path_factory.mktemp("runs")
    bench = _run(root, "specbench", CATEGORIES, [0.0], [1], repeats=3)
    sweep = _run(root, "sweep", ["code", "prose"], [0.0, 0.7], [1, 2, 4, 8], repeats=2)
    both = pd.concat([load_requests(bench), load_requests(sweep)], ignore_index=True)
    return {"bench": ([bench], summarize(load_requests(bench))), "sweep": ([sweep], None),
            "both": ([bench, sweep], summarize(both))}


def _texts(fig):
    fig.draw_without_rendering()  # fills in tick labels
    for ax in fig.axes:
        yield from (t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels())
        if ax.get_legend():
            yield from (t.get_text() for t in ax.get_legend().get_texts())
    yield fig.get_suptitle()


def test_single_value_axes_are_skipped_and_the_rest_written(runs, tmp_path):
    files = plots(runs["bench"][1], tmp_path / "bench")  # as the notebooks call it
    assert [f.name for f in files] == ["acceptance_per_position.png", "al_speedup_vs_k.png", "per_category.png"]
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == sorted(f.name for f in files)
    assert all(f.stat().st_size > 5000 for f in files)
    _, files = report(runs["sweep"][0], tmp_path / "sweep")
    assert {f.name for f in files} == ALL_PNGS
    assert all(f.stat().st_size > 5000 for f in files)


@pytest.mark.parametrize("which", ["bench", "both"])
def test_ticks_titles_reference_lines_and_error_bars(runs, which):
    run_dirs, s = runs[which]
    figs = figures(s, run_meta(run_dirs))
    assert set(figs) == (ALL_PNGS if which == "both" else ALL_PNGS - {
        "acceptance_vs_temperature.png", "speedup_vs_batch.png", "speedup_vs_batch_by_policy.png"})
    for name, fig in figs.items():
        texts = list(_texts(fig))
        assert not [t for t in texts if re.fullmatch(r"\(.*,.*\)", t.strip())], name
        title = " ".join(fig.get_suptitle().split())
        assert "model: shipped" in title and "device: cpu (float32)" in title, title
        assert "spec_bench/question.jsonl" in title, title
        for ax in fig.axes:
            if ax.get_ylabel() == SPEEDUP:
                ref = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [1.0, 1.0]]
                assert ref and list(ref[0].get_xdata()) == [0, 1], f"{name}: no vanilla line at 1.0"
                # repeats > 1 give confidence intervals; medians of per-prompt ratios from 6 batches on
                if name != "speedup_vs_batch_by_policy.png" or s["speedup_median_lo"].notna().any():
                    assert ax.containers, f"{name}: no error bars"
            if ax.get_xlabel().startswith(("k ", "batch size", "draft position")):
                ticks = ax.get_xticks()
                assert len(ticks) and all(float(t).is_integer() for t in ticks), (name, ticks)
            if ax.get_legend():  # legends sit right of the axes, off the data
                assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1, name
    for line in figs["acceptance_per_position.png"].axes[0].get_lines():  # every drafted position, zeros too
        k = re.search(r"k=(\d+)", line.get_label())
        assert k and len(line.get_xdata()) == int(k.group(1)), line.get_label()
    if which == "bench":
        heat = figs["per_category.png"].axes[0]
        assert [t.get_text() for t in heat.get_xticklabels()] == sorted(CATEGORIES)
        assert "mtp k=1" in [t.get_text() for t in heat.get_yticklabels()]
        assert len(heat.texts) == len(CATEGORIES) * len(heat.get_yticklabels())  # every cell annotated
    else:
        batch = figs["speedup_vs_batch.png"].axes[1]
        assert batch.get_xscale() == "log" and list(batch.get_xticks()) == [1, 2, 4, 8]
        temp = figs["acceptance_vs_temperature.png"].axes[0]
        assert list(temp.get_xticks()) == [0.0, 0.7]


def test_without_meta_the_title_names_the_run(runs):
    s = runs["bench"][1]
    small = s[s["category"].isin(["coding", "math"]) & s["strategy"].isin(["vanilla", "mtp"])]
    assert {f.get_suptitle() for f in figures(small).values()} == {"run: specbench"}


def test_policies_with_a_draft_vocabulary_and_auto_depth_get_their_own_lines(tmp_path):
    """The adaptive study's policies: k = 1, 2 and auto, each with the full head and a 1024-token draft
    vocabulary, over batch sizes, two categories: one line per policy and panel, vanilla at 1."""
    d = tmp_path / "adaptive"
    d.mkdir()
    rng = random.Random(0)
    lines = []
    for b in (1, 4, 16):
        for k, vocab in [(0, 0)] + [(k, v) for k in (1, 2, "auto") for v in (0, 1024)]:
            cell = Cell("vanilla" if k == 0 else "mtp", k if k != "auto" else 2, 0, 0.0, b, 32, 0, 0)
            for cat in ("code", "prose"):
                for i in range(8):
                    rec = _record(cell, f"{cat}-{i}", cat, rng)
                    rec.update(k=k, draft_vocab=vocab, round=i, cell=rec["cell"] + f"|{k}|v{vocab}")
                    rec["batch_tokens_per_s"] *= 1 + (0.1 if vocab else 0) * (k != 0)
                    lines.append(json.dumps(rec))
    (d / "requests.jsonl").write_text("\n".join(lines) + "\n")
    s = summarize(load_requests(d))
    assert set(s["draft_vocab"]) == {0, 1024} and "auto" in set(s["k"])
    figs = figures(s)
    assert "speedup_vs_batch_by_policy.png" in figs and "al_speedup_vs_k.png" in figs
    code, prose = figs["speedup_vs_batch_by_policy.png"].axes[:2]
    assert code.get_title().startswith("code") and prose.get_title().startswith("prose")
    labels = [ln.get_label() for ln in code.get_lines() if not ln.get_label().startswith("_")]
    assert sorted(labels) == sorted(["mtp k=1", "mtp k=1 V=1024", "mtp k=2", "mtp k=2 V=1024", "mtp k=auto",
                                     "mtp k=auto V=1024", "vanilla"])
    styles = {ln.get_label(): ln.get_linestyle() for ln in code.get_lines()}
    assert styles["mtp k=2"] == "-" and styles["mtp k=2 V=1024"] == "--"
    assert list(code.get_xticks()) == [1, 4, 16] and code.containers  # 8 batches: median intervals
    ks = figs["al_speedup_vs_k.png"].axes[0]
    assert sorted(ln.get_label() for ln in ks.get_lines() if "mtp" in ln.get_label()) == ["mtp", "mtp V=1024"]
