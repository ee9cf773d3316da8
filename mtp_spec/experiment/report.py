"""Read runs back: per-request records -> summary tables -> plots. Notebooks call these functions.

Group metrics (definitions in mtp_spec/metrics.py): AL and AR pool the counters of every request in
the group; tokens/s is the mean batch throughput (generated tokens / batch wall time); speedup is
that over the vanilla baseline of the same run, temperature, batch size, length and category, with a
95% confidence interval over repeats when there are several.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

KEYS = ["strategy", "k", "tree_width", "temperature", "batch_size", "max_new_tokens", "category"]


def load_requests(run_dir: str | Path) -> pd.DataFrame:
    from mtp_spec.experiment.runner import read_records

    run_dir = Path(run_dir)
    rows = read_records(run_dir / "requests.jsonl")
    if not rows:
        raise ValueError(f"{run_dir}: no requests.jsonl records")
    df = pd.DataFrame(rows)
    df["run"] = run_dir.name
    return df


def _pool(g: pd.DataFrame) -> pd.Series:
    drafts = g["num_drafts"].sum()
    dtoks = g["num_draft_tokens"].sum()
    acc = g["num_accepted_tokens"].sum()
    width = max((len(x) for x in g["accepted_per_pos"]), default=0)
    per_pos = [sum(x[i] if i < len(x) else 0 for x in g["accepted_per_pos"]) for i in range(width)]
    rep = g.groupby("repeat")["batch_tokens_per_s"].mean()
    return pd.Series({
        "requests": len(g), "AL": 1 + acc / drafts if drafts else 1.0, "AR": acc / dtoks if dtoks else float("nan"),
        "per_pos": [round(a / drafts, 3) for a in per_pos] if drafts else [],
        "per_pos_cond": [round(a / b, 3) if b else 0.0 for a, b in zip(per_pos, [drafts] + per_pos)],
        "tokens_per_s": g["batch_tokens_per_s"].mean(), "rep_tps": list(rep.values),
        "ttft_s": g["ttft_s"].mean(), "tpot_s": g["tpot_s"].mean(),
        "lossless_violations": int((g["lossless"] == False).sum()),  # noqa: E712 (None means unchecked)
        "lossless_checked": int(g["lossless"].notna().sum()),
    })


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["run", *KEYS]
    s = df.groupby(keys, dropna=False).apply(_pool, include_groups=False).reset_index()
    base = s[s["strategy"] == "vanilla"].set_index(["run", "temperature", "batch_size", "max_new_tokens",
                                                    "category"])
    speed, lo, hi = [], [], []
    for _, r in s.iterrows():
        key = (r["run"], r["temperature"], r["batch_size"], r["max_new_tokens"], r["category"])
        if key not in base.index:
            speed.append(float("nan")), lo.append(float("nan")), hi.append(float("nan"))
            continue
        b = base.loc[key]
        speed.append(r["tokens_per_s"] / b["tokens_per_s"])
        reps = [x / y for x, y in zip(r["rep_tps"], b["rep_tps"])]
        if len(reps) > 1:
            m = sum(reps) / len(reps)
            sd = math.sqrt(sum((x - m) ** 2 for x in reps) / (len(reps) - 1))
            half = 1.96 * sd / math.sqrt(len(reps))
            lo.append(m - half), hi.append(m + half)
        else:
            lo.append(float("nan")), hi.append(float("nan"))
    s["speedup"], s["speedup_lo"], s["speedup_hi"] = speed, lo, hi
    return s.drop(columns=["rep_tps"])


def write_summary(run_dir: str | Path) -> int:
    """summary.csv beside requests.jsonl; returns the number of lossless violations."""
    s = summarize(load_requests(run_dir))
    s.to_csv(Path(run_dir) / "summary.csv", index=False)
    return int(s["lossless_violations"].sum())


def table(s: pd.DataFrame) -> str:
    cols = ["run", "strategy", "k", "tree_width", "temperature", "batch_size", "category", "requests", "AL", "AR",
            "per_pos", "tokens_per_s", "speedup", "lossless"]
    t = s.copy()
    t["lossless"] = [("-" if c == 0 else ("OK" if v == 0 else f"FAIL {v}/{c}"))
                     for v, c in zip(t["lossless_violations"], t["lossless_checked"])]
    t["speedup"] = [f"{x:.2f}" + (f" [{a:.2f}, {b:.2f}]" if not math.isnan(a) else "")
                    for x, a, b in zip(t["speedup"], t["speedup_lo"], t["speedup_hi"])]
    if t["run"].nunique() == 1:
        cols.remove("run")
    return t[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")


def plots(s: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = s[s["strategy"] != "vanilla"]
    multi = s["run"].nunique() > 1
    label = lambda r, extra="": (f"{r['run']}: " if multi else "") + f"{r['strategy']}" + extra
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    t0 = spec[spec["temperature"] == spec["temperature"].min()]
    for _, r in t0.groupby(["run", "strategy", "k", "tree_width"]).first().reset_index().iterrows():
        if len(r["per_pos"]):
            ax.plot(range(1, len(r["per_pos"]) + 1), r["per_pos"], marker="o", label=label(r, f" k={r['k']}"))
    ax.set(xlabel="draft position", ylabel="acceptance (unconditional)", title="Acceptance per position")
    ax.legend(fontsize=7)
    save(fig, "acceptance_per_position.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for (run, strat, w), g in spec.groupby(["run", "strategy", "tree_width"]):
        g = g.groupby("k")[["AL", "speedup"]].mean().reset_index()
        name = (f"{run}: " if multi else "") + strat + (f" w={w}" if strat == "mtp-tree" else "")
        a1.plot(g["k"], g["AL"], marker="o", label=name)
        a2.plot(g["k"], g["speedup"], marker="o", label=name)
    a1.set(xlabel="k", ylabel="acceptance length", title="AL vs k")
    a2.set(xlabel="k", ylabel="speedup over vanilla", title="Speedup vs k")
    a2.axhline(1.0, color="grey", lw=0.8)
    a1.legend(fontsize=7)
    save(fig, "al_speedup_vs_k.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for (run, strat, k), g in spec.groupby(["run", "strategy", "k"]):
        g = g.groupby("temperature")["AR"].mean().reset_index()
        ax.plot(g["temperature"], g["AR"], marker="o", label=(f"{run}: " if multi else "") + f"{strat} k={k}")
    ax.set(xlabel="temperature", ylabel="acceptance rate", title="Acceptance vs temperature")
    ax.legend(fontsize=7)
    save(fig, "acceptance_vs_temperature.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for (run, strat, k), g in spec.groupby(["run", "strategy", "k"]):
        g = g.groupby("batch_size")["speedup"].mean().reset_index()
        ax.plot(g["batch_size"], g["speedup"], marker="o", label=(f"{run}: " if multi else "") + f"{strat} k={k}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="batch size", ylabel="speedup over vanilla", title="Speedup vs batch size")
    ax.legend(fontsize=7)
    save(fig, "speedup_vs_batch.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    piv = spec.pivot_table(index=["strategy", "k"], columns="category", values="AL", aggfunc="mean")
    piv.plot.bar(ax=ax)
    ax.set(ylabel="acceptance length", title="AL per category")
    save(fig, "per_category.png")
    return files


def report(run_dirs: list[str | Path], plot_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    df = pd.concat([load_requests(r) for r in run_dirs], ignore_index=True)
    s = summarize(df)
    files = plots(s, plot_dir or Path(run_dirs[0]) / "plots")
    return s, files


def env(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "env.json").read_text())
