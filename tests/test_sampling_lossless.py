"""Sampled speculative decoding has the target's distribution: a chi-square test over 20k samples of
the first three generated tokens (vocabulary 8), against exact autoregressive probabilities.
MTP chains draft by sampling (q known); trees and n-grams draft deterministically (q one-hot)."""

import pytest
import torch

import mtp_spec
from mtp_spec.config import ModelArgs
from mtp_spec.decoding import verify as verify_mod
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import (
    DraftModelProposer,
    MTPNGramProposer,
    MTPProposer,
    MTPTreeProposer,
    NGramProposer,
)
from mtp_spec.decoding.sampling import SamplingParams, probs
from mtp_spec.random_model import write_random_checkpoint

V = 8
N = 20_000
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive, so that n-gram lookup proposes
EVERY_TOKEN = [0, 1, 2, 3, 4, 5, 6, 7, 1, 2]  # every token seen: a 1-gram lookup always finds one


@pytest.fixture(scope="module", params=["off", "auto"])
def models(tmp_path_factory, request):
    """On the eager reference path and on the fast step path (CPU kernels). With 20k rows the
    forwards are the cost, so the model is the tiny preset's structure, narrower, and the cache holds
    24 positions (prompt, 3 tokens, drafts): a step reads the whole cache under a length mask."""
    args = ModelArgs.from_name("tiny").with_(vocab_size=V, fp8=False, dim=64, inter_dim=128, moe_inter_dim=32,
                                             n_heads=2, q_lora_rank=32, kv_lora_rank=16, n_routed_experts=4,
                                             n_expert_groups=2, n_limited_groups=1)
    root = tmp_path_factory.mktemp("small-vocab")
    target = mtp_spec.load(write_random_checkpoint(root / "t", args, seed=11, dtype=torch.float32, std=0.3),
                           compile=request.param, max_len=24)
    # the draft: the target with noise, so it agrees part of the time
    draft = mtp_spec.load(root / "t", part="main", compile=request.param, max_len=24)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.add_(0.15 * p.std() * torch.randn(p.shape, generator=g))
    return target, draft


@torch.no_grad()
def exact_joint(model, sp: SamplingParams, prompt: list[int] = PROMPT) -> torch.Tensor:
    """P(t1, t2, t3) under plain autoregressive sampling, shape (V, V, V)."""
    grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    ids = torch.cat([torch.tensor(prompt).expand(len(grid), -1), grid], 1)
    logits = model(ids).logits
    p1 = probs(logits[0, len(prompt) - 1], sp)
    p2 = probs(logits[:V * V:V, len(prompt)], sp)  # rows where t1 = 0..V-1
    p3 = probs(logits[:, len(prompt) + 1], sp).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_p(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2], minlength=V**3).double()
    expected = p.flatten().double() * len(samples)
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def run(model, proposer, sp, prompt: list[int] = PROMPT):
    res = Engine(model, proposer).generate([prompt] * N, max_new_tokens=3, sp=sp, seed=1234)
    drafted = sum(r.metrics.num_draft_tokens for r in res)
    accepted = sum(r.metrics.num_accepted_tokens for r in res)
    return torch.tensor([r.token_ids for r in res]), drafted, accepted


CASES = {
    "mtp-sampled-drafts": (lambda t, d: MTPProposer(t, 2), SamplingParams(temperature=1.0)),
    "ngram": (lambda t, d: NGramProposer(2, n_max=2), SamplingParams(temperature=0.8)),
    # rows whose first token makes a seen 2-gram look up, the others take MTP drafts: steps mix both
    "mtp-ngram": (lambda t, d: MTPNGramProposer(t, 2), SamplingParams(temperature=1.0)),
    # every row finds a 1-gram at every step: the MTP layer only catches up (and its draws are skipped)
    "mtp-ngram-all-lookup": (lambda t, d: MTPNGramProposer(t, 2, ngram_min=1), SamplingParams(temperature=1.0),
                             EVERY_TOKEN),
    "mtp-tree": (lambda t, d: MTPTreeProposer(t, 2, width=2), SamplingParams(temperature=1.0, top_k=5)),
    "draft-model": (lambda t, d: DraftModelProposer(d, 2), SamplingParams(temperature=1.0, top_k=6, top_p=0.9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampled_speculative_decoding_matches_the_target_distribution(models, case):
    target, draft = models
    make, sp, *prompt = CASES[case]
    prompt = prompt[0] if prompt else PROMPT
    samples, drafted, accepted = run(target, make(target, draft), sp, prompt)
    assert samples.shape == (N, 3)
    # meaningful only if drafts were proposed and judged both ways
    assert drafted > N // 2 and 0.01 * drafted < accepted < 0.99 * drafted, (drafted, accepted)
    p = chi_square_p(samples, exact_joint(target, sp, prompt))
    assert p > 1e-3, f"{case}: chi-square p = {p:.2e}"


def test_the_chi_square_check_catches_a_biased_verifier(models, monkeypatch):
    """Negative control: accepting every draft gives the draft's distribution, and the test sees it."""
    target, draft = models
    sp = SamplingParams(temperature=1.0)
    monkeypatch.setattr(verify_mod, "uniforms", lambda gens, n, device: torch.zeros(len(gens), n, device=device))
    samples, _, _ = run(target, DraftModelProposer(draft, 2), sp)
    assert chi_square_p(samples, exact_joint(target, sp)) < 1e-6
