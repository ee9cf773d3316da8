"""Whole engine steps timed at warm-up, for `--k auto`'s cost model (decoding/cost.py): the step at
each depth as `AutoMTPProposer` runs it, and the step with drafting off. Above the engine and the
proposers, since it runs one with the other."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtp_spec.decoding.cost import CostModel, Table, smooth
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import AutoMTPProposer, DecodeState, Proposer


class _Plain(Proposer):
    """No drafts, as `auto` runs once drafting is off: every step after the first timed (`measure_steps`)."""

    def reset(self, batch: int, max_len: int) -> None:
        self.times, self.skip = [], True

    def observe(self, st, steps, seconds):
        if not self.skip:
            self.times.append(seconds)
        self.skip = False


class _FixedDepth(AutoMTPProposer):
    """`auto`'s step at one depth, every step, its steady steps timed (`measure_steps`)."""

    def __init__(self, model, k: int, k_max: int, cost: CostModel):
        super().__init__(model, k_max, cost=cost)
        self.fixed, self.times = k, []

    def choose(self, st: DecodeState) -> int:
        return self.fixed

    def observe(self, st, steps, seconds):  # steady: extends the k + 1 tokens the last step committed (k = 0: none)
        if self.ran == (self.fixed, self.fixed + 1 if self.fixed else 0):
            self.times.append(seconds)


@torch.no_grad()
def measure_steps(model, cost: CostModel, batches: Sequence[int], k_max: int, new: int = 12,
                  prompt: int = 32, rounds: int = 4) -> CostModel:
    """Time `auto`'s whole engine step at each depth 0..k_max and batch size (greedy, random prompts)
    into `cost.step_table`, which the chooser then reads instead of the sum of the forwards, and the
    step with drafting off into `cost.off_table`, the price of plain decoding. The sum
    missed what the engine adds and what the forwards do to each other (toy model, batch 4, a 128-token
    cache: verify(1) 8.3 ms where a whole plain step took 7.3, hot in cache; verify(2) + extend(2) 11.3
    where a k = 1 step took 12.6), so auto saw k = 1 at 1.2x plain decoding where it measured 0.88x.
    Depths take turns within a round; the first round pays first calls (compilation) and is dropped.
    Each depth is timed against the step with drafting off of its own round (the median over rounds of
    that ratio, times the median step with drafting off), so that a machine that slows for a few
    seconds moves one round's ratio, not the table: on a busy CPU one such table had SmolLM2's
    drafting steps at batch 2 about 3x their price, and `auto` never drafted at batch 2."""
    g = torch.Generator().manual_seed(0)
    prompt = max(1, min(prompt, model.max_len - new - k_max - 2))
    mid = lambda t: sorted(t)[len(t) // 2]
    ratios: dict[tuple[int, int], list[float]] = {}
    off: dict[tuple[int, int], list[float]] = {}
    for rnd in range(rounds):
        for b in batches:
            prompts = torch.randint(0, model.args.vocab_size, (b, prompt), generator=g).tolist()
            times = {}
            for k in range(-1, k_max + 1):  # -1: drafting off
                prop = _Plain() if k < 0 else _FixedDepth(model, k, k_max, cost)
                Engine(model, prop).generate(prompts, new)
                if prop.times:
                    times[k] = mid(prop.times)
            if rnd == 0 or -1 not in times:
                continue
            off.setdefault((1, b), []).append(times[-1])
            for k in range(k_max + 1):
                if k in times:
                    ratios.setdefault((k + 1, b), []).append(times[k] / times[-1])
    cost.off_table = Table({key: mid(t) for key, t in off.items()})
    cost.step_table = Table({(n, b): mid(r) * cost.off_table(1, b) for (n, b), r in ratios.items()})
    smooth(cost.step_table)
    return cost
