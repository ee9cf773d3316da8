import os

import torch

# Triton must see the interpreter switch before it is first imported (its language functions are
# decorated at import): without a GPU, every Triton kernel in the tests runs in the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mtp_spec.config import ModelArgs  # noqa: E402
from mtp_spec.random_model import write_random_checkpoint  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory):
    """The tiny V3 preset, FP8 projections, BF16 elsewhere: the real on-disk kinds."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp8", "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory):
    """Tiny V3 in fp32 without quantisation: the parity reference for transformers."""
    args = ModelArgs.from_name("tiny").with_(fp8=False)
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp32", args, seed=2, dtype=torch.float32)
