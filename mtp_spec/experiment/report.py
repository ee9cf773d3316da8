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
from typing import TYPE_CHECKING

import pandas as pd

from mtp_spec.decoding.strategies import PEERS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KEYS = ["strategy", "k", "tree_width", "temperature", "batch_size", "max_new_tokens", "category"]


def load_requests(run_dir: str | Path) -> pd.DataFrame:
    from mtp_spec.experiment.records import read_records

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
        "lossless_ties": int((g["lossless"] == "tie").sum()),  # divergences at a numerical tie (see runner)
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
    t["lossless"] = [("-" if c == 0 else ("OK" if v == 0 else f"FAIL {v}/{c}") + (f" ({n} ties)" if n else ""))
                     for v, n, c in zip(t["lossless_violations"], t["lossless_ties"], t["lossless_checked"])]
    t["speedup"] = [f"{x:.2f}" + (f" [{a:.2f}, {b:.2f}]" if not math.isnan(a) else "")
                    for x, a, b in zip(t["speedup"], t["speedup_lo"], t["speedup_hi"])]
    if t["run"].nunique() == 1:
        cols.remove("run")
    return t[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")


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
    name = str(r["strategy"]) + (f" k={int(r['k'])}" if with_k else "")
    if r["strategy"] == "mtp-tree":
        name += f" w={int(r['tree_width'])}"
    return (f"{r['run']}: " if multi else "") + name


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
    for (_, _, k, _), g in t0.groupby(["run", "strategy", "k", "tree_width"]):
        # per_pos stops at the deepest accepted position: pad with zeros to the k drafted positions
        width = max([int(k), *(len(p) for p in g["per_pos"])])
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
    if base["k"].nunique() < 2:
        return None
    fig, (a1, a2) = _new_figure(s, meta, ncols=2, width=10)
    groups = list(base.groupby(["run", "strategy", "tree_width"]))
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
    for _, g in d.groupby(["run", "strategy", "k", "tree_width"]):
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


def _fig_per_category(spec, s, meta, multi):
    import numpy as np
    from matplotlib import colormaps

    base = _at_base(spec)
    cats = sorted(base["category"].astype(str).unique())
    if len(cats) < 2:
        return None
    rows = [(_label(g.iloc[0], multi), g.groupby(g["category"].astype(str))["AL"].mean())
            for _, g in base.groupby(["run", "strategy", "k", "tree_width"])]
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
    keys = spec[["run", "strategy", "k", "tree_width"]].drop_duplicates().sort_values(["run", "strategy", "k",
                                                                                       "tree_width"])
    styles = _styles([_label(r, multi) for _, r in keys.iterrows()])
    with rc_context({"axes.titlesize": 10, "figure.titlesize": 9, "legend.fontsize": 8}):
        figs = {
            "acceptance_per_position.png": _fig_per_position(spec, s, meta, multi, styles),
            "al_speedup_vs_k.png": _fig_vs_k(spec, s, meta, multi, styles),
            "acceptance_vs_temperature.png": _fig_vs_temperature(spec, s, meta, multi, styles),
            "speedup_vs_batch.png": _fig_vs_batch(s, meta, multi, styles),
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
    s = summarize(df)
    files = plots(s, plot_dir or Path(run_dirs[0]) / "plots", meta=run_meta(run_dirs))
    return s, files


def env(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "env.json").read_text())
