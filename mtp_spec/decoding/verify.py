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


# --- the batched verifier: every row at once, on the device, no read-back ------------------------
@dataclass
class DraftBatch:
    """Every row's proposal as tensors. Node j of row i has token tokens[i, j] (-1: no draft there)
    and parent parents[i, j] (-1: the root, the row's newest token; None: a chain, parent = j - 1).
    q (b, n, V) holds the draft distributions when the drafts were sampled (None: deterministic)."""

    tokens: torch.Tensor
    parents: torch.Tensor | None = None
    q: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def from_lists(cls, drafts: list[Drafts], device, width: int = 0) -> DraftBatch:
        """Host-side proposals (n-gram, oracles, hand-made trees) padded into one batch, `width` wide
        when any row has drafts (a fixed width keeps the verify shape fixed), else empty."""
        n = max((len(d) for d in drafts), default=0)
        n = max(n, width) if n else 0
        toks = torch.full((len(drafts), n), -1, dtype=torch.long)
        chain = all(d.is_chain() for d in drafts)
        parents = None if chain else torch.full((len(drafts), n), -1, dtype=torch.long)
        for i, d in enumerate(drafts):
            toks[i, : len(d)] = torch.tensor(d.tokens, dtype=torch.long)
            if parents is not None:
                parents[i, : len(d)] = torch.tensor(d.parents, dtype=torch.long)
        q = None
        if any(d.q is not None for d in drafts):
            v = next(d.q for d in drafts if d.q is not None).shape[-1]
            q = torch.zeros(len(drafts), n, v)
            for i, d in enumerate(drafts):
                if d.q is not None:
                    q[i, : len(d)] = d.q
            q = q.to(device)
        return cls(toks.to(device), None if parents is None else parents.to(device), q)

    def chain_parents(self) -> torch.Tensor:
        if self.parents is not None:
            return self.parents
        b, n = self.tokens.shape
        return (torch.arange(n, device=self.tokens.device) - 1).expand(b, n)

    def depths(self) -> torch.Tensor:
        """(b, n) depth of each node (1 for the root's children)."""
        if self.parents is None:
            return (torch.arange(self.n, device=self.tokens.device) + 1).expand(self.tokens.shape)
        return tree_of(self.parents)[1]

    def tree_mask(self) -> torch.Tensor:
        """(b, 1 + n, 1 + n) ancestor-or-self mask over [root, nodes...]: every node sees the root."""
        b, n = self.tokens.shape
        nodes = tree_of(self.chain_parents())[0]
        top = torch.zeros(b, 1, 1 + n, dtype=torch.bool, device=nodes.device)
        top[:, :, 0] = True
        rest = torch.cat([torch.ones(b, n, 1, dtype=torch.bool, device=nodes.device), nodes], 2)
        return torch.cat([top, rest], 1)

    def row(self, i: int) -> Drafts:
        """Row i as host lists (for the per-row reference verifier: it reads tensors back)."""
        valid = self.tokens[i] >= 0
        toks = self.tokens[i][valid].tolist()
        par = self.chain_parents()[i][valid].tolist()
        return Drafts(toks, par, None if self.q is None else self.q[i][valid])


@dataclass
class Accepted:
    """What verification decided for every row, on the device."""

    n: torch.Tensor  # (b,) accepted draft nodes (the path length)
    path: torch.Tensor  # (b, n) node indices of the accepted path, root side first (valid below n)
    token: torch.Tensor  # (b,) the target's token after the path (bonus or correction)
    drafted: torch.Tensor  # (b,) draft nodes this row had


def uniforms(gens: list[torch.Generator | None], n: int, device) -> torch.Tensor:
    """(b, n) U(0, 1) draws, each row from its own request's generator (reproducible per request)."""
    return torch.stack([torch.rand(n, generator=g) for g in gens]).to(device)


def sample_rows(p: torch.Tensor, gens: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row of (b, V) unnormalised probabilities: argmax of p / E with E ~ Exp(1) drawn
    from each row's generator (the exponential race: the same law as multinomial)."""
    noise = torch.stack([torch.empty(p.shape[-1]).exponential_(generator=g) for g in gens]).to(p.device)
    return (p.float() / noise).argmax(-1)


def verify_batch(logits: torch.Tensor, drafts: DraftBatch, sp: SamplingParams,
                 gens: list[torch.Generator | None], relaxed: Relaxed | None = None) -> Accepted:
    """logits (b, 1 + n, V): row 0 is the target at the root, row j + 1 at node j. The batched form of
    `verify`: greedy chains and trees and sampled chains run as tensor ops on every row at once;
    sampled trees and relaxed acceptance take the per-row reference (which reads values back)."""
    b, n = drafts.tokens.shape
    dev = logits.device
    drafted = (drafts.tokens >= 0).sum(1)
    if n == 0:
        token = logits[:, 0].argmax(-1) if sp.greedy else sample_rows(probs(logits[:, 0], sp), gens)
        return Accepted(torch.zeros(b, dtype=torch.long, device=dev), drafts.tokens, token, drafted)
    if relaxed is not None or (not sp.greedy and drafts.parents is not None):
        return _per_row(logits, drafts, sp, gens, relaxed, drafted)
    if sp.greedy:
        target = logits.argmax(-1)  # (b, 1 + n)
        if drafts.parents is None:
            ok = (drafts.tokens == target[:, :n]).long()
            count = ok.cumprod(1).sum(1)
            path = torch.arange(n, device=dev).expand(b, n)
            return Accepted(count, path, target.gather(1, count[:, None])[:, 0], drafted)
        return _greedy_tree(target, drafts, drafted)
    p = probs(logits, sp)  # (b, 1 + n, V)
    x = drafts.tokens.clamp(min=0)
    valid = drafts.tokens >= 0
    px = p[:, :n].gather(2, x[:, :, None])[:, :, 0]
    qx = torch.ones_like(px) if drafts.q is None else drafts.q.float().gather(2, x[:, :, None])[:, :, 0]
    # accept x with probability min(1, p(x) / q(x)); a one-hot q gives p(x)
    ok = valid & (qx > 0) & (uniforms(gens, n, dev) * qx < px)
    count = ok.long().cumprod(1).sum(1)
    at = count[:, None]
    p_at = p.gather(1, at[:, :, None].expand(-1, -1, p.shape[-1]))[:, 0]
    rejected = count < n
    rej_valid = rejected & valid.gather(1, at.clamp(max=n - 1))[:, 0]
    if drafts.q is None:
        q_at = torch.zeros_like(p_at).scatter(1, x.gather(1, at.clamp(max=n - 1)), 1.0)
    else:
        q_at = drafts.q.float().gather(1, at.clamp(max=n - 1)[:, :, None].expand(-1, -1, p.shape[-1]))[:, 0]
    residual = (p_at - q_at).clamp(min=0)
    use_res = rej_valid & (residual.sum(-1) > 0)
    dist = torch.where(use_res[:, None], residual, p_at)  # after the last node, or no draft there: p itself
    path = torch.arange(n, device=dev).expand(b, n)
    return Accepted(count, path, sample_rows(dist, gens), drafted)


def _greedy_tree(target: torch.Tensor, drafts: DraftBatch, drafted: torch.Tensor) -> Accepted:
    b, n = drafts.tokens.shape
    par = drafts.parents
    ok = drafts.tokens == target.gather(1, par + 1)  # a node matches the target's choice at its parent
    reach = torch.zeros_like(ok)
    for j in range(n):  # parents precede children
        up = torch.where(par[:, j] >= 0, reach.gather(1, par[:, j].clamp(min=0)[:, None])[:, 0], True)
        reach[:, j] = ok[:, j] & up
    depth = drafts.depths()
    nodes = torch.arange(n, device=par.device).expand(b, n)
    # the deepest reached node; among equals the first, as the reference tries children in order
    score = torch.where(reach, depth * (n + 1) + (n - nodes), -1)
    leaf = score.argmax(1)
    count = torch.where(score.amax(1) >= 0, depth.gather(1, leaf[:, None])[:, 0], 0)
    anc = drafts.tree_mask()  # ancestor-or-self over [root, nodes]
    on_path = anc.gather(1, (leaf + 1)[:, None, None].expand(b, 1, n + 1))[:, 0, 1:] & (count > 0)[:, None]
    at = torch.where(on_path, depth - 1, n)  # each path node goes to its depth; the rest to a spare column
    path = torch.zeros(b, n + 1, dtype=torch.long, device=par.device).scatter_(1, at, nodes)[:, :n]
    token = target.gather(1, torch.where(count > 0, leaf + 1, 0)[:, None])[:, 0]
    return Accepted(count, path, token, drafted)


def _per_row(logits, drafts, sp, gens, relaxed, drafted) -> Accepted:
    b, n = drafts.tokens.shape
    counts, paths, tokens = [], [], []
    for i in range(b):
        d = drafts.row(i)
        v = verify(logits[i, : 1 + n], d, sp, gens[i], relaxed)
        counts.append(len(v.path))
        paths.append(v.path + [0] * (n - len(v.path)))
        tokens.append(v.token)
    dev = logits.device
    return Accepted(torch.tensor(counts, device=dev), torch.tensor(paths, dtype=torch.long, device=dev).view(b, n),
                    torch.tensor(tokens, device=dev), drafted)


def tree_of(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, s) parent indices (-1: the root; parents precede children) -> the (b, s, s) ancestor-or-self
    mask and the (b, s) depths (1-based), without reading anything back."""
    b, s = parents.shape
    mask = torch.eye(s, dtype=torch.bool, device=parents.device).expand(b, s, s).clone()
    depth = torch.ones(b, s, dtype=torch.long, device=parents.device)
    for j in range(s):
        p = parents[:, j]
        has = p >= 0
        pj = p.clamp(min=0)
        mask[:, j] |= has[:, None] & mask.gather(1, pj[:, None, None].expand(b, 1, s))[:, 0]
        depth[:, j] = torch.where(has, depth.gather(1, pj[:, None])[:, 0] + 1, 1)
    return mask, depth
