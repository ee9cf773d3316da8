"""The lossless invariants of draft-and-verify decoding, for every proposer, depth and batch shape."""

import random

import pytest
import torch

import mtp_spec
from mtp_spec.decoding import proposers as proposers_mod
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import (
    DraftModelProposer,
    MTPNGramProposer,
    MTPProposer,
    MTPTreeProposer,
    NGramProposer,
    OracleProposer,
    Proposer,
    lookup,
)
from mtp_spec.decoding.sampling import SamplingParams
from mtp_spec.decoding.verify import Drafts, Relaxed, verify
from mtp_spec.metrics import SpecMetrics


@pytest.fixture(scope="module", params=["off", "auto"])
def model(tiny_fp8, request):
    """Every invariant holds on the eager reference path and on the fast step path (CPU kernels)."""
    return mtp_spec.load(tiny_fp8, max_len=160, compile=request.param)


@pytest.fixture(scope="module")
def noisy_draft(tiny_fp8, model):
    """The target with perturbed weights: a draft model that is right part of the time."""
    d = mtp_spec.load(tiny_fp8, part="main", max_len=160)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() == 2:
                p.add_(0.7 * p.std() * torch.randn(p.shape, generator=g))
    if model.steps.small_m:
        d.compile_steps(blocks=False)
    return d


class SteeredMTP(MTPProposer):
    """The real MTP proposer (its caches, extend and chaining), with drafts steered towards a known
    continuation so that acceptance lengths vary: this exercises draft extend after partial acceptance."""

    def __init__(self, model, k, refs, seed):
        super().__init__(model, k)
        self.refs, self.rng = refs, random.Random(seed)

    def propose(self, st, sp):
        out = super().propose(st, sp)
        for r, toks in enumerate(st.tokens):
            ref = self.refs[r][len(toks):len(toks) + out.n]
            cut = self.rng.randint(0, len(ref))
            out.tokens[r, :cut] = torch.tensor(ref[:cut], dtype=torch.long)
        return out


def _prompts(seed, batch, vocab=512, repetitive=False):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 24, (batch,), generator=g).tolist()
    if repetitive:  # give n-gram lookup something to find
        return [(torch.randint(0, 6, (n,), generator=g) * 7).tolist() for n in lens]
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def _vanilla(model, prompts, n, eos=None):
    return Engine(model).generate(prompts, n, eos_id=eos)


def _eos_mid_batch(model, prompts, n):
    """A token that the first sequence emits mid-way: used as eos so that one row stops early."""
    out = _vanilla(model, prompts, n)[0].token_ids
    return out[len(out) // 2]


def _proposers(model, noisy_draft, refs, k, seed):
    return {
        "mtp": MTPProposer(model, k),
        "mtp-steered": SteeredMTP(model, k, refs, seed),
        "ngram": NGramProposer(k, n_max=3),
        "mtp-ngram": MTPNGramProposer(model, k),
        "mtp-ngram-1": MTPNGramProposer(model, k, ngram_min=1),  # far more lookups; ragged rows mix both
        "draft-model": DraftModelProposer(noisy_draft, k),
        "oracle-right": OracleProposer(refs, k, model.args.vocab_size),
        "oracle-wrong": OracleProposer(refs, k, model.args.vocab_size, wrong=True),
    }


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_speculative_equals_vanilla_for_every_proposer_and_ragged_batch(model, noisy_draft, k):
    n_new = 24
    for seed in range(2):
        batch = random.Random(k * 10 + seed).randint(1, 8)
        prompts = _prompts(seed * 100 + k, batch, repetitive=seed == 1)
        eos = _eos_mid_batch(model, prompts, n_new)
        ref = _vanilla(model, prompts, n_new, eos)
        refs = [p + r.token_ids for p, r in zip(prompts, ref)]
        for name, prop in _proposers(model, noisy_draft, refs, k, seed).items():
            got = Engine(model, prop).generate(prompts, n_new, eos_id=eos)
            for i, (a, b) in enumerate(zip(ref, got)):
                assert b.token_ids == a.token_ids, f"{name} k={k} row {i}"
                assert b.finish_reason == a.finish_reason
            if name == "oracle-right":
                assert all(r.metrics.num_accepted_tokens == r.metrics.num_draft_tokens for r in got)
            if name == "oracle-wrong":
                assert all(r.metrics.num_accepted_tokens == 0 for r in got)
                assert all(r.metrics.num_steps == len(r.token_ids) - 1 for r in got)


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_tree_equals_vanilla(model, width, k):
    prompts = _prompts(width * 7 + k, random.Random(width + k).randint(1, 8))
    eos = _eos_mid_batch(model, prompts, 20)
    ref = _vanilla(model, prompts, 20, eos)
    got = Engine(model, MTPTreeProposer(model, k, width)).generate(prompts, 20, eos_id=eos)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert all(r.metrics.num_draft_tokens == r.metrics.num_drafts * k * width for r in got)


class OracleTree(Proposer):
    """A tree whose right answer sits on a random branch: the verifier must find it and the engine
    must move that branch's cache entries into place."""

    def __init__(self, refs, k, width, vocab, seed):
        self.refs, self.k, self.w, self.vocab, self.rng = refs, k, width, vocab, random.Random(seed)
        self.max_nodes = k * width

    def propose(self, st, sp):
        out = []
        for r, tokens in enumerate(st.tokens):
            n = len(tokens)
            ref = self.refs[r][n:n + self.k] if st.active[r] else []
            toks, parents, prev = [], [], -1
            for t in ref:
                right = self.rng.randrange(self.w)
                level = []
                for b in range(self.w):
                    toks.append(t if b == right else (t + 1 + b) % self.vocab)
                    parents.append(prev)
                    level.append(len(toks) - 1)
                prev = level[right] if self.rng.random() < 0.8 else level[(right + 1) % self.w]
            out.append(Drafts(toks, parents))
        return out


@pytest.mark.parametrize("width", [2, 3])
def test_tree_with_a_right_branch_anywhere_equals_vanilla(model, width):
    prompts = _prompts(31 + width, 5)
    ref = _vanilla(model, prompts, 24)
    refs = [p + r.token_ids for p, r in zip(prompts, ref)]
    got = Engine(model, OracleTree(refs, 3, width, 512, width)).generate(prompts, 24)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert sum(r.metrics.num_accepted_tokens for r in got) > 0


def test_tree_of_width_one_drafts_exactly_the_chain(model):
    prompts = _prompts(5, 3)
    chain, tree = MTPProposer(model, 4), MTPTreeProposer(model, 4, 1)
    a = Engine(model, chain)
    b = Engine(model, tree)
    ra, rb = a.generate(prompts, 12), b.generate(prompts, 12)
    assert [r.token_ids for r in ra] == [r.token_ids for r in rb]
    assert [r.metrics.to_dict()["num_accepted_tokens"] for r in ra] == \
        [r.metrics.to_dict()["num_accepted_tokens"] for r in rb]


@torch.no_grad()
def test_mtp_ngram_catches_up_after_many_lookup_steps(model, monkeypatch):
    """Lookup-only steps leave committed pairs waiting for the MTP layer; however many such steps come
    first (the prompts' own extend waiting too), the waiting pairs must stay within the MTP cache when
    a row finally needs an MTP draft, and the output must stay vanilla's."""
    calls = {"n": 0}

    def lookup_then_miss(tokens, k, n_max, n_min):
        calls["n"] += 1
        return [tokens[-1]] * k if calls["n"] <= 60 else []  # drafts that are mostly wrong: few accepted

    monkeypatch.setattr(proposers_mod, "lookup", lookup_then_miss)
    prompts = [[3, 1, 4, 1, 5]]  # with 110 new tokens: caches of 128 slots (the MTP's + 11)
    ref = _vanilla(model, prompts, 110)
    got = Engine(model, MTPNGramProposer(model, 4)).generate(prompts, 110)
    assert calls["n"] > 60 and got[0].token_ids == ref[0].token_ids


def test_mtp_chain_drafts_equal_an_uncached_recomputation(model):
    ids = torch.tensor([[5, 9, 200, 31, 7, 7, 64]])
    h = model(ids).hidden_states
    prop = MTPProposer(model, 3)
    prop.reset(1, 64)
    from mtp_spec.decoding.proposers import DecodeState

    nxt = int(model(ids).logits[0, -1].argmax())
    toks = torch.tensor([ids[0, 1:].tolist() + [nxt]])
    st = DecodeState([ids[0].tolist() + [nxt]], [True], [torch.Generator()], [7], torch.tensor([nxt]),
                     torch.tensor([True]), hidden=h, next_tokens=toks, n_new=torch.tensor([7]))
    drafts = prop.propose(st, SamplingParams()).tokens[0].tolist()
    out = model.mtp(toks, h)
    assert drafts[0] == int(out.logits[0, -1].argmax())
    hid = torch.cat([h, out.hidden_states[:, -1:]], 1)
    out2 = model.mtp(torch.cat([toks, torch.tensor([[drafts[0]]])], 1), hid)
    assert drafts[1] == int(out2.logits[0, -1].argmax())
    hid = torch.cat([hid, out2.hidden_states[:, -1:]], 1)
    out3 = model.mtp(torch.cat([toks, torch.tensor([[drafts[0], drafts[1]]])], 1), hid)
    assert drafts[2] == int(out3.logits[0, -1].argmax())


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollback_leaves_caches_equal_to_a_fresh_prefill_of_the_accepted_text(model, seed):
    prompts = _prompts(40 + seed, 4)
    ref = _vanilla(model, prompts, 20)
    refs = [p + r.token_ids for p, r in zip(prompts, ref)]
    prop = SteeredMTP(model, 3, refs, seed)
    eng = Engine(model, prop)
    res = eng.generate(prompts, 20)
    assert sum(r.metrics.num_accepted_tokens for r in res) > 0
    for i in range(len(prompts)):
        text = torch.tensor([prompts[i] + res[i].token_ids])
        # the main cache holds everything but the newest token; so does the MTP cache, in pairs
        n = len(prompts[i]) + len(res[i].token_ids) - 1
        fresh = model.new_cache(1, 64)
        out = model(text[:, :n], cache=fresh)
        cache = eng.last_cache
        assert int(cache.lengths[i]) == n
        for a, b in zip(cache.tensors(), fresh.tensors()):
            torch.testing.assert_close(a[i, :n], b[0, :n], rtol=1e-4, atol=1e-5)
        m = int(prop.cache.lengths[i])
        assert 0 < m < n  # pairs up to the last extend; the newest ones would be extended next step
        fresh_mtp = model.mtp.new_cache(1, 64)
        model.mtp(text[:, 1:m + 1], out.hidden_states[:, :m], cache=fresh_mtp)
        torch.testing.assert_close(prop.cache.layer(0)[0][i, :m], fresh_mtp.layer(0)[0][0, :m], rtol=1e-4, atol=1e-5)


def test_metrics_arithmetic_on_hand_made_steps():
    m = SpecMetrics()
    for drafted, accepted in [(3, 3), (3, 1), (3, 0), (0, 0), (3, 2)]:
        m.record(drafted, accepted)
    assert (m.num_steps, m.num_drafts, m.num_draft_tokens, m.num_accepted_tokens) == (5, 4, 12, 6)
    assert m.accepted_per_pos == [3, 2, 1]
    assert m.acceptance_rate == pytest.approx(6 / 12)
    assert m.acceptance_len == pytest.approx(1 + 6 / 4)
    assert m.per_pos_rate == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    assert m.per_pos_cond == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    both = m.merge(SpecMetrics(num_drafts=1, num_draft_tokens=5, num_accepted_tokens=5,
                               accepted_per_pos=[1, 1, 1, 1, 1], num_steps=1))
    assert both.accepted_per_pos == [4, 3, 2, 1, 1] and both.acceptance_len == pytest.approx(1 + 11 / 5)
    assert SpecMetrics().acceptance_len == 1.0


def test_relaxed_acceptance_is_lossy_and_labelled(model):
    prompts = _prompts(9, 2)
    ref = _vanilla(model, prompts, 16)
    refs = [p + r.token_ids for p, r in zip(prompts, ref)]
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0], [0.0, 0.0, 9.0, 0.0]])
    assert verify(logits, Drafts.chain([2]), SamplingParams()).path == []
    assert verify(logits, Drafts.chain([2]), SamplingParams(), relaxed=Relaxed(2, 0.5)).path == [0]
    res = Engine(model, OracleProposer(refs, 2, 512, wrong=True), relaxed=Relaxed(512, 100.0)).generate(prompts, 16)
    assert all(r.lossy for r in res)
    assert any(r.token_ids != a.token_ids for r, a in zip(res, ref))


def test_streaming_and_stop_strings(model):
    prompts = _prompts(11, 3)
    seen = {0: [], 1: [], 2: []}
    res = Engine(model, MTPProposer(model, 3)).generate(prompts, 15, on_tokens=lambda i, t: seen[i].extend(t))
    assert [seen[i] for i in range(3)] == [r.token_ids for r in res]
    decode = lambda ids: " ".join(map(str, ids))
    stop = str(res[0].token_ids[4])
    got = Engine(model, NGramProposer(3)).generate(prompts[:1], 15, stop=[stop], decode=decode)[0]
    assert got.finish_reason == "stop" and stop in decode(got.token_ids)
    assert stop not in decode(got.token_ids[:-1])


def test_bad_input_gives_clear_errors(model, tmp_path):
    eng = Engine(model, MTPProposer(model, 2))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match="prompt 0 has 200 tokens"):
        eng.generate([[1] * 200], 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        MTPProposer(model, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        NGramProposer(0)
    from mtp_spec.decoding.strategies import make_proposer

    with pytest.raises(ValueError, match="unknown strategy 'medusa'"):
        make_proposer("medusa", model, 2)
    from mtp_spec.random_model import write_random_checkpoint

    v2 = mtp_spec.load(write_random_checkpoint(tmp_path / "v2", "tiny-v2"))
    with pytest.raises(ValueError, match="needs an MTP layer"):
        MTPProposer(v2, 2)
    assert lookup([1, 2, 3, 1, 2], 2, 3, 1) == [3, 1]
