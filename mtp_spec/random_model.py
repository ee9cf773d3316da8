"""Random checkpoints in the exact DeepSeek layout, for tests, demos and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mtp_spec.checkpoint import hf_state_dict, write_checkpoint
from mtp_spec.config import ModelArgs
from mtp_spec.model import Transformer


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Deterministic random weights. Norm weights and router biases are perturbed too, so a test
    notices if any of them is dropped or misnamed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("gate.bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def random_state(args: ModelArgs, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors of a randomly initialised model with MTP layers."""
    model = init_random(Transformer(args, max_len=2), seed, std)
    return hf_state_dict(model, args)


def write_random_checkpoint(path: str | os.PathLike, args: ModelArgs | str = "tiny", seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 4 << 30,
                            std: float = 0.02, extra_files: dict[str, str] | None = None) -> Path:
    if isinstance(args, str):
        args = ModelArgs.from_name(args)
    return write_checkpoint(random_state(args, seed, std), args, path, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            extra_files=extra_files)
