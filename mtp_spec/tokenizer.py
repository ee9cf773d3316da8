"""Tokenizers in HF format (`tokenizer.json` + `tokenizer_config.json`), loaded with `tokenizers`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from mtp_spec.io import atomic_write_text

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# DeepSeek-V3's template, reduced to system/user/assistant turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


class TextTokenizer:
    """encode/decode plus the ids and chat template the CLI needs."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"{path / 'tokenizer.json'}: not a valid tokenizer ({e})") from None
        cfg_file = path / "tokenizer_config.json"
        try:
            self.config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object")
        self.path = path

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        bos = self.token_id(self.config.get("bos_token"))
        # a tokenizer_config may name a bos it never prepends (SmolLM2: add_bos_token false)
        add_bos = add_bos and self.config.get("add_bos_token", True)
        return ([bos] if add_bos and bos is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self.tok.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.config.get("eos_token"))

    def chat(self, messages: list[dict]) -> list[int]:
        """Apply the checkpoint's chat template (rendered with jinja2, as transformers does)."""
        import jinja2

        template = self.config.get("chat_template")
        if not template:
            raise ValueError(f"{self.path / 'tokenizer_config.json'}: no chat_template for --chat")
        text = jinja2.Environment().from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token=self._tok_str("bos_token"),
            eos_token=self._tok_str("eos_token"))
        return self.encode(text, add_bos=False)

    def _tok_str(self, key: str) -> str:
        t = self.config.get(key) or ""
        return t.get("content", "") if isinstance(t, dict) else t


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer | None:
    return TextTokenizer(path) if (Path(path) / "tokenizer.json").exists() else None


def byte_tokenizer_files() -> dict[str, str]:
    """A byte-level tokenizer (256 byte tokens, then bos/eos/user/assistant) in HF format, for
    random demo checkpoints that have no trained tokenizer: file name -> contents."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, USER, ASSISTANT])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, len(vocab))])
    cfg = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
           "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False)}


def write_byte_tokenizer(path: str | os.PathLike) -> None:
    for name, text in byte_tokenizer_files().items():
        atomic_write_text(Path(path) / name, text)
