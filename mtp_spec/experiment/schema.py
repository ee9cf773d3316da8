"""Experiment configs (YAML): the model, prompt suites, strategies and the axes to sweep.

    name: depth_sweep
    model: shipped                     # or a checkpoint dir
    draft_model: shipped-draft         # for the draft-model strategy (optional)
    suites: [code, prose]              # shipped suite names, or JSONL paths (ours or Spec-Bench's)
    prompts_per_suite: 20
    strategies:
      - {name: mtp, k: [1, 2, 3, 4, auto], draft_vocab: [full, 1024]}
      - {name: mtp-tree, k: [3], tree_width: [2, 3]}
      - {name: ngram, k: [3], ngram_max: 3}
    sweep: {temperature: [0.0], top_p: 1.0, top_k: 0, batch_size: [1], max_new_tokens: [64],
            seeds: [0], repeats: 1}
    device: cpu
    dtype: float32
    warmup: 1

`k: auto` (mtp only) picks the depth before every step; `draft_vocab: N` makes the MTP layer draft
from the N most frequent tokens (FR-Spec; `full` or 0: the whole head), counted in the model's
`token_counts.json`. Every list is an axis; the run covers their cartesian product. The vanilla
baseline is always run on the same prompts. Unknown keys, wrong types and missing files are errors
that name them.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mtp_spec.decoding.strategies import MTP_DRAFTERS, PEERS, STRATEGIES
from mtp_spec.loader import ASSETS, COMPILE, DTYPES
from mtp_spec.loader import resolve_model as _resolve


class ExperimentConfigError(ValueError):
    pass





@dataclass(frozen=True)
class Strategy:
    name: str
    k: list[int | str] = field(default_factory=lambda: [3])  # "auto": chosen per step (mtp)
    tree_width: list[int] = field(default_factory=lambda: [2])
    ngram_max: int = 3
    draft_vocab: list[int] = field(default_factory=lambda: [0])  # 0: the full head


@dataclass(frozen=True)
class Sweep:
    temperature: list[float] = field(default_factory=lambda: [0.0])
    top_p: float = 1.0
    top_k: int = 0
    batch_size: list[int] = field(default_factory=lambda: [1])
    max_new_tokens: list[int] = field(default_factory=lambda: [64])
    seeds: list[int] = field(default_factory=lambda: [0])
    repeats: int = 1


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str = "shipped"
    draft_model: str | None = None
    suites: list[str] = field(default_factory=lambda: ["code"])
    prompts_per_suite: int = 10
    strategies: list[Strategy] = field(default_factory=list)
    sweep: Sweep = field(default_factory=Sweep)
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 1
    mtp_hidden: str = "post"
    compile: str = "auto"  # off | on | auto, as `generate --compile`
    peers: list[str] = field(default_factory=list)  # other implementations on the same prompts (PEERS)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a strategy setting under one sampling/batch/length/seed/repeat setting."""

    strategy: str
    k: int | str  # "auto": chosen per step
    tree_width: int
    temperature: float
    batch_size: int
    max_new_tokens: int
    seed: int
    repeat: int
    draft_vocab: int = 0  # the MTP layer drafts from this many most frequent tokens; 0: the full head

    def key(self) -> str:
        vocab = f"|v{self.draft_vocab}" if self.draft_vocab else ""  # full-head keys as before: old runs resume
        return (f"{self.strategy}|k{self.k}|w{self.tree_width}{vocab}|T{self.temperature}|b{self.batch_size}|"
                f"n{self.max_new_tokens}|s{self.seed}|r{self.repeat}")

    def baseline(self) -> Cell:
        return Cell("vanilla", 0, 0, self.temperature, self.batch_size, self.max_new_tokens, self.seed, self.repeat)


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def _typed(value, kind, where: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ExperimentConfigError(f"{where}: expected {_TYPES[kind]}, got {value!r}")
    return value


def _list(value, kind, where: str) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ExperimentConfigError(f"{where}: must not be empty")
    return [_typed(v, kind, f"{where}[{i}]") for i, v in enumerate(values)]


def _check_keys(d, allowed: set, where: str) -> None:
    if not isinstance(d, dict):
        raise ExperimentConfigError(f"{where}: expected a mapping, got {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ExperimentConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _depths(value, strategy: str, where: str) -> list[int | str]:
    """Draft depths: whole numbers >= 1, or `auto` (mtp: the depth is chosen before every step)."""
    out = []
    for i, k in enumerate(value if isinstance(value, list) else [value]):
        if k == "auto":
            if strategy != "mtp":
                raise ExperimentConfigError(f"{where}: k auto works with strategy mtp only, not {strategy}")
            out.append("auto")
        elif _typed(k, int, f"{where}[{i}]") < 1:
            raise ExperimentConfigError(f"{where}: every k must be >= 1 or auto, got {k}")
        else:
            out.append(k)
    if not out:
        raise ExperimentConfigError(f"{where}: must not be empty")
    return out


def _draft_vocabs(value, strategy: str, where: str) -> list[int]:
    """Draft vocabulary sizes: whole numbers >= 1, or `full` / 0 / null for the whole head."""
    out = []
    for i, n in enumerate(value if isinstance(value, list) else [value]):
        n = 0 if n in ("full", None) else _typed(n, int, f"{where}[{i}]")
        if n < 0:
            raise ExperimentConfigError(f"{where}: a draft vocabulary size must be >= 1 (or full), got {n}")
        out.append(n)
    if not out:
        raise ExperimentConfigError(f"{where}: must not be empty")
    if any(out) and strategy not in MTP_DRAFTERS:
        raise ExperimentConfigError(f"{where}: applies to strategies that draft with the MTP layer "
                                    f"({', '.join(MTP_DRAFTERS)}), not {strategy}")
    return out


def _check_draft_vocabs(exp: Experiment, source: str) -> None:
    """Sizes within the model's vocabulary, and the token frequencies they are drawn from present."""
    sizes = {n for s in exp.strategies for n in s.draft_vocab if n}
    if not sizes:
        return
    from mtp_spec.draft_vocab import counts_file
    from mtp_spec.loader import model_args

    path = resolve_model(exp.model, f"{source}: model")
    vocab = model_args(path).vocab_size
    if max(sizes) > vocab:
        raise ExperimentConfigError(f"{source}: strategies.draft_vocab: {max(sizes)} is more than the model's "
                                    f"vocab_size {vocab}")
    if not counts_file(path).is_file():
        raise ExperimentConfigError(f"{source}: strategies.draft_vocab needs token frequencies: {counts_file(path)} "
                                    f"does not exist (write it with `mtp-spec count-tokens --model {path}`)")


def parse(raw: dict, source: str = "config") -> Experiment:
    top = {"name", "model", "draft_model", "suites", "prompts_per_suite", "strategies", "sweep", "device",
           "dtype", "warmup", "mtp_hidden", "compile", "peers"}
    _check_keys(raw, top, source)
    if "name" not in raw:
        raise ExperimentConfigError(f"{source}: missing key 'name'")
    if not raw.get("strategies"):
        raise ExperimentConfigError(f"{source}: 'strategies' must list at least one strategy")
    strategies = []
    for i, s in enumerate(raw["strategies"]):
        where = f"{source}: strategies[{i}]"
        _check_keys(s, {"name", "k", "tree_width", "ngram_max", "draft_vocab"}, where)
        if s.get("name") not in STRATEGIES:
            raise ExperimentConfigError(f"{where}.name: {s.get('name')!r} is not one of {list(STRATEGIES)}")
        ks = _depths(s.get("k", 3), s["name"], f"{where}.k")
        strategies.append(Strategy(s["name"], ks, _list(s.get("tree_width", 2), int, f"{where}.tree_width"),
                                   _typed(s.get("ngram_max", 3), int, f"{where}.ngram_max"),
                                   _draft_vocabs(s.get("draft_vocab", 0), s["name"], f"{where}.draft_vocab")))
    sw = raw.get("sweep", {}) or {}
    where = f"{source}: sweep"
    _check_keys(sw, {"temperature", "top_p", "top_k", "batch_size", "max_new_tokens", "seeds", "repeats"}, where)
    sweep = Sweep(_list(sw.get("temperature", 0.0), float, f"{where}.temperature"),
                  _typed(sw.get("top_p", 1.0), float, f"{where}.top_p"),
                  _typed(sw.get("top_k", 0), int, f"{where}.top_k"),
                  _list(sw.get("batch_size", 1), int, f"{where}.batch_size"),
                  _list(sw.get("max_new_tokens", 64), int, f"{where}.max_new_tokens"),
                  _list(sw.get("seeds", 0), int, f"{where}.seeds"),
                  _typed(sw.get("repeats", 1), int, f"{where}.repeats"))
    exp = Experiment(
        name=_typed(raw["name"], str, f"{source}: name"),
        model=_typed(raw.get("model", "shipped"), str, f"{source}: model"),
        draft_model=raw.get("draft_model") and _typed(raw["draft_model"], str, f"{source}: draft_model"),
        suites=_list(raw.get("suites", ["code"]), str, f"{source}: suites"),
        prompts_per_suite=_typed(raw.get("prompts_per_suite", 10), int, f"{source}: prompts_per_suite"),
        strategies=strategies, sweep=sweep, device=_typed(raw.get("device", "cpu"), str, f"{source}: device"),
        dtype=_typed(raw.get("dtype", "float32"), str, f"{source}: dtype"),
        warmup=_typed(raw.get("warmup", 1), int, f"{source}: warmup"),
        mtp_hidden=_typed(raw.get("mtp_hidden", "post"), str, f"{source}: mtp_hidden"),
        compile=_typed(raw.get("compile", "auto"), str, f"{source}: compile"),
        peers=_list(raw.get("peers", []), str, f"{source}: peers") if raw.get("peers") else [])
    for p in exp.peers:
        if p not in PEERS:
            raise ExperimentConfigError(f"{source}: peers: {p!r} is not one of {', '.join(PEERS)}")
    if exp.compile not in COMPILE:
        raise ExperimentConfigError(f"{source}: compile: {exp.compile!r} is not one of {', '.join(COMPILE)}")
    if exp.dtype not in DTYPES:
        raise ExperimentConfigError(f"{source}: dtype: {exp.dtype!r} is not one of {', '.join(DTYPES)}")
    if exp.mtp_hidden not in ("post", "pre"):
        raise ExperimentConfigError(f"{source}: mtp_hidden: {exp.mtp_hidden!r} is not 'post' or 'pre'")
    if any(s.name == "draft-model" for s in strategies) and not exp.draft_model:
        raise ExperimentConfigError(f"{source}: strategy draft-model needs 'draft_model'")
    resolve_model(exp.model, f"{source}: model")
    if exp.draft_model:
        resolve_model(exp.draft_model, f"{source}: draft_model")
    for s in exp.suites:
        resolve_suite(s, f"{source}: suites")
    _check_draft_vocabs(exp, source)
    return exp


def load(path: str | Path) -> Experiment:
    p = Path(path)
    if not p.exists():
        raise ExperimentConfigError(f"{p}: no such experiment config")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ExperimentConfigError(f"{p}: not valid YAML ({e})") from None
    return parse(raw or {}, str(p))


def resolve_model(name: str, where: str = "model") -> Path:
    """A model name (see mtp_spec.loader.MODEL_NAMES) or a checkpoint directory."""
    try:
        return _resolve(name, where)
    except ValueError as e:
        raise ExperimentConfigError(str(e)) from None


def resolve_suite(name: str, where: str = "suites") -> Path:
    p = ASSETS / "prompts" / f"{name}.jsonl"
    if p.exists():
        return p
    p = Path(name)
    if not p.exists():
        raise ExperimentConfigError(f"{where}: prompt suite {name!r} is neither a shipped suite nor a file")
    return p


def load_prompts(path: Path, limit: int = 0) -> list[dict]:
    """Our suite format ({"id", "category", "prompt" | "messages"}) or Spec-Bench's question.jsonl
    ({"question_id", "category", "turns": [...]}, first turn as a user message). A `limit` samples
    that many rows evenly across categories (`sample_by_category`)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExperimentConfigError(f"{path}:{n}: not JSON ({e})") from None
        if "turns" in r:
            rows.append({"id": str(r.get("question_id", n)), "category": r.get("category", "spec-bench"),
                         "messages": [{"role": "user", "content": r["turns"][0]}]})
        elif "prompt" in r or "messages" in r:
            rows.append({"id": str(r.get("id", n)), "category": r.get("category", path.stem), **(
                {"prompt": r["prompt"]} if "prompt" in r else {"messages": r["messages"]})})
        else:
            raise ExperimentConfigError(f"{path}:{n}: needs 'prompt', 'messages' or 'turns'")
    return sample_by_category(rows, limit) if limit else rows


def sample_by_category(rows: list[dict], limit: int) -> list[dict]:
    """The first `limit` rows of a round-robin over categories in file order (first row of each
    category, then the second, ...), so that a Spec-Bench file's 13 categories are all sampled
    evenly rather than the first N lines of its first category. One category: the first N lines."""
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    out = []
    for i in range(max(map(len, by_cat.values()), default=0)):
        out += [group[i] for group in by_cat.values() if i < len(group)]
    return out[:limit]


def cells(exp: Experiment) -> list[Cell]:
    """The sweep's cells, vanilla first in each setting. The runner groups them by `Cell.baseline()`
    and runs each group's cells prompt by prompt in rotating order (runner.plan)."""
    sw = exp.sweep
    base = list(itertools.product(sw.temperature, sw.batch_size, sw.max_new_tokens, sw.seeds, range(sw.repeats)))
    out = [Cell("vanilla", 0, 0, *b) for b in base]
    for s in exp.strategies:
        if s.name == "vanilla":
            continue
        widths = s.tree_width if s.name == "mtp-tree" else [0]
        for k, w, v, b in itertools.product(s.k, widths, s.draft_vocab, base):
            out.append(Cell(s.name, k, w, *b, draft_vocab=v))
    out += [Cell(p, 0, 0, *b) for p in exp.peers for b in base if b[0] == 0.0]
    return out
