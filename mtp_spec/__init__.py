"""mtp-spec: speculative decoding with DeepSeek-V3's multi-token-prediction module."""

from __future__ import annotations

import os

import torch

from mtp_spec.config import ConfigError, ModelArgs
from mtp_spec.model import Transformer

__version__ = "0.1.0"


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         part: str = "all", max_len: int | None = None, keep_fp8: bool | None = None,
         mtp_hidden: str = "post") -> Transformer:
    """Load a checkpoint in the HF DeepSeek layout.

    part: "all" (main model and MTP), "main" or "mtp". dtype None means bfloat16 on CUDA and float32
    on the CPU. FP8 weights are dequantised once at load unless keep_fp8 (default: on CUDA with compute
    capability >= 8.9). mtp_hidden: feed the MTP module the main model's hidden state "post" or "pre"
    its final norm."""
    from mtp_spec.checkpoint import CheckpointReader, load_state, validate

    if part not in ("all", "main", "mtp"):
        raise ValueError(f"part must be 'all', 'main' or 'mtp', got {part!r}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = ModelArgs.from_file(path)
    if part == "mtp" and args.n_mtp_layers == 0:
        raise ConfigError(f"{path}: config.json has num_nextn_predict_layers 0: there is no MTP layer to load")
    if max_len is not None and max_len > args.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings {args.max_seq_len}")
    reader = CheckpointReader(path)
    validate(reader, args, part)
    if keep_fp8 is None:
        keep_fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    with torch.device("meta"):
        model = Transformer(args, max_len=max_len, main=part != "mtp", mtp=part != "main")
    load_state(model, reader, args, dtype, device, keep_fp8=keep_fp8 and args.fp8)
    if keep_fp8 and args.fp8:
        from mtp_spec.model.moe import MoE

        for m in model.modules():
            if isinstance(m, MoE):
                m.pack_fp8()
    model.rotary.to_empty(device=device)
    # Buffers built on meta must be rebuilt for real.
    from mtp_spec.model.layers import Rotary

    real = Rotary(args, model.max_len).to(device)
    model.rotary.cos, model.rotary.sin = real.cos, real.sin
    if model.mtp is not None:
        model.mtp.hidden_input = mtp_hidden
    model.source = str(path)
    return model.eval()


__all__ = ["ConfigError", "ModelArgs", "Transformer", "load", "__version__"]
