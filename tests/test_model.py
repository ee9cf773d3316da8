"""Model internals: naive == absorbed attention, ragged caches, tree masks, and the MTP formula."""

import pytest
import torch
from safetensors.torch import load_file

import mtp_spec


@pytest.fixture(scope="module")
def model(tiny_fp32):
    return mtp_spec.load(tiny_fp32, dtype=torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("seed", range(3))
def test_naive_attention_equals_absorbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.args.vocab_size, (2, 30), generator=g)
    a = model(ids, absorb=True).logits
    n = model(ids, absorb=False).logits
    torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-5)
    cache_a, cache_n = model.new_cache(2, 48), model.new_cache(2, 48)
    for lo, hi in [(0, 10), (10, 11), (11, 30)]:
        a = model(ids[:, lo:hi], cache=cache_a, absorb=True).logits
        n = model(ids[:, lo:hi], cache=cache_n, absorb=False).logits
        cache_a.lengths += hi - lo
        cache_n.lengths += hi - lo
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_ragged_starts_equal_separate_sequences(model):
    g = torch.Generator().manual_seed(3)
    lens = [5, 12, 1]
    seqs = [torch.randint(0, model.args.vocab_size, (n + 4,), generator=g) for n in lens]
    cache = model.new_cache(3, 32)
    padded = torch.zeros(3, max(lens), dtype=torch.long)
    for b, s in enumerate(seqs):  # one right-padded prefill; each row's pad writes are scratch
        padded[b, : lens[b]] = s[: lens[b]]
    model(padded, cache=cache)
    cache.lengths = torch.tensor(lens)
    new = torch.stack([s[lens[b]:] for b, s in enumerate(seqs)])
    got = model(new, cache=cache).logits
    for b, s in enumerate(seqs):
        ref = model(s[None]).logits[0, lens[b]:]
        torch.testing.assert_close(got[b], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_tree_mask_of_a_chain_equals_causal_and_branches_are_independent(model):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.args.vocab_size, (1, 12), generator=g)
    cache = model.new_cache(1, 32)
    model(ids[:, :8], cache=cache)
    cache.lengths += 8
    causal = model(ids[:, 8:], cache=cache).logits
    chain = model(ids[:, 8:], cache=cache, tree_mask=torch.tril(torch.ones(4, 4, dtype=torch.bool))).logits
    torch.testing.assert_close(causal, chain)
    # Two siblings at the same depth: each must see only the prefix (and itself).
    sib = torch.tensor([[ids[0, 8], 7]])
    tm = torch.eye(2, dtype=torch.bool)
    pos = torch.tensor([[8, 8]])
    both = model(sib, cache=cache, tree_mask=tm, positions=pos).logits
    alone = model(torch.tensor([[7]]), cache=cache).logits
    torch.testing.assert_close(both[:, 0], causal[:, 0])
    torch.testing.assert_close(both[:, 1], alone[:, 0])


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def test_mtp_forward_matches_the_papers_formula(model, tiny_fp32):
    """h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)] (embedding first, as the checkpoint is laid out),
    h_i^1 = TRM(h'_i), P = OutHead(h_i^1); TRM is transformers' own decoder layer with layer 2's weights."""
    transformers = pytest.importorskip("transformers")
    args = model.args
    cfg = transformers.AutoConfig.from_pretrained(tiny_fp32)
    cfg.num_hidden_layers = args.n_layers + 1  # makes HF build (and load) the MTP layer's block
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_fp32, config=cfg, dtype=torch.float32).eval()
    trm = hf.model.layers[args.n_layers]

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, args.vocab_size, (2, 16), generator=g)
    h = model(ids).hidden_states  # post-norm, the default switch
    t_next = ids[:, 1:]
    h_i = h[:, :-1]

    sd = load_file(str(tiny_fp32 / "model.safetensors"))
    p = f"model.layers.{args.n_layers}."
    e = _rms(sd[p + "embed_tokens.weight"][t_next], sd[p + "enorm.weight"], args.norm_eps)
    hh = _rms(h_i, sd[p + "hnorm.weight"], args.norm_eps)
    x = torch.cat([e, hh], -1) @ sd[p + "eh_proj.weight"].T
    s = x.shape[1]
    pos = torch.arange(s)[None].expand(2, -1)
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    x = trm(x, attention_mask=mask, position_ids=pos, position_embeddings=hf.model.rotary_emb(x, pos))
    x = x[0] if isinstance(x, tuple) else x
    logits = _rms(x, sd[p + "shared_head.norm.weight"], args.norm_eps) @ sd[p + "shared_head.head.weight"].T

    out = model.mtp(t_next, h_i)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_mtp_pre_and_post_norm_switch_changes_the_input(tiny_fp32):
    post = mtp_spec.load(tiny_fp32, mtp_hidden="post")
    pre = mtp_spec.load(tiny_fp32, mtp_hidden="pre")
    assert post.mtp.hidden_input == "post" and pre.mtp.hidden_input == "pre"
    ids = torch.arange(1, 9)[None]
    out = post(ids)
    a = post.mtp(ids[:, 1:], out.hidden_states[:, :-1]).logits
    b = pre.mtp(ids[:, 1:], out.prenorm_hidden[:, :-1]).logits
    assert not torch.allclose(a, b)


@torch.no_grad()
def test_mtp_cached_steps_equal_full(model):
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.args.vocab_size, (2, 20), generator=g)
    h = model(ids).hidden_states
    full = model.mtp(ids[:, 1:], h[:, :-1]).logits
    cache = model.mtp.new_cache(2, 32)
    parts = []
    for lo, hi in [(0, 9), (9, 10), (10, 19)]:
        parts.append(model.mtp(ids[:, 1 + lo:1 + hi], h[:, lo:hi], cache=cache).logits)
        cache.lengths += hi - lo
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
