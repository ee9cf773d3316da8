"""The Llama family (GQA, SwiGLU, tied head) beside DeepSeek-V3: parity with transformers'
LlamaForCausalLM, the post-hoc MTP layer in its own file, and the lossless invariants on it."""

import json
import random

import pytest
import torch
from safetensors import safe_open

import mtp_spec
from mtp_spec.config import ModelArgs
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer, MTPTreeProposer, NGramProposer
from mtp_spec.random_model import write_random_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("llama") / "tiny-llama", "tiny-llama", seed=3,
                                   dtype=torch.float32, std=0.05)


@pytest.fixture(scope="module")
def model(llama_dir):
    return mtp_spec.load(llama_dir, max_len=160)


def test_the_mtp_layer_lives_in_its_own_file_and_the_main_weights_are_plain_hf(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "num_nextn_predict_layers" not in cfg
    with safe_open(str(llama_dir / "model.safetensors"), "pt") as fh:
        main = set(fh.keys())
    with safe_open(str(llama_dir / "mtp.safetensors"), "pt") as fh:
        mtp, meta = set(fh.keys()), fh.metadata()
    assert all(k.startswith("model.layers.2.") for k in mtp) and not any(k.startswith("model.layers.2.") for k in main)
    assert "lm_head.weight" not in main  # tied
    assert meta["num_nextn_predict_layers"] == "1"
    assert not any("embed_tokens" in k or "shared_head.head" in k for k in mtp)  # shared with the main model


@torch.no_grad()
def test_logits_equal_transformers_llama_full_and_cached(model, llama_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits
    ours = model(ids).logits
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-4
    cache = model.new_cache(2, 64)
    steps = []
    for lo, hi in [(0, 17), (17, 18), (18, 40)]:
        steps.append(model(ids[:, lo:hi], cache=cache).logits)
        cache.lengths += hi - lo
    assert float((torch.cat(steps, 1) - ref).abs().max() / ref.abs().max()) <= 1e-4


def _prompts(seed, batch):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (batch,), generator=g)]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_every_strategy_on_llama_equals_vanilla_greedy(model, k):
    for seed in range(2):
        prompts = _prompts(k * 10 + seed, random.Random(seed + k).randint(1, 6))
        ref = Engine(model).generate(prompts, 20)
        for prop in (MTPProposer(model, k), MTPTreeProposer(model, k, 2), NGramProposer(k)):
            got = Engine(model, prop).generate(prompts, 20)
            assert [r.token_ids for r in got] == [r.token_ids for r in ref], (type(prop).__name__, k, seed)


@torch.no_grad()
def test_a_draft_vocabulary_scores_only_its_tokens_and_stays_lossless(model):
    layer = model.mtp.layers[0]
    vocab = torch.arange(0, 512, 3)
    layer.set_draft_vocab(vocab)
    try:
        ids = torch.tensor([[5, 6, 7, 8]])
        h = model(ids).hidden_states
        logits = model.mtp(ids[:, 1:], h[:, :-1]).logits
        outside = torch.ones(512, dtype=torch.bool)
        outside[vocab] = False
        assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., vocab]).all()
        assert torch.isin(logits.argmax(-1), vocab).all()
        prompts = _prompts(7, 3)
        ref = Engine(model).generate(prompts, 16)
        got = Engine(model, MTPProposer(model, 3)).generate(prompts, 16)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    finally:
        layer.set_draft_vocab(None)


def test_a_llama_config_is_refused_where_it_is_not_a_plain_llama(tmp_path, llama_dir):
    import shutil

    from mtp_spec.config import ConfigError

    p = tmp_path / "scaled"
    shutil.copytree(llama_dir, p)
    cfg = json.loads((p / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope_scaling"):
        mtp_spec.load(p)


def test_the_llama_presets_round_trip_through_hf_config():
    from mtp_spec.config import args_from_hf

    for name in ("tiny-llama", "smollm2-135m"):
        a = ModelArgs.from_name(name)
        assert args_from_hf(json.loads(json.dumps(a.to_hf()))) == a.with_(n_mtp_layers=0)
