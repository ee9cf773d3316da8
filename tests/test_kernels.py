"""Triton FP8 kernels under the CPU interpreter (TRITON_INTERPRET=1), at small odd shapes, against the
torch references fed the same fp8 bytes. Random data, never zeros (except where zeros are the point)."""

import pytest
import torch

from mtp_spec import kernels as K
from mtp_spec.kernels import FP8, act_quant_ref, fp8_gemm_ref, weight_dequant_ref, weight_quant_ref

pytest.importorskip("triton")


@pytest.fixture
def T():
    """The Triton kernels (conftest turns the interpreter on when there is no GPU)."""
    import mtp_spec.kernels.triton_fp8 as mod

    return mod


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


SHAPES = [(m, n, k) for m in (1, 3, 17) for n in (128, 576) for k in (256, 384)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_block_gemm_matches_the_reference_on_the_same_bytes(T, m, n, k):
    aq, a_s = act_quant_ref(_rand(m, k, seed=m * n + k))
    bq, b_s = weight_quant_ref(_rand(n, k, seed=k, scale=0.1))
    got = T.fp8_gemm(aq, a_s, bq, b_s)
    ref = fp8_gemm_ref(aq, a_s, bq, b_s)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_public_gemm_dispatches_to_triton_under_the_interpreter(T):
    aq, a_s = act_quant_ref(_rand(3, 256))
    bq, b_s = weight_quant_ref(_rand(576, 256, seed=1))
    assert K.backend(aq) == "triton"
    torch.testing.assert_close(K.fp8_gemm(aq, a_s, bq, b_s), fp8_gemm_ref(aq, a_s, bq, b_s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_scales_are_exact(T, m, ue8m0):
    x = _rand(m, 384, seed=m)
    fmt = "ue8m0" if ue8m0 else None
    y, s = T.act_quant(x, 128, fmt)
    ry, rs = act_quant_ref(x, 128, fmt)
    assert torch.equal(s, rs)
    # Values: the interpreter's fp32->fp8 cast is known to be wrong (ties round away from zero, and the
    # mantissa carry is OR-ed: triton #8322, PR #11897), so bytes may differ by one step, sometimes 2x.
    # We check the bound that holds for the correct cast and for the buggy one alike: within 2x.
    deq = y.float() * s.repeat_interleave(128, -1)
    assert ((deq - x).abs() <= x.abs() + 1e-6).all()
    mismatch = (y.view(torch.uint8) != ry.view(torch.uint8)).float().mean().item()
    assert mismatch < 0.1, f"{mismatch:.1%} of bytes differ: more than the known interpreter bug explains"


@pytest.mark.xfail(strict=False, reason="Triton interpreter fp32->fp8 rounding bug (triton #8322); byte-exact "
                                        "on a GPU, checked there by experiments/kernels/bench_kernels.py")
def test_act_quant_is_byte_exact(T):
    x = _rand(17, 384, seed=5)
    y, _ = T.act_quant(x)
    assert torch.equal(y.view(torch.uint8), act_quant_ref(x)[0].view(torch.uint8))


def test_act_quant_all_zero_and_extreme_blocks(T):
    x = _rand(4, 256, seed=7)
    x[0, :128] = 0.0  # all-zero block: finite scale, zero output
    x[1, :128] = 448.0
    x[1, 5] = -448.0
    x[2, 128:] = float("inf")
    x[3, 7] = float("nan")
    y, s = T.act_quant(x)
    ry, rs = act_quant_ref(x)
    assert torch.isfinite(s[0, 0]) and s[0, 0] > 0 and (y[0, :128].float() == 0).all()
    assert s[1, 0] == 1.0 and y[1, 0].float() == 448.0 and y[1, 5].float() == -448.0
    assert torch.equal(s[:2], rs[:2])
    assert torch.isinf(s[2, 1]) == torch.isinf(rs[2, 1])  # an inf block has no finite scale in either


@pytest.mark.parametrize("shape", [(576, 256), (128, 384), (200, 130)])
def test_weight_dequant_matches_the_reference(T, shape):
    q, s = weight_quant_ref(_rand(*shape, seed=shape[0]))
    assert torch.equal(T.weight_dequant(q, s), weight_dequant_ref(q, s))


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 17, 0], [1, 1, 1, 1], [20, 0, 0, 3]])
def test_grouped_gemm_handles_ragged_and_empty_experts(T, counts):
    e_of_row = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    e_of_row = e_of_row[torch.randperm(len(e_of_row), generator=torch.Generator().manual_seed(0))]
    aq, a_s = act_quant_ref(_rand(len(e_of_row), 256, seed=1))
    ws = [weight_quant_ref(_rand(192, 256, seed=10 + e, scale=0.1)) for e in range(4)]
    w, w_s = torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])
    got = T.grouped_fp8_gemm(aq, a_s, w, w_s, e_of_row)
    ref = torch.stack([fp8_gemm_ref(aq[i:i + 1], a_s[i:i + 1], w[e], w_s[e])[0] for i, e in enumerate(e_of_row)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    row_ids, block_expert = T.sort_by_expert(e_of_row, 4, 16)
    assert set(block_expert.tolist()) == {e for e, c in enumerate(counts) if c}


def test_bad_inputs_name_the_argument():
    aq, a_s = act_quant_ref(_rand(3, 256))
    bq, b_s = weight_quant_ref(_rand(128, 256))
    with pytest.raises(ValueError, match="a_fp8 must be torch.float8_e4m3fn"):
        K.fp8_gemm(aq.float(), a_s, bq, b_s)
    with pytest.raises(ValueError, match="multiple of 128"):
        K.fp8_gemm(torch.zeros(3, 200, dtype=FP8), torch.ones(3, 2), torch.zeros(128, 200, dtype=FP8), b_s)
    with pytest.raises(ValueError, match="b_fp8 must be contiguous"):
        K.fp8_gemm(aq, a_s, torch.zeros(256, 128, dtype=FP8).t(), b_s)
    with pytest.raises(ValueError, match="b_scale_inv has shape"):
        K.fp8_gemm(aq, a_s, bq, b_s[:, :1])
    with pytest.raises(ValueError, match="a_scales has shape"):
        K.fp8_gemm(aq, a_s[:, :1].contiguous(), bq, b_s)
    with pytest.raises(ValueError, match="x must be contiguous"):
        K.act_quant(_rand(256, 4).t())
    with pytest.raises(ValueError, match="last dim K=100"):
        K.act_quant(_rand(2, 100))
    with pytest.raises(ValueError, match="scale_inv has shape"):
        K.weight_dequant(bq, b_s[:, :1].contiguous())


def test_the_interpreter_cast_bug_canary(T):
    """Documents the interpreter bug our xfail relies on; if Triton fixes it, this starts to fail and the
    xfail above should become a plain byte-exact test."""
    x = torch.full((1, 128), 127.99)
    x[0, 0] = 448.0  # scale 1: values are cast as they are
    y, _ = T.act_quant(x)
    torch_cast = torch.tensor(127.99).to(FP8).float().item()  # 128 in torch
    assert torch_cast == 128.0
    assert y[0, 1].float().item() != torch_cast, "the interpreter's fp8 cast is fixed: make byte-exact tests strict"


@torch.no_grad()
def test_model_on_the_fp8_path_matches_the_dequantised_path(T, tmp_path, monkeypatch):
    import mtp_spec
    from mtp_spec.config import ModelArgs
    from mtp_spec.random_model import write_random_checkpoint

    args = ModelArgs.from_name("tiny").with_(moe_inter_dim=128, n_layers=2)
    path = write_random_checkpoint(tmp_path / "m", args, seed=4)
    ref = mtp_spec.load(path, keep_fp8=False)
    fp8 = mtp_spec.load(path, keep_fp8=True)
    assert fp8.layers[1].ffn.packed  # experts stacked for the grouped kernel
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    # Take the interpreter's buggy fp8 cast out of play: activations quantised by the reference.
    monkeypatch.setattr(T, "act_quant", lambda x, b=128, f=None: act_quant_ref(x, b, f))
    triton_out = fp8(ids).logits
    # The same wiring with the GEMMs done by the torch references must give the same numbers.
    monkeypatch.setattr(T, "fp8_gemm", lambda a, a_s, b, b_s, dt=torch.float32: fp8_gemm_ref(a, a_s, b, b_s).to(dt))
    monkeypatch.setattr(T, "grouped_fp8_gemm", lambda a, a_s, w, w_s, e, dt=torch.float32: torch.stack(
        [fp8_gemm_ref(a[i:i + 1], a_s[i:i + 1], w[int(x)], w_s[int(x)])[0] for i, x in enumerate(e)]).to(dt))
    torch_out = fp8(ids).logits
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-4, atol=1e-5)
    # and, activations being e4m3 on this path, it stays near the dequantised bf16-style path
    dense = ref(ids).logits
    assert ((triton_out - dense).abs().max() / dense.abs().max()) < 0.15
