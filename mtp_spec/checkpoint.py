"""Hugging Face checkpoint I/O in DeepSeek's own layout.

`config.json` + `model.safetensors` or shards with `model.safetensors.index.json`. FP8 projections
are e4m3 with a float32 `<name>_scale_inv` sibling of shape (ceil(out/128), ceil(in/128)); every
other tensor is BF16 (F32 for `e_score_correction_bias`). The MTP layer sits at `model.layers.{n}`.
Loading is safetensors-only (no pickle, no remote code) and lazy: one tensor is read at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtp_spec.config import ModelArgs
from mtp_spec.io import atomic_dir, check_not_inside
from mtp_spec.kernels import FP8, weight_dequant_ref, weight_quant_ref

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MTP_FILE = "mtp.safetensors"  # a post-hoc MTP layer beside a checkpoint that has none (the Llama family)
SCALE = "_scale_inv"
FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# --- names: ours <-> HF ----------------------------------------------------------------------
_BLOCK = [  # (ours, HF) within a decoder block
    ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
    ("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"), ("attn.wv", "self_attn.v_proj"),
    ("attn.wq_a", "self_attn.q_a_proj"),
    ("attn.q_norm", "self_attn.q_a_layernorm"), ("attn.wq_b", "self_attn.q_b_proj"),
    ("attn.wkv_a", "self_attn.kv_a_proj_with_mqa"), ("attn.kv_norm", "self_attn.kv_a_layernorm"),
    ("attn.wkv_b", "self_attn.kv_b_proj"), ("attn.wo", "self_attn.o_proj"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.gate", "mlp.gate"),
    ("ffn.shared_experts", "mlp.shared_experts"), ("ffn.experts", "mlp.experts"), ("ffn", "mlp"),
    ("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"),
]
_MTP_OWN = [("embed", "embed_tokens"), ("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
            ("head_norm", "shared_head.norm"), ("head", "shared_head.head")]


def _rename(rest: str, table: list[tuple[str, str]], forward: bool) -> str:
    # forward: ours -> HF. Rename component by component, longest match first.
    out, src = [], rest
    pairs = table if forward else [(b, a) for a, b in table]
    while src:
        for a, b in pairs:
            if src == a or src.startswith(a + "."):
                out.append(b)
                src = src[len(a) + 1:]
                break
        else:
            head, _, src = src.partition(".")
            out.append(head)
    return ".".join(out)


def to_hf_name(name: str, args: ModelArgs) -> str:
    """Our parameter name -> the checkpoint's tensor name."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m[1]}.{_rename(m[2], _BLOCK, True)}"
    m = re.fullmatch(r"mtp\.layers\.(\d+)\.(.+)", name)
    if m:
        i = args.n_layers + int(m[1])
        if m[2].startswith("block."):
            return f"model.layers.{i}.{_rename(m[2][6:], _BLOCK, True)}"
        return f"model.layers.{i}.{_rename(m[2], _MTP_OWN, True)}"
    raise KeyError(f"no checkpoint name for parameter '{name}'")


def from_hf_name(name: str, args: ModelArgs) -> str:
    """The checkpoint's tensor name -> our parameter name (the inverse of to_hf_name)."""
    fixed = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "head.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        raise KeyError(name)
    i, rest = int(m[1]), m[2]
    if i < args.n_layers:
        return f"layers.{i}.{_rename(rest, _BLOCK, False)}"
    k = i - args.n_layers
    own = _rename(rest, _MTP_OWN, False)
    if own.split(".")[0] in {a for a, _ in _MTP_OWN}:
        return f"mtp.layers.{k}.{own}"
    return f"mtp.layers.{k}.block.{_rename(rest, _BLOCK, False)}"


def draft_vocab_names(args) -> list[str]:
    """Where an MTP layer's sub-vocabulary (token ids its draft head scores) is stored, if it has one."""
    return [f"model.layers.{args.n_layers + k}.draft_vocab" for k in range(args.n_mtp_layers)]


def mtp_file_layers(path: str | os.PathLike) -> int:
    """How many MTP layers a checkpoint's post-hoc `mtp.safetensors` holds (0 without one)."""
    p = Path(path) / MTP_FILE
    if not p.is_file():
        return 0
    _check_safetensors_file(p)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{p}: corrupt safetensors file ({e})") from None
    try:
        return int(meta["num_nextn_predict_layers"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{p}: metadata 'num_nextn_predict_layers' missing or not an integer") from None


def is_fp8_tensor(hf_name: str) -> bool:
    """True for the projections DeepSeek stores in e4m3 with block scales."""
    parts = hf_name.split(".")
    return parts[-1] == "weight" and len(parts) > 1 and parts[-2] in FP8_MODULES


def expected_tensors(args: ModelArgs, part: str = "all") -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes that a model with these args has (scales excluded).
    part: "all", "main" or "mtp"."""
    import mtp_spec.parallel as parallel
    from mtp_spec.model import Transformer

    # the checkpoint's full shapes, whatever this process's share of them (tensor parallelism)
    with torch.device("meta"), parallel.using(parallel.World()):  # a Llama's tied head appears once, as the embedding
        model = Transformer(args, max_len=2, main=part in ("all", "main"), mtp=part in ("all", "mtp"))
    return {to_hf_name(n, args): tuple(p.shape) for n, p in model.named_parameters()}


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (-(-shape[0] // 128), -(-shape[1] // 128))


# --- reading --------------------------------------------------------------------------------------
class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory, single-file or sharded."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        index = self.path / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            for f in files:
                _check_shard_name(index, f, self.path)
                if not (self.path / f).is_file():
                    who = next(k for k, v in weight_map.items() if v == f)
                    raise CheckpointError(f"{index}: points tensor '{who}' to missing file '{f}'")
        elif (self.path / SINGLE).exists():
            files, weight_map = [SINGLE], None
        else:
            raise CheckpointError(f"{self.path}: neither {SINGLE} nor {INDEX} found")
        if (self.path / MTP_FILE).is_file():
            files = files + [MTP_FILE]
        self.files = files
        self.bytes_read = 0  # tensor bytes read so far (a rank of a parallel run reads its slices only)
        self._handles: dict[str, object] = {}
        self.where: dict[str, str] = {}
        for f in files:
            for k in self._open(f).keys():
                self.where[k] = f
        if weight_map is not None:
            for k, f in weight_map.items():
                if self.where.get(k) == MTP_FILE:
                    continue
                if self.where.get(k) != f:
                    found = self.where.get(k)
                    raise CheckpointError(f"{index}: tensor '{k}' is mapped to '{f}' but "
                                          + (f"found in '{found}'" if found else "is in no shard"))

    def _open(self, f: str):
        if f not in self._handles:
            p = self.path / f
            _check_safetensors_file(p)
            try:
                self._handles[f] = safe_open(str(p), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{p}: corrupt safetensors file ({e})") from None
        return self._handles[f]

    def close(self, f: str) -> None:
        """Unmap shard file f (it reopens on the next read)."""
        self._handles.pop(f, None)

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        try:
            t = self._open(f).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path / f}: cannot read tensor '{name}' ({e})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get_part(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, end) of a tensor, reading only those bytes."""
        f = self.where.get(name)
        if f is None:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        try:
            sl = self._open(f).get_slice(name)
            t = (sl[start:end] if dim == 0 else sl[:, start:end]).contiguous()  # columns may come strided
        except Exception as e:
            raise CheckpointError(f"{self.path / f}: cannot read tensor '{name}' ({e})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def dtype_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        sl = self._open(self.where[name]).get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())


def _check_shard_name(index: Path, name: str, root: Path) -> None:
    """A shard must be a plain file name inside the checkpoint directory: an index that points
    elsewhere (an absolute path, '..', a link out) would read files that are not the checkpoint's."""
    p = Path(name)
    inside = (root / p).resolve().parent == root.resolve()
    if p.is_absolute() or len(p.parts) != 1 or name in (".", "..") or not inside:
        raise CheckpointError(f"{index}: shard file name {name!r} leaves the checkpoint directory {root}; "
                              "an index may only name files inside it")


def _check_safetensors_file(p: Path) -> None:
    """Catch truncation before safetensors does, so the error names the file and the tensor."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{p}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{p}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupt safetensors header (not a JSON object)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise CheckpointError(f"{p}: corrupt safetensors header: tensor '{name}' has no valid data_offsets")
        end = offs[1]
        if 8 + n + end > size:
            raise CheckpointError(f"{p}: truncated: tensor '{name}' ends at byte {8 + n + end}, "
                                  f"file has {size}")


_DTYPE_NAMES = {"F8_E4M3": "float8_e4m3fn", "BF16": "bfloat16", "F32": "float32", "F16": "float16"}


def validate(reader: CheckpointReader, args: ModelArgs, part: str = "all") -> dict[str, tuple[int, ...]]:
    """Check names, shapes, dtypes and scales against the config; raise naming the first fault."""
    want = expected_tensors(args, part)
    have = set(reader.keys())
    missing = [k for k in want if k not in have]
    if missing:
        raise CheckpointError(f"{reader.path}: missing tensor '{missing[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    allowed = set(want) | {k + SCALE for k in want if is_fp8_tensor(k)} | set(draft_vocab_names(args))
    if part == "all":
        unexpected = [k for k in have if k not in allowed]
        if unexpected:
            raise CheckpointError(f"{reader.path / reader.where[unexpected[0]]}: unexpected tensor "
                                  f"'{unexpected[0]}' (not in a model with this config.json)")
    for name, shape in want.items():
        dt, sh = reader.dtype_shape(name)
        where = reader.path / reader.where[name]
        if sh != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {list(sh)}, expected {list(shape)}")
        if dt not in _DTYPE_NAMES:
            raise CheckpointError(f"{where}: tensor '{name}' has unsupported dtype {dt}")
        if dt == "F8_E4M3":
            if not is_fp8_tensor(name):
                raise CheckpointError(f"{where}: tensor '{name}' is F8_E4M3 but DeepSeek keeps it in BF16/F32")
            sname = name + SCALE
            if sname not in have:
                raise CheckpointError(f"{where}: fp8 tensor '{name}' has no scale '{sname}'")
            sdt, ssh = reader.dtype_shape(sname)
            if sdt != "F32" or ssh != scale_shape(shape):
                raise CheckpointError(f"{reader.path / reader.where[sname]}: scale '{sname}' is {sdt} "
                                      f"{list(ssh)}, expected F32 {list(scale_shape(shape))}")
        elif args.fp8 and is_fp8_tensor(name):
            raise CheckpointError(f"{where}: tensor '{name}' is {dt}, but config.json's quantization_config "
                                  "says FP8 (convert with `mtp-spec convert --to bf16`, which fixes config.json)")
    return want


def load_state(model: torch.nn.Module, reader: CheckpointReader, args: ModelArgs, dtype: torch.dtype,
               device: torch.device | str, keep_fp8: bool = False) -> None:
    """Fill the (meta or allocated) model's parameters one tensor at a time."""

    modules = dict(model.named_modules())
    for pname, _ in model.named_parameters():  # refuse a bad split from the headers, before reading anything
        mod_name, _, attr = pname.rpartition(".")
        shard = getattr(modules[mod_name], "shard", None) if attr == "weight" else None
        hf = to_hf_name(pname, args)
        if shard is not None and hf in reader and reader.dtype_shape(hf)[0] == "F8_E4M3":
            _scale_part(hf, shard, reader)
    # shard by shard, each unmapped when done: the pages read stay resident only while their file is open
    names = sorted((reader.where.get(to_hf_name(n, args), ""), n) for n, _ in model.named_parameters())
    for i, (f, pname) in enumerate(names):
        hf = to_hf_name(pname, args)
        mod_name, _, attr = pname.rpartition(".")
        mod = modules[mod_name]
        shard = getattr(mod, "shard", None) if attr == "weight" else None
        t = reader.get(hf) if shard is None else reader.get_part(hf, *shard)
        _check_finite(t, hf, reader)
        scale = None
        if t.dtype == FP8:
            if shard is None:
                scale = reader.get(hf + SCALE)
            else:
                scale = reader.get_part(hf + SCALE, *_scale_part(hf, shard, reader))
            _check_finite(scale, hf + SCALE, reader)
        place(mod, attr, t, scale, keep_fp8, dtype, device)
        del t, scale
        if i + 1 == len(names) or names[i + 1][0] != f:
            reader.close(f)
    if getattr(model, "mtp", None) is not None:
        for layer, name in zip(model.mtp.layers, draft_vocab_names(args)):
            if name in reader:
                layer.draft_vocab = reader.get(name).to(device=device, dtype=torch.long)


def _scale_part(name: str, shard: tuple[int, int, int], reader: CheckpointReader) -> tuple[int, int, int]:
    """The scale blocks of a weight slice. Slices must be whole 128-blocks: a cut through a block would
    leave two ranks one scale for different rows. The test looks at the slice's width, not where it
    starts, so every rank (all slices are equal) reaches the same verdict and none waits on the others."""
    import mtp_spec.parallel as parallel

    dim, start, end = shard
    n = reader.dtype_shape(name)[1][dim]
    if (end - start) % 128:
        raise CheckpointError(f"{reader.path / reader.where[name]}: fp8 tensor '{name}' cannot be split across "
                              f"world size {parallel.world().size}: this rank's {'rows' if dim == 0 else 'columns'} "
                              f"[{start}, {end}) of {n} cut a 128x128 weight_scale_inv block")
    return dim, start // 128, -(-end // 128)


def place(mod: torch.nn.Module, attr: str, t: torch.Tensor, scale: torch.Tensor | None, keep_fp8: bool,
          dtype: torch.dtype, device: torch.device | str) -> None:
    """Set one parameter as the model keeps it: an e4m3 Linear weight (with its `scale`) stays e4m3
    when keep_fp8, else it is dequantised; the rest in `dtype`, the router bias in fp32 (as DeepSeek)."""
    from mtp_spec.model.layers import Linear

    if scale is not None:
        if keep_fp8 and isinstance(mod, Linear):
            mod.weight = torch.nn.Parameter(_own(t, device), requires_grad=False)
            mod.scale = _own(scale, device)
            return
        t = weight_dequant_ref(t, scale)
    keep = torch.float32 if attr == "bias" else dtype
    setattr(mod, attr, torch.nn.Parameter(_own(t, device, keep), requires_grad=False))


def _own(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on device in dtype, in memory of its own: safetensors hands out CPU tensors that view the
    file's mmap, which would keep every shard mapped (and resident) for the model's life, and a
    rewritten checkpoint file would change or fault the weights under a running model."""
    out = t.to(device=device, dtype=dtype or t.dtype)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def _check_finite(t: torch.Tensor, name: str, reader: CheckpointReader) -> None:
    """NaN or inf weights load silently and then produce garbage text: refuse them by name."""
    if t.dtype == FP8:
        bad = bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())  # e4m3fn's only non-finite codes
    elif t.is_floating_point():
        bad = not bool(torch.isfinite(t).all())
    else:
        bad = False
    if bad:
        raise CheckpointError(f"{reader.path / reader.where[name]}: tensor '{name}' holds NaN or inf values")


# --- writing --------------------------------------------------------------------------------------

def hf_state_dict(model: torch.nn.Module, args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF-named tensors. DeepSeek stores shared tensors under every name (the MTP layer's embedding and
    head are copies in the checkpoint); a Llama stores a tied head and the MTP layer's shared
    embedding and head once, as the embedding."""
    shared = args.family != "llama"
    out = {to_hf_name(n, args): p.detach() for n, p in model.named_parameters(remove_duplicate=not shared)}
    if getattr(model, "mtp", None) is not None:
        for layer, name in zip(model.mtp.layers, draft_vocab_names(args)):
            if layer.draft_vocab is not None:
                out[name] = layer.draft_vocab
    return out


def quantize_state(state: dict[str, torch.Tensor], fp8: bool, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors as DeepSeek stores them: FP8 projections with scales, the rest in `dtype` (bias fp32)."""
    for name, t in state.items():
        if fp8 and is_fp8_tensor(name) and t.dim() == 2:
            q, s = weight_quant_ref(t)
            yield name, q
            yield name + SCALE, s
        elif name.endswith("e_score_correction_bias"):
            yield name, t.float().contiguous()
        elif not t.is_floating_point():  # token ids (a draft vocabulary)
            yield name, t.contiguous()
        else:
            yield name, t.to(dtype).contiguous()


def write_checkpoint(state: dict[str, torch.Tensor], args: ModelArgs, path: str | os.PathLike,
                     dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 4 << 30,
                     extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json, shards (+ index when there are several) atomically: into a temp dir, then rename.
    `state` holds HF names and float tensors; FP8 quantisation follows args.fp8."""
    path = Path(path)
    args = args.with_(torch_dtype=str(dtype).removeprefix("torch."))  # config.json says what the files hold
    with atomic_dir(path) as tmp:
        if args.family == "llama" and args.n_mtp_layers:  # the MTP layer goes to its own file
            mtp = {k: v for k, v in state.items() if _layer_index(k) >= args.n_layers}
            state = {k: v for k, v in state.items() if k not in mtp}
            write_mtp_file(mtp, args, tmp / MTP_FILE, dtype)
            args = args.with_(n_mtp_layers=0)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in quantize_state(state, args.fp8, dtype):
            nb = t.numel() * t.element_size()
            if shards[-1] and size + nb > max_shard_bytes and not name.endswith(SCALE):
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nb
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, sh in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):06d}.safetensors"
                save_file(sh, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in sh})
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        args.save(tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return path


def _layer_index(name: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m[1]) if m else -1


def write_mtp_file(state: dict[str, torch.Tensor], args, path: str | os.PathLike,
                   dtype: torch.dtype = torch.bfloat16, extra_metadata: dict[str, str] | None = None) -> Path:
    """A post-hoc MTP layer as one safetensors file (layer index n_layers on), written atomically; its
    metadata says how many MTP layers it holds. Copy it into a checkpoint directory as mtp.safetensors."""
    path = Path(path)
    tensors = dict(quantize_state(state, False, dtype))
    meta = {"format": "pt", "num_nextn_predict_layers": str(args.n_mtp_layers), **(extra_metadata or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def convert_to_bf16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """DeepSeek's fp8_cast_bf16: dequantise every FP8 tensor, drop the scales, keep the shard names,
    and also fix config.json (no quantization_config, torch_dtype bfloat16) and copy tokenizer files."""
    src, dst = Path(src), Path(dst)
    check_not_inside(dst, src, "destination")
    args = ModelArgs.from_file(src)
    reader = CheckpointReader(src)
    with atomic_dir(dst) as tmp:
        weight_map, total = {}, 0
        for f in reader.files:
            out = {}
            for name in [k for k, v in reader.where.items() if v == f]:
                if name.endswith(SCALE):
                    continue
                t = reader.get(name)
                if t.dtype == FP8:
                    if name + SCALE not in reader:
                        raise CheckpointError(f"{src / f}: fp8 tensor '{name}' has no scale '{name}{SCALE}'")
                    t = weight_dequant_ref(t, reader.get(name + SCALE)).to(torch.bfloat16)
                out[name] = t.contiguous()
                total += t.numel() * t.element_size()
            save_file(out, str(tmp / f), metadata={"format": "pt"})
            weight_map.update({k: f for k in out})
        if len(reader.files) > 1 or (src / INDEX).exists():
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        args.with_(fp8=False, torch_dtype="bfloat16").save(tmp)
        for fname in TOKENIZER_FILES:
            if (src / fname).exists():
                shutil.copy(src / fname, tmp / fname)
    return dst
