"""The trained model that ships inside the package."""

import json

import pytest
import torch

import mtp_spec
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer, Proposer
from mtp_spec.loader import default_model, shipped_model_dir
from mtp_spec.tokenizer import load_tokenizer

SHIPPED = shipped_model_dir()


def test_the_shipped_model_is_the_default_and_fits_the_size_budget():
    assert (SHIPPED / "config.json").exists(), "no shipped model in mtp_spec/assets/model"
    assert default_model() == SHIPPED
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size <= 30 * 2**20
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128] and cfg["num_nextn_predict_layers"] == 1
    training = json.loads((SHIPPED / "training.json").read_text())
    assert training["command"].startswith("mtp-spec train") and "seed" in training


def test_the_shipped_model_reproduces_its_stored_greedy_continuation():
    expected = json.loads((SHIPPED / "expected.json").read_text())
    model = mtp_spec.load(SHIPPED, max_len=512)
    tok = load_tokenizer(SHIPPED)
    ids = tok.encode(expected["prompt"])
    for proposer in (Proposer(), MTPProposer(model, 3)):
        out = Engine(model, proposer).generate([ids], len(expected["token_ids"]), eos_id=tok.eos_id)[0]
        assert out.token_ids == expected["token_ids"]


@torch.no_grad()
def test_the_shipped_model_has_the_same_logits_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mtp_spec.checkpoint import convert_to_bf16

    bf16 = convert_to_bf16(SHIPPED, tmp_path / "bf16")  # transformers does not run FP8 on a CPU
    ours = mtp_spec.load(bf16, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    tok = load_tokenizer(SHIPPED)
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")])
    a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).abs().max() / b.abs().max()) <= 1e-4
    fp8 = mtp_spec.load(SHIPPED, dtype=torch.float32)(ids).logits
    assert ((fp8 - b).abs().max() / b.abs().max()) <= 2e-2  # the bf16 copy rounds fp8 x scale products
    hf_tok = transformers.AutoTokenizer.from_pretrained(SHIPPED)
    assert hf_tok("def f").input_ids == tok.encode("def f")
