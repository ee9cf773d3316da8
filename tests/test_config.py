import json

import pytest

from mtp_spec.config import PRESETS, ConfigError, ModelArgs
from mtp_spec.model.layers import softmax_scale


@pytest.mark.parametrize("name", sorted(n for n, a in PRESETS.items() if a.family != "llama"))
def test_every_preset_round_trips_through_hf_config(name):
    args = PRESETS[name]
    back = ModelArgs.from_hf(json.loads(json.dumps(args.to_hf())))
    assert back == args


def test_v3_preset_matches_the_published_config():
    a = ModelArgs.from_name("deepseek-v3-671b")
    hf = a.to_hf()
    assert hf["hidden_size"] == 7168 and hf["num_hidden_layers"] == 61 and hf["num_nextn_predict_layers"] == 1
    assert hf["n_group"] == 8 and hf["topk_group"] == 4 and hf["routed_scaling_factor"] == 2.5
    assert hf["quantization_config"]["weight_block_size"] == [128, 128]
    assert softmax_scale(a) == pytest.approx(0.135234, rel=1e-5)  # 192^-0.5 * mscale(40)^2


def test_v2_lite_has_single_wq():
    hf = ModelArgs.from_name("deepseek-v2-lite-16b").to_hf()
    assert hf["q_lora_rank"] is None
    assert ModelArgs.from_hf(hf).q_lora_rank == 0


def _cfg():
    return ModelArgs.from_name("tiny").to_hf()


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "n_group", "model_type"])
def test_missing_field_is_named(field):
    cfg = _cfg()
    del cfg[field]
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_hf(cfg)


def test_unknown_field_is_a_warning_that_names_it():
    cfg = _cfg()
    cfg["hiden_size"] = 3
    with pytest.warns(UserWarning, match="hiden_size"):
        args = ModelArgs.from_hf(cfg)
    assert args == ModelArgs.from_name("tiny")


@pytest.mark.parametrize("field,value", [
    ("n_group", 3),  # does not divide 8 experts
    ("topk_group", 5),  # more than n_group
    ("num_experts_per_tok", 9),
    ("num_key_value_heads", 2),
    ("first_k_dense_replace", 7),
    ("scoring_func", "relu"),
])
def test_contradictory_field_is_named(field, value):
    cfg = _cfg()
    cfg[field] = value
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_hf(cfg)


def test_noaux_tc_with_softmax_is_refused():
    cfg = _cfg()
    cfg["scoring_func"] = "softmax"
    with pytest.raises(ConfigError, match="topk_method"):
        ModelArgs.from_hf(cfg)


@pytest.mark.parametrize("field,value", [("hidden_size", "128"), ("norm_topk_prob", 1), ("rms_norm_eps", "x")])
def test_wrong_type_is_named(field, value):
    cfg = _cfg()
    cfg[field] = value
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_hf(cfg)


def test_rope_and_quant_config_are_checked():
    cfg = _cfg()
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelArgs.from_hf(cfg)
    cfg = _cfg()
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    with pytest.raises(ConfigError, match="weight_block_size"):
        ModelArgs.from_hf(cfg)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        ModelArgs.from_file(tmp_path)
