"""The fast step path: sync-free, batch-invariant, and equal to the eager reference.

`compile="auto"` runs step-sized forwards through the CPU kernels; `compile="on"` also runs the
blocks through torch.compile (few shapes, so a bounded number of compilations)."""

import pytest
import torch

import mtp_spec
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer, MTPTreeProposer, NGramProposer, Proposer
from mtp_spec.kernels import cpu_linear
from mtp_spec.random_model import write_random_checkpoint

needs_kernels = pytest.mark.skipif(not cpu_linear.available(), reason="needs a C compiler and an AVX2 CPU")


def _prompts(seed, batch, vocab=512):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 20, (batch,), generator=g)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("l") / "llama", "tiny-llama", seed=5, std=0.05)


class _NoSync:
    """Counts the calls that read a tensor back to the host while it is active."""

    NAMES = ("item", "tolist", "__int__", "__bool__", "__float__", "cpu", "numpy")

    def __enter__(self):
        self.calls: list[str] = []
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n, fn in self.saved.items():
            setattr(torch.Tensor, n, self._wrap(n, fn))
        return self

    def _wrap(self, name, fn):
        def f(t, *a, **k):
            self.calls.append(name)
            return fn(t, *a, **k)
        return f

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("mode", ["off", "auto"])
@torch.no_grad()
def test_decode_verify_and_draft_steps_read_nothing_back(tiny_fp8, mode):
    model = mtp_spec.load(tiny_fp8, max_len=64, compile=mode)
    cache = model.new_cache(2, 64)
    model(torch.randint(0, 512, (2, 9)), cache=cache)
    cache.lengths += 9
    mcache = model.mtp.new_cache(2, 64)
    h = torch.randn(2, 4, model.args.dim)
    with _NoSync() as spy:
        model(torch.randint(0, 512, (2, 1)), cache=cache)  # decode
        out = model(torch.randint(0, 512, (2, 4)), cache=cache)  # verify k+1 = 4
        model.mtp(torch.randint(0, 512, (2, 4)), h, cache=mcache, logits_at=torch.tensor([[3], [1]]))  # extend
        model.mtp(torch.randint(0, 512, (2, 1)), h[:, :1], depth=1, cache=mcache)  # draft step
        out.logits.argmax(-1)
    assert spy.calls == []


def test_a_whole_engine_step_reads_back_once(tiny_fp8, monkeypatch):
    """Per step the engine reads one small tensor: every row's accepted count and tokens."""
    model = mtp_spec.load(tiny_fp8, max_len=96, compile="auto")
    eng = Engine(model, MTPProposer(model, 3))
    calls = {"tolist": 0, "steps": 0}
    orig_emit, orig_tolist = Engine.emit, torch.Tensor.tolist

    def emit(self, *a):
        calls["steps"] += 1
        return orig_emit(self, *a)

    def tolist(t):
        calls["tolist"] += 1
        return orig_tolist(t)

    monkeypatch.setattr(Engine, "emit", emit)
    prompts = _prompts(3, 3)
    with _NoSync() as spy:
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        eng.generate(prompts, 24)
    # the prefill's first tokens, then one read per step; nothing else anywhere in the loop
    assert calls["tolist"] == calls["steps"] + 1
    assert [c for c in spy.calls if c != "tolist"] == []


@needs_kernels
@pytest.mark.parametrize("k", [1, 3])
def test_fast_path_equals_eager_on_deepseek_and_llama(tiny_fp8, llama_bf16, k):
    for path, vocab in ((tiny_fp8, 512), (llama_bf16, 512)):
        eager = mtp_spec.load(path, max_len=128, compile="off")
        fast = mtp_spec.load(path, max_len=128, compile="auto")
        assert fast.steps.small_m and not eager.steps.small_m
        for seed in range(2):
            prompts = _prompts(seed + 10 * k, 1 + seed * 3, vocab)
            ref = Engine(eager).generate(prompts, 20)
            for m, prop in ((eager, MTPProposer(eager, k)), (fast, Proposer()), (fast, MTPProposer(fast, k)),
                            (fast, MTPTreeProposer(fast, k, 2)), (fast, NGramProposer(k))):
                got = Engine(m, prop).generate(prompts, 20)
                assert [r.token_ids for r in got] == [r.token_ids for r in ref], (path.name, type(prop).__name__)


@needs_kernels
def test_bf16_weights_speculate_exactly_like_vanilla_on_the_fast_path(llama_bf16):
    """bf16 weights, fp32 activations, batch-invariant kernels: a verify of k+1 tokens rounds exactly like
    k+1 decodes, so there are no numerical ties to excuse: outputs are equal token for token."""
    fast = mtp_spec.load(llama_bf16, max_len=160, compile="auto")
    assert next(fast.parameters()).dtype == torch.bfloat16
    prompts = _prompts(77, 6)
    ref = Engine(fast).generate(prompts, 40)
    for k in (2, 4):
        got = Engine(fast, MTPProposer(fast, k)).generate(prompts, 40)
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]


@needs_kernels
def test_torch_compile_path_equals_eager_and_compiles_a_bounded_number_of_times(tiny_fp8):
    eager = mtp_spec.load(tiny_fp8, max_len=96, compile="off")
    comp = mtp_spec.load(tiny_fp8, max_len=96, compile="on")
    prompts = _prompts(5, 2)
    ref = Engine(eager).generate(prompts, 12)
    assert [r.token_ids for r in Engine(comp).generate(prompts, 12)] == [r.token_ids for r in ref]
    got = Engine(comp, MTPProposer(comp, 2)).generate(prompts, 12)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    first = comp.steps.compiles
    assert 0 < first <= 24  # block kinds x step shapes, not one per step
    # other prompts, other lengths, same batch: every shape is already compiled
    Engine(comp, MTPProposer(comp, 2)).generate(_prompts(6, 2), 12)
    Engine(comp).generate(_prompts(7, 2), 12)
    assert comp.steps.compiles == first
