"""The one decode loop, in phases: prefill, then propose -> verify -> accept -> emit, until done.

    prefill   the prompts fill the cache; the first token of every row is chosen
    propose   the proposer drafts (b, n) tokens, on the device where it can
    verify    one forward of the newest token plus the drafts, under a chain or tree mask
    accept    the batched verifier picks each row's accepted path and next token; caches roll back
    emit      the one read-back of the step; tokens are committed and stop rules applied on the host

Batches are ragged: every row has its own cache length and accepts its own number of tokens per step.
Rows that finish stay in the batch with fixed shapes (inactive) so every step has the same shapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtp_spec.decoding.proposers import DecodeState, Proposer
from mtp_spec.decoding.sampling import SamplingParams, probs
from mtp_spec.decoding.verify import Accepted, DraftBatch, Relaxed, sample_rows, verify_batch
from mtp_spec.metrics import SpecMetrics

CACHE_STEP = 128


@dataclass
class Result:
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "eos" | "length" | "stop"
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    lossy: bool = False  # relaxed acceptance was on: the output may differ from the target model's


@dataclass
class _Run:
    """Per-call settings and outputs, so the phases take one argument."""

    sp: SamplingParams
    max_new: int
    eos_id: int | None
    stop: list[str] | None
    decode: Callable[[list[int]], str] | None
    on_tokens: Callable[[int, list[int]], None] | None
    results: list[Result]
    t0: float
    t_read: float = 0.0  # when the latest read-back returned: steps are timed from one to the next


class Engine:
    def __init__(self, model, proposer: Proposer | None = None, relaxed: Relaxed | None = None,
                 absorb: bool = True):
        self.model, self.proposer, self.relaxed, self.absorb = model, proposer or Proposer(), relaxed, absorb

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, sp: SamplingParams | None = None,
                 seed: int = 0, eos_id: int | None = None, stop: list[str] | None = None,
                 decode: Callable[[list[int]], str] | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> list[Result]:
        """Generate for a batch of token-id prompts. `on_tokens(i, ids)` streams each request's new
        tokens as they are accepted. Stop strings need `decode`."""
        sp = sp or SamplingParams()
        self._check(prompts, max_new_tokens, stop, decode)
        run = _Run(sp, max_new_tokens, eos_id, stop, decode, on_tokens,
                   [Result([], "length", lossy=self.relaxed is not None) for _ in prompts], time.perf_counter())
        st = self.prefill(prompts, seed, run)
        while any(st.active):
            drafts = self.propose(st, run)
            out = self.verify(st, drafts)
            acc = self.accept(st, drafts, out, run)
            self.emit(st, drafts, acc, run)
        return run.results

    # --- phases -------------------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], seed: int, run: _Run) -> DecodeState:
        """Run the right-padded prompts (each row's pad writes are scratch) and pick every first token."""
        model, prop = self.model, self.proposer
        dev = next(model.parameters()).device
        b = len(prompts)
        need = max(len(p) for p in prompts) + run.max_new + prop.max_nodes + 2
        # cache lengths come in steps of 128 (attention reads the whole cache): the step shapes of
        # different requests coincide, so compiled steps are reused instead of compiled again
        max_len = min(model.max_len, -(-need // CACHE_STEP) * CACHE_STEP)
        cache = self.last_cache = model.new_cache(b, max_len)
        prop.reset(b, max_len)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        toks = torch.zeros(b, max(len(p) for p in prompts), dtype=torch.long)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = torch.tensor(p)
        toks = toks.to(dev)
        cache.lengths.zero_()
        out = model(toks, cache=cache, logits_at=(lens - 1)[:, None], absorb=self.absorb)
        cache.lengths.copy_(lens)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(b)]
        first = out.logits[:, 0].argmax(-1) if run.sp.greedy else sample_rows(probs(out.logits[:, 0], run.sp), gens)
        st = DecodeState([list(p) for p in prompts], [True] * b, gens, [len(p) for p in prompts], first,
                         torch.ones(b, dtype=torch.bool, device=dev), remaining=[run.max_new] * b)
        if prop.wants_hidden:
            st.hidden = self._hidden(out)
            nxt = torch.cat([toks[:, 1:], torch.zeros_like(toks[:, :1])], 1)
            st.next_tokens = nxt.scatter(1, (lens - 1)[:, None], first[:, None])
            st.n_new = lens
        ttft = time.perf_counter() - run.t0
        run.t_read = time.perf_counter()
        for i, t in enumerate(first.tolist()):
            run.results[i].metrics.ttft_s = ttft
            self._commit(st, i, [t], run)
        return st

    def propose(self, st: DecodeState, run: _Run) -> DraftBatch:
        drafts = self.proposer.propose(st, run.sp)
        if drafts is None:
            return DraftBatch(torch.zeros(len(st.tokens), 0, dtype=torch.long, device=st.device))
        if isinstance(drafts, list):
            return DraftBatch.from_lists(drafts, st.device, width=self.proposer.max_nodes)
        return drafts

    def verify(self, st: DecodeState, drafts: DraftBatch):
        """One forward of [newest token, drafts...] per row: logits (b, 1 + n, V) and hidden states."""
        cache = self.last_cache
        inp = torch.cat([st.last[:, None], drafts.tokens.clamp(min=0)], 1)
        tree = pos = None
        if drafts.parents is not None:
            tree = drafts.tree_mask()
            depth = torch.cat([torch.zeros_like(drafts.tokens[:, :1]), drafts.depths()], 1)
            pos = cache.lengths[:, None] + depth
        return self.model(inp, cache=cache, tree_mask=tree, positions=pos, absorb=self.absorb, step=True)

    def accept(self, st: DecodeState, drafts: DraftBatch, out, run: _Run) -> Accepted:
        """Verify every row at once, then roll the cache back to each row's accepted path (a tree
        branch has its entries moved into place) and hand the proposer what was committed."""
        acc = verify_batch(out.logits, drafts, run.sp, st.gens, self.relaxed)
        cache = self.last_cache
        if drafts.parents is not None and drafts.n:
            _move_path(cache, acc)
        cache.lengths.copy_(torch.where(st.active_t, cache.lengths + 1 + acc.n, cache.lengths))
        if self.proposer.wants_hidden:
            root = torch.zeros_like(acc.token[:, None])  # (b, 1) even when nothing was drafted
            at = torch.cat([root, acc.path + 1], 1)  # root, then the path
            hidden = self._hidden(out)
            st.hidden = hidden.gather(1, at[:, :, None].expand(-1, -1, hidden.shape[-1]))
            path_tokens = drafts.tokens.gather(1, acc.path) if drafts.n else drafts.tokens
            nxt = torch.cat([path_tokens, torch.zeros_like(acc.token[:, None])], 1)
            st.next_tokens = nxt.scatter(1, acc.n[:, None], acc.token[:, None])
            st.n_new = torch.where(st.active_t, acc.n + 1, 0)
        st.n_acc = acc.n
        st.last = acc.token
        return acc

    def emit(self, st: DecodeState, drafts: DraftBatch, acc: Accepted, run: _Run) -> None:
        """The step's one read-back: accepted counts, tokens and draft counts of every row. The read-back
        waits for the device, so the time from one to the next is the whole step's, without a sync."""
        path_tokens = drafts.tokens.gather(1, acc.path) if drafts.n else drafts.tokens
        rows = torch.cat([acc.n[:, None], acc.drafted[:, None], path_tokens, acc.token[:, None]], 1).tolist()
        now = time.perf_counter()
        seconds, run.t_read = now - run.t_read, now
        seen = []
        for i, row in enumerate(rows):
            if not st.active[i]:
                continue
            n, drafted = row[0], row[1]
            seen.append((i, drafted, n))
            run.results[i].metrics.record(drafted, n, self.proposer.depth)
            st.lengths[i] += 1 + n
            self._commit(st, i, row[2:2 + n] + [row[-1]], run)
        self.proposer.observe(st, seen, seconds)

    # --- helpers ------------------------------------------------------------------------------------
    def _commit(self, st: DecodeState, i: int, new: list[int], run: _Run) -> None:
        """Append accepted tokens to row i, cutting at eos, a stop string or max_new_tokens."""
        res = run.results[i]
        kept, reason = 0, None
        for t in new:
            res.token_ids.append(t)
            kept += 1
            if run.eos_id is not None and t == run.eos_id:
                reason = "eos"
            elif run.stop and any(s in run.decode(res.token_ids) for s in run.stop):
                reason = "stop"
            elif len(res.token_ids) >= run.max_new:
                reason = "length"
            if reason:
                break
        st.tokens[i].extend(new[:kept])
        if run.on_tokens is not None and kept:
            run.on_tokens(i, new[:kept])
        res.metrics.num_generated = len(res.token_ids)
        if st.remaining is not None:
            st.remaining[i] = run.max_new - len(res.token_ids)
        if reason:
            st.active[i] = False
            st.active_t[i] = False
            if st.n_new is not None:
                st.n_new[i] = 0  # nothing more for its proposer cache either
            self.last_cache.lengths[i] = len(st.tokens[i]) - 1  # tokens cut by a stop are dropped here too
            res.finish_reason = reason
            res.metrics.total_s = time.perf_counter() - run.t0

    def _hidden(self, out) -> torch.Tensor:
        return out.hidden_states if self.proposer.hidden_input == "post" else out.prenorm_hidden

    def _check(self, prompts, max_new_tokens, stop, decode) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.model.args.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.model.args.vocab_size})")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.model.max_len
        longest = max(len(p) for p in prompts) + max_new_tokens + self.proposer.max_nodes + 2
        if longest > limit:
            i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
            raise ValueError(f"prompt {i} has {len(prompts[i])} tokens; with max_new_tokens={max_new_tokens} "
                             f"and {self.proposer.max_nodes} draft slots it needs {longest} positions, but the "
                             f"context is {limit} (load with a larger max_len, up to "
                             f"max_position_embeddings={self.model.args.max_seq_len})")
        if stop and decode is None:
            raise ValueError("--stop: stop strings need a tokenizer (decode function); this model has none")


def _move_path(cache, acc: Accepted) -> None:
    """Copy the cache entries of each row's accepted tree path (slot start + 1 + node) to the slots
    right after the root (start + 1 + depth); entries past the path are left as scratch."""
    b, n = acc.path.shape
    start = cache.lengths[:, None] + 1
    depth = torch.arange(n, device=acc.path.device).expand(b, n)
    src = torch.where(depth < acc.n[:, None], start + acc.path, start + depth)
    dst = start + depth
    rows = torch.arange(b, device=src.device)[:, None].expand(b, n)
    for t in cache.tensors():
        t.index_put_((rows, dst), t[rows, src])
