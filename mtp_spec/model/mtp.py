"""The multi-token-prediction module (checkpoint layers n_layers .. n_layers + D - 1).

For position i it combines the main model's hidden state h_i with the embedding of the next token
t_{i+1} and predicts t_{i+2}:

    h'_i = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])      # embedding first, as the checkpoint expects
    h_i^1 = Block(h'_i)                                      # causal over the MTP layer's own cache
    logits = shared_head.head(shared_head.norm(h_i^1))

Drafting k > 1 tokens feeds h_i^1 back in as the next step's h (chained reuse of one layer).
Whether h_i is taken after the main model's final norm ("post", as vLLM does) or before it ("pre")
is a switch, because which works better is an open question worth measuring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import mtp_spec.parallel as parallel
from mtp_spec.cache import KVCache
from mtp_spec.config import ModelArgs
from mtp_spec.model.attention import cache_dtype, cache_widths, make_step
from mtp_spec.model.block import Block
from mtp_spec.model.layers import ColumnParallelLinear, Linear, ParallelEmbedding, RMSNorm, Rotary
from mtp_spec.model.steps import StepCompiler


@dataclass
class MTPOutput:
    logits: torch.Tensor  # (b, s, vocab): predictions of t_{i+2}
    hidden_states: torch.Tensor  # (b, s, dim): the state to chain, per the pre/post switch


class MTPLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, rotary: Rotary, block: type[nn.Module] = Block):
        super().__init__()
        self.embed = ParallelEmbedding(args.vocab_size, args.dim)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = Linear(2 * args.dim, args.dim)
        self.block = block(args, layer_id, rotary)
        self.head_norm = RMSNorm(args.dim, args.norm_eps)  # shared_head.norm
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, "vocab_size", gather=True)  # shared_head.head
        self.vocab_size = args.vocab_size
        # FR-Spec's sub-vocabulary draft head: only these token ids are scored (None: the full head)
        self.register_buffer("draft_vocab", None)
        self.sub_head: list[Linear] = []
        self.sub_ids: torch.Tensor | None = None  # the draft-vocabulary ids this rank's sub_head scores

    def set_draft_vocab(self, ids: torch.Tensor | None, runtime: bool = False) -> None:
        """Score only `ids` (the most frequent tokens) when drafting; the verifier still uses the main
        head over the whole vocabulary, so output stays lossless. None restores the full head.

        `draft_vocab` is the vocabulary the layer was trained with (the checkpoint's tensor). A
        `runtime` restriction (mtp_spec.draft_vocab, `--draft-vocab N`) builds the sub-head only and
        leaves it alone, so None with `runtime` goes back to the trained vocabulary, not the full head."""
        if not runtime:
            self.draft_vocab = None
        self.sub_head, self.sub_ids = [], None
        if ids is None and runtime:
            ids = self.draft_vocab
        if ids is None:
            return
        ids = ids.to(device=self.head.weight.device, dtype=torch.long)
        if ids.dim() != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"draft vocabulary must be 1-D token ids in [0, {self.vocab_size})")
        if not runtime:
            self.draft_vocab = ids
        start = self.head.shard[1] if self.head.shard else 0  # a rank scores the ids in its vocabulary slice
        mine = ids[(ids >= start) & (ids < start + self.head.weight.shape[0])]
        sub = Linear(self.head.in_features, len(mine))
        sub.small_m = self.head.small_m
        sub.weight = nn.Parameter(self.head.dense_weight(self.head_norm.weight.dtype)[mine - start].clone(),
                                  requires_grad=False)
        self.sub_head, self.sub_ids = [sub], mine


class MTP(nn.Module):
    def __init__(self, args: ModelArgs, rotary: Rotary, hidden_input: str = "post",
                 steps: StepCompiler | None = None, block: type[nn.Module] = Block,
                 cache_widths: Callable[..., dict[str, int]] = cache_widths):
        super().__init__()
        self.steps = steps or StepCompiler()  # shared with the main model: one switch, one compile count
        self.args = args
        self.layers = nn.ModuleList(MTPLayer(args, args.n_layers + k, rotary, block)
                                    for k in range(args.n_mtp_layers))
        self.hidden_input = hidden_input
        self.cache_widths = cache_widths

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.layers[0].eh_proj.weight
        widths = self.cache_widths(self.args)
        return KVCache(len(self.layers), batch, max_len, widths, p.device, dtype or cache_dtype(p))

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, depth: int = 0,
                cache: KVCache | None = None, start: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                absorb: bool = True, logits_at: torch.Tensor | None = None, step: bool = False) -> MTPOutput:
        """tokens (b, s) are t_{i+1}, hidden (b, s, dim) is h_i; entries sit at the positions of h_i.
        `depth` picks the layer for this draft step (models with several MTP layers use them in turn).
        Each layer has its own slot in the MTP cache. logits_at (b, m): positions that go through the head."""
        k = depth % len(self.layers)
        layer = self.layers[k]
        step = make_step(tokens, start, cache, tree_mask, positions, absorb, layer.block.attn.rotary[0])
        compiled = self.steps.active(tokens.shape[1], step)
        x = self.steps.run(_mtp_input, layer, tokens, hidden, compiled=compiled)
        kv = None if cache is None else cache.layer(k)
        x = self.steps.run(type(layer.block).forward, layer.block, x, step, kv, compiled=compiled)
        normed = layer.head_norm(x)
        sel = normed if logits_at is None else normed.gather(1, logits_at[:, :, None].expand(-1, -1, x.shape[-1]))
        if layer.sub_head:  # score the draft vocabulary only; every other token gets -inf
            sub = self.steps.run(Linear.forward, layer.sub_head[0], sel, compiled=compiled)
            logits = sub.new_full((*sub.shape[:-1], layer.vocab_size), float("-inf"))
            logits = logits.scatter(-1, layer.sub_ids.expand_as(sub), sub)
            logits = parallel.all_reduce(logits, "max")  # each rank filled its own ids; -inf elsewhere
        else:
            logits = self.steps.run(type(layer.head).forward, layer.head, sel, compiled=compiled)
        return MTPOutput(logits=logits, hidden_states=normed if self.hidden_input == "post" else x)


def _mtp_input(layer: MTPLayer, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    e = layer.embed(tokens).to(hidden.dtype)
    return layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(hidden)], dim=-1))
