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

from dataclasses import dataclass

import torch
from torch import nn

from mtp_spec.cache import KVCache
from mtp_spec.config import ModelArgs
from mtp_spec.model.attention import make_step
from mtp_spec.model.layers import Linear, RMSNorm, Rotary
from mtp_spec.model.transformer import Block


@dataclass
class MTPOutput:
    logits: torch.Tensor  # (b, s, vocab): predictions of t_{i+2}
    hidden_states: torch.Tensor  # (b, s, dim): the state to chain, per the pre/post switch


class MTPLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, rotary: Rotary):
        super().__init__()
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = Linear(2 * args.dim, args.dim)
        self.block = Block(args, layer_id, rotary)
        self.head_norm = RMSNorm(args.dim, args.norm_eps)  # shared_head.norm
        self.head = Linear(args.dim, args.vocab_size)  # shared_head.head


class MTP(nn.Module):
    def __init__(self, args: ModelArgs, rotary: Rotary, hidden_input: str = "post"):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(MTPLayer(args, args.n_layers + k, rotary) for k in range(args.n_mtp_layers))
        self.hidden_input = hidden_input

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.layers[0].eh_proj.weight
        dtype = dtype or (p.dtype if p.element_size() > 1 else torch.bfloat16)
        return KVCache(self.args, len(self.layers), batch, max_len, p.device, dtype)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, depth: int = 0,
                cache: KVCache | None = None, start: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, absorb: bool = True) -> MTPOutput:
        """tokens (b, s) are t_{i+1}, hidden (b, s, dim) is h_i; entries sit at the positions of h_i.
        `depth` picks the layer for this draft step (models with several MTP layers use them in turn).
        Each layer has its own slot in the MTP cache."""
        k = depth % len(self.layers)
        layer = self.layers[k]
        step = make_step(tokens, start, cache, rows, tree_mask, positions, absorb)
        x = layer.eh_proj(torch.cat([layer.enorm(layer.embed(tokens)), layer.hnorm(hidden)], dim=-1))
        x = layer.block(x, step, k)
        normed = layer.head_norm(x)
        return MTPOutput(logits=layer.head(normed), hidden_states=normed if self.hidden_input == "post" else x)
