"""Read runs back: per-request records -> summary tables -> plots. Notebooks call these functions.

Group metrics (definitions in mtp_spec/metrics.py): AL and AR pool the counters of every request in
the group; tokens/s is the mean batch throughput (generated tokens / batch wall time).

Two speedups over the vanilla baseline of the same run, temperature, batch size, length and category:
- `speedup`: the group's mean tokens/s over vanilla's, with a 95% normal interval over repeats when
  there are several (as reported before; the plots use it).
- `speedup_median`: the median of per-prompt ratios, each a request's batch throughput over vanilla's
  on the same prompt (same batch) and seed and repeat, measured seconds apart in the same round (see
  runner.py), so drift over a run cancels. Its interval (`speedup_median_lo`, `_hi`) is the
  distribution-free 95% interval on a median from order statistics (`median_ci`); a batch counts
  once. `speedup_median_all` pools the ratios over categories.
The runner measures a few vanilla batches again at the end; `vanilla_drift` is the median change of
their throughput, flagged (`drift_flag`) beyond DRIFT_THRESHOLD.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mtp_spec.decoding.strategies import PEERS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KEYS = ["strategy", "k", "tree_width", "draft_vocab", "temperature", "batch_size", "max_new_tokens", "category"]
# one decoding policy: a line in the plots (draft_vocab 0: the full head; k may be "auto")
POLICY = ["run", "strategy", "k", "tree_width", "draft_vocab"]
PAIR = ["run", "temperature", "batch_size", "max_new_tokens", "seed", "repeat", "prompt_id"]  # vanilla's twin
DRIFT_THRESHOLD = 0.05  # vanilla slower or faster by more than this at the end of a run is flagged
LEVEL = 0.95


def load_requests(run_dir: str | Path) -> pd.DataFrame:
    """requests.jsonl as a frame, with each rechecked vanilla request's second throughput
    (`recheck_tokens_per_s`, NaN elsewhere) from vanilla_recheck.jsonl."""
    from mtp_spec.experiment.records import RECHECK, REQUESTS, read_records

    run_dir = Path(run_dir)
    rows = read_records(run_dir / REQUESTS)
    if not rows:
        raise ValueError(f"{run_dir}: no {REQUESTS} records")
    df = pd.DataFrame(rows)
    df["run"] = run_dir.name
    # records from before draft vocabularies (and vanilla's) ran the full head
    df["draft_vocab"] = (df["draft_vocab"] if "draft_vocab" in df else pd.Series(0, index=df.index)).fillna(0)
    df["draft_vocab"] = df["draft_vocab"].astype(int)
    again = {(r["cell"], r["prompt_id"]): r["batch_tokens_per_s"] for r in read_records(run_dir / RECHECK)}
    df["recheck_tokens_per_s"] = [again.get(k, math.nan) for k in zip(df["cell"], df["prompt_id"])]
    return df


def median_ci(values, level: float = LEVEL) -> tuple[float, float, float]:
    """The median and a distribution-free interval for it: [x_(l), x_(n+1-l)] of the sorted values,
    with the largest l whose coverage 1 - 2 P(Binomial(n, 1/2) < l) is at least `level`. It assumes
    independent draws only, no shape; below 6 values no interval reaches 95% (NaN bounds)."""
    xs = sorted(v for v in values if not math.isnan(v))
    n = len(xs)
    if not n:
        return math.nan, math.nan, math.nan
    med = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    tail, cum, r = (1 - Fraction(level).limit_denominator(1000)) / 2, 0, 0  # r: the l above
    while r < n // 2:
        cum += math.comb(n, r)  # 2^n P(B <= r)
        if Fraction(cum, 2**n) > tail:
            break
        r += 1
    return (med, xs[r - 1], xs[n - r]) if r else (med, math.nan, math.nan)


def _with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Each request's batch throughput over vanilla's on the same prompt, seed and repeat (`ratio`),
    and the batch it ran in (`unit`: its round, or the prompt for records from before rounds)."""
    van = df[df["strategy"] == "vanilla"].set_index(PAIR)["batch_tokens_per_s"]
    van = van[~van.index.duplicated()]
    ratio = df["batch_tokens_per_s"].to_numpy() / van.reindex(pd.MultiIndex.from_frame(df[PAIR])).to_numpy()
    rounds = df["round"] if "round" in df else pd.Series(math.nan, index=df.index)
    unit = [f"r{int(r)}" if pd.notna(r) else f"p{p}" for r, p in zip(rounds, df["prompt_id"])]
    return df.assign(ratio=ratio, unit=unit)


def _median(g: pd.DataFrame, prefix: str) -> dict:
    """Median ratio of a group with its interval; a batch counts once (its requests share one ratio)."""
    ratios = g.drop_duplicates(["seed", "repeat", "unit"])["ratio"]  # run is a group key
    med, lo, hi = median_ci(ratios)
    return {prefix: med, f"{prefix}_lo": lo, f"{prefix}_hi": hi,
            prefix.replace("speedup_median", "speedup_pairs"): int(ratios.notna().sum())}


def drift(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: vanilla requests measured again at the end (`vanilla_rechecked`), the median relative
    change of their batch throughput (`vanilla_drift`) and whether it exceeds DRIFT_THRESHOLD."""
    cols = ["run", "vanilla_rechecked", "vanilla_drift", "drift_flag"]
    if "recheck_tokens_per_s" not in df:
        return pd.DataFrame(columns=cols)
    again = _with_ratios(df).dropna(subset=["recheck_tokens_per_s"]).drop_duplicates(["run", "cell", "unit"])
    rows = []
    for run, g in again.groupby("run"):
        d = median_ci(g["recheck_tokens_per_s"] / g["batch_tokens_per_s"])[0] - 1
        rows.append({"run": run, "vanilla_rechecked": len(g), "vanilla_drift": d,
                     "drift_flag": bool(abs(d) > DRIFT_THRESHOLD)})
    return pd.DataFrame(rows, columns=cols)


def _pool(g: pd.DataFrame) -> pd.Series:
    drafts = int(g["num_drafts"].sum())  # a Python number: the summary CSV prints lists of plain floats
    dtoks = g["num_draft_tokens"].sum()
    acc = g["num_accepted_tokens"].sum()
    width = max((len(x) for x in g["accepted_per_pos"]), default=0)
    per_pos = [int(sum(x[i] if i < len(x) else 0 for x in g["accepted_per_pos"])) for i in range(width)]
    rep = g.groupby("repeat")["batch_tokens_per_s"].mean()
    return pd.Series({
        "requests": len(g), "AL": 1 + acc / drafts if drafts else 1.0, "AR": acc / dtoks if dtoks else float("nan"),
        "per_pos": [round(a / drafts, 3) for a in per_pos] if drafts else [],
        "per_pos_cond": [round(a / b, 3) if b else 0.0 for a, b in zip(per_pos, [drafts] + per_pos)],
        "tokens_per_s": g["batch_tokens_per_s"].mean(), "rep_tps": list(rep.values),
        "ttft_s": g["ttft_s"].mean(), "tpot_s": g["tpot_s"].mean(),
        "lossless_violations": int((g["lossless"] == False).sum()),  # noqa: E712 (None means unchecked)
        "lossless_ties": int((g["lossless"] == "tie").sum()),  # divergences at a numerical tie (see runner)
        "lossless_checked": int(g["lossless"].notna().sum()),
    })


def load_costs(run_dirs) -> dict:
    """Each run's measured step cost table (costs.json, written at warm-up), by run name."""
    from mtp_spec.decoding.cost import CostModel
    from mtp_spec.experiment.records import COSTS

    dirs = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    return {d.name: CostModel.load(d / COSTS) for d in dirs if (d / COSTS).exists()}


def predicted_speedup(cost, cond: list[float], k, batch: int) -> float:
    """The cost model's speedup of a fixed-depth MTP cell over vanilla at its batch size, from the cell's
    measured conditional acceptance per position (decoding/cost.py: tokens per step over step time)."""
    if cost is None or isinstance(k, str) or not k:
        return math.nan
    cond = list(cond) + [0.0] * (int(k) - len(cond))  # positions never accepted are not listed
    return cost.tokens_per_s(cond, int(k), batch) / cost.tokens_per_s(cond, 0, batch)


def summarize(df: pd.DataFrame, costs: dict | None = None) -> pd.DataFrame:
    """One row per cell and category. `costs` (load_costs) adds `predicted`: the speedup the cost model
    predicts for fixed-k MTP cells with the full draft head, beside the measured one."""
    keys = ["run", *KEYS]
    df = _with_ratios(df)
    s = df.groupby(keys, dropna=False).apply(_pool, include_groups=False).reset_index()
    med = df.groupby(keys, dropna=False).apply(lambda g: pd.Series(_median(g, "speedup_median")),
                                               include_groups=False).reset_index()
    pooled = [k for k in keys if k != "category"]
    med_all = df.groupby(pooled, dropna=False).apply(lambda g: pd.Series(_median(g, "speedup_median_all")),
                                                     include_groups=False).reset_index()
    s = s.merge(med, on=keys, how="left").merge(med_all, on=pooled, how="left")
    s = s.merge(drift(df), on="run", how="left")
    for col in ("speedup_pairs", "speedup_pairs_all", "vanilla_rechecked"):  # counts, NaN-free after the merges
        s[col] = s[col].fillna(0).astype(int)
    s["drift_flag"] = s["drift_flag"].astype("boolean").fillna(False).astype(bool)
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
    costs = costs or {}
    s["predicted"] = [predicted_speedup(costs.get(r["run"]), r["per_pos_cond"], r["k"], int(r["batch_size"]))
                      if r["strategy"] == "mtp" and not r["draft_vocab"] and not math.isnan(r["AR"]) else math.nan
                      for _, r in s.iterrows()]
    return s.drop(columns=["rep_tps"])


def write_summary(run_dir: str | Path) -> pd.DataFrame:
    """summary.csv beside requests.jsonl; returns the summary."""
    s = summarize(load_requests(run_dir), load_costs(run_dir))
    s.to_csv(Path(run_dir) / "summary.csv", index=False)
    return s


def _interval(x: float, lo: float, hi: float, n: int | None = None) -> str:
    if math.isnan(x):
        return "-"
    if not math.isnan(lo):
        return f"{x:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{x:.2f}" + (f" (n={n})" if n is not None else "")


def _drift_line(r) -> str:
    if not r["vanilla_rechecked"]:
        return "not measured (no vanilla_recheck.jsonl)"
    verdict = "DRIFT: the machine changed speed during the run" if r["drift_flag"] else "ok"
    return (f"{r['vanilla_drift']:+.1%} over {r['vanilla_rechecked']} batch(es) re-run at the end "
            f"(threshold {DRIFT_THRESHOLD:.0%}): {verdict}")


def table(s: pd.DataFrame) -> str:
    """The summary as text: one row per group, a pooled-over-categories table when there are several
    categories, and notes on the speedup columns and vanilla drift."""
    cols = ["run", "strategy", "k", "tree_width", "temperature", "batch_size", "category", "requests", "AL", "AR",
            "per_pos", "tokens_per_s", "speedup", "median_ratio", "lossless"]
    t = s.copy()
    t["lossless"] = [("-" if c == 0 else ("OK" if v == 0 else f"FAIL {v}/{c}") + (f" ({n} ties)" if n else ""))
                     for v, n, c in zip(t["lossless_violations"], t["lossless_ties"], t["lossless_checked"])]
    t["speedup"] = [_interval(x, a, b) for x, a, b in zip(t["speedup"], t["speedup_lo"], t["speedup_hi"])]
    t["median_ratio"] = [_interval(x, a, b, n) for x, a, b, n in zip(
        t["speedup_median"], t["speedup_median_lo"], t["speedup_median_hi"], t["speedup_pairs"])]
    one_run = t["run"].nunique() == 1
    if one_run:
        cols.remove("run")
    if "predicted" in t and t["predicted"].notna().any():
        t["predicted"] = [f"{x:.2f}" if not math.isnan(x) else "-" for x in t["predicted"]]
        cols.insert(cols.index("speedup") + 1, "predicted")
    if "draft_vocab" in t and t["draft_vocab"].any():
        cols.insert(cols.index("tree_width") + 1, "draft_vocab")
    out = [t[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")]
    if t["category"].nunique() > 1:
        pooled = ["run", "strategy", "k", "tree_width", "temperature", "batch_size", "max_new_tokens"]
        if "draft_vocab" in cols:
            pooled.insert(4, "draft_vocab")
        a = t.drop_duplicates(pooled).copy()
        a["median_ratio"] = [_interval(x, lo, hi, n) for x, lo, hi, n in zip(
            a["speedup_median_all"], a["speedup_median_all_lo"], a["speedup_median_all_hi"], a["speedup_pairs_all"])]
        a["pairs"] = a["speedup_pairs_all"]
        out += ["", "all categories:",
                a[[c for c in pooled if c != "run" or not one_run] + ["pairs", "median_ratio"]].to_string(index=False)]
    out += ["", "speedup: mean tokens/s over vanilla's [95% CI over repeats]. median_ratio: median of per-prompt "
            "ratios to vanilla run in the same round [distribution-free 95% CI on the median from order "
            "statistics; (n=...) where under 6 batches give none]."]
    if "predicted" in cols:
        out.append("predicted: the speedup the step cost table measured at warm-up (costs.json) predicts from "
                   "the cell's per-position acceptance (mtp, fixed k, full draft head).")
    for _, r in s.drop_duplicates("run").iterrows():
        out.append(f"vanilla drift{'' if one_run else ' ' + str(r['run'])}: {_drift_line(r)}")
    return "\n".join(out)


# Plots. Every figure is built on a bare matplotlib Figure (no pyplot, so no global backend switch and
# nothing to close). A plot whose x axis would hold a single value is not drawn. Lines and the heatmap
# show each run's lowest temperature and smallest batch size unless that is the plot's x axis, averaged
# over categories and lengths; a speedup error bar is then the mean of the 95% bounds of the averaged
# rows, which is no narrower than the interval of their mean. Series sharing an x are shifted slightly
# sideways (ticks stay on the true values) so that their error bars stay apart.

TPS = "tokens/s"
SPEEDUP = "speedup over vanilla (x)"
AL = "acceptance length (tokens/step)"
AR = "acceptance rate (accepted / draft tokens)"
POS = "acceptance at position (accepted / drafts)"
MARKERS = "osD^vPX<>*"


def run_meta(run_dirs: str | Path | list[str | Path]) -> dict[str, str]:
    """Model, device (with dtype) and suites of one or more runs, from config.yaml and env.json."""
    import yaml

    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs
    found: dict[str, list[str]] = {"model": [], "device": [], "suite": []}
    for d in map(Path, dirs):
        cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").exists() else {}
        e = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
        if cfg.get("model"):
            found["model"].append(Path(cfg["model"]).name)
        device, dtype = e.get("gpu") or e.get("device") or cfg.get("device"), e.get("dtype") or cfg.get("dtype")
        if device:
            found["device"].append(f"{device} ({dtype})" if dtype else str(device))
        found["suite"] += ["/".join(Path(x).parts[-2:]) if x.endswith(".jsonl") else x for x in cfg.get("suites", [])]
    return {k: ", ".join(dict.fromkeys(v)) for k, v in found.items() if v}


def _heading(meta: dict[str, str] | None, s: pd.DataFrame) -> str:
    parts = [f"{k}: {v}" for k, v in (meta or {}).items() if v and k in ("model", "device", "suite")]
    if not parts:
        parts = [f"run: {', '.join(sorted(s['run'].unique()))}"]
    return "  |  ".join(parts)


def _label(r, multi: bool, with_k: bool = True) -> str:
    name = str(r["strategy"]) + (f" k={_k(r['k'])}" if with_k else "")
    if r["strategy"] == "mtp-tree":
        name += f" w={int(r['tree_width'])}"
    if r.get("draft_vocab", 0):
        name += f" V={int(r['draft_vocab'])}"
    return (f"{r['run']}: " if multi else "") + name


def _k_int(k) -> int | None:
    """k as a number, None for `auto` (a depth chosen per step)."""
    try:
        return int(k)
    except (TypeError, ValueError):
        return None


def _k(k) -> str:
    return str(k) if _k_int(k) is None else str(_k_int(k))


def _sort_key(v):
    """Mixed columns (k holds integers and 'auto') sort numbers first, then text."""
    return (1, v) if isinstance(v, str) else (0, v)


def _styles(labels: list[str]) -> dict[str, dict]:
    """A distinct colour per label (tab10, tab20, then a sampled colormap) and a marker as a second cue."""
    from matplotlib import colormaps

    n = len(labels)
    if n <= 10:
        colors = list(colormaps["tab10"].colors)
    elif n <= 20:  # the ten strong hues first, then their light partners
        colors = list(colormaps["tab20"].colors[0::2] + colormaps["tab20"].colors[1::2])
    else:
        colors = [colormaps["turbo"](i / (n - 1)) for i in range(n)]
    return {lab: {"color": colors[i % len(colors)], "marker": MARKERS[i % len(MARKERS)]}
            for i, lab in enumerate(labels)}


def _at_base(df: pd.DataFrame, free: str | None = None) -> pd.DataFrame:
    """Rows at each run's lowest temperature and smallest batch size, except along the `free` column."""
    for col in ("temperature", "batch_size"):
        if col != free and len(df):
            df = df[df[col] == df.groupby("run")[col].transform("min")]
    return df


def _where(df: pd.DataFrame, free: str | None = None) -> str:
    out = []
    if free != "temperature":
        out.append("T=" + "/".join(f"{t:g}" for t in sorted(df["temperature"].unique())))
    if free != "batch_size":
        out.append("batch " + "/".join(str(int(b)) for b in sorted(df["batch_size"].unique())))
    return ", ".join(out)


def _mean_by(g: pd.DataFrame, x: str) -> pd.DataFrame:
    cols = ["AL", "AR", "tokens_per_s", "speedup", "speedup_lo", "speedup_hi"]
    return g.groupby(x)[cols].agg(lambda c: c.mean(skipna=False)).reset_index()


def _errorbars(ax, x, y, lo, hi, color) -> None:
    import numpy as np

    x, y, lo, hi = (np.asarray(v, dtype=float) for v in (x, y, lo, hi))
    ok = ~(np.isnan(lo) | np.isnan(hi) | np.isnan(y))
    if ok.any():
        yerr = np.vstack([np.clip(y[ok] - lo[ok], 0, None), np.clip(hi[ok] - y[ok], 0, None)])
        ax.errorbar(x[ok], y[ok], yerr=yerr, fmt="none", ecolor=color, elinewidth=1, capsize=3)


def _ci_note(df: pd.DataFrame) -> str:
    return "95% CI over repeats" if df["speedup_lo"].notna().any() else "one repeat: no CI"


def _dodge(x, i: int, n: int, log2: bool = False):
    """Shift series i of n a little sideways so that markers and error bars at one x do not hide each other."""
    import numpy as np

    off = 0.16 * (i - (n - 1) / 2) / max(n - 1, 1)
    x = np.asarray(x, dtype=float)
    return x * 2 ** off if log2 else x + off


def _reference(ax, label: str = "vanilla") -> None:
    ax.axhline(1.0, color="0.35", lw=1, ls="--", label=label, zorder=0)


def _al_limits(ax) -> None:
    """AL axes start just below 1 (vanilla) and span at least up to 1.5, so that noise does not look like a trend."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, 0.95), max(hi, 1.5))


def _int_ticks(ax, values, log2: bool = False) -> None:
    from matplotlib.ticker import NullLocator

    values = sorted({int(v) for v in values})
    if log2:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(values, labels=[str(v) for v in values])
    if not log2 and len(values) > 1:
        pad = 0.3 * (values[-1] - values[0]) / (len(values) - 1)
        ax.set_xlim(values[0] - pad, values[-1] + pad)


def _new_figure(s: pd.DataFrame, meta: dict[str, str] | None, ncols: int = 1, width: float = 6.0,
                height: float = 4.0):
    import textwrap

    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    fig.suptitle(textwrap.fill(_heading(meta, s), width=int(width * 13)))
    return fig, list(axes)


def _legend(fig, ax) -> None:
    """One legend to the right of the axes, off the data."""
    handles, labels = [], []
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)


def _fig_per_position(spec, s, meta, multi, styles):
    t0 = _at_base(spec)
    t0 = t0[t0["AR"].notna()]  # groups that drafted nothing have no acceptance to show
    series = []
    for (_, _, k, _, _), g in t0.groupby(POLICY):
        # per_pos stops at the deepest accepted position: pad with zeros to the k drafted positions
        width = max([_k_int(k) or 0, *(len(p) for p in g["per_pos"])])
        rows = [list(p) + [0.0] * (width - len(p)) for p in g["per_pos"]]
        series.append((_label(g.iloc[0], multi), [sum(col) / len(rows) for col in zip(*rows)]))
    if max((len(m) for _, m in series), default=0) < 2:
        return None
    fig, (ax,) = _new_figure(s, meta, width=7)
    for lab, mean in series:
        ax.plot(range(1, len(mean) + 1), mean, label=lab, **styles[lab])
    _int_ticks(ax, range(1, max(len(m) for _, m in series) + 1))
    ax.set(xlabel="draft position", ylabel=POS, ylim=(-0.03, 1.05),
           title=f"Acceptance per draft position\n(unconditional; {_where(t0)}; mean over categories)")
    _legend(fig, ax)
    return fig


def _fig_vs_k(spec, s, meta, multi, styles):
    base = _at_base(spec)
    base = base[base["k"].map(_k_int).notna()].astype({"k": int})  # k = auto has no place on a k axis
    if base["k"].nunique() < 2:
        return None
    fig, (a1, a2) = _new_figure(s, meta, ncols=2, width=10)
    groups = list(base.groupby(["run", "strategy", "tree_width", "draft_vocab"]))
    for i, (_, g) in enumerate(groups):
        lab = _label(g.iloc[0], multi, with_k=False)
        st = styles.setdefault(lab, styles[_label(g.iloc[0], multi)])
        m = _mean_by(g, "k")
        x = _dodge(m["k"], i, len(groups))
        a1.plot(x, m["AL"], label=lab, **st)
        a2.plot(x, m["speedup"], label=lab, **st)
        _errorbars(a2, x, m["speedup"], m["speedup_lo"], m["speedup_hi"], st["color"])
    _reference(a1)
    _reference(a2)
    for ax in (a1, a2):
        _int_ticks(ax, base["k"])
    a1.set(xlabel="k (draft tokens per step)", ylabel=AL, title="Acceptance length vs k")
    _al_limits(a1)
    a2.set(xlabel="k (draft tokens per step)", ylabel=SPEEDUP, title=f"Speedup vs k ({_where(base)}; {_ci_note(base)})")
    _legend(fig, a2)
    return fig


def _series(d: pd.DataFrame, x: str):
    """(first row, means along x) per strategy setting, leaving out settings with a single x value."""
    for _, g in d.groupby(POLICY):
        if g[x].nunique() > 1:
            yield g.iloc[0], _mean_by(g, x)


def _fig_vs_temperature(spec, s, meta, multi, styles):
    d = _at_base(spec, free="temperature")
    series = list(_series(d, "temperature"))
    if not series:
        return None
    fig, (a1, a2) = _new_figure(s, meta, ncols=2, width=10)
    temps = set()
    for r, m in series:
        lab = _label(r, multi)
        a1.plot(m["temperature"], m["AL"], label=lab, **styles[lab])
        a2.plot(m["temperature"], m["AR"], label=lab, **styles[lab])
        temps |= set(m["temperature"])
    _reference(a1)
    for ax in (a1, a2):
        ax.set_xticks(sorted(temps), labels=[f"{t:g}" for t in sorted(temps)])
    a1.set(xlabel="temperature", ylabel=AL, title=f"Acceptance length vs temperature ({_where(d, 'temperature')})")
    _al_limits(a1)
    a2.set(xlabel="temperature", ylabel=AR, ylim=(-0.03, 1.05), title="Acceptance rate vs temperature")
    _legend(fig, a2)
    return fig


def _fig_vs_batch(s, meta, multi, styles):
    d = _at_base(s, free="batch_size")
    series = list(_series(d, "batch_size"))
    if not series:
        return None
    batches = sorted({int(b) for _, m in series for b in m["batch_size"]})
    log2 = batches[0] > 0 and all(b & (b - 1) == 0 for b in batches) and batches[-1] / batches[0] >= 4
    fig, (a1, a2) = _new_figure(s, meta, ncols=2, width=10)
    runs = sorted(s["run"].unique())
    for i, (r, m) in enumerate(series):
        x = _dodge(m["batch_size"], i, len(series), log2)
        if r["strategy"] == "vanilla":
            a1.plot(x, m["tokens_per_s"], color="0.2", ls="--", marker=MARKERS[runs.index(r["run"])],
                    label=(f"{r['run']}: " if multi else "") + "vanilla")
            continue
        lab = _label(r, multi)
        a1.plot(x, m["tokens_per_s"], label=lab, **styles[lab])
        a2.plot(x, m["speedup"], label=lab, **styles[lab])
        _errorbars(a2, x, m["speedup"], m["speedup_lo"], m["speedup_hi"], styles[lab]["color"])
    _reference(a2)
    for ax in (a1, a2):
        _int_ticks(ax, batches, log2=log2)
    a1.set(xlabel="batch size", ylabel=f"throughput ({TPS})",
           title=f"Throughput vs batch size ({_where(d, 'batch_size')})")
    a2.set(xlabel="batch size", ylabel=SPEEDUP, title=f"Speedup vs batch size ({_ci_note(d)})")
    _legend(fig, a2)
    return fig


def _fig_policy_vs_batch(spec, s, meta, multi):
    """Speedup (median of per-prompt ratios, with its interval) against batch size, one line per policy
    (strategy, k, draft vocabulary), one panel per category (pooled over categories past three), and
    vanilla at 1: where does each policy stop paying? Colour: strategy and k; line style: draft vocabulary."""
    d = _at_base(spec, free="batch_size")
    if d["batch_size"].nunique() < 2:
        return None
    cats = sorted(d["category"].astype(str).unique())
    pooled = len(cats) > 3
    col = "speedup_median_all" if pooled else "speedup_median"
    if pooled:
        d = d.drop_duplicates([*POLICY, "temperature", "batch_size", "max_new_tokens"]).assign(category="all")
        cats = ["all"]
    batches = sorted(int(b) for b in d["batch_size"].unique())
    log2 = batches[0] > 0 and all(b & (b - 1) == 0 for b in batches) and batches[-1] / batches[0] >= 4
    heads = ["run", "strategy", "k", "tree_width"]
    kinds = d[heads].drop_duplicates().sort_values(heads, key=lambda c: c.map(_sort_key))
    colors = _styles([_label(r, multi) for _, r in kinds.iterrows()])
    vocabs = sorted(int(v) for v in d["draft_vocab"].unique())
    dashes = dict(zip(vocabs, ["-", "--", ":", "-.", (0, (5, 1, 1, 1))] * 4))
    fig, axes = _new_figure(s, meta, ncols=len(cats), width=4.2 * len(cats) + 2.2, height=4.2)
    groups = list(d.groupby(POLICY, sort=False))
    for ax in axes[1:]:
        ax.sharey(axes[0])  # panels compare at a glance
    for ax, cat in zip(axes, cats):
        for i, (_, g) in enumerate(groups):
            g = g[g["category"].astype(str) == cat]
            if g.empty:
                continue
            m = g.groupby("batch_size")[[col, f"{col}_lo", f"{col}_hi"]].mean().reset_index()
            r = g.iloc[0]
            st = colors[_label(r[heads], multi)]  # one colour per strategy and k, whatever the vocabulary
            vocab = int(r["draft_vocab"])
            x = _dodge(m["batch_size"], i, len(groups), log2)
            ax.plot(x, m[col], color=st["color"], marker=st["marker"], ls=dashes[vocab], label=_label(r, multi))
            _errorbars(ax, x, m[col], m[f"{col}_lo"], m[f"{col}_hi"], st["color"])
        _reference(ax)
        _int_ticks(ax, batches, log2=log2)
        ax.set(xlabel="batch size", ylabel=SPEEDUP if ax is axes[0] else "", title=f"{cat}: speedup vs batch size")
    fig.supxlabel(f"median of per-prompt ratios to vanilla in the same round, with its 95% interval (from 6 "
                  f"batches on); {_where(d, 'batch_size')}; line style: draft vocabulary (solid: full head)",
                  fontsize=7)
    _legend(fig, axes[-1])
    return fig


def _fig_per_category(spec, s, meta, multi):
    import numpy as np
    from matplotlib import colormaps

    base = _at_base(spec)
    cats = sorted(base["category"].astype(str).unique())
    if len(cats) < 2:
        return None
    rows = [(_label(g.iloc[0], multi), g.groupby(g["category"].astype(str))["AL"].mean())
            for _, g in base.groupby(POLICY)]
    grid = np.array([[al.get(c, np.nan) for c in cats] for _, al in rows], dtype=float)
    label_w = max(len(lab) for lab, _ in rows) * 0.07
    fig, (ax,) = _new_figure(s, meta, width=max(6.0, 2.2 + label_w + 0.62 * len(cats)),
                             height=max(3.2, 2.2 + 0.36 * len(rows)))
    # colour from AL 1 (nothing accepted, as vanilla) to at least 2, so that tiny differences do not look large
    lo, hi = 1.0, max(2.0, float(np.nanmax(grid)))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=colormaps["viridis"].with_extremes(bad="0.85"),
                   vmin=lo, vmax=hi)
    tilt = len(cats) > 6 or max(map(len, cats)) > 10
    ax.set_xticks(range(len(cats)), labels=cats, fontsize=8, rotation=40 if tilt else 0,
                  ha="right" if tilt else "center", rotation_mode="anchor")
    ax.set_yticks(range(len(rows)), labels=[lab for lab, _ in rows], fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
        light = not np.isnan(v) and (v - lo) / (hi - lo) > 0.6
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="black" if light else "white" if not np.isnan(v) else "0.3")
    ax.set(xlabel="category", title=f"Acceptance length per category ({_where(base)})")
    fig.colorbar(im, ax=ax, label=AL, fraction=0.05, pad=0.02)
    return fig


def figures(s: pd.DataFrame, meta: dict[str, str] | None = None) -> dict[str, Figure]:
    """The report's figures by file name (matplotlib Figures); plots whose x axis has one value are left out.

    `meta` (see `run_meta`) names the model, device and suites in every title. Peers (other
    implementations, no drafts) appear in the tables, not in these acceptance plots."""
    spec = s[(s["strategy"] != "vanilla") & ~s["strategy"].isin(PEERS)]
    if spec.empty:
        return {}
    from matplotlib import rc_context

    multi = s["run"].nunique() > 1
    keys = spec[POLICY].drop_duplicates().sort_values(POLICY, key=lambda c: c.map(_sort_key))
    styles = _styles([_label(r, multi) for _, r in keys.iterrows()])
    with rc_context({"axes.titlesize": 10, "figure.titlesize": 9, "legend.fontsize": 8}):
        figs = {
            "acceptance_per_position.png": _fig_per_position(spec, s, meta, multi, styles),
            "al_speedup_vs_k.png": _fig_vs_k(spec, s, meta, multi, styles),
            "acceptance_vs_temperature.png": _fig_vs_temperature(spec, s, meta, multi, styles),
            "speedup_vs_batch.png": _fig_vs_batch(s, meta, multi, styles),
            "speedup_vs_batch_by_policy.png": _fig_policy_vs_batch(spec, s, meta, multi),
            "per_category.png": _fig_per_category(spec, s, meta, multi),
        }
    return {name: f for name, f in figs.items() if f is not None}


def plots(s: pd.DataFrame, out_dir: str | Path, meta: dict[str, str] | None = None) -> list[Path]:
    """Write the report's PNGs to out_dir; returns the files written (plots with a one-value x axis are skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, fig in figures(s, meta).items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        files.append(out / name)
    return files


def report(run_dirs: list[str | Path], plot_dir: str | Path | None = None) -> tuple[pd.DataFrame, list[Path]]:
    df = pd.concat([load_requests(r) for r in run_dirs], ignore_index=True)
    s = summarize(df, load_costs(run_dirs))
    files = plots(s, plot_dir or Path(run_dirs[0]) / "plots", meta=run_meta(run_dirs))
    return s, files


def env(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "env.json").read_text())
