"""The FP8 block format: quantise/dequantise round trips and the reference GEMM."""

import pytest
import torch

from mtp_spec.kernels import FP8, act_quant_ref, fp8_gemm_ref, weight_dequant_ref, weight_quant_ref


def _bound(scale_inv_full, w):
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; subnormal steps are 2^-9 * scale.
    return torch.maximum(w.abs() * 2.0**-4, scale_inv_full * 2.0**-10) + 1e-12


@pytest.mark.parametrize("shape", [(576, 256), (128, 128), (200, 333), (1, 7), (256, 576)])
@pytest.mark.parametrize("seed", [0, 1])
def test_weight_round_trip_stays_within_e4m3_bounds(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    q, s = weight_quant_ref(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = weight_dequant_ref(q, s)
    s_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert bool(((back - w).abs() <= _bound(s_full, w)).all())
    # each block's largest magnitude maps to exactly 448 (the scale is amax / 448)
    assert torch.allclose(q.float().abs().amax(), torch.tensor(448.0))


def test_all_zero_block_gets_a_finite_scale():
    w = torch.zeros(130, 256)
    w[129, 200] = 1.0
    q, s = weight_quant_ref(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert weight_dequant_ref(q, s)[:128, :128].abs().sum() == 0


def test_dequant_rejects_a_wrong_scale_shape():
    q, s = weight_quant_ref(torch.randn(576, 256))
    with pytest.raises(ValueError, match="scale_inv"):
        weight_dequant_ref(q, s[:4])


def test_act_quant_scales_and_ue8m0():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 384, generator=g)
    y, s = act_quant_ref(x)
    assert s.shape == (3, 3)
    torch.testing.assert_close(s, x.view(3, 3, 128).abs().amax(-1) / 448, rtol=0, atol=0)
    y2, s2 = act_quant_ref(x, scale_fmt="ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s2).round()), s2) and (s2 >= s).all()
    with pytest.raises(ValueError, match="multiple of"):
        act_quant_ref(torch.randn(2, 100))


def test_reference_gemm_equals_dequantised_matmul():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(17, 384, generator=g), torch.randn(576, 384, generator=g)
    aq, as_ = act_quant_ref(a)
    bq, bs = weight_quant_ref(b)
    a_deq = (aq.float().view(17, 3, 128) * as_[..., None]).view(17, 384)
    ref = a_deq @ weight_dequant_ref(bq, bs).T
    torch.testing.assert_close(fp8_gemm_ref(aq, as_, bq, bs), ref, rtol=1e-5, atol=1e-4)
