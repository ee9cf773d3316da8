"""The CPU step kernels (kernels/cpu_linear.py): right against torch, and batch-invariant: a row's
result does not depend on the other rows in the call, which is what keeps a verify of k+1 tokens
rounding exactly like k+1 single-token decodes."""

import pytest
import torch

from mtp_spec.kernels import cpu_linear as C

pytestmark = pytest.mark.skipif(not C.available(), reason="needs a C compiler and an AVX2 CPU")
HAS_DOT = C.bf16_dot_kernel() is not None
# (weight dtype, bf16 kernel): fp32 weights, bf16 weights on the AVX2 kernel, and on the AVX-512 BF16
# one where this CPU has it (a skip says so where it does not)
PATHS = [(torch.float32, "avx2"), (torch.bfloat16, "avx2"),
         pytest.param((torch.bfloat16, "avx512-bf16-dot"),
                      marks=pytest.mark.skipif(not HAS_DOT, reason="this CPU has no AVX-512 BF16"))]


@pytest.fixture
def path(request, monkeypatch):
    dtype, kernel = request.param
    monkeypatch.setattr(C, "_dot", C.bf16_dot_kernel() if kernel == "avx512-bf16-dot" else None)
    monkeypatch.setattr(C, "_dot_tried", True)
    return dtype, kernel


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("n,k", [(37, 16), (300, 129), (64, 576), (8, 7), (5, 31)])
def test_small_m_linear_matches_torch(path, n, k):
    dtype, kernel = path
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    for m in (1, 2, 5, 16, 17, 40):
        x = torch.randn(m, k, generator=g)
        xr = x.bfloat16() if kernel == "avx512-bf16-dot" else x  # that kernel rounds its inputs to bf16
        ref = torch.nn.functional.linear(xr.double(), w.double())
        got = C.linear(x, w)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * k ** 0.5)
        if kernel == "avx512-bf16-dot":  # nearer the rounded inputs' product than the exact one's
            exact = torch.nn.functional.linear(x.double(), w.double())
            assert (got.double() - ref).abs().max() < (got.double() - exact).abs().max()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("k", [576, 129])
def test_small_m_linear_is_batch_invariant(path, k):
    dtype, _ = path
    g = torch.Generator().manual_seed(k)
    w = torch.randn(300, k, generator=g).to(dtype)
    x = torch.randn(40, k, generator=g)
    full = C.linear(x, w)
    for i in range(40):
        assert torch.equal(C.linear(x[i:i + 1], w)[0], full[i])
    for m in (2, 3, 7, 16):
        assert torch.equal(C.linear(x[5:5 + m], w), full[5:5 + m])


def _attention_ref(q, k, v, mask, scale):
    b, s, h, _ = q.shape
    kvh = k.shape[2]
    kk = k.repeat_interleave(h // kvh, 2).double()
    vv = v.repeat_interleave(h // kvh, 2).double()
    sc = torch.einsum("bshd,bthd->bsht", q.double(), kk) * scale
    sc = sc.masked_fill(~mask[:, :, None, :], float("-inf"))
    return torch.einsum("bsht,bthd->bshd", sc.softmax(-1), vv)


@pytest.mark.parametrize("shape", [(2, 3, 9, 3, 64, 64, 40), (1, 5, 4, 1, 40, 32, 33), (3, 1, 6, 2, 16, 16, 70),
                                   (1, 4, 6, 3, 20, 67, 45), (2, 2, 4, 2, 64, 72, 128)])
def test_attention_matches_torch_and_is_batch_invariant(shape):
    b, s, h, kvh, dk, dv, t = shape
    g = torch.Generator().manual_seed(t)
    q = torch.randn(b, s, h, dk, generator=g)
    cache = torch.randn(b, t, kvh, dk + 7, generator=g)  # strided views, like MLA's key and value
    k, v = cache[..., :dk], cache[..., :dv]
    mask = torch.rand(b, s, t, generator=g) < 0.7
    mask[..., 0] = True
    got = C.attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(got.double(), _attention_ref(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-5)
    for i in range(s):
        assert torch.equal(C.attention(q[:, i:i + 1], k, v, mask[:, i:i + 1], 0.3)[:, 0], got[:, i])


@pytest.mark.parametrize("d", [24, 72, 67])
def test_attention_ignores_masked_slots_and_gives_zeros_for_an_empty_row(d):
    """Slots past a sequence's length hold whatever was there (rolled-back drafts, uninitialised
    memory): NaN or inf in them must not reach the output, and a query that sees nothing gets zeros.
    A NaN where the query looks still gives NaN, as in torch."""
    g = torch.Generator().manual_seed(1)
    q, cache = torch.randn(2, 3, 4, d, generator=g), torch.randn(2, 50, 2, d, generator=g)
    mask = torch.zeros(2, 3, 50, dtype=torch.bool)
    mask[0, :, :17] = True
    mask[1, 0, 5:30] = True
    mask[1, 1, 3] = True
    dirty = cache.clone()
    dirty[~mask.any(1)[..., None, None].expand_as(dirty)] = float("nan")
    dirty[0, 40, 0] = float("inf")
    got = C.attention(q, dirty, dirty, mask, 0.2)
    ref = C.attention(q, cache, cache, mask, 0.2)
    assert torch.equal(got, ref) and not got.isnan().any()
    assert torch.equal(got[1, 2], torch.zeros(4, d))
    torch.testing.assert_close(got[:, :2].double(), _attention_ref(q[:, :2], cache, cache, mask[:, :2], 0.2),
                               rtol=1e-5, atol=1e-5)
    nan_key = cache.clone()
    nan_key[0, 9, 1, 3] = float("nan")  # visible to batch row 0's queries; heads 2, 3 read KV head 1
    out = C.attention(q, nan_key, cache, mask, 0.2)
    assert out[0, :, 2:].isnan().all() and not out[0, :, :2].isnan().any() and not out[1].isnan().any()


def test_the_linear_runs_inside_torch_compile_without_a_graph_break():
    w = torch.randn(64, 32)
    f = torch.compile(lambda x: torch.relu(C.small_m_linear(x, w)) * 2, fullgraph=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(f(x), torch.relu(torch.nn.functional.linear(x, w)) * 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [576, 61, 8])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_row_ops_match_torch_and_are_batch_invariant(d, wdtype):
    from mtp_spec.kernels import cpu_rows as R

    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 5, d + 3, generator=g)[..., :d] * 3  # strided rows, as a slice of a fused output
    w = torch.randn(d, generator=g).to(wdtype)
    ref = w.double() * torch.nn.functional.rms_norm(x.double(), (d,), eps=1e-5)
    got = R.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(R.rms_norm(x[1:, 2:3], w, 1e-5), got[1:, 2:3])

    h = torch.randn(3, 4, 2 * d, generator=g) * 4
    h[0, 0, : min(d, 6)] = torch.tensor([-200.0, -90.0, -20.0, 0.0, 30.0, 200.0])[: min(d, 6)]  # exp's clamps
    ref = torch.nn.functional.silu(h[..., :d].double()) * h[..., d:].double()
    got = R.silu_mul(h)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(R.silu_mul(h[2:, 1:3]), got[2:, 1:3])


@pytest.mark.parametrize("family", ["llama", "deepseek"])
def test_rope_matches_the_rotary_module(family):
    from types import SimpleNamespace

    from mtp_spec.kernels import cpu_rows as R
    from mtp_spec.model.layers import Rotary

    args = SimpleNamespace(family=family, head_dim=64, rope_theta=1e5, qk_rope_head_dim=64, rope_scaling=None)
    rot = Rotary(args, 300)
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(2, 5, 12 * 96, generator=g)  # heads of 96: a 64-wide rotary part, strided
    x = fused.view(2, 5, 12, 96)[..., 32:]
    rope = rot.tables(torch.randint(0, 300, (2, 5), generator=g))
    got = R.rope(x, *rope, pairs=family == "deepseek")
    torch.testing.assert_close(got, rot(x, rope), rtol=1e-6, atol=1e-6)
    one = R.rope(x[1:, 3:4], rope[0][1:, 3:4], rope[1][1:, 3:4], pairs=family == "deepseek")
    assert torch.equal(one, got[1:, 3:4])
    k = fused[..., :64]  # one head without a head axis (MLA's shared roped key)
    torch.testing.assert_close(R.rope(k, *rope, pairs=family == "deepseek"), rot(k, rope), rtol=1e-6, atol=1e-6)


def test_rope_takes_any_strides_and_broadcast_tables():
    from types import SimpleNamespace

    from mtp_spec.kernels import cpu_rows as R
    from mtp_spec.model.layers import Rotary

    rot = Rotary(SimpleNamespace(family="llama", head_dim=32, rope_theta=1e4), 64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 1, 32, generator=g).transpose(1, 2)  # s = 1: torch calls it contiguous
    rope = rot.tables(torch.arange(1).view(1, 1))  # one table row for the whole batch
    torch.testing.assert_close(R.rope(x, *rope, pairs=False), rot(x, rope), rtol=1e-6, atol=1e-6)


def test_rms_norm_module_leaves_fp16_weights_to_torch():
    from mtp_spec.model.layers import RMSNorm

    norm = RMSNorm(64).to(torch.float16)
    x = torch.randn(2, 3, 64)
    ref = norm(x)
    norm.small_m = True
    assert torch.equal(norm(x), ref)
