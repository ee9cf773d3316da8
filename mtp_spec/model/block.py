"""One decoder block: MLA attention then a dense MLP or MoE, each behind an RMSNorm with a residual.
The main model stacks them; the MTP layer wraps one."""

from __future__ import annotations

import torch
from torch import nn

from mtp_spec.config import ModelArgs
from mtp_spec.model.attention import MLA, Step
from mtp_spec.model.layers import RMSNorm, Rotary
from mtp_spec.model.moe import MLP, MoE


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args, rotary)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim, parallel=True)

    def forward(self, x: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """kv: this layer's cache tensors (latent, roped key), or None without a cache."""
        x = x + self.attn(self.attn_norm(x), step, kv)
        return x + self.ffn(self.ffn_norm(x))

    def fuse(self) -> None:
        """Load-time fusion of projections that read the same input."""
        self.attn.fuse()
        if isinstance(self.ffn, MoE):
            self.ffn.stack()
        else:
            self.ffn.fuse()
