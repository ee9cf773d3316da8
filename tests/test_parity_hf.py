"""Logits parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on our own checkpoints."""

import pytest
import torch

import mtp_spec
from mtp_spec.config import ModelArgs
from mtp_spec.random_model import write_random_checkpoint

transformers = pytest.importorskip("transformers")

CASES = {
    # YaRN with positions past original_seq_len (64), n_group > 1, LoRA queries, sigmoid + bias.
    "v3": ModelArgs.from_name("tiny").with_(fp8=False),
    # Four groups of two experts, three of them kept; two dense layers then MoE.
    "v3-groups": ModelArgs.from_name("tiny").with_(fp8=False, n_layers=3, n_dense_layers=1, n_limited_groups=3,
                                                   n_activated_experts=3, rope_factor=8.0),
    # Softmax scoring, no q LoRA (a single wq), V2 names.
    "v2": ModelArgs.from_name("tiny-v2"),
    "v2-group-limited": ModelArgs.from_name("tiny-v2").with_(topk_method="group_limited_greedy", n_expert_groups=4,
                                                             n_limited_groups=2, route_scale=2.0),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("hf") / request.param, CASES[request.param],
                                   seed=7, dtype=torch.float32, std=0.05)
    ours = mtp_spec.load(path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


@torch.no_grad()
def test_full_forward_logits_match_transformers(pair):
    ours, theirs = pair
    ids = torch.randint(0, ours.args.vocab_size, (2, 90), generator=torch.Generator().manual_seed(0))
    assert rel_err(ours(ids).logits, theirs(ids).logits) <= 1e-4


@torch.no_grad()
def test_cached_step_by_step_logits_match_transformers(pair):
    ours, theirs = pair
    ids = torch.randint(0, ours.args.vocab_size, (2, 80), generator=torch.Generator().manual_seed(1))
    cache = ours.new_cache(batch=2, max_len=96)
    past = transformers.DynamicCache(config=theirs.config)
    prefill = 20
    a = [ours(ids[:, :prefill], cache=cache).logits]
    cache.lengths += prefill
    b = [theirs(ids[:, :prefill], past_key_values=past, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):  # past 64 = original_seq_len: YaRN territory
        a.append(ours(ids[:, t:t + 1], cache=cache).logits)
        cache.lengths += 1
        b.append(theirs(ids[:, t:t + 1], past_key_values=past, use_cache=True).logits)
    assert rel_err(torch.cat(a, 1), torch.cat(b, 1)) <= 1e-4


@torch.no_grad()
def test_cached_decoding_equals_full_forward(pair):
    ours, _ = pair
    ids = torch.randint(0, ours.args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    full = ours(ids).logits
    cache = ours.new_cache(batch=3, max_len=64)
    parts = []
    for lo, hi in [(0, 7), (7, 8), (8, 20), (20, 21), (21, 40)]:
        parts.append(ours(ids[:, lo:hi], cache=cache).logits)
        cache.lengths += hi - lo
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


def test_the_peer_generates_what_we_generate(pair):
    """The experiments' transformers peer (greedy, and with prompt lookup) on the same weights gives
    our vanilla greedy tokens."""
    from mtp_spec.decoding.engine import Engine
    from mtp_spec.decoding.strategies import peer_generate

    ours, theirs = pair
    prompt = [5, 9, 2, 7, 5, 9, 2]
    ref = Engine(ours).generate([prompt], 12)[0].token_ids
    assert peer_generate(theirs, prompt, 12, None) == ref
    assert peer_generate(theirs, prompt, 12, None, lookup=3) == ref
