"""Draft proposers. Each turns the committed state of the active sequences into Drafts; the one
verifier and the one engine loop do the rest. A new strategy is one new class here.

A proposer sees, per sequence, `tokens` (prompt + output so far, the last one not yet in the main
cache) and, for MTP, `new_hidden`/`new_tokens`: the main model's hidden states at the positions
committed since the last call and the tokens that followed them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtp_spec.decoding.sampling import SamplingParams, probs, sample
from mtp_spec.decoding.verify import Drafts


@dataclass
class SeqState:
    tokens: list[int]
    prompt_len: int
    gen: torch.Generator
    new_hidden: torch.Tensor | None = None  # (m, dim)
    new_tokens: list[int] = field(default_factory=list)  # (m,) token i+1 for hidden state i
    done: bool = False


class Proposer:
    name = "vanilla"
    wants_hidden = False  # whether the engine must hand over main-model hidden states
    max_nodes = 0  # most draft tokens per step, for sizing caches

    def reset(self, batch: int, max_len: int) -> None:
        """Called once per generate() with the batch size and the cache length it needs."""

    def propose(self, seqs: list[SeqState], rows: list[int], sp: SamplingParams) -> list[Drafts]:
        return [Drafts() for _ in rows]


def _pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, list[int]]:
    lens = [len(s) for s in seqs]
    out = torch.zeros(len(seqs), max(lens), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device), lens


def _pick(logits: torch.Tensor, sp: SamplingParams, gen, sample_drafts: bool) -> tuple[int, torch.Tensor | None]:
    """The draft token from a 1-D logit row: argmax (q one-hot, None) or a sample (q returned)."""
    if sp.greedy or not sample_drafts:
        return int(logits.argmax()), None
    q = probs(logits, sp)
    return sample(q, gen), q


def _draft_chain(logits: torch.Tensor, step, seqs: list[SeqState], rows: list[int], sp: SamplingParams, k: int,
                 sample_drafts: bool) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """k drafts per row, autoregressively: pick from `logits`, then `step(j, tokens (n, 1))` gives the
    next logits. Returns the tokens and, for sampled drafts, their distributions q."""
    toks: list[list[int]] = [[] for _ in rows]
    qs: list[list[torch.Tensor]] = [[] for _ in rows]
    for j in range(k):
        for i, r in enumerate(rows):
            t, q = _pick(logits[i], sp, seqs[r].gen, sample_drafts)
            toks[i].append(t)
            if q is not None:
                qs[i].append(q)
        if j < k - 1:
            logits = step(j, torch.tensor([[t[-1]] for t in toks], device=logits.device))
    return toks, qs


class MTPProposer(Proposer):
    """A chain of k drafts from the MTP module, reusing it recursively (vLLM / SGLang style).

    Each call first runs a "draft extend": the MTP layer consumes the pairs (h_i, t_{i+1}) committed
    since last time, which fills its cache for them and yields draft 1 at the newest position. Draft
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
        self.max_nodes = k

    @property
    def hidden_input(self) -> str:
        return self.mtp.hidden_input

    def reset(self, batch: int, max_len: int) -> None:
        self.cache = self.mtp.new_cache(batch, max_len + self.max_nodes + 1)

    def _extend(self, seqs: list[SeqState], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.cache.lengths.device
        toks, m = _pad([seqs[r].new_tokens for r in rows], dev)
        dim = seqs[rows[0]].new_hidden.shape[-1]
        hid = torch.zeros(len(rows), toks.shape[1], dim, dtype=seqs[rows[0]].new_hidden.dtype, device=dev)
        for i, r in enumerate(rows):
            hid[i, : m[i]] = seqs[r].new_hidden
        rows_t = torch.tensor(rows, device=dev)
        out = self.mtp(toks, hid, depth=0, cache=self.cache, start=self.cache.lengths[rows_t], rows=rows_t)
        last = torch.tensor(m, device=dev) - 1
        ar = torch.arange(len(rows), device=dev)
        self.cache.lengths[rows_t] += torch.tensor(m, device=dev)
        for r in rows:
            seqs[r].new_hidden, seqs[r].new_tokens = None, []
        return out.logits[ar, last], out.hidden_states[ar, last]

    @torch.no_grad()
    def propose(self, seqs, rows, sp):
        logits, h = self._extend(seqs, rows)
        rows_t = torch.tensor(rows, device=logits.device)
        state = {"h": h}

        def step(j: int, inp: torch.Tensor) -> torch.Tensor:
            out = self.mtp(inp, state["h"][:, None], depth=j + 1, cache=self.cache,
                           start=self.cache.lengths[rows_t] + j, rows=rows_t)
            state["h"] = out.hidden_states[:, 0]
            return out.logits[:, 0]

        toks, qs = _draft_chain(logits, step, seqs, rows, sp, self.k, self.sample_drafts)
        return [Drafts.chain(t, torch.stack(q) if q else None) for t, q in zip(toks, qs)]


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
    def propose(self, seqs, rows, sp):
        logits, h_root = self._extend(seqs, rows)
        dev = logits.device
        n, b = len(rows), self.width
        rows_t = torch.tensor(rows, device=dev)
        lp = logits.float().log_softmax(-1)
        top = lp.topk(b, dim=-1)
        tokens = top.indices  # (n, nodes)
        scores = top.values
        parents = torch.full((n, b), -1, dtype=torch.long, device=dev)
        level = list(range(b))  # node indices of the newest level
        node_h = h_root[:, None].expand(-1, b, -1)  # each node's input: its parent's MTP output state
        base = self.cache.lengths[rows_t][:, None]
        for _ in range(2, self.k + 1):
            mask, depths = _tree_mask(parents)
            out = self.mtp(tokens, node_h, depth=0, cache=self.cache, start=base[:, 0], rows=rows_t,
                           tree_mask=mask, positions=base + depths - 1)
            lp = out.logits[:, level].float().log_softmax(-1)  # (n, b, V)
            best = (scores[:, level, None] + lp).view(n, -1).topk(b, dim=-1)
            vocab = lp.shape[-1]
            new_par = torch.tensor(level, device=dev)[best.indices // vocab]
            dim = out.hidden_states.shape[-1]
            node_h = torch.cat([node_h, out.hidden_states.gather(1, new_par[..., None].expand(-1, -1, dim))], 1)
            level = list(range(tokens.shape[1], tokens.shape[1] + b))
            tokens = torch.cat([tokens, best.indices % vocab], 1)
            scores = torch.cat([scores, best.values], 1)
            parents = torch.cat([parents, new_par], 1)
        return [Drafts(tokens[i].tolist(), parents[i].tolist()) for i in range(n)]


def _tree_mask(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, s) parent indices (-1 root) -> (n, s, s) ancestor-or-self mask and (n, s) depths (1-based)."""
    n, s = parents.shape
    mask = torch.eye(s, dtype=torch.bool, device=parents.device).expand(n, s, s).clone()
    depth = torch.ones(n, s, dtype=torch.long, device=parents.device)
    for j in range(s):  # parents precede children
        p = parents[:, j]
        has = p >= 0
        if has.any():
            pj = p.clamp(min=0)
            mask[has, j] |= mask[has, pj[has]]
            depth[has, j] = depth[has, pj[has]] + 1
    return mask, depth


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
        self.max_nodes = k

    def propose(self, seqs, rows, sp):
        return [Drafts.chain(lookup(seqs[r].tokens, self.k, self.n_max, self.n_min)) for r in rows]


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
    Its cache entries for drafts that the target accepts stay valid; the rest are overwritten."""

    name = "draft-model"

    def __init__(self, draft, k: int, sample_drafts: bool = True):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.draft, self.k, self.sample_drafts = draft, k, sample_drafts
        self.max_nodes = k

    def reset(self, batch: int, max_len: int) -> None:
        self.cache = self.draft.new_cache(batch, max_len + self.k + 1)
        self.scratch: dict[int, list[int]] = {}

    @torch.no_grad()
    def propose(self, seqs, rows, sp):
        dev = self.cache.lengths.device
        for r in rows:  # keep the cache entries of scratch drafts that turned out to be committed
            done = int(self.cache.lengths[r])
            ahead = seqs[r].tokens[done:]
            keep = 0
            for a, b in zip(self.scratch.get(r, []), ahead):
                if a != b:
                    break
                keep += 1
            self.cache.lengths[r] = done + min(keep, len(ahead) - 1)
        rows_t = torch.tensor(rows, device=dev)
        new, m = _pad([seqs[r].tokens[int(self.cache.lengths[r]):] for r in rows], dev)
        out = self.draft(new, cache=self.cache, start=self.cache.lengths[rows_t], rows=rows_t)
        logits = out.logits[torch.arange(len(rows), device=dev), torch.tensor(m, device=dev) - 1]
        self.cache.lengths[rows_t] += torch.tensor(m, device=dev)

        def step(j: int, inp: torch.Tensor) -> torch.Tensor:
            return self.draft(inp, cache=self.cache, start=self.cache.lengths[rows_t] + j, rows=rows_t).logits[:, 0]

        toks, qs = _draft_chain(logits, step, seqs, rows, sp, self.k, self.sample_drafts)
        for i, r in enumerate(rows):
            self.scratch[r] = toks[i][:-1]
        return [Drafts.chain(t, torch.stack(q) if q else None) for t, q in zip(toks, qs)]


class OracleProposer(Proposer):
    """Proposes from known continuations: always right (an upper bound), or always wrong when
    `wrong` (every draft rejected). For tests and for measuring the verifier's ceiling."""

    name = "oracle"

    def __init__(self, references: list[list[int]], k: int, vocab_size: int, wrong: bool = False):
        self.refs, self.k, self.vocab, self.wrong = references, k, vocab_size, wrong
        self.max_nodes = k

    def propose(self, seqs, rows, sp):
        out = []
        for r in rows:
            nxt = self.refs[r][len(seqs[r].tokens):len(seqs[r].tokens) + self.k]
            out.append(Drafts.chain([(t + 1) % self.vocab for t in nxt] if self.wrong else nxt))
        return out
