"""Draft proposers. Each turns the committed state of the batch into drafts; the one verifier and the
one engine loop do the rest. A new strategy is one new class here (and a line in strategies.py).

A proposer reads a `DecodeState`: host lists of every row's tokens, and device tensors of what the
last step committed (for MTP: the main model's hidden states at those positions and the tokens that
followed them). Device-side proposers (MTP chain and tree, draft model) return a `DraftBatch` built
without reading anything back; host-side ones (n-gram, oracles) return a list of `Drafts`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import mtp_spec.parallel as parallel
from mtp_spec.decoding.cost import (
    DEFAULT_PRIOR,
    Acceptance,
    CostModel,
    best_depth,
    depth_rates,
    measure,
)
from mtp_spec.decoding.sampling import SamplingParams, probs
from mtp_spec.decoding.verify import DraftBatch, Drafts, sample_rows, tree_of


@dataclass
class DecodeState:
    """The batch as the engine keeps it. Rows that finished stay in the batch (shapes stay fixed)
    with `active` false; their results are ignored and their caches no longer grow."""

    tokens: list[list[int]]  # per row: prompt + output; the last token is not in the cache yet
    active: list[bool]
    gens: list[torch.Generator]
    lengths: list[int]  # host copy of the main cache's per-row lengths
    last: torch.Tensor  # (b,) the newest token of each row
    active_t: torch.Tensor  # (b,) bool, `active` on the device
    # committed by the last step (device): for position i among them, hidden[i] and the token after it
    hidden: torch.Tensor | None = None  # (b, s, dim)
    next_tokens: torch.Tensor | None = None  # (b, s)
    n_new: torch.Tensor | None = None  # (b,) how many of the s positions are real (0 for finished rows)
    n_acc: torch.Tensor | None = None  # (b,) drafts accepted by the last step (None after prefill)
    remaining: list[int] | None = None  # per row: tokens it may still emit (max_new_tokens less its output)

    @property
    def device(self) -> torch.device:
        return self.last.device


class Proposer:
    name = "vanilla"
    wants_hidden = False  # whether the engine must keep main-model hidden states for `propose`
    max_nodes = 0  # most draft tokens per step, for sizing caches
    depth = 0  # the draft depth k of the latest propose (0: none); the metrics count steps per k

    def reset(self, batch: int, max_len: int) -> None:
        """Called once per generate() with the batch size and the cache length it needs."""

    def propose(self, st: DecodeState, sp: SamplingParams) -> DraftBatch | list[Drafts] | None:
        return None

    def learned(self) -> dict:
        """A copy of what this proposer has learned across requests (none here), for `restore`."""
        return {}

    def restore(self, learned: dict) -> None:
        """Back to a state `learned` returned, so that a repeated run starts where an earlier one did."""
        for key, value in copy.deepcopy(learned).items():
            setattr(self, key, value)

    def observe(self, st: DecodeState, steps: list[tuple[int, int, int]], seconds: float) -> None:
        """After each step's read-back: (row, drafted, accepted) for every row that was active, and the
        seconds since the previous read-back (the whole step, device and host)."""


def _pick(logits: torch.Tensor, sp: SamplingParams, gens, sample_drafts: bool):
    """Draft tokens from (b, V) logits: argmax (q one-hot: None) or a sample per row (q returned)."""
    if sp.greedy or not sample_drafts:
        return logits.argmax(-1), None
    q = probs(logits, sp)
    return sample_rows(q, gens), q


def _chain(logits: torch.Tensor, step, st: DecodeState, sp: SamplingParams, k: int,
           sample_drafts: bool) -> DraftBatch:
    """k drafts per row, autoregressively: pick from `logits`, then `step(j, tokens (b,))` gives the
    next logits. q is kept when the drafts were sampled."""
    toks, qs = [], []
    for j in range(k):
        t, q = _pick(logits, sp, st.gens, sample_drafts)
        toks.append(t)
        qs.append(q)
        if j < k - 1:
            logits = step(j, t)
    return DraftBatch(torch.stack(toks, 1), None, torch.stack(qs, 1) if qs[0] is not None else None)


class MTPProposer(Proposer):
    """A chain of k drafts from the MTP module, reusing it recursively (vLLM / SGLang style).

    Each call first runs a "draft extend": the MTP layer consumes the pairs (h_i, t_{i+1}) committed
    by the last step, which fills its cache for them and yields draft 1 at the newest position. Draft
    j > 1 feeds the MTP block's own output state and draft j-1 one position on; those cache entries
    are scratch and are overwritten by the next extend."""

    name = "mtp"
    wants_hidden = True

    def __init__(self, model, k: int, sample_drafts: bool = True):
        if model.mtp is None:
            src = getattr(model, "source", "this model")
            raise ValueError(f"strategy 'mtp' needs an MTP layer, but {src} has none "
                             "(config.json: num_nextn_predict_layers = 0)")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.model, self.mtp, self.k, self.sample_drafts = model, model.mtp, k, sample_drafts
        self.max_nodes = self.depth = k
        self.lag = 0  # most committed tokens that may wait for an extend (steps without drafts)

    @property
    def hidden_input(self) -> str:
        return self.mtp.hidden_input

    def reset(self, batch: int, max_len: int) -> None:
        self.cache = self.mtp.new_cache(batch, max_len + max(self.max_nodes, self.lag) + 1)
        self.first = True  # the first extend covers the prompts: not a repeating step shape
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # hidden, tokens, counts

    def _queue(self, st: DecodeState) -> None:
        """Put the pairs the last step committed behind those still waiting for an extend (row i's
        real ones are its first counts[i]; the rest is scratch)."""
        h, t, n = st.hidden, st.next_tokens.clamp(min=0), st.n_new  # scratch slots may hold -1 (no draft)
        if self.pending is not None:
            ph, pt, pn = self.pending
            at = pn[:, None] + torch.arange(t.shape[1], device=t.device)
            t = torch.cat([pt, torch.zeros_like(t)], 1).scatter(1, at, t)
            h = torch.cat([ph, torch.zeros_like(h)], 1).scatter(1, at[:, :, None].expand(-1, -1, h.shape[-1]), h)
            n = torch.where(st.active_t, pn + n, 0)  # a finished row's cache no longer matters
        self.pending = (h, t, n)

    def _flush(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer over every waiting pair; logits and state at each row's newest one."""
        hidden, tokens, n = self.pending
        self.pending = None
        last = (n - 1).clamp(min=0)
        out = self.mtp(tokens, hidden, depth=0, cache=self.cache, start=self.cache.lengths,
                       logits_at=last[:, None], step=not self.first)
        self.first = False
        self.cache.lengths += n
        h = out.hidden_states.gather(1, last[:, None, None].expand(-1, 1, out.hidden_states.shape[-1]))
        return out.logits[:, 0], h[:, 0]

    def _extend(self, st: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft extend: the newly committed pairs (and any still waiting) through the MTP layer."""
        self._queue(st)
        return self._flush()

    @torch.no_grad()
    def propose(self, st, sp):
        return self._draft(st, sp, self.k)

    def _draft(self, st: DecodeState, sp: SamplingParams, k: int) -> DraftBatch:
        logits, h = self._extend(st)
        return self._draft_from(logits, h, st, sp, k)

    def _draft_from(self, logits: torch.Tensor, h: torch.Tensor, st: DecodeState, sp: SamplingParams,
                    k: int) -> DraftBatch:
        """Draft 1 from the extend's logits, drafts 2..k by chained steps from its state h."""
        state = {"h": h}

        def step(j: int, t: torch.Tensor) -> torch.Tensor:
            out = self.mtp(t[:, None], state["h"][:, None], depth=j + 1, cache=self.cache,
                           start=self.cache.lengths + j, step=True)
            state["h"] = out.hidden_states[:, 0]
            return out.logits[:, 0]

        return _chain(logits, step, st, sp, k, self.sample_drafts)


class AutoMTPProposer(MTPProposer):
    """MTP chains whose depth k (0..k_max, one for the whole batch) is chosen before every step: the
    depth with the highest predicted throughput (decoding/cost.py) from each active row's acceptance
    so far and the step times. The choice reads past acceptance and timings only, never this step's
    drafts, so verification stays lossless: greedy output is vanilla's, sampled output has the
    target's distribution.

    k = 0 is plain decoding: the MTP layer does not run and the committed pairs wait for the next draft
    extend, which takes them all; after `lag` waiting tokens a k = 0 step extends them anyway, so the
    extend stays step-sized and the cache bounded (once the prompts' own extend has run: until a
    step drafts, they and what follows them wait). Acceptance per position is kept per row as Beta
    counts, starting from `prior` (default DEFAULT_PRIOR at every position) or, once this proposer has
    served requests, from what they accepted. A depth that never runs is never measured again (its
    acceptance past the current depth, its time), so after `probe_every` steps in a row at one depth,
    one step runs a neighbouring depth, deeper and shallower in turn.

    From plain decoding (and at the start of a batch) a depth k > 0 is taken only when it is predicted
    `switch_on` times faster and to save more time over the rest of the batch than the first drafting
    step's extend of everything that waited (the prompts at first) costs (`_worth_starting`).

    Even at k = 0 the MTP layer costs something (its catch-up extends, the probes). Where speculation
    does not pay for a batch, that is all it adds, so the proposer turns it off for the rest of the
    batch: when `probe_every` plain steps in a row (`probe_every // 4` before anything has drafted)
    come due for a probe and no depth is predicted within `margin` of plain decoding's throughput, or
    no step of the batch has drafted yet and a probe would first run the MTP layer over prompts that
    cost more than `prefill_steps` plain steps to extend (by the cost table); at once when nothing has
    drafted yet and no depth comes within `margin`, or when plain decoding is chosen again after
    `max_probes` probes from it changed nothing (the toy at batch 1 waited another 16 plain steps, at
    1.07-1.22x the price of decoding with drafting off, in a third of its batches). From then on the batch
    decodes plainly (pending pairs dropped, no extend, no probe, no hidden states handed over); rows
    that finish only make speculation pay less. The next batch starts afresh.
    `cost`: a CostModel (e.g. CostModel.load, or `measure` then `timing.measure_steps`: what
    `strategies.make_proposer` builds), used as given and refreshed online; None: its forwards
    measured now (no whole steps: the engine's timing lives above this module)."""

    def __init__(self, model, k_max: int = 4, cost: CostModel | None = None, prior: Sequence[float] | None = None,
                 sample_drafts: bool = True, probe_every: int = 16, margin: float = 0.9, max_probes: int = 1,
                 switch_on: float = 1.03):
        super().__init__(model, k_max, sample_drafts)
        prior = [DEFAULT_PRIOR] * k_max if prior is None else list(prior)
        if not prior or not all(0 <= p <= 1 for p in prior):
            raise ValueError(f"prior must be acceptance rates in [0, 1], one per position, got {prior}")
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {probe_every}")
        self.k_max, self.probe_every, self.lag = k_max, probe_every, 2 * (k_max + 1)
        self.margin, self.max_probes, self.switch_on = margin, max_probes, switch_on
        self.prefill_steps = 2.0  # a first probe may extend the prompts when that costs at most this many steps
        self.off = False  # speculation turned off for the rest of the batch (reset() starts each batch on)
        self.prior = (prior + [prior[-1]] * k_max)[:k_max]
        self.record = Acceptance(self.prior)  # every request served so far
        self.cost = cost if cost is not None else measure(model, (1, 4), range(1, k_max + 2),
                                                          max_len=min(256, model.max_len))
        self.depth = 0
        # step shapes (k, extend width, batch) timed once already: the first run of one pays its warm-up
        # (compilation, first allocations) and is not timed. Kept across batches: a probe of a depth is
        # often its only step in a batch, and were each batch's first one dropped, a depth that runs on
        # probes alone would never be measured.
        self.timed: set[tuple[int, int, int]] = set()

    @property
    def wants_hidden(self) -> bool:  # once off, the engine need not hand over hidden states
        return not self.off

    def learned(self) -> dict:  # the acceptance of every request served, the refreshed step costs
        return copy.deepcopy({"record": self.record, "cost": self.cost})

    def reset(self, batch: int, max_len: int) -> None:
        super().reset(batch, max_len)
        self.cost.forget()
        prior = self.record.means() if self.record.observed else self.prior
        self.rows = [Acceptance(prior) for _ in range(batch)]
        self.streak = (-1, 0)  # the depth chosen last and for how many steps in a row
        self.probe_up = False
        self.ran: tuple[int, int] | None = None  # (k, extend width) of the step in flight (k = -1: off); None: untimed
        self.off = False  # speculation turned off for the rest of this batch
        self.idle_probes = 0  # probes from depth 0 since the chooser last picked a depth > 0 itself
        # per step: [k (-1: off), best k > 0 / k = 0 predicted, the pace, the best depth's step over its table time]
        self.trace: list[list[float]] = []
        self.predicted: list[float] | None = None  # tokens/s per depth the chooser predicted at this step

    def choose(self, st: DecodeState) -> int:
        """The depth of the next step, from the active rows' acceptance and the cost model; -1: turn
        speculation off for the rest of the batch. Timings differ per rank, so rank 0's choice is
        everyone's."""
        rates = self._predict(st)
        k = best_depth(rates)
        last, run = self.streak
        if last <= 0 and k and not self._worth_starting(st, rates, k):
            k = 0
        run = run + 1 if k == last else 1
        self.streak = (k, run % (self.probe_every + 1))
        if k:
            self.idle_probes = 0
        far = max(rates[1:], default=0.0) < self.margin * rates[0]
        if k == 0 and self.first and far:  # nothing drafted yet and nothing near: no need to wait
            return parallel.broadcast_int(-1)
        if k == 0 and self.idle_probes >= self.max_probes:  # the probes from plain decoding changed nothing
            return parallel.broadcast_int(-1)
        # before anything drafted, a plain step waiting for its probe costs more than decoding with
        # drafting off (the toy: 1.07-1.22x) and a first probe tells little more than the prior: probe soon
        if run <= (self.probe_every // 4 if k == 0 and self.first else self.probe_every):
            return parallel.broadcast_int(k)
        # off where no depth comes near, or where a probe would first have to run a costly extend of
        # the prompts (a prefill of the MTP layer: at a large batch, many steps' time; at batch 1-2 of a
        # 135M model about one, and turning off there lost batches where k = 1 paid 1.2x)
        b = len(st.tokens)
        costly = self.first and self.cost.extend(self._waiting(st), b) > self.prefill_steps * self.cost.verify(1, b)
        if k == 0 and (costly or far):
            return parallel.broadcast_int(-1)
        # a depth that never runs is never measured again: probe a neighbour, deeper and shallower in turn
        self.probe_up = not self.probe_up
        self.idle_probes += k == 0
        return parallel.broadcast_int(k + 1 if k == 0 or (self.probe_up and k < self.k_max) else k - 1)

    def _worth_starting(self, st: DecodeState, rates: list[float], k: int) -> bool:
        """From plain decoding, drafting first extends all that waited (at first the prompts): start when
        depth k is `switch_on` times faster (the timings are noisy) and the time it is predicted to
        save over the rest of the batch exceeds that extend. A fixed 1.1 alone kept the toy at k = 0
        for 29% of its steps at batch 1, where k = 1 was predicted 1.13x and paid 1.04x."""
        if rates[k] < self.switch_on * rates[0]:
            return False
        if st.remaining is None:
            return True
        b = len(st.tokens)
        total = sum(n for n, a in zip(st.remaining, st.active) if a)
        saved = total / rates[0] - total / rates[k]
        return saved > self.cost.speed(b) * self.cost.extend(self._waiting(st), b)

    def _waiting(self, st: DecodeState) -> int:
        """Tokens per row the next draft extend covers: the pairs waiting and this step's newest."""
        return (self.pending[1].shape[1] if self.pending is not None else 0) + st.next_tokens.shape[1]

    def _predict(self, st: DecodeState) -> list[float]:
        """Predicted tokens/s per depth 0..k_max for the active rows (`depth_rates`), kept for `_trace`."""
        rows = [r.means() for r, a in zip(self.rows, st.active) if a]
        left = None if st.remaining is None else [n for n, a in zip(st.remaining, st.active) if a]
        self.predicted = depth_rates(self.cost, len(st.tokens), rows, self.k_max, left)
        return self.predicted

    def _trace(self, st: DecodeState, k: int) -> None:
        """What the chooser saw at this step, for the run's records: a study shows why a batch turned
        drafting off (the records hold steps per depth, not the prediction behind them)."""
        b = len(st.tokens)
        rates = self.predicted if self.predicted is not None else self._predict(st)  # a subclass may choose alone
        best = max(range(1, self.k_max + 1), key=rates.__getitem__)
        ratio = rates[best] / rates[0] if rates[0] > 0 else 0.0
        self.trace.append([k, round(ratio, 3), round(self.cost.speed(b), 3), round(self.cost.factor(best, b), 3)])

    @torch.no_grad()
    def propose(self, st, sp):
        if not self.off:
            self.predicted = None
            k = self.choose(st)
            self._trace(st, k)
            self.off = k < 0
            if self.off:
                self.pending = None  # the MTP layer will not run again for this batch
        if self.off:
            self.depth, self.ran = 0, (-1, 0)  # -1: a step with drafting off
            return None
        self.depth = k
        first = self.first
        self._queue(st)
        width = self.pending[1].shape[1]
        if k:
            logits, h = self._flush()
            drafts = self._draft_from(logits, h, st, sp, k)
        else:
            drafts = None
            # catch up, so the waiting tokens stay step-sized; but not the prompts before a draft
            # needs them: the batch may turn speculation off first
            if width >= self.lag and not self.first:
                self._flush()
            else:
                width = 0
        self.ran = None if first and not self.first else (k, width)  # the prompts' extend is not a step
        return drafts

    def observe(self, st, steps, seconds):
        for row, drafted, accepted in steps:
            self.rows[row].update(drafted, accepted)
            self.record.update(drafted, accepted)
        if self.ran is None:
            return
        k, width = self.ran
        b = len(self.rows)
        if (k, width, b) not in self.timed:  # the first run of a shape pays its warm-up
            self.timed.add((k, width, b))
            return
        mtp = (self.cost.extend(width, b) if width else 0.0) + max(k - 1, 0) * self.cost.draft(b)
        self.cost.observe_step(max(k, 0), b, seconds, mtp, off=k < 0)


class MTPNGramProposer(MTPProposer):
    """MTP chains, with prompt lookup taking over where the text repeats itself (code that reuses its
    own names and lines). Before each step every active row looks up its newest n-gram (n from
    ngram_max down to ngram_min) in its own text; a row that finds one proposes the (up to) k tokens
    that followed it, deterministically (q one-hot), and the others take the MTP layer's chain. When
    every active row found one, the MTP layer does not run: the committed pairs wait for the next
    draft extend, and a step extends them anyway before the next step's pairs would make more than
    `lag` wait, so extends stay step-sized and within the MTP cache. The choice reads committed
    tokens only, never this step's drafts: greedy output stays vanilla's and sampled output keeps the
    target's distribution. Each row's generator advances by k draft draws every step, whichever
    drafter served it, so a request's sampled output does not depend on its batch-mates' lookups."""

    name = "mtp-ngram"

    def __init__(self, model, k: int, ngram_max: int = 3, ngram_min: int = 2, sample_drafts: bool = True):
        super().__init__(model, k, sample_drafts)
        ngram_min = min(ngram_min, ngram_max)
        if ngram_min < 1:
            raise ValueError(f"ngram_max must be >= 1, got {ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.lag = 2 * (k + 1)

    @torch.no_grad()
    def propose(self, st: DecodeState, sp: SamplingParams) -> DraftBatch:
        found = [lookup(t, self.k, self.ngram_max, self.ngram_min) if a else []
                 for t, a in zip(st.tokens, st.active)]
        self._queue(st)
        if all(f or not a for f, a in zip(found, st.active)):
            if self.pending[1].shape[1] + self.k + 1 > self.lag:
                self._flush()  # catch up (at first: the prompts), before the next step's pairs overrun lag
            if not sp.greedy and self.sample_drafts:  # the draws the MTP chain would have taken
                for _ in range(self.k):
                    sample_rows(torch.ones(len(found), self.mtp.args.vocab_size), st.gens)
            return DraftBatch.from_lists([Drafts.chain(f) for f in found], st.device, width=self.k)
        logits, h = self._flush()
        drafts = self._draft_from(logits, h, st, sp, self.k)
        if not any(found):
            return drafts
        toks, q = drafts.tokens.clone(), None if drafts.q is None else drafts.q.clone()
        for i, f in enumerate(found):
            if f:
                toks[i] = -1
                toks[i, : len(f)] = torch.tensor(f, device=toks.device)
                if q is not None:
                    q[i] = 0
                    q[i, torch.arange(len(f), device=q.device), toks[i, : len(f)]] = 1
        return DraftBatch(toks, None, q)


class MTPTreeProposer(MTPProposer):
    """Top-b branching per step: level 1 holds the b best tokens of draft 1; each later level keeps
    the b best children (by cumulative log-probability) of the previous level. The MTP layer runs each
    level over the whole tree so far under a tree mask. Drafts are deterministic (q one-hot)."""

    name = "mtp-tree"

    def __init__(self, model, k: int, width: int = 2):
        super().__init__(model, k)
        if width < 1:
            raise ValueError(f"tree width must be >= 1, got {width}")
        self.width = width
        self.max_nodes = k * width

    @torch.no_grad()
    def propose(self, st, sp):
        logits, h_root = self._extend(st)
        dev = logits.device
        n, b = logits.shape[0], self.width
        lp = logits.float().log_softmax(-1)
        top = lp.topk(b, dim=-1)
        tokens, scores = top.indices, top.values  # (n, nodes)
        parents = torch.full((n, b), -1, dtype=torch.long, device=dev)
        level = torch.arange(b, device=dev)  # node indices of the newest level
        node_h = h_root[:, None].expand(-1, b, -1)  # each node's input: its parent's MTP output state
        base = self.cache.lengths[:, None]
        for _ in range(2, self.k + 1):
            mask, depths = tree_of(parents)
            out = self.mtp(tokens, node_h, depth=0, cache=self.cache, start=base[:, 0], tree_mask=mask,
                           positions=base + depths - 1, step=True)
            lp = out.logits[:, level].float().log_softmax(-1)  # (n, b, V)
            best = (scores[:, level, None] + lp).view(n, -1).topk(b, dim=-1)
            vocab = lp.shape[-1]
            new_par = level[best.indices // vocab]
            dim = out.hidden_states.shape[-1]
            node_h = torch.cat([node_h, out.hidden_states.gather(1, new_par[..., None].expand(-1, -1, dim))], 1)
            level = torch.arange(tokens.shape[1], tokens.shape[1] + b, device=dev)
            tokens = torch.cat([tokens, best.indices % vocab], 1)
            scores = torch.cat([scores, best.values], 1)
            parents = torch.cat([parents, new_par], 1)
        return DraftBatch(tokens, parents)


class NGramProposer(Proposer):
    """Prompt lookup: find the most recent earlier occurrence of the longest suffix (n from n_max
    down to n_min) and propose the k tokens that followed it."""

    name = "ngram"

    def __init__(self, k: int, n_max: int = 3, n_min: int = 1):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.k, self.n_max, self.n_min = k, n_max, n_min
        self.max_nodes = self.depth = k

    def propose(self, st, sp):
        return [Drafts.chain(lookup(t, self.k, self.n_max, self.n_min) if a else [])
                for t, a in zip(st.tokens, st.active)]


def lookup(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    t = torch.tensor(tokens)
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        windows = t.unfold(0, n, 1)[:-1]  # every earlier n-gram, the suffix itself excluded
        hits = (windows == t[-n:]).all(-1).nonzero().flatten()
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k]
    return []


class DraftModelProposer(Proposer):
    """A smaller checkpoint with the same tokenizer drafts k tokens autoregressively with its own cache.

    Its cache follows the main one: after a step that accepted n drafts, the entries it wrote for
    drafts 1..min(n, k-1) are right and stay; it then runs the one or two committed tokens it has not
    seen (draft k when all were accepted, and the target's token)."""

    name = "draft-model"

    def __init__(self, draft, k: int, sample_drafts: bool = True):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.draft, self.k, self.sample_drafts = draft, k, sample_drafts
        self.max_nodes = self.depth = k

    def reset(self, batch: int, max_len: int) -> None:
        self.cache = self.draft.new_cache(batch, max_len + self.k + 1)
        self.prev: torch.Tensor | None = None  # last step's drafts

    def _catch_up(self, st: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, s) tokens the draft cache lacks, right-padded, and their counts."""
        if self.prev is None:  # first call: the whole prompt and the first output token
            seqs = [t if a else t[:1] for t, a in zip(st.tokens, st.active)]
            toks = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
            for i, t in enumerate(seqs):
                toks[i, : len(t)] = torch.tensor(t)
            count = torch.tensor([len(t) if a else 0 for t, a in zip(seqs, st.active)])
            return toks.to(st.device), count.to(st.device)
        full = st.n_acc == self.k
        kept = self.cache.lengths - (self.k - 1) + st.n_acc.clamp(max=self.k - 1)  # drop rejected scratch
        self.cache.lengths.copy_(torch.where(st.active_t, kept, self.cache.lengths))
        first = torch.where(full, self.prev[:, -1], st.last)
        count = torch.where(st.active_t, 1 + full.long(), 0)
        return torch.stack([first, st.last], 1), count

    @torch.no_grad()
    def propose(self, st, sp):
        toks, count = self._catch_up(st)
        last = (count - 1).clamp(min=0)
        out = self.draft(toks, cache=self.cache, start=self.cache.lengths, logits_at=last[:, None],
                         step=self.prev is not None)
        self.cache.lengths += count

        def step(j: int, t: torch.Tensor) -> torch.Tensor:
            return self.draft(t[:, None], cache=self.cache, start=self.cache.lengths + j, step=True).logits[:, 0]

        drafts = _chain(out.logits[:, 0], step, st, sp, self.k, self.sample_drafts)
        # the k-1 chained steps wrote scratch entries; count them so the next call can keep the good ones
        self.cache.lengths.copy_(torch.where(st.active_t, self.cache.lengths + (self.k - 1), self.cache.lengths))
        self.prev = drafts.tokens
        return drafts


class OracleProposer(Proposer):
    """Proposes from known continuations: always right (an upper bound), always wrong when `wrong`
    (every draft rejected), or right at each position with probability `rate` (a fixed acceptance,
    seeded): with random weights that isolates the cost side of speculation. For tests and benchmarks."""

    name = "oracle"

    def __init__(self, references: list[list[int]], k: int, vocab_size: int, wrong: bool = False,
                 rate: float | None = None, seed: int = 0):
        import random

        self.refs, self.k, self.vocab, self.wrong, self.rate = references, k, vocab_size, wrong, rate
        self.rng = random.Random(seed)
        self.max_nodes = self.depth = k

    def _draft(self, t: int) -> int:
        right = not self.wrong and (self.rate is None or self.rng.random() < self.rate)
        return t if right else (t + 1) % self.vocab

    def propose(self, st, sp):
        out = []
        for r, (toks, a) in enumerate(zip(st.tokens, st.active)):
            nxt = self.refs[r][len(toks):len(toks) + self.k] if a else []
            out.append(Drafts.chain([self._draft(t) for t in nxt]))
        return out
