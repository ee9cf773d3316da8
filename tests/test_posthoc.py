"""The post-hoc MTP trainer on a tiny random Llama (the path that trained SmolLM2's shipped layer):
its own-answers data, the cache reuse of another run, resuming, and a layer the loader accepts."""

import json

import numpy as np
import pytest
import torch

import mtp_spec
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer
from mtp_spec.random_model import write_random_checkpoint
from mtp_spec.tokenizer import byte_tokenizer_files, load_tokenizer
from mtp_spec.train import posthoc


@pytest.fixture(scope="module")
def main_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ph") / "llama", "tiny-llama", seed=5,
                                   extra_files=byte_tokenizer_files(), std=0.05)


def _cfg(out, model, **kw):
    base = dict(out=str(out), model=str(model), tokens=2500, heldout_tokens=512, chunk=128, draft_vocab=64,
                steps=4, batch=2, window=16, eval_every=2, chained=1.0, threads=0)
    return posthoc.PosthocConfig(**{**base, **kw})


def test_own_answers_extend_another_runs_cache_and_the_layer_loads(tmp_path, main_dir, monkeypatch):
    monkeypatch.setattr(posthoc, "_package_docs", lambda limit_bytes=0: [])  # the stdlib is enough here
    first = tmp_path / "first"
    posthoc.train(_cfg(first, main_dir), progress=False)
    second = tmp_path / "second"
    out = posthoc.train(_cfg(second, main_dir, cache_from=str(first), init_from=str(first / "mtp.safetensors"),
                             generated_tokens=150, gen_batch=4, gen_max_new=8), progress=False)

    base, gen = np.load(first / "tokens.npy"), np.load(second / "generated.npy")
    both = np.load(second / "tokens_all.npy")
    assert len(gen) >= 150 and np.array_equal(both, np.concatenate([base, gen]))
    # the base part's cached hidden states were copied, the rest computed: all as a fresh cache would be
    h1, h2 = np.load(first / "hidden.npy"), np.load(second / "hidden.npy")
    whole = len(base) // 128 * 128
    assert np.array_equal(h1[:whole], h2[:whole]) and h2[len(base):].any()

    # the answers are the main model's own greedy continuations, each ending in eos
    tok = load_tokenizer(main_dir)
    model = mtp_spec.load(main_dir, part="main", compile="auto")  # as generate_own loads it
    rows = [json.loads(line) for line in (second / "generated.jsonl").read_text().splitlines()]
    assert all(r["ids"][-1] == tok.eos_id for r in rows)
    for r in rows[:3]:
        prompt, answer = r["ids"][:r["prompt_len"]], r["ids"][r["prompt_len"]:]
        again = Engine(model).generate([prompt], 8, eos_id=tok.eos_id)[0].token_ids
        assert answer[:len(again)] == again

    # the exported layer sits beside the main weights and drafts losslessly
    (main_dir / "mtp.safetensors").write_bytes(out.read_bytes())
    full = mtp_spec.load(main_dir, dtype=torch.float32)
    assert full.mtp is not None and full.mtp.layers[0].draft_vocab is not None
    ids = tok.encode("def f(x):")
    ref = Engine(full).generate([ids], 12)[0].token_ids
    assert Engine(full, MTPProposer(full, 2)).generate([ids], 12)[0].token_ids == ref


def test_a_changed_setting_refuses_to_resume(tmp_path, main_dir, monkeypatch):
    monkeypatch.setattr(posthoc, "_package_docs", lambda limit_bytes=0: [])
    posthoc.train(_cfg(tmp_path / "o", main_dir, steps=2), progress=False)
    posthoc.train(_cfg(tmp_path / "o", main_dir, steps=3), progress=False)  # longer: resumes
    assert json.loads((tmp_path / "o" / "train_state.json").read_text())["step"] == 3
    with pytest.raises(ValueError, match="posthoc_config.json: differs"):
        posthoc.train(_cfg(tmp_path / "o", main_dir, lr=0.5), progress=False)
