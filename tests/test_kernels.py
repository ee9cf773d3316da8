"""Triton FP8 kernels under the CPU interpreter (TRITON_INTERPRET=1), at small odd shapes, against the
torch references fed the same fp8 bytes. Random data, never zeros (except where zeros are the point)."""

import pytest
import torch

from mtp_spec import kernels as K
from mtp_spec.kernels import FP8, act_quant_ref, fp8_gemm_ref, weight_dequant_ref, weight_quant_ref

pytest.importorskip("triton")

# On a machine with a GPU the kernels run compiled on it (conftest leaves the interpreter off);
# the references run on the CPU either way.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"


# Hopper's FP8 tensor cores keep a shorter accumulator inside one 128-wide K block (DeepSeek-V3
# report: about 14 bits), so compiled products match the fp32 reference to ~1e-4 of their scale.
RTOL = 3e-4 if GPU else 1e-5


def _dev(*ts):
    return [t.to(DEV) for t in ts]


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
    got = T.fp8_gemm(*_dev(aq, a_s, bq, b_s)).cpu()
    ref = fp8_gemm_ref(aq, a_s, bq, b_s)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


@pytest.mark.parametrize("config", [(16, 64, 4, 2, 0), (16, 32, 4, 3, 4), (32, 64, 4, 2, 1), (64, 128, 4, 2, 0)])
def test_every_tile_config_and_k_split_gives_the_same_product(T, config):
    """Split K sums partial products in a fixed order: same numbers, to rounding, whatever the tiling."""
    aq, a_s = act_quant_ref(_rand(5, 1024, seed=11))
    bq, b_s = weight_quant_ref(_rand(320, 1024, seed=12, scale=0.1))
    assert T.split_k(tiles=1, k_blocks=8, waves=config[4], sms=132) == (4 if config[4] else 1)
    got = T.fp8_gemm(*_dev(aq, a_s, bq, b_s), config=config).cpu()
    ref = fp8_gemm_ref(aq, a_s, bq, b_s)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


def test_rows_do_not_depend_on_the_batch_within_a_bucket(T):
    """A decode step (M=1) and a verify (M=k+1) must give a row the same bits: lossless greedy."""
    aq, a_s = act_quant_ref(_rand(9, 768, seed=13))
    bq, b_s = weight_quant_ref(_rand(576, 768, seed=14, scale=0.1))
    aq, a_s, bq, b_s = _dev(aq, a_s, bq, b_s)
    full = T.fp8_gemm(aq, a_s, bq, b_s)
    for m in (1, 4):
        assert torch.equal(T.fp8_gemm(aq[:m].contiguous(), a_s[:m].contiguous(), bq, b_s), full[:m])


def test_public_gemm_dispatches_to_triton(T):
    aq, a_s = act_quant_ref(_rand(3, 256))
    bq, b_s = weight_quant_ref(_rand(576, 256, seed=1))
    assert K.backend(_dev(aq)[0]) == "triton"
    ref = fp8_gemm_ref(aq, a_s, bq, b_s)
    torch.testing.assert_close(K.fp8_gemm(*_dev(aq, a_s, bq, b_s)).cpu(), ref, rtol=RTOL,
                               atol=RTOL * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_scales_are_exact(T, m, ue8m0):
    x = _rand(m, 384, seed=m)
    fmt = "ue8m0" if ue8m0 else None
    y, s = (t.cpu() for t in T.act_quant(*_dev(x), 128, fmt))
    ry, rs = act_quant_ref(x, 128, fmt)
    assert torch.equal(s, rs)
    if GPU:  # compiled, the cast is exact
        assert torch.equal(y.view(torch.uint8), ry.view(torch.uint8))
    # Values: the interpreter's fp32->fp8 cast is known to be wrong (ties round away from zero, and the
    # mantissa carry is OR-ed: triton #8322, PR #11897), so bytes may differ by one step, sometimes 2x.
    # We check the bound that holds for the correct cast and for the buggy one alike: within 2x.
    deq = y.float() * s.repeat_interleave(128, -1)
    assert ((deq - x).abs() <= x.abs() + 1e-6).all()
    mismatch = (y.view(torch.uint8) != ry.view(torch.uint8)).float().mean().item()
    assert mismatch < 0.1, f"{mismatch:.1%} of bytes differ: more than the known interpreter bug explains"


@pytest.mark.xfail(not GPU, strict=False, reason="Triton interpreter fp32->fp8 rounding bug (triton #8322); "
                                                "strict on a GPU")
@pytest.mark.parametrize("seed", [5, 6])
def test_act_quant_is_byte_exact(T, seed):
    x = _rand(17, 384, seed=seed) * 10 ** (seed - 5)
    y = T.act_quant(*_dev(x))[0].cpu()
    assert torch.equal(y.view(torch.uint8), act_quant_ref(x)[0].view(torch.uint8))


def test_act_quant_all_zero_and_extreme_blocks(T):
    x = _rand(4, 256, seed=7)
    x[0, :128] = 0.0  # all-zero block: finite scale, zero output
    x[1, :128] = 448.0
    x[1, 5] = -448.0
    x[2, 128:] = float("inf")
    x[3, 7] = float("nan")
    y, s = (t.cpu() for t in T.act_quant(*_dev(x)))
    ry, rs = act_quant_ref(x)
    assert torch.isfinite(s[0, 0]) and s[0, 0] > 0 and (y[0, :128].float() == 0).all()
    assert s[1, 0] == 1.0 and y[1, 0].float() == 448.0 and y[1, 5].float() == -448.0
    assert torch.equal(s[:2], rs[:2])
    assert torch.isinf(s[2, 1]) == torch.isinf(rs[2, 1])  # an inf block has no finite scale in either


@pytest.mark.parametrize("shape", [(576, 256), (128, 384), (200, 130)])
def test_weight_dequant_matches_the_reference(T, shape):
    q, s = weight_quant_ref(_rand(*shape, seed=shape[0]))
    assert torch.equal(T.weight_dequant(*_dev(q, s)).cpu(), weight_dequant_ref(q, s))


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 17, 0], [1, 1, 1, 1], [20, 0, 0, 3]])
def test_grouped_gemm_handles_ragged_and_empty_experts(T, counts):
    e_of_row = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    e_of_row = e_of_row[torch.randperm(len(e_of_row), generator=torch.Generator().manual_seed(0))]
    aq, a_s = act_quant_ref(_rand(len(e_of_row), 256, seed=1))
    ws = [weight_quant_ref(_rand(192, 256, seed=10 + e, scale=0.1)) for e in range(4)]
    w, w_s = torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])
    got = T.grouped_fp8_gemm(*_dev(aq, a_s, w, w_s, e_of_row)).cpu()
    ref = torch.stack([fp8_gemm_ref(aq[i:i + 1], a_s[i:i + 1], w[e], w_s[e])[0] for i, e in enumerate(e_of_row)])
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())
    row_ids, block_expert = T.sort_by_expert(e_of_row, 4, 16)
    assert set(block_expert.tolist()) - {-1} == {e for e, c in enumerate(counts) if c}


@pytest.mark.parametrize("seed", range(6))
def test_rows_sorted_by_expert_on_the_device(T, seed):
    """Every row lands once, in a block of its own expert; spare blocks (-1) only at the end; the
    sizes depend on the row count alone (a CUDA graph can hold them)."""
    g = torch.Generator().manual_seed(seed)
    t, e, bm = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g)), 16
    rows = torch.randint(0, e, (t,), generator=g)
    ids, be = T.sort_by_expert(rows, e, bm)
    assert len(be) == -(-t // bm) + min(e, t) and len(ids) == len(be) * bm
    real = int((be >= 0).sum())
    assert (be[real:] == -1).all() and (ids.view(-1, bm)[real:] == -1).all()
    got = ids[ids >= 0]
    assert sorted(got.tolist()) == list(range(t))
    blk = torch.arange(len(ids)) // bm
    assert (be[blk[ids >= 0]].long() == rows[got.long()]).all()


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


@pytest.mark.skipif(GPU, reason="about the CPU interpreter only")
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
    ref = mtp_spec.load(path, keep_fp8=False, device=DEV, dtype=torch.float32)
    fp8 = mtp_spec.load(path, keep_fp8=True, device=DEV, dtype=torch.float32)
    assert fp8.layers[1].ffn.packed  # experts stacked for the grouped kernel
    ids = torch.tensor([[3, 1, 4, 1, 5]], device=DEV)
    # Take the interpreter's buggy fp8 cast out of play: activations quantised by the reference.
    monkeypatch.setattr(T, "act_quant", lambda x, b=128, f=None: act_quant_ref(x, b, f))
    triton_out = fp8(ids).logits
    # The same wiring with the GEMMs done by the torch references must give the same numbers.
    monkeypatch.setattr(T, "fp8_gemm", lambda a, a_s, b, b_s, dt=torch.float32: fp8_gemm_ref(a, a_s, b, b_s).to(dt))
    monkeypatch.setattr(T, "grouped_fp8_gemm", lambda a, a_s, w, w_s, e, dt=torch.float32, routing=None: torch.stack(
        [fp8_gemm_ref(a[i:i + 1], a_s[i:i + 1], w[int(x)], w_s[int(x)])[0] for i, x in enumerate(e)]).to(dt))
    torch_out = fp8(ids).logits
    torch.testing.assert_close(triton_out, torch_out, rtol=max(RTOL, 1e-4), atol=1e-5 if not GPU else 1e-3)
    # and, activations being e4m3 on this path, it stays near the dequantised bf16-style path
    dense = ref(ids).logits
    assert ((triton_out - dense).abs().max() / dense.abs().max()) < 0.15
