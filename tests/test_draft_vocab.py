"""The sub-vocabulary draft head (FR-Spec): the MTP layer drafts from the N most frequent tokens only,
the main head still verifies over the whole vocabulary, so greedy output is vanilla's and sampled
output keeps the target's distribution (q restricted to the N tokens and renormalised)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sampling_lossless import N as N_SAMPLES
from test_sampling_lossless import V, chi_square_p, exact_joint
from test_sampling_lossless import models as small_vocab_models  # noqa: F401  (a fixture)
from test_sampling_lossless import run as run_sampled

import mtp_spec
from mtp_spec.config import ModelArgs
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer, MTPTreeProposer
from mtp_spec.decoding.sampling import SamplingParams
from mtp_spec.draft_vocab import (
    COUNTS_FILE,
    DraftHeads,
    apply_draft_vocab,
    count_tokens,
    read_counts,
    top_ids,
    write_counts,
)
from mtp_spec.loader import shipped_model_dir
from mtp_spec.random_model import write_random_checkpoint
from mtp_spec.tokenizer import TextTokenizer, write_byte_tokenizer


class Recording(MTPProposer):
    """The MTP chain, keeping every DraftBatch it proposed."""

    def reset(self, batch, max_len):
        super().reset(batch, max_len)
        self.seen = []

    def propose(self, st, sp):
        d = super().propose(st, sp)
        self.seen.append(d)
        return d


@pytest.fixture(scope="module", params=[8, 512])
def model(tmp_path_factory, request):
    """Tiny V3 in fp32: vocabulary 8 (drafts are often accepted by chance) and 512."""
    args = ModelArgs.from_name("tiny").with_(vocab_size=request.param, fp8=False)
    path = write_random_checkpoint(tmp_path_factory.mktemp("dv") / f"v{request.param}", args, seed=5,
                                   dtype=torch.float32, std=0.3 if request.param == 8 else 0.02)
    return mtp_spec.load(path, max_len=96)


def _prompts(vocab: int, seed: int, batch: int) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(vocab) for _ in range(r.randint(1, 12))] for _ in range(batch)]


def _counts(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, vocab)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_with_a_draft_vocabulary_equals_vanilla(model, seed):
    vocab = model.args.vocab_size
    sizes = (1, 3, vocab - 1) if vocab == 8 else (1, 64, vocab - 1)
    prompts = _prompts(vocab, seed, 3)
    ref = [r.token_ids for r in Engine(model).generate(prompts, 16)]
    accepted = 0
    try:
        for n in sizes:
            ids = apply_draft_vocab(model, n, _counts(vocab, seed))
            assert len(ids) == n and len(model.mtp.layers[0].sub_ids) == n
            for prop in (Recording(model, 3), MTPTreeProposer(model, 2, 2)):
                res = Engine(model, prop).generate(prompts, 16)
                assert [r.token_ids for r in res] == ref, (n, type(prop).__name__, prop.k)
                accepted += sum(r.metrics.num_accepted_tokens for r in res)
                for d in getattr(prop, "seen", []):  # greedy drafts come from the subset only
                    assert torch.isin(d.tokens[d.tokens >= 0], ids).all()
    finally:
        apply_draft_vocab(model, None)
    assert model.mtp.layers[0].sub_head == []
    if vocab == 8:  # the check means something only if drafts were accepted
        assert accepted > 0


@torch.no_grad()
def test_the_draft_head_scores_only_its_tokens_and_the_main_head_all(model):
    vocab = model.args.vocab_size
    ids = apply_draft_vocab(model, vocab // 2, _counts(vocab, 3))
    try:
        x = torch.tensor([[1, 2, 3, 4]]) % vocab
        out = model(x)
        logits = model.mtp(x[:, 1:], out.hidden_states[:, :-1]).logits
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[ids] = False
        assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., ids]).all()
        assert torch.isfinite(out.logits).all()  # verification keeps the full head
        apply_draft_vocab(model, None)
        full = model.mtp(x[:, 1:], out.hidden_states[:, :-1]).logits
        torch.testing.assert_close(logits[..., ids], full[..., ids])  # the same rows of the same head
    finally:
        apply_draft_vocab(model, None)


def test_sampled_drafts_come_from_q_restricted_to_the_subset(model):
    vocab = model.args.vocab_size
    ids = apply_draft_vocab(model, max(2, vocab // 4), _counts(vocab, 4))
    try:
        prop = Recording(model, 3)
        Engine(model, prop).generate(_prompts(vocab, 4, 4), 12, SamplingParams(temperature=1.0, top_k=50), seed=3)
        assert prop.seen
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[ids] = False
        for d in prop.seen:
            assert torch.isin(d.tokens[d.tokens >= 0], ids).all()
            assert d.q is not None and (d.q[..., outside] == 0).all()
            torch.testing.assert_close(d.q.sum(-1), torch.ones(d.q.shape[:-1]))
    finally:
        apply_draft_vocab(model, None)


def test_sampled_output_with_a_draft_vocabulary_keeps_the_target_distribution(small_vocab_models):  # noqa: F811
    """Chi-square over the first three sampled tokens against exact autoregressive probabilities (as
    tests/test_sampling_lossless.py), the MTP layer drafting from 3 of the 8 tokens: q is 0 on the
    other 5, where the target puts mass that only the residual distribution can give back."""
    target, _ = small_vocab_models
    subset = (0, 2, 5)
    counts = np.zeros(V, dtype=np.int64)
    counts[list(subset)] = 10
    apply_draft_vocab(target, len(subset), counts)
    try:
        sp = SamplingParams(temperature=1.0)
        samples, drafted, accepted = run_sampled(target, MTPProposer(target, 2), sp)
    finally:
        apply_draft_vocab(target, None)
    assert drafted > N_SAMPLES // 2 and 0.01 * drafted < accepted < 0.99 * drafted, (drafted, accepted)
    p = chi_square_p(samples, exact_joint(target, sp))
    assert p > 1e-3, f"chi-square p = {p:.2e}"


def test_draft_heads_build_each_size_once_and_switch_between_them(model):
    vocab = model.args.vocab_size
    layer = model.mtp.layers[0]
    heads = DraftHeads(model, _counts(vocab, 6))
    prompts = _prompts(vocab, 6, 2)
    try:
        out, subs = {}, {}
        for n in (2, None, vocab // 2, 2, 0, vocab // 2):
            heads.use(n)
            subs.setdefault(n or None, layer.sub_head[0] if layer.sub_head else None)
            assert (layer.sub_head[0] if layer.sub_head else None) is subs[n or None]  # built once, reused
            assert n or layer.sub_ids is None
            res = [r.token_ids for r in Engine(model, MTPProposer(model, 2)).generate(prompts, 8)]
            assert out.setdefault(n or None, res) == res
        assert len(set(map(str, out.values()))) == 1  # greedy: every size gives vanilla's output
    finally:
        apply_draft_vocab(model, None)


def test_bad_draft_vocabulary_sizes_are_refused(model, tmp_path):
    vocab = model.args.vocab_size
    counts = _counts(vocab, 0)
    for n in (0, -3, vocab + 1, True, 2.5):
        with pytest.raises(ValueError, match=rf"--draft-vocab must be a whole number in \[1, {vocab}\]"):
            apply_draft_vocab(model, n, counts)
    with pytest.raises(ValueError, match=r"draft_vocab must be"):
        apply_draft_vocab(model, 0, counts, where="draft_vocab")
    with pytest.raises(ValueError, match=f"{tmp_path / COUNTS_FILE}: no token frequency file.*count-tokens"):
        apply_draft_vocab(model, 2, tmp_path)
    write_counts(tmp_path, np.ones(vocab + 1, dtype=np.int64), "test")
    with pytest.raises(ValueError, match=f"vocab_size {vocab + 1} does not match the model's vocab_size {vocab}"):
        apply_draft_vocab(model, 2, tmp_path)
    (tmp_path / COUNTS_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a token frequency file"):
        apply_draft_vocab(model, 2, tmp_path / COUNTS_FILE)
    assert model.mtp.layers[0].sub_head == []  # a refused size leaves the head as it was


def test_a_model_without_mtp_layer_refuses_a_draft_vocabulary(tiny_fp32):
    main = mtp_spec.load(tiny_fp32, part="main")
    with pytest.raises(ValueError, match="no MTP layer"):
        apply_draft_vocab(main, 4, np.ones(main.args.vocab_size))


def test_a_layer_trained_with_a_draft_vocabulary_drafts_within_it(model):
    """SmolLM2's post-hoc layer was trained with a restricted head: smaller sizes choose among its
    tokens, larger ones are refused, and None restores what it shipped with."""
    vocab = model.args.vocab_size
    layer = model.mtp.layers[0]
    trained = torch.arange(0, vocab, 2)
    layer.set_draft_vocab(trained)
    try:
        counts = np.arange(vocab)[::-1].copy()  # token 0 most frequent, so the odd ones would win... if allowed
        ids = apply_draft_vocab(model, 2, counts + (np.arange(vocab) % 2) * 10_000)
        assert ids.tolist() == [0, 2]
        with pytest.raises(ValueError, match=rf"in \[1, {len(trained)}\] \(the model's trained draft vocabulary\)"):
            apply_draft_vocab(model, len(trained) + 1, counts)
        apply_draft_vocab(model, None)
        assert torch.equal(layer.draft_vocab, trained) and len(layer.sub_ids) == len(trained)
    finally:
        layer.set_draft_vocab(None)


def test_top_ids_ranks_by_count_then_id():
    counts = np.array([5, 9, 9, 0, 7, 5])
    assert top_ids(counts, 3).tolist() == [1, 2, 4]
    assert top_ids(counts, 4).tolist() == [0, 1, 2, 4]  # tie between 0 and 5: the lower id
    assert top_ids(counts, 2, within=torch.tensor([0, 3, 5])).tolist() == [0, 5]
    with pytest.raises(ValueError, match=r"in \[1, 6\]"):
        top_ids(counts, 7)


def test_counting_tokens_and_the_counts_file_round_trip(tmp_path):
    (tmp_path / "tok").mkdir()
    write_byte_tokenizer(tmp_path / "tok")
    tok = TextTokenizer(tmp_path / "tok")
    vocab = tok.tok.get_vocab_size()
    counts = count_tokens(tok, ["aab", "b"], vocab, batch=1)
    ids_a, ids_b = tok.encode("a", add_bos=False), tok.encode("b", add_bos=False)
    assert counts[ids_a[0]] == 2 and counts[ids_b[0]] == 2
    if tok.eos_id is not None:
        assert counts[tok.eos_id] == 2  # one per document, as the trainer lays the corpus out
    assert counts.sum() == 4 + (2 if tok.eos_id is not None else 0)
    path = write_counts(tmp_path, counts, "two documents")
    doc = json.loads(path.read_text())
    assert doc["source"] == "two documents" and doc["tokens"] == counts.sum() and doc["ids"][0] == min(ids_a[0],
                                                                                                       ids_b[0])
    np.testing.assert_array_equal(read_counts(tmp_path, vocab), counts)
    with pytest.raises(ValueError, match="outside the model's vocab_size"):
        count_tokens(tok, ["z"], 5)


def test_the_shipped_model_ships_its_token_frequencies():
    counts = read_counts(shipped_model_dir(), 8192)
    doc = json.loads((shipped_model_dir() / COUNTS_FILE).read_text())
    assert counts.sum() == doc["tokens"] > 2_000_000
    top = np.sort(counts)[::-1]
    assert top[:1024].sum() > 0.75 * counts.sum()  # FR-Spec's premise: a few tokens carry most of the text


def test_greedy_on_the_shipped_model_with_a_draft_vocabulary_equals_vanilla_and_still_accepts():
    from mtp_spec.tokenizer import load_tokenizer

    path = shipped_model_dir()
    model = mtp_spec.load(path, max_len=256)
    tok = load_tokenizer(path)
    prompts = [tok.encode("import os\nimport sys\n\n\ndef main("), tok.encode("class Parser:\n    def __init__(self")]
    ref = [r.token_ids for r in Engine(model).generate(prompts, 24)]
    for n in (1024, 64):
        apply_draft_vocab(model, n, path)
        res = Engine(model, MTPProposer(model, 2)).generate(prompts, 24)
        assert [r.token_ids for r in res] == ref, n
        assert sum(r.metrics.num_accepted_tokens for r in res) > 0, n


def _config(**strategy) -> dict:
    return {"name": "t", "model": "shipped", "suites": ["code"], "prompts_per_suite": 2,
            "strategies": [{"name": "mtp", "k": [1, 2], **strategy}], "sweep": {"batch_size": [1, 4]}}


def test_an_experiment_sweeps_draft_vocabularies_and_auto_depth():
    from mtp_spec.experiment.schema import cells, parse

    exp = parse(_config(k=[1, "auto"], draft_vocab=["full", 1024]))
    assert exp.strategies[0].k == [1, "auto"] and exp.strategies[0].draft_vocab == [0, 1024]
    got = cells(exp)
    assert len(got) == 2 * (1 + 2 * 2)  # per batch size: vanilla + 2 depths x 2 heads
    keys = [c.key() for c in got]
    assert len(set(keys)) == len(keys)
    full = next(c for c in got if c.k == 1 and c.draft_vocab == 0 and c.batch_size == 1)
    assert full.key() == "mtp|k1|w0|T0.0|b1|n64|s0|r0"  # full-head keys unchanged: older runs resume
    assert next(c for c in got if c.draft_vocab == 1024).key().startswith("mtp|k1|w0|v1024|")
    assert all(c.baseline().draft_vocab == 0 for c in got)


@pytest.mark.parametrize("strategy, match", [
    (dict(draft_vocab=9000), "draft_vocab: 9000 is more than the model's vocab_size 8192"),
    (dict(draft_vocab=-2), "strategies\\[0\\].draft_vocab: a draft vocabulary size must be >= 1"),
    (dict(draft_vocab="big"), "strategies\\[0\\].draft_vocab\\[0\\]: expected an integer"),
    (dict(name="ngram", draft_vocab=1024), "draft_vocab: applies to strategies that draft with the MTP layer"),
    (dict(name="mtp-tree", k=["auto"]), "k auto works with strategy mtp only"),
    (dict(k=[0]), "every k must be >= 1 or auto"),
])
def test_bad_draft_vocabulary_fields_are_refused_by_name(strategy, match):
    from mtp_spec.experiment.schema import ExperimentConfigError, parse

    with pytest.raises(ExperimentConfigError, match=match):
        parse(_config(**strategy))


def test_a_draft_vocabulary_without_token_counts_is_refused_at_parse(tiny_fp32):
    from mtp_spec.experiment.schema import ExperimentConfigError, parse

    with pytest.raises(ExperimentConfigError, match=f"{tiny_fp32 / COUNTS_FILE} does not exist.*count-tokens"):
        parse({**_config(draft_vocab=[64]), "model": str(tiny_fp32)})


def test_the_adaptive_study_plans_its_requests(capsys):
    from mtp_spec.experiment.runner import run

    assert run(Path(__file__).parent.parent / "configs" / "adaptive.yaml", dry_run=True) is None
    out = capsys.readouterr().out
    assert "adaptive: 112 cells x 128 prompts = 14336 requests" in out


def test_smollm2_ships_token_counts_and_drafts_within_its_trained_vocabulary():
    from mtp_spec.loader import resolve_model
    from mtp_spec.tokenizer import load_tokenizer

    path = resolve_model("smollm2-135m")
    assert (path / COUNTS_FILE).is_file()  # copied beside the imported weights with mtp.safetensors
    model = mtp_spec.load(path, max_len=128, compile="auto")  # batch-invariant kernels: bf16 greedy is exact
    trained = model.mtp.layers[0].draft_vocab.clone()
    ids = apply_draft_vocab(model, 1024, path)
    assert len(ids) == 1024 and torch.isin(ids, trained).all()
    with pytest.raises(ValueError, match=r"--draft-vocab must be a whole number in \[1, 8192\]"):
        apply_draft_vocab(model, 8193, path)
    tok = load_tokenizer(path)
    prompts = [tok.chat([{"role": "user", "content": "Write a Python function that reverses a list."}])]
    ref = [r.token_ids for r in Engine(model).generate(prompts, 24)]
    res = Engine(model, MTPProposer(model, 2)).generate(prompts, 24)
    assert [r.token_ids for r in res] == ref and sum(r.metrics.num_accepted_tokens for r in res) > 0
    apply_draft_vocab(model, None)
    assert torch.equal(model.mtp.layers[0].sub_ids, trained)


def test_count_tokens_command_writes_a_counts_file_that_generate_uses(tmp_path, capsys):
    import shutil

    from mtp_spec.cli import main

    model = tmp_path / "model"
    shutil.copytree(shipped_model_dir(), model, ignore=shutil.ignore_patterns(COUNTS_FILE, "*.png", "loss.csv"))
    (tmp_path / "corpus.txt").write_text("\n<|eos|>\n".join(["def f(x):\n    return x", "import os"] * 50))
    args = ["generate", "def f(x):", "--model", str(model), "--k", "2", "--max-new-tokens", "12", "--json",
            "--compare"]
    assert main(args + ["--draft-vocab", "64"]) == 2  # no counts file yet: the error names it
    assert f"{model / COUNTS_FILE}: no token frequency file" in capsys.readouterr().err
    assert main(["count-tokens", "--model", str(model), "--corpus", str(tmp_path / "corpus.txt")]) == 0
    assert "100 documents" in capsys.readouterr().out
    assert read_counts(model, 8192).sum() > 0
    assert main(args + ["--draft-vocab", "64"]) == 0
    rec = json.loads(next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")))
    assert rec["draft_vocab"] == 64 and rec["equals_vanilla"] and rec["strategy"] == "mtp"
    assert main(args + ["--draft-vocab", "0"]) == 2
    assert "--draft-vocab must be a whole number in [1, 8192]" in capsys.readouterr().err
    assert main(args + ["--draft-vocab", "64", "--strategy", "ngram", "--k", "2"]) == 2
    assert "--draft-vocab works with the MTP strategies (mtp, mtp-tree, mtp-ngram), not ngram" in \
        capsys.readouterr().err
