"""Model arithmetic (mtp_spec/plan.py): bytes per GPU under the parallel scheme, and the speedup
projection, checked against counts derived by hand from DeepSeek-V3's shapes."""

import itertools
import json
import math

import pytest

from mtp_spec import plan
from mtp_spec.checkpoint import expected_tensors
from mtp_spec.cli import main
from mtp_spec.config import PRESETS

V3 = PRESETS["deepseek-v3-671b"]
GB = 1e9


# --- hand counts for DeepSeek-V3 671B ----------------------------------------------------------------
ATTN = (7168 * 1536 + 1536 + 24576 * 1536  # wq_a, q_a_layernorm, wq_b
        + 576 * 7168 + 512 + 32768 * 512 + 7168 * 16384  # wkv_a, kv_a_layernorm, wkv_b, wo
        + 2 * 7168)  # input and post-attention norms
DENSE = ATTN + 3 * 18432 * 7168
MOE = ATTN + 256 * 7168 + 256 + 256 * 3 * 2048 * 7168 + 3 * 2048 * 7168  # router, bias, experts, shared
MAIN = 2 * 129280 * 7168 + 7168 + 3 * DENSE + 58 * MOE  # embed + head, final norm, 3 dense + 58 MoE layers
MTP = MOE + 2 * 129280 * 7168 + 3 * 7168 + 7168 * 14336  # own embed + head, enorm/hnorm/head norm, eh_proj


def test_parameter_counts_of_deepseek_v3_match_the_hand_count():
    groups = plan.weight_groups(V3)
    main_params = sum(plan.params([w for w in groups if not w.mtp]).values())
    mtp_params = sum(plan.params([w for w in groups if w.mtp]).values())
    assert main_params == MAIN == 671_026_419_200  # README_WEIGHTS: 671B main
    assert mtp_params == MTP  # 11.5B unique + the 2 x 0.93B embedding and head copies
    # what expected_tensors(deepseek-v3-671b) sums to (building it on meta takes ~15 s, so not here)
    assert main_params + mtp_params == 684_489_845_504


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2", "mtp-spec-small", "deepseek-v2-lite-16b"])
def test_parameter_total_matches_the_checkpoint_shapes(preset):
    args = PRESETS[preset]
    want = sum(math.prod(s) for s in expected_tensors(args).values())
    assert sum(plan.params(plan.weight_groups(args)).values()) == want


def test_per_rank_bytes_on_8_gpus_match_the_hand_count():
    p = plan.make_plan(V3, plan.parse_gpus("8xH200"), batch=8, context=16384)
    moe_layers, local = 58, 256 // 8
    expert = 3 * 7168 * 2048  # e4m3: one byte each
    expert_scales = (2 * 16 * 56 + 56 * 16) * 4  # float32 per 128x128 block of w1, w3 (2048x7168) and w2
    assert p.main_bytes["routed_experts"] == moe_layers * local * (expert + expert_scales)
    assert p.mtp_bytes["routed_experts"] == local * (expert + expert_scales)
    rows = 129280 // 8 * 7168 * 2  # vocabulary rows of the bf16 embedding and head
    assert p.main_bytes["embed"] == p.main_bytes["head"] == p.mtp_bytes["embed"] == p.mtp_bytes["head"] == rows
    assert p.mtp_bytes["mtp_input"] == 7168 * 14336 * 2  # eh_proj, bf16, replicated
    router = moe_layers * (256 * 7168 * 2 + 256 * 4)  # bf16 gate, fp32 e_score_correction_bias
    assert p.main_bytes["router"] == router
    # heads split: wq_b (24576 rows) and wkv_b (32768 rows) by rows, wo by columns; wq_a and wkv_a whole
    fp8 = lambda r, c: r * c + 4 * -(-r // 128) * -(-c // 128)
    attn = fp8(1536, 7168) + fp8(24576 // 8, 1536) + fp8(576, 7168) + fp8(32768 // 8, 512) + fp8(7168, 16384 // 8)
    assert p.main_bytes["attention"] == 61 * attn
    assert p.kv == 8 * 16384 * 62 * 576 * 2  # latent + rope key, bf16, 61 main layers + the MTP layer
    assert 8 * 16384 * 61 * 576 * 2 / GB == pytest.approx(9.2, abs=0.05)  # the reference's defaults: ~9.2 GB


def test_the_whole_fp8_checkpoint_is_about_689_gb():
    # 671B + 14B MTP parameters, FP8 projections with their scales: ~688.6 GB, the size usually quoted
    # for the HF shards (not re-checked against the index here)
    assert sum(plan.weight_bytes(plan.weight_groups(V3), 1, "fp8").values()) / GB == pytest.approx(688.6, abs=0.5)
    bf16 = sum(plan.weight_bytes(plan.weight_groups(V3), 1, "bf16").values())
    assert bf16 == 2 * (MAIN + MTP) + 2 * 58 * 256 + 2 * 256  # every tensor 2 bytes; the biases are fp32


def test_671b_fp8_does_not_fit_8xh100_but_fits_8xh200_16xh100_8xb200():
    kw = dict(batch=4, context=8192)
    h100 = plan.make_plan(V3, plan.parse_gpus("8xH100"), **kw)
    assert not h100.fits and sum(h100.main_bytes.values()) > h100.usable  # the weights alone exceed 72 GB
    fits = {p.cluster.name: p.fits for p in plan.known_plans(V3, **kw)}
    assert fits == {"8xH100": False, "16xH100": True, "8xH200": True, "8xB200": True}


def test_leaving_out_the_mtp_layer_drops_its_weights_and_its_cache_layer():
    with_mtp = plan.make_plan(V3, plan.parse_gpus("8xH200"))
    without = plan.make_plan(V3, plan.parse_gpus("8xH200"), with_mtp=False)
    assert without.mtp_bytes == {} and without.kv_layers == 61 and with_mtp.kv_layers == 62
    assert with_mtp.total - without.total == sum(with_mtp.mtp_bytes.values()) + with_mtp.kv - without.kv


@pytest.mark.parametrize("spec, n, mem", [("8xH200", 8, 141e9), ("16xH100", 16, 80e9), ("8xB200", 8, 180e9),
                                          ("8x96GB", 8, 96e9), ("4x80GiB", 4, 80 * 2**30), ("2X40.5gb", 2, 40.5e9)])
def test_gpu_specs_parse(spec, n, mem):
    c = plan.parse_gpus(spec)
    assert (c.n, c.gpu.mem_bytes) == (n, mem)


@pytest.mark.parametrize("spec", ["8xA100", "H200", "x80GB", "0xH100", "8xH200x", "", "8x-5GB", "8x80TB", "8x0GB"])
def test_bad_gpu_specs_are_refused_naming_the_flag(spec):
    with pytest.raises(ValueError, match="--gpus"):
        plan.parse_gpus(spec)


def test_a_world_size_that_does_not_split_heads_and_experts_is_refused():
    with pytest.raises(ValueError, match="--gpus: 3 GPUs cannot split 128 attention heads"):
        plan.make_plan(V3, plan.parse_gpus("3xH100"))


# --- projection ----------------------------------------------------------------------------------------
def test_expected_tokens_per_step():
    p = [0.8, 0.6, 0.45]
    assert plan.expected_tokens(p, 0) == 1.0
    assert plan.expected_tokens(p, 1) == pytest.approx(1.8)
    assert plan.expected_tokens(p, 3) == pytest.approx(1 + 0.8 + 0.8 * 0.6 + 0.8 * 0.6 * 0.45)
    assert plan.expected_tokens(p, 4) == pytest.approx(plan.expected_tokens(p, 3) + 0.8 * 0.6 * 0.45 ** 2)


def test_distinct_experts_is_the_exact_expectation_of_uniform_top_k():
    n, top = 6, 2
    picks = list(itertools.combinations(range(n), top))
    for tokens in (1, 2, 3):
        exact = sum(len(set().union(*c)) for c in itertools.product(picks, repeat=tokens)) / len(picks) ** tokens
        assert plan.distinct_experts(n, top, tokens) == pytest.approx(exact)
    assert plan.distinct_experts(256, 8, 1) == pytest.approx(8)
    assert plan.distinct_experts(256, 8, 10_000) == pytest.approx(256)


def test_projection_from_a_measured_table():
    costs = plan.MeasuredCosts.from_json({"device": "test", "verify": [[1, 1, 1.0], [2, 1, 1.1], [3, 1, 1.2]],
                                          "draft": [[1, 0.1]]})
    cells = {c.k: c for c in plan.project(costs, [0.8, 0.5], range(4), costs.batches)}
    assert set(cells) == {0, 1, 2}  # k=3 needs verify(4, 1), which the table lacks
    assert cells[0].speedup == pytest.approx(1.0)
    assert cells[1].speedup == pytest.approx(1.8 / 1.2)
    assert cells[2].speedup == pytest.approx(2.2 / 1.4)
    with_host = {c.k: c for c in plan.project(costs, [0.8, 0.5], [1], [1], overhead_s=0.5)}
    assert with_host[1].speedup == pytest.approx(1.8 / 1.7 * 1.5)  # the host time lands on both steps
    # with extends (as `mtp-spec run` measures them): extend(k + 1) + (k - 1) draft steps
    costs = plan.MeasuredCosts.from_json({"device": "test", "verify": [[1, 1, 1.0], [2, 1, 1.1], [3, 1, 1.2]],
                                          "draft": [[1, 0.1]], "extend": [[2, 1, 0.3], [3, 1, 0.2]]})
    cells = {c.k: c for c in plan.project(costs, [0.8, 0.5], range(3), [1])}
    assert cells[1].speedup == pytest.approx(1.8 / 1.4) and cells[2].speedup == pytest.approx(2.2 / 1.5)


def test_acceptance_pools_runs_of_different_k_per_position(tmp_path):
    recs = [{"strategy": "mtp", "k": 1, "temperature": 0.0, "num_drafts": 10, "accepted_per_pos": [8]},
            {"strategy": "mtp", "k": 2, "temperature": 0.0, "num_drafts": 10, "accepted_per_pos": [6, 3]},
            {"strategy": "vanilla", "k": 0, "temperature": 0.0, "num_drafts": 0, "accepted_per_pos": []}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    acc = plan.acceptance_from_run(tmp_path)
    assert acc.cond == pytest.approx([14 / 20, 3 / 6]) and acc.num_drafts == 20


def test_bad_projection_inputs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="--acceptance"):
        plan.parse_acceptance("0.8,1.2")
    with pytest.raises(ValueError, match="--run"):
        plan.acceptance_from_run(tmp_path)
    with pytest.raises(ValueError, match="'verify' row"):
        plan.MeasuredCosts.from_json({"device": "x", "verify": [[1, 1, -1]], "draft": [[1, 0.1]]})
    with pytest.raises(ValueError, match="no n_tokens = 1 entry"):
        plan.MeasuredCosts.from_json({"device": "x", "verify": [[2, 1, 1.0]], "draft": [[1, 0.1]]})
    with pytest.raises(ValueError, match="--gpus 8x96GB"):
        plan.BandwidthModel(V3, plan.parse_gpus("8x96GB"))


def test_bandwidth_model_plain_decode_reads_the_stated_bytes():
    m = plan.BandwidthModel(V3, plan.parse_gpus("8xH200"), context=4096, efficiency=1.0, collective_s=0.0)
    p = plan.make_plan(V3, plan.parse_gpus("8xH200"), batch=1, context=4096)
    # one token: 8 of 256 experts per layer (1/32 of the rank's 32), every other weight but the embedding
    weights = sum(b for k, b in p.main_bytes.items() if k not in ("routed_experts", "embed"))
    read = weights + p.main_bytes["routed_experts"] / 32 + 7168 * 2 + 4096 * 61 * 576 * 2
    assert m.verify_s(1, 1) == pytest.approx(read / 4.8e12)
    assert m.verify_s(2, 1) > m.verify_s(1, 1) > m.draft_s(1)


# --- the CLI -----------------------------------------------------------------------------------------
def test_cli_plan_says_8xh100_does_not_fit_and_lists_what_does(capsys):
    assert main(["plan", "--model", "deepseek-v3-671b", "--gpus", "8xH100"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT on 8xH100" in out
    assert "fit: 16xH100, 8xH200, 8xB200; do not fit: 8xH100" in out
    assert main(["plan", "--model", "deepseek-v3-671b", "--gpus", "8xH200", "--batch", "4"]) == 0
    assert "FITS on 8xH200" in capsys.readouterr().out


def test_cli_plan_reads_a_checkpoint_dir_and_refuses_bad_gpus(tmp_path, capsys):
    PRESETS["tiny"].save(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--gpus", "4x1GB", "--context", "128"]) == 0
    assert "FITS on 4x1GB" in capsys.readouterr().out
    assert main(["plan", "--model", "deepseek-v3-671b", "--gpus", "8xA100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtp-spec: error: --gpus '8xA100'") and err.count("\n") == 1


def test_cli_project_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "proj.json"
    assert main(["project", "--acceptance", "0.8,0.6", "--batches", "1,8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "assumptions:" in text and "uniform routing" in text
    rows = json.loads(out.read_text())["rows"]
    assert {(r["k"], r["batch"]) for r in rows} == {(k, b) for k in range(5) for b in (1, 8)}
    assert all(r["speedup"] == pytest.approx(1.0) for r in rows if r["k"] == 0)
    assert main(["project", "--gpus", "8xH200"]) == 2
    assert "--run" in capsys.readouterr().err
