"""Speculative-decoding counters and the metrics derived from them (vLLM's names and definitions).

  num_drafts            verify steps that carried at least one draft token
  num_draft_tokens      draft tokens proposed (tree nodes count one each)
  num_accepted_tokens   draft tokens accepted (the bonus/corrected token is not counted)
  accepted_per_pos[i]   steps whose accepted path reached depth i+1
  steps_per_k[k]        steps the proposer ran at draft depth k (0: no drafts; `--k auto` varies it)
Derived:
  acceptance_rate  AR = num_accepted_tokens / num_draft_tokens
  acceptance_len   AL = 1 + num_accepted_tokens / num_drafts  (bonus included; vanilla = 1.00, Spec-Bench)
  per_pos_rate[i]  accepted_per_pos[i] / num_drafts            (unconditional, as vLLM; never rises with i)
  per_pos_cond[i]  accepted_per_pos[i] / accepted_per_pos[i-1] (given every earlier position accepted)
Timing: ttft_s (prompt to first token), tpot_s (per output token after the first), tokens_per_s
(generated tokens over the whole request time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecMetrics:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    num_steps: int = 0  # verify forwards (with or without drafts)
    num_generated: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    steps_per_k: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int, k: int | None = None) -> None:
        """One verify step: `drafted` tokens proposed, the accepted path `accepted` long, at depth k."""
        self.num_steps += 1
        if k is not None:
            self.steps_per_k += [0] * (k + 1 - len(self.steps_per_k))
            self.steps_per_k[k] += 1
        if drafted:
            self.num_drafts += 1
            self.num_draft_tokens += drafted
            self.num_accepted_tokens += accepted
            while len(self.accepted_per_pos) < accepted:
                self.accepted_per_pos.append(0)
            for i in range(accepted):
                self.accepted_per_pos[i] += 1

    def merge(self, other: SpecMetrics) -> SpecMetrics:
        return SpecMetrics(
            self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
            self.num_accepted_tokens + other.num_accepted_tokens,
            _add(self.accepted_per_pos, other.accepted_per_pos),
            self.num_steps + other.num_steps, self.num_generated + other.num_generated,
            self.ttft_s + other.ttft_s, self.total_s + other.total_s, _add(self.steps_per_k, other.steps_per_k))

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_len(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def per_pos_rate(self) -> list[float]:
        return [a / self.num_drafts for a in self.accepted_per_pos] if self.num_drafts else []

    @property
    def per_pos_cond(self) -> list[float]:
        out, prev = [], self.num_drafts
        for a in self.accepted_per_pos:
            out.append(a / prev if prev else 0.0)
            prev = a
        return out

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated / self.total_s if self.total_s > 0 else 0.0

    @property
    def tpot_s(self) -> float:
        return (self.total_s - self.ttft_s) / (self.num_generated - 1) if self.num_generated > 1 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, acceptance_len=self.acceptance_len,
                 per_pos_rate=self.per_pos_rate, per_pos_cond=self.per_pos_cond,
                 tokens_per_s=self.tokens_per_s, tpot_s=self.tpot_s)
        return d


def _add(a: list[int], b: list[int]) -> list[int]:
    """Elementwise sum of two counts lists of any lengths."""
    n = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]
