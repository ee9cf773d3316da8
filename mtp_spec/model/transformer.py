"""The DeepSeek-V3/V2 decoder: embedding, blocks (dense first, then MoE), final norm, head.

`Transformer.forward` returns logits and hidden states for every position: verification needs all
of them, and the MTP module consumes the hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtp_spec.cache import KVCache
from mtp_spec.config import ModelArgs
from mtp_spec.model.attention import MLA, Step, make_step
from mtp_spec.model.layers import Linear, RMSNorm, Rotary
from mtp_spec.model.moe import MLP, MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (b, s, vocab)
    hidden_states: torch.Tensor  # (b, s, dim), after the final norm
    prenorm_hidden: torch.Tensor  # (b, s, dim), the residual stream before it


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args, rotary)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim)

    def forward(self, x: torch.Tensor, step: Step, cache_layer: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), step, cache_layer)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_len: int | None = None, main: bool = True, mtp: bool = True):
        super().__init__()
        from mtp_spec.model.mtp import MTP

        self.args = args
        self.max_len = max_len or min(args.max_seq_len, 8192)
        self.rotary = Rotary(args, self.max_len)
        self.has_main = main
        if main:
            self.embed = nn.Embedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(Block(args, i, self.rotary) for i in range(args.n_layers))
            self.norm = RMSNorm(args.dim, args.norm_eps)
            self.head = Linear(args.dim, args.vocab_size)
        self.mtp = MTP(args, self.rotary) if mtp and args.n_mtp_layers > 0 else None

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = next(self.parameters())
        dtype = dtype or (p.dtype if p.is_floating_point() and p.element_size() > 1 else torch.bfloat16)
        return KVCache(self.args, self.args.n_layers, batch, max_len or self.max_len, p.device, dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, absorb: bool = True) -> ModelOutput:
        """Run new tokens (b, s). With a cache, they are appended at per-sequence `start` (default: the
        cache's lengths); the cache lengths are not changed here, the caller decides what to keep."""
        if not self.has_main:
            raise RuntimeError("this model was loaded with the MTP layer only; load the main model too")
        step = make_step(tokens, start, cache, rows, tree_mask, positions, absorb)
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, step, i)
        normed = self.norm(h)
        return ModelOutput(logits=self.head(normed), hidden_states=normed, prenorm_hidden=h)
