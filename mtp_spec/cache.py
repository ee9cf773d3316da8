"""Preallocated latent KV cache with per-sequence lengths.

Each layer keeps MLA's compressed state: the normalised 512-d latent and the roped 64-d key per token.
A sequence's cache is valid up to `lengths[b]`; writes past it are scratch. Rolling back rejected
draft tokens is therefore just setting the length back: the next write overwrites them.
"""

from __future__ import annotations

import torch

from mtp_spec.config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, n_layers: int, batch: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len
        self.kv = [torch.zeros(batch, max_len, args.kv_lora_rank, device=device, dtype=dtype)
                   for _ in range(n_layers)]
        self.pe = [torch.zeros(batch, max_len, args.qk_rope_head_dim, device=device, dtype=dtype)
                   for _ in range(n_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def rollback(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Forget everything past `lengths` for the given rows."""
        self.lengths[rows] = lengths

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv + self.pe)
