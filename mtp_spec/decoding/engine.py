"""The one decode loop: prefill, then propose -> verify -> accept -> roll back -> record.

Batches are ragged: every sequence has its own cache length and accepts its own number of tokens
per step. A finished sequence (eos, max_new_tokens, stop string) simply leaves the active set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtp_spec.decoding.proposers import Proposer, SeqState
from mtp_spec.decoding.sampling import SamplingParams
from mtp_spec.decoding.verify import Drafts, Relaxed, verify
from mtp_spec.metrics import SpecMetrics


@dataclass
class Result:
    token_ids: list[int]  # generated tokens only
    finish_reason: str  # "eos" | "length" | "stop"
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    lossy: bool = False  # relaxed acceptance was on: the output may differ from the target model's


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
        model, prop = self.model, self.proposer
        self._check(prompts, max_new_tokens, stop, decode)
        dev = next(model.parameters()).device
        n = len(prompts)
        max_len = max(len(p) for p in prompts) + max_new_tokens + prop.max_nodes + 2
        cache = self.last_cache = model.new_cache(n, max_len)
        prop.reset(n, max_len)
        seqs = [SeqState(list(p), len(p), torch.Generator().manual_seed(seed * 1_000_003 + i))
                for i, p in enumerate(prompts)]
        results = [Result([], "length", lossy=self.relaxed is not None) for _ in prompts]
        t0 = time.perf_counter()

        # prefill: the whole (right-padded) batch at once; each row's pad writes are scratch
        lens = [len(p) for p in prompts]
        toks = torch.zeros(n, max(lens), dtype=torch.long)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = torch.tensor(p)
        out = model(toks.to(dev), cache=cache, start=torch.zeros(n, dtype=torch.long, device=dev),
                    absorb=self.absorb)
        hidden = self._hidden(out)
        for i in range(n):
            tok = verify(out.logits[i, lens[i] - 1: lens[i]], Drafts(), sp, seqs[i].gen).token
            cache.lengths[i] = lens[i]
            if hidden is not None:
                seqs[i].new_hidden, seqs[i].new_tokens = hidden[i, : lens[i]], prompts[i][1:] + [tok]
            results[i].metrics.ttft_s = time.perf_counter() - t0
            self._append(i, [tok], seqs, results, max_new_tokens, eos_id, stop, decode, on_tokens, t0)

        while rows := [i for i in range(n) if not seqs[i].done]:
            drafts = prop.propose(seqs, rows, sp)
            inp, tree, pos = self._verify_inputs(seqs, rows, drafts, cache, dev)
            rows_t = torch.tensor(rows, device=dev)
            start = cache.lengths[rows_t]
            out = model(inp, cache=cache, start=start, rows=rows_t, tree_mask=tree, positions=pos,
                        absorb=self.absorb)
            hidden = self._hidden(out)
            for j, i in enumerate(rows):
                d = drafts[j]
                v = verify(out.logits[j, : 1 + len(d)], d, sp, seqs[i].gen, self.relaxed)
                new = [d.tokens[p] for p in v.path] + [v.token]
                if v.path != list(range(len(v.path))):  # a tree branch: move its cache entries into place
                    s0 = int(start[j]) + 1
                    _move(cache, i, [s0 + p for p in v.path], list(range(s0, s0 + len(v.path))))
                cache.lengths[i] = int(start[j]) + 1 + len(v.path)
                if hidden is not None:
                    seqs[i].new_hidden = hidden[j, [0] + [1 + p for p in v.path]]
                    seqs[i].new_tokens = new
                results[i].metrics.record(len(d), len(v.path))
                self._append(i, new, seqs, results, max_new_tokens, eos_id, stop, decode, on_tokens, t0)
                cache.lengths[i] = len(seqs[i].tokens) - 1  # tokens cut by a stop are dropped here too
        return results

    def _hidden(self, out) -> torch.Tensor | None:
        if not self.proposer.wants_hidden:
            return None
        return out.hidden_states if self.proposer.hidden_input == "post" else out.prenorm_hidden

    def _verify_inputs(self, seqs, rows, drafts: list[Drafts], cache, dev):
        s = 1 + max(len(d) for d in drafts)
        inp = torch.zeros(len(rows), s, dtype=torch.long)
        for j, (i, d) in enumerate(zip(rows, drafts)):
            inp[j, 0] = seqs[i].tokens[-1]
            if len(d):
                inp[j, 1: 1 + len(d)] = torch.tensor(d.tokens)
        if all(d.is_chain() for d in drafts):
            return inp.to(dev), None, None
        mask = torch.zeros(len(rows), s, s, dtype=torch.bool)
        depth = torch.zeros(len(rows), s, dtype=torch.long)
        for j, d in enumerate(drafts):
            mask[j].fill_diagonal_(True)
            mask[j, :, 0] = True
            for c, (p, dep) in enumerate(zip(d.parents, d.depths())):
                depth[j, c + 1] = dep
                if p >= 0:
                    mask[j, c + 1] |= mask[j, p + 1]
            depth[j, 1 + len(d):] = torch.arange(1, s - len(d))  # padding: harmless positions
        start = cache.lengths[torch.tensor(rows, device=cache.lengths.device)].cpu()
        return inp.to(dev), mask.to(dev), (start[:, None] + depth).to(dev)

    def _append(self, i, new, seqs, results, max_new, eos_id, stop, decode, on_tokens, t0) -> None:
        """Commit accepted tokens, cutting at eos, a stop string or max_new_tokens."""
        seq, res = seqs[i], results[i]
        kept, reason = 0, None
        for t in new:
            res.token_ids.append(t)
            kept += 1
            if eos_id is not None and t == eos_id:
                reason = "eos"
            elif stop and any(s in decode(res.token_ids) for s in stop):
                reason = "stop"
            elif len(res.token_ids) >= max_new:
                reason = "length"
            if reason:
                break
        seq.tokens.extend(new[:kept])
        self._emit(on_tokens, i, new[:kept])
        res.metrics.num_generated = len(res.token_ids)
        if reason:
            seq.done, res.finish_reason = True, reason
            res.metrics.total_s = time.perf_counter() - t0

    @staticmethod
    def _emit(on_tokens, i, toks):
        if on_tokens is not None and toks:
            on_tokens(i, toks)

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
            raise ValueError("stop strings need a tokenizer (decode function)")


def _move(cache, row: int, src: list[int], dst: list[int]) -> None:
    s, d = torch.tensor(src), torch.tensor(dst)
    for kv, pe in zip(cache.kv, cache.pe):
        kv[row, d] = kv[row, s].clone()
        pe[row, d] = pe[row, s].clone()
