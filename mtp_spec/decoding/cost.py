"""What a speculative step costs on the loaded model, what it brings, and the depth worth running.

Times in seconds for the model on its device (a `CostModel`):
  verify(n, b)   one forward of n tokens per row at batch b; n = 1 is plain decoding
  draft(b)       one chained MTP draft step, (b, 1) with full logits
  extend(n, b)   the MTP draft extend over n committed tokens per row (logits at one position)
A step of depth k as `MTPProposer` runs it: extend the k + 1 tokens the previous step committed (which
yields draft 1), k - 1 chained draft steps, then verify the newest token and the k drafts. By the
forwards alone (`table_time` where no whole steps were timed; the report's predictions):
  step_time(k, b) = verify(k + 1, b) + extend(k + 1, b) + (k - 1) draft(b)     k >= 1
  step_time(0, b) = verify(1, b)     the MTP cache catches up later, in one extend of what is pending
With conditional acceptance p_j = P(draft j accepted | drafts 1..j-1 accepted) a row emits
  expected_tokens(p, k) = 1 + sum_{j=1..k} prod_{i<=j} p_i
tokens per step (the bonus or correction token included). Rows that finished stay in the batch, so a
step costs step_time(k, b) for the whole batch while only the active rows emit.

The forwards' sum misses what the engine adds around them and what they do to each other's caches,
so `auto` reads whole engine steps where they were timed (`timing.measure_steps`): `step_table`,
points (k + 1, b), and `off_table`, the step with drafting off, which prices k = 0 (what a batch gets
by stopping; a plain step that keeps the MTP layer ready costs 1.07-1.22x that on the toy).

Times between measured points are linear in n (along each measured batch) and then in b. Outside the
measured range: below the smallest n or b the edge value holds (small steps are bound by reading the
weights, not cheaper); above the largest the last segment continues, never falling (one point: flat).

Online the tables stay as measured; each timed step's ratio of what it took to what the tables say
(`table_time`, the MTP parts it ran included; `off_table` for a step with drafting off) refreshes
  speed(b)       the pace at batch b: the median ratio of the last SPEED_WINDOW steps there, any
                 depth (ones standing in for steps not yet seen, up to a majority, so one or two slow
                 steps cannot decide; at a batch size not yet run: the pace of all recent steps)
  factor(k, b)   depth k's: the median of its own last OWN_WINDOW ratios at b once it has a majority
                 of them, else the pace (k = -1: steps with drafting off, which price plain decoding)
  step_time(k, b) = factor(k, b) * table_time(k, b)      (k = 0: factor(-1, b) * off_table)
A depth with steps of its own is told apart from its neighbours by them (seen: k = 1 run on 97% of
the steps at batch 1 while k = 2 paid 11% more, because the table's verify(3, 1) was a few ms high);
one without (plain decoding while `auto` drafts, a depth never tried) follows the pace, so that a
machine that changes speed moves it too (seen, with plain decoding refreshed by plain steps alone:
its price stayed at the warm-up value and drafting looked 1.2-1.5x better than it was). Ratios to
the table rather than offsets from the pace of their moment: depths mostly run in different batches
(drafting in one, off in the next), each then sets the pace of its own steps, and an offset from
that pace learns nothing of the table's error between them (tried: the toy at batch 1 read k = 1 at
0.99x plain decoding and ran it in 1 batch of 32 where it measured 1.11x). Plain steps that keep the
MTP layer ready (k = 0 before drafting turns off) move the pace and their own ratio, not plain
decoding's price: steps against one table point do not price another (seen: their ratio fell to
0.7, priced plain decoding 30% low and turned batches off). `forget` pulls the own ratios halfway to
the pace at each batch, so that one learned once (then never re-measured where it turned drafting
off) is re-checked.
The engine does not time the MTP parts apart (that would need device syncs inside the step), so
what they miss lands in the ratios.

JSON (`to_json`, `from_json`; another tool reads it):
  {"device": str, "verify": [[n_tokens, batch, seconds], ...], "draft": [[batch, seconds], ...],
   "extend": [[n_tokens, batch, seconds], ...]}       "extend" is optional; without it extend = draft.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_PRIOR = 0.5  # conditional acceptance per position before anything is known about the model
# pseudo-observations behind a prior: the Beta whose spread is the spread of acceptance between requests
# (SmolLM2, fixed k = 1, 64 code and prose prompts: p_1 0.51, between-request sd 0.17 -> weight 7.8).
# At 4, four rejections on a request's first steps halved its estimate, auto stopped drafting, and a
# row at k = 0 learns nothing more: batches where k = 1 paid 1.3-1.5x decoded plainly.
PRIOR_WEIGHT = 8.0
SPEED_WINDOW = 9  # steps (any depth) whose median ratio to the table is the pace: one outlier moves nothing
OWN_WINDOW = 5  # a depth's own steps whose median ratio sets it apart from the pace
PRIOR_FILE = "acceptance.json"  # a model's recorded acceptance, beside its weights (experiments/record_acceptance.py)


def expected_tokens(p: Sequence[float], k: int) -> float:
    """Tokens a row emits per step at depth k, from conditional acceptance p_1..p_k (positions past
    the given rates repeat the last one)."""
    if k > 0 and not p:
        raise ValueError("acceptance: no per-position rates given")
    total, reach = 1.0, 1.0
    for j in range(k):
        reach *= p[min(j, len(p) - 1)]
        total += reach
    return total


def _interp(pts: list[tuple[float, float]], x: float) -> float:
    """Piecewise linear through (x, y) points sorted by x; the edge value below, the last segment above."""
    if x <= pts[0][0] or len(pts) == 1:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = pts[-2:]
    return max(y1, y1 + (y1 - y0) * (x - x1) / (x1 - x0))


@dataclass
class Table:
    """Seconds at measured (n_tokens, batch) points."""

    points: dict[tuple[int, int], float] = field(default_factory=dict)
    # the points sorted per batch size, and what they were sorted from: the chooser reads the tables
    # several times a step, and sorting them each time cost the toy model 3% of its step
    _rows: list = field(default_factory=list, repr=False, compare=False)
    _from: tuple = field(default=(), repr=False, compare=False)

    def batches(self) -> list[int]:
        return sorted({b for _, b in self.points})

    def __call__(self, n: int, b: int) -> float:
        if not self.points:
            raise ValueError("the cost table has no measured points")
        if self._from != (now := tuple(self.points.items())):
            self._rows = [(pb, sorted((pn, t) for (pn, qb), t in self.points.items() if qb == pb))
                          for pb in self.batches()]
            self._from = now
        return _interp([(pb, _interp(pts, n)) for pb, pts in self._rows], b)


@dataclass
class CostModel:
    device: str = "cpu"
    verify_table: Table = field(default_factory=Table)
    draft_table: Table = field(default_factory=Table)  # n = 1 only
    extend_table: Table | None = None
    # the engine's whole step of depth k at batch b, points (k + 1, b) (`timing.measure_steps`)
    step_table: Table | None = None
    # the engine's step once drafting is off (vanilla's: no MTP layer, no hidden states handed over), (1, b)
    off_table: Table | None = None
    online: bool = True  # refresh the pace and the own ratios from the engine's step times
    paces: dict[int, deque] = field(default_factory=dict)  # per batch size: the last steps' ratios to the table
    # per (depth, batch size), -1 for steps with drafting off: the same ratios, its own steps only
    owns: dict[tuple[int, int], deque] = field(default_factory=dict)

    def verify(self, n: int, b: int) -> float:
        return self.verify_table(n, b)

    def draft(self, b: int) -> float:
        return self.draft_table(1, b)

    def extend(self, n: int, b: int) -> float:
        return self.extend_table(n, b) if self.extend_table is not None else self.draft(b)

    def table_time(self, k: int, b: int, mtp_seconds: float | None = None) -> float:
        """A step of depth k at batch b by the warm-up tables alone: the engine's whole step where it
        was timed (`step_table`), else its forwards. `mtp_seconds`: what this step's MTP parts took by
        the table, where they differ from a steady step's (a plain step's catch-up extend, a first
        drafting step's extend of all that waited)."""
        steady = self.extend(k + 1, b) + (k - 1) * self.draft(b) if k else 0.0
        extra = 0.0 if mtp_seconds is None else mtp_seconds - steady
        base = self.step_table(k + 1, b) if self.step_table is not None else self.verify(k + 1, b) + steady
        return max(base + extra, 1e-9)

    def speed(self, b: int) -> float:
        """The machine's pace at batch b: step times over the table's, any depth. Until b has a
        majority of a window of steps, the pace of all recent steps stands in for the missing ones."""
        d = self.paces.get(b, ())
        need = SPEED_WINDOW // 2 + 1
        if len(d) >= need:
            return statistics.median(d)
        everything = [r for q in self.paces.values() for r in q]
        prior = statistics.median(everything + [1.0] * (need - len(everything))) if everything else 1.0
        return statistics.median(list(d) + [prior] * (need - len(d)))

    def factor(self, k: int, b: int) -> float:
        """What a step of depth k at batch b (-1: drafting off) takes now over what the table says: the
        median of depth k's own last steps there once it has a majority of a window of them, else the
        pace."""
        d = self.owns.get((k, b), ())
        return statistics.median(d) if len(d) > OWN_WINDOW // 2 else self.speed(b)

    def forget(self, factor: float = 0.5) -> None:
        """Pull each depth's own ratios halfway to the pace: called per batch, so that one learned once
        (then never re-measured where it turned drafting off) is re-checked."""
        self.owns = {(k, b): deque((self.speed(b) + (r - self.speed(b)) * factor for r in d), maxlen=d.maxlen)
                     for (k, b), d in self.owns.items()}

    def step_time(self, k: int, b: int) -> float:
        """Seconds of a step of depth k at batch b now. k = 0 is priced as decoding with drafting off
        where that was timed (`off_table`): what a batch gets by stopping. A plain step that keeps the
        MTP layer ready to draft again costs more (the toy: 1.07-1.22x of vanilla's step), a price of
        waiting to probe, not of plain decoding."""
        if k == 0 and self.off_table is not None:
            return self.factor(-1, b) * self.off_table(1, b)
        return self.factor(k, b) * self.table_time(k, b)

    def tokens_per_s(self, p: Sequence[float], k: int, b: int, active: int | None = None) -> float:
        """Predicted throughput of a batch of b rows, `active` of them emitting (default all), all at p."""
        return (b if active is None else active) * expected_tokens(p, k) / self.step_time(k, b)

    def observe_step(self, k: int, b: int, seconds: float, mtp_seconds: float, off: bool = False) -> None:
        """One step of depth k at batch b took `seconds`, `mtp_seconds` of them (by the table) in the
        MTP layer: its ratio to the table refreshes the pace at b and its depth's own ratio. `off`: a
        step with drafting off (k = 0), measured against `off_table`, the table that prices it: against
        the plain step that keeps the MTP layer ready (5-10% dearer), a batch that had turned drafting
        off left plain decoding priced that much low for the next one."""
        if not self.online:
            return
        if off and self.off_table is not None:
            ratio, key = seconds / self.off_table(1, b), (-1, b)
        else:
            ratio, key = seconds / self.table_time(k, b, mtp_seconds), (k, b)
        self.owns.setdefault(key, deque(maxlen=OWN_WINDOW)).append(ratio)
        self.paces.setdefault(b, deque(maxlen=SPEED_WINDOW)).append(ratio)

    # --- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        rows = lambda t: [[n, b, s] for (n, b), s in sorted(t.points.items())]
        out = {"device": self.device, "verify": rows(self.verify_table),
               "draft": [[b, s] for (_, b), s in sorted(self.draft_table.points.items())]}
        if self.extend_table is not None:
            out["extend"] = rows(self.extend_table)
        return out

    @classmethod
    def from_json(cls, d: dict, where: str = "cost table") -> CostModel:
        if not isinstance(d, dict) or not isinstance(d.get("device"), str):
            raise ValueError(f"{where}: expected an object with 'device' (a string), 'verify' and 'draft'")

        def table(key: str, width: int) -> Table:
            rows = d.get(key)
            if not isinstance(rows, list) or not rows:
                raise ValueError(f"{where}: '{key}' must be a non-empty list of {width}-number rows")
            pts, shape = {}, "[n_tokens, batch, seconds]" if width == 3 else "[batch, seconds]"
            for r in rows:
                ok = isinstance(r, list) and len(r) == width and all(isinstance(x, (int, float)) for x in r)
                if not ok or min(r[:-1]) < 1 or r[-1] < 0 or any(int(x) != x for x in r[:-1]):
                    raise ValueError(f"{where}: '{key}' row {r!r}: expected {shape} with whole counts >= 1 "
                                     "and seconds >= 0")
                pts[(int(r[0]), int(r[1])) if width == 3 else (1, int(r[0]))] = float(r[-1])
            return Table(pts)

        return cls(d["device"], table("verify", 3), table("draft", 2), table("extend", 3) if "extend" in d else None)

    def save(self, path: str | Path) -> None:
        from mtp_spec.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"{p}: no such cost table") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_json(d, str(p))


# --- warm-up measurement ----------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(dev: torch.device, repeats: int, calls: list) -> list[float]:
    """Median seconds of each (fn, args, kwargs) in `calls`, after one warm-up call each (compilation,
    first allocations). The calls take turns, repeat by repeat, so that a machine that changes speed
    meanwhile moves every point alike: the table's ratios are what the choice of depth reads."""
    for fn, args, kwargs in calls:
        fn(*args, **kwargs)
    _sync(dev)
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, (fn, args, kwargs) in enumerate(calls):
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            _sync(dev)
            times[i].append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


@torch.no_grad()
def measure(model, batches: Sequence[int] = (1, 4), tokens: Sequence[int] = (1, 2, 3, 4, 5),
            max_len: int = 256, repeats: int = 5, into: CostModel | None = None,
            prompt: int = 64) -> CostModel:
    """Time verify(n, b), extend(n, b) and draft(b) on the model's step path (as loaded: compiled or
    not) in scratch caches `max_len` long and half full, adding the points to `into` (or a new model).
    extend is also timed over `prompt` tokens (where the cache has room): the first drafting step of a
    batch extends the prompts, which the chooser prices (`AutoMTPProposer.prefill_steps`) from this
    point rather than from n = 1..5 extrapolated."""
    dev = next(model.parameters()).device
    cost = into or CostModel(str(dev))
    if cost.extend_table is None:
        cost.extend_table = Table()
    g = torch.Generator().manual_seed(0)
    widths = list(tokens) + ([prompt] if max(tokens) < prompt <= max_len - max_len // 2 else [])
    for b in batches:
        cache = model.new_cache(b, max_len)
        cache.lengths.fill_(max_len // 2)
        mtp_cache = model.mtp.new_cache(b, max_len) if model.mtp is not None else None
        keys, calls = [], []
        for n in widths:
            x = torch.randint(0, model.args.vocab_size, (b, n), generator=g).to(dev)
            if n in tokens:
                keys.append((cost.verify_table, (n, b)))
                calls.append((model, (x,), {"cache": cache, "step": True}))
            if mtp_cache is None:
                continue
            h = model(x, cache=cache, step=True).hidden_states
            last = torch.full((b, 1), n - 1, device=dev)
            keys.append((cost.extend_table, (n, b)))
            calls.append((model.mtp, (x, h), {"depth": 0, "cache": mtp_cache, "start": cache.lengths,
                                              "logits_at": last, "step": True}))
            if n == 1:
                keys.append((cost.draft_table, (1, b)))
                calls.append((model.mtp, (x, h), {"depth": 1, "cache": mtp_cache, "start": cache.lengths,
                                                  "step": True}))
        for (table, key), seconds in zip(keys, _timed(dev, repeats, calls)):
            table.points[key] = seconds
    for table in (cost.verify_table, cost.extend_table):
        smooth(table)
    return cost


def smooth(table: Table) -> None:
    """Replace each batch size's points by the nearest sequence that does not fall with n (least
    squares: neighbours that fall are pooled to their mean). On a busy CPU a 2-token verify read faster
    than a 1-token one and the choice of depth followed the noise; a line through n = 1..5 (the fix
    before this one) hid the kernels' real shape, flat while the rows fit one pass of the CPU matmul
    and a jump after (SmolLM2, batch 1, an Intel CPU: verify of 2 / 3 / 4 / 5 tokens x1.07 / 1.07 /
    1.07 / 1.50 of one token, the line x1.11 / 1.21 / 1.32 / 1.43), so `auto` ran k = 1 where k = 2
    paid 11% more."""
    for b in table.batches():
        pts = sorted((n, t) for (n, qb), t in table.points.items() if qb == b)
        pools: list[list[float]] = []  # [sum, count] per run of pooled points
        for _, t in pts:
            pools.append([t, 1])
            while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
                total, count = pools.pop()
                pools[-1][0] += total
                pools[-1][1] += count
        fitted = [total / count for total, count in pools for _ in range(int(count))]
        for (n, _), t in zip(pts, fitted):
            table.points[(n, b)] = t


# --- acceptance and the choice of depth -------------------------------------------------------------
@dataclass
class Acceptance:
    """Beta counts of conditional acceptance per draft position: a step that drafted k and accepted n
    is a success at positions 1..n and a failure at n + 1 (if n < k); deeper positions were not tried."""

    prior: list[float]
    weight: float = PRIOR_WEIGHT
    hits: list[float] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.prior)
        self.hits = self.hits or [0.0] * n
        self.trials = self.trials or [0.0] * n

    def update(self, drafted: int, accepted: int) -> None:
        for j in range(min(accepted + 1, drafted, len(self.prior))):
            self.trials[j] += 1
            self.hits[j] += j < accepted

    def means(self) -> list[float]:
        return [(h + self.weight * p) / (t + self.weight) for h, t, p in zip(self.hits, self.trials, self.prior)]

    @property
    def observed(self) -> bool:
        return self.trials[0] > 0


def load_prior(model_dir: str | Path | None) -> list[float] | None:
    """The conditional acceptance per draft position recorded for a model (`acceptance.json` in its
    directory: {"conditional": [p_1, ...], "source": str, ...}), or None where it has none. `auto`
    starts from it instead of DEFAULT_PRIOR, and from what it has accepted once it has served requests
    (recorded: the shipped toy 0.66 / 0.57 / 0.54 / 0.58, SmolLM2's layer about 0.5 at every position)."""
    if model_dir is None or not (Path(model_dir) / PRIOR_FILE).is_file():
        return None
    p = Path(model_dir) / PRIOR_FILE
    try:
        rates = json.loads(p.read_text()).get("conditional")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{p}: not a JSON object ({e})") from None
    ok = isinstance(rates, list) and rates and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in rates)
    if not ok:
        raise ValueError(f"{p}: 'conditional' must be a non-empty list of acceptance rates in [0, 1], got {rates!r}")
    return [float(x) for x in rates]


def depth_rates(cost: CostModel, batch: int, rows: Sequence[Sequence[float]], k_max: int,
                remaining: Sequence[int] | None = None) -> list[float]:
    """Predicted tokens per second of the whole batch at each depth 0..k_max: the active rows'
    expected tokens (each from its own acceptance `rows[i]`) over one step's time at `batch` rows.
    With `remaining` (tokens each active row may still emit), the batch's tokens over the time to
    finish it: a batch returns when its slowest row is done, so a depth is worth what it brings the
    row that needs the most steps (max(1, remaining / expected tokens): a row's last token takes a
    step at any depth). Summing over rows let rows that draft well hide one that does not (toy,
    batch 4, fixed k = 1: the batch took 1.11x the mean of its rows' steps)."""
    if remaining is None:
        return [sum(expected_tokens(p, k) for p in rows) / cost.step_time(k, batch) for k in range(k_max + 1)]
    total = sum(remaining)
    steps = [max(max(1.0, n / expected_tokens(p, k)) for p, n in zip(rows, remaining)) for k in range(k_max + 1)]
    return [total / (s * cost.step_time(k, batch)) for k, s in enumerate(steps)]


def best_depth(rates: Sequence[float]) -> int:
    """The depth with the highest rate; ties go to the shallower depth."""
    best_k, best = 0, -1.0
    for k, rate in enumerate(rates):
        if rate > best * (1 + 1e-9):
            best_k, best = k, rate
    return best_k


def choose_depth(cost: CostModel, batch: int, rows: Sequence[Sequence[float]], k_max: int) -> int:
    """The depth 0..k_max with the highest predicted throughput (`depth_rates`)."""
    return best_depth(depth_rates(cost, batch, rows, k_max))
