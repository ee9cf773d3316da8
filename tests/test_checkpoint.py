"""Checkpoint I/O: the real layout, sharding, selection, bf16 conversion, and named errors."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtp_spec
from mtp_spec.checkpoint import CheckpointError, CheckpointReader, convert_to_bf16, expected_tensors
from mtp_spec.config import ModelArgs
from mtp_spec.kernels import FP8
from mtp_spec.random_model import random_state, write_random_checkpoint


def test_fp8_checkpoint_has_deepseeks_dtypes_and_scales(tiny_fp8):
    sd = load_file(str(tiny_fp8 / "model.safetensors"))
    n = ModelArgs.from_file(tiny_fp8).n_layers
    assert sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == FP8
    assert sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 1)
    assert sd["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == FP8
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for bf16 in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
                 f"model.layers.{n}.eh_proj.weight", f"model.layers.{n}.shared_head.head.weight",
                 f"model.layers.{n}.enorm.weight", f"model.layers.{n}.embed_tokens.weight"]:
        assert sd[bf16].dtype == torch.bfloat16, bf16
    assert f"model.layers.{n}.eh_proj.weight_scale_inv" not in sd
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["num_nextn_predict_layers"] == 1


def test_edge_blocks_of_576_rows_load_correctly(tmp_path):
    args = ModelArgs.from_name("tiny").with_(kv_lora_rank=512, qk_rope_head_dim=64, n_layers=1, n_dense_layers=1)
    path = write_random_checkpoint(tmp_path / "c", args, seed=3, dtype=torch.float32)
    sd = load_file(str(path / "model.safetensors"))
    assert sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (576, 128)
    assert sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 1)
    ref = random_state(args, seed=3)["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    m = mtp_spec.load(path)
    got = m.layers[0].attn.wkv_a.weight
    assert ((got - ref).abs() <= ref.abs() * 2**-4 + 1e-6).all()


@torch.no_grad()
def test_sharded_equals_single_file(tmp_path, tiny_fp8):
    sharded = write_random_checkpoint(tmp_path / "s", "tiny", seed=1, max_shard_bytes=200_000)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):06d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files) and index["metadata"]["total_size"] > 0
    ids = torch.arange(1, 20)[None]
    a, b = mtp_spec.load(tiny_fp8), mtp_spec.load(sharded)
    assert torch.equal(a(ids).logits, b(ids).logits)


@torch.no_grad()
def test_selection_loads_main_only_mtp_only_or_both(tiny_fp8):
    both = mtp_spec.load(tiny_fp8)
    main = mtp_spec.load(tiny_fp8, part="main")
    mtp = mtp_spec.load(tiny_fp8, part="mtp")
    assert main.mtp is None and both.mtp is not None
    assert not hasattr(mtp, "layers") and mtp.mtp is not None
    with pytest.raises(RuntimeError, match="MTP layer only"):
        mtp(torch.tensor([[1]]))
    ids = torch.arange(1, 10)[None]
    torch.testing.assert_close(main(ids).logits, both(ids).logits)
    h = both(ids).hidden_states
    torch.testing.assert_close(mtp.mtp(ids[:, 1:], h[:, :-1]).logits, both.mtp(ids[:, 1:], h[:, :-1]).logits)
    n_main = sum(p.numel() for p in main.parameters())
    n_mtp = sum(p.numel() for p in mtp.parameters())
    assert n_main + n_mtp == sum(p.numel() for p in both.parameters())


@torch.no_grad()
def test_keeping_fp8_in_memory_gives_the_dequantised_result(tiny_fp8, monkeypatch):
    monkeypatch.setenv("MTP_SPEC_KERNELS", "torch")  # the reference path; Triton's is in test_kernels.py
    deq = mtp_spec.load(tiny_fp8, keep_fp8=False)
    kept = mtp_spec.load(tiny_fp8, keep_fp8=True)
    assert kept.layers[0].attn.wq_a.weight.dtype == FP8
    ids = torch.arange(3, 30)[None]
    torch.testing.assert_close(kept(ids).logits, deq(ids).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_convert_to_bf16_dequantises_drops_scales_and_fixes_config(tmp_path, tiny_fp8):
    (tiny_fp8 / "tokenizer.json").write_text("{}")
    sharded = write_random_checkpoint(tmp_path / "s", "tiny", seed=1, max_shard_bytes=200_000)
    for src in (tiny_fp8, sharded):
        dst = convert_to_bf16(src, tmp_path / f"bf16-{src.name}")
        cfg = json.loads((dst / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
        r = CheckpointReader(dst)
        assert not any(k.endswith("_scale_inv") for k in r.keys())
        assert sorted(r.files) == sorted(CheckpointReader(src).files)
        assert r.get("model.layers.0.self_attn.q_a_proj.weight").dtype == torch.bfloat16
        ids = torch.arange(1, 12)[None]
        torch.testing.assert_close(mtp_spec.load(dst)(ids).logits, mtp_spec.load(src)(ids).logits,
                                   rtol=2e-2, atol=2e-2)
    assert (tmp_path / "bf16-tiny-fp8" / "tokenizer.json").exists()


def test_loading_uses_no_pickle(tiny_fp8, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    mtp_spec.load(tiny_fp8)


# --- bad checkpoints: each error names the file and the tensor ----------------------------------
def _copy(src, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, fn):
    f = path / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def _expect(path, *words):
    with pytest.raises(CheckpointError) as e:
        mtp_spec.load(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_tensor_is_named(tiny_fp8, tmp_path):
    p = _copy(tiny_fp8, tmp_path)
    _rewrite(p, lambda sd: sd.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    _expect(p, str(p), "model.layers.1.mlp.experts.5.up_proj.weight", "missing")


def test_unexpected_tensor_is_named(tiny_fp8, tmp_path):
    p = _copy(tiny_fp8, tmp_path)
    _rewrite(p, lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    _expect(p, "model.safetensors", "model.layers.0.mlp.extra.weight", "unexpected")


def test_shape_mismatch_is_named(tiny_fp8, tmp_path):
    p = _copy(tiny_fp8, tmp_path)
    _rewrite(p, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(7, dtype=torch.bfloat16)))
    _expect(p, "model.safetensors", "model.norm.weight", "shape")


def test_dtype_mismatch_is_named(tiny_fp8, tmp_path):
    p = _copy(tiny_fp8, tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(p, lambda sd: sd.__setitem__(name, sd[name].float().to(torch.bfloat16)))
    _expect(p, "model.safetensors", name, "BF16")
    p2 = _copy(tiny_fp8, tmp_path / "x")
    _rewrite(p2, lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"].to(FP8)))
    _expect(p2, "model.norm.weight", "F8_E4M3")


def test_missing_scale_is_named(tiny_fp8, tmp_path):
    p = _copy(tiny_fp8, tmp_path)
    _rewrite(p, lambda sd: sd.pop("model.layers.0.self_attn.q_b_proj.weight_scale_inv"))
    _expect(p, "model.layers.0.self_attn.q_b_proj.weight_scale_inv", "no scale")


def test_truncated_shard_is_named(tmp_path):
    p = write_random_checkpoint(tmp_path / "s", "tiny", seed=1, max_shard_bytes=200_000)
    shard = sorted(p.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _expect(p, shard.name, "truncated", "tensor '")


def test_corrupt_header_is_named(tiny_fp8, tmp_path):
    p = _copy(tiny_fp8, tmp_path)
    f = p / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    f.write_bytes(bytes(data))
    _expect(p, "model.safetensors", "corrupt")


def test_index_pointing_to_missing_file_is_named(tmp_path):
    p = write_random_checkpoint(tmp_path / "s", "tiny", seed=1, max_shard_bytes=200_000)
    victim = sorted(p.glob("model-*.safetensors"))[-1]
    victim.unlink()
    _expect(p, "model.safetensors.index.json", victim.name, "missing file")


def test_mtp_part_needs_an_mtp_layer(tmp_path):
    p = write_random_checkpoint(tmp_path / "v2", "tiny-v2", dtype=torch.float32)
    with pytest.raises(mtp_spec.ConfigError, match="num_nextn_predict_layers"):
        mtp_spec.load(p, part="mtp")


def test_expected_tensors_count_matches_the_671b_layout():
    names = expected_tensors(ModelArgs.from_name("deepseek-v3-671b"))
    scales = sum(1 for k in names if k.split(".")[-2] in {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                          "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert "model.layers.61.eh_proj.weight" in names and "model.layers.61.shared_head.head.weight" in names
    assert names["model.layers.61.eh_proj.weight"] == (7168, 14336)
    assert names["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert len(names) + scales == 91_991  # the published tensor count, scales included
