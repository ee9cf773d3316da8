"""The CPU step kernels (kernels/cpu_linear.py): right against torch, and batch-invariant: a row's
result does not depend on the other rows in the call, which is what keeps a verify of k+1 tokens
rounding exactly like k+1 single-token decodes."""

import pytest
import torch

from mtp_spec.kernels import cpu_linear as C

pytestmark = pytest.mark.skipif(not C.available(), reason="needs a C compiler and an AVX2 CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(37, 16), (300, 129), (64, 576), (8, 7)])
def test_small_m_linear_matches_torch(dtype, n, k):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    for m in (1, 2, 5, 16, 17, 40):
        x = torch.randn(m, k, generator=g)
        ref = torch.nn.functional.linear(x.double(), w.double())
        got = C.linear(x, w)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_m_linear_is_batch_invariant(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 576, generator=g).to(dtype)
    x = torch.randn(40, 576, generator=g)
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


@pytest.mark.parametrize("shape", [(2, 3, 9, 3, 64, 64, 40), (1, 5, 4, 1, 40, 32, 33), (3, 1, 6, 2, 16, 16, 70)])
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


def test_the_linear_runs_inside_torch_compile_without_a_graph_break():
    w = torch.randn(64, 32)
    f = torch.compile(lambda x: torch.relu(C.small_m_linear(x, w)) * 2, fullgraph=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(f(x), torch.relu(torch.nn.functional.linear(x, w)) * 2, rtol=1e-5, atol=1e-5)
