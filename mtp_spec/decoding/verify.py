"""The one verifier: lossless acceptance of any proposer's drafts, chain or tree.

Greedy: follow the target's argmax through the draft tree; the first miss emits the target's token.
Sampling (Leviathan et al. / Chen et al.):
  - a lone child x with draft probabilities q: accept with probability min(1, p(x) / q(x)); on
    rejection sample from max(p - q, 0), normalised.
  - deterministic children (argmax, n-gram, top-b tree; q one-hot): try them in order, accepting x
    with probability p(x) / mass left, zeroing each rejected x; if none is accepted, sample what is left.
    With one child this is the rule above with q = onehot(x).
  - after the last accepted node, a bonus token comes from p.
Relaxed acceptance (TensorRT-LLM style: a draft in the target's top-N within `delta` of the top-1 log
probability) is lossy and only on request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtp_spec.decoding.sampling import SamplingParams, probs, sample, uniform


@dataclass
class Drafts:
    """One sequence's proposal: node i has token tokens[i] and parent parents[i] (-1: the root,
    which is the sequence's newest token). q[i] holds the draft distribution when it was sampled."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None

    @classmethod
    def chain(cls, tokens: list[int], q: torch.Tensor | None = None) -> Drafts:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q)

    def __len__(self) -> int:
        return len(self.tokens)

    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def children(self) -> dict[int, list[int]]:
        ch: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            ch.setdefault(p, []).append(i)
        return ch


@dataclass(frozen=True)
class Relaxed:
    """Lossy acceptance: accept a draft in the target's top_n whose log-prob is within delta of the top-1."""

    top_n: int = 3
    delta: float = 0.5


@dataclass
class Verdict:
    path: list[int]  # accepted node indices, root to leaf
    token: int  # the target's token after the path (bonus or correction)


def verify(logits: torch.Tensor, drafts: Drafts, sp: SamplingParams, gen: torch.Generator | None = None,
           relaxed: Relaxed | None = None) -> Verdict:
    """logits (1 + len(drafts), V): row 0 is the target at the root, row i+1 at node i."""
    children = drafts.children()
    node, path = -1, []
    while True:
        row = logits[node + 1]
        kids = children.get(node, [])
        if sp.greedy:
            best = int(row.argmax())
            nxt = next((c for c in kids if drafts.tokens[c] == best), None)
            if nxt is None and relaxed is not None:
                nxt = _relaxed_pick(row, kids, drafts.tokens, relaxed)
            if nxt is None:
                return Verdict(path, best)
        else:
            p = probs(row, sp)
            if not kids:
                return Verdict(path, sample(p, gen))
            nxt, rest = _sample_children(p, kids, drafts, gen)
            if nxt is None:
                return Verdict(path, sample(rest, gen))
        path.append(nxt)
        node = nxt


def _relaxed_pick(row: torch.Tensor, kids: list[int], tokens: list[int], r: Relaxed) -> int | None:
    logp = row.float().log_softmax(-1)
    top = logp.topk(r.top_n)
    allowed = {int(t) for t, v in zip(top.indices, top.values) if v >= top.values[0] - r.delta}
    return next((c for c in kids if tokens[c] in allowed), None)


def _sample_children(p: torch.Tensor, kids: list[int], drafts: Drafts, gen) -> tuple[int | None, torch.Tensor]:
    if len(kids) == 1 and drafts.q is not None:
        c = kids[0]
        x, q = drafts.tokens[c], drafts.q[c].to(p.device).float()
        if q[x] > 0 and uniform(gen) < min(1.0, float(p[x] / q[x])):
            return c, p
        residual = (p - q).clamp(min=0)
        return None, residual if residual.sum() > 0 else p
    left = p.clone()
    for c in kids:
        x = drafts.tokens[c]
        mass = float(left.sum())
        if mass > 0 and uniform(gen) < float(left[x]) / mass:
            return c, left
        left[x] = 0.0
    return None, left if left.sum() > 0 else p
