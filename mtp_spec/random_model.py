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


@torch.no_grad()
def random_model(args: ModelArgs | str, device: str | torch.device, seed: int = 0, fp8: bool = True,
                 dtype: torch.dtype = torch.bfloat16, max_len: int | None = None, main: bool = True,
                 mtp: bool = True, std: float = 0.02) -> Transformer:
    """A random model built straight on `device`, with no files: for GPU benchmarks at sizes whose
    checkpoint would take minutes to write. Tensors get the loader's kinds: with `fp8` (and an FP8
    config) the projections the checkpoint stores in e4m3 are quantised on the device and kept so;
    without, they are dequantised to `dtype`, as `load(keep_fp8=False)` does."""
    from mtp_spec.checkpoint import is_fp8_tensor, place, to_hf_name
    from mtp_spec.kernels import weight_quant_ref

    if isinstance(args, str):
        args = ModelArgs.from_name(args)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args, max_len=max_len, main=main, mtp=mtp)
    modules = dict(model.named_modules())
    g = torch.Generator(device=device).manual_seed(seed)
    keep_fp8 = fp8 and args.fp8
    for pname, p in list(model.named_parameters()):
        mod_name, _, attr = pname.rpartition(".")
        t = torch.randn(p.shape, generator=g, device=device)
        if pname.endswith("norm.weight"):
            t = 1 + 0.1 * t
        else:
            t *= 0.05 if attr == "bias" else std
        scale = None
        if args.fp8 and is_fp8_tensor(to_hf_name(pname, args)) and t.dim() == 2:
            t, scale = weight_quant_ref(t)
        place(modules[mod_name], attr, t, scale, keep_fp8, dtype, device)
        del t
    return model.materialize(device, keep_fp8=keep_fp8).eval()
