"""Preallocated KV cache with per-sequence lengths.

Each layer keeps one or two tensors of shape (batch, max_len, width), named by the attention that
uses them: MLA keeps its compressed state ("latent": the normalised 512-d c_kv, and "k_rope": the
roped 64-d key); GQA keeps "k" and "v" (heads flattened). A sequence's cache is valid up to
`lengths[b]`; writes past it are scratch. Rolling back rejected draft tokens is therefore just
setting the length back: the next write overwrites them.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, widths: dict[str, int],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len
        self.names = list(widths)
        self.store = {name: [torch.zeros(batch, max_len, w, device=device, dtype=dtype) for _ in range(n_layers)]
                      for name, w in widths.items()}
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """Layer i's tensors, in the order of `widths`."""
        return tuple(self.store[name][i] for name in self.names)

    def tensors(self) -> list[torch.Tensor]:
        return [t for name in self.names for t in self.store[name]]

    def rollback(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Forget everything past `lengths` for the given rows."""
        self.lengths[rows] = lengths

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
