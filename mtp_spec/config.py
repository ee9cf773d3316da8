"""ModelArgs: one dataclass for DeepSeek-V3 and V2, read from and written to HF `config.json`.

Field names follow DeepSeek's reference `ModelArgs`; `HF_NAMES` is the mapping to the HF keys.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


class ConfigError(ValueError):
    """A config.json (or preset) that cannot describe a model; the message names the field."""


@dataclass(frozen=True)
class ModelArgs:
    model_type: str = "deepseek_v3"  # or "deepseek_v2"
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    moe_layer_freq: int = 1
    n_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # noaux_tc | greedy | group_limited_greedy
    norm_topk_prob: bool = True
    route_scale: float = 2.5
    q_lora_rank: int = 1536  # 0: a single wq
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: bool = True  # YaRN on/off
    original_seq_len: int = 4096
    rope_factor: float = 40.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_seq_len: int = 163840  # max_position_embeddings
    norm_eps: float = 1e-6
    n_mtp_layers: int = 1  # num_nextn_predict_layers
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    fp8: bool = True  # quantization_config present: e4m3 weights with 128x128 scales
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False)  # HF keys kept for a faithful rewrite

    # --- derived ---------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """HF's rule; the MTP layers (i >= n_layers) are MoE whenever the model has experts."""
        if self.n_routed_experts == 0:
            return False
        if i >= self.n_layers:
            return True
        return i >= self.n_dense_layers and i % self.moe_layer_freq == 0

    def validate(self) -> ModelArgs:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{name}': {why}")

        for f in ("vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(self, f) > 0, HF_NAMES.get(f, f), "must be > 0")
        need(self.model_type in ("deepseek_v3", "deepseek_v2"), "model_type",
             f"'{self.model_type}' is not deepseek_v3 or deepseek_v2")
        need(self.score_func in ("sigmoid", "softmax"), "scoring_func",
             f"'{self.score_func}' is not sigmoid or softmax")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
             f"'{self.topk_method}' is not noaux_tc, greedy or group_limited_greedy")
        need(not (self.topk_method == "noaux_tc" and self.score_func != "sigmoid"), "topk_method",
             "noaux_tc needs scoring_func sigmoid")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
        need(0 <= self.n_dense_layers <= self.n_layers, "first_k_dense_replace",
             f"{self.n_dense_layers} is not within [0, num_hidden_layers={self.n_layers}]")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        need(self.n_mtp_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0 or null: a single q_proj)")
        if self.n_routed_experts:
            need(self.moe_inter_dim > 0, "moe_intermediate_size", "must be > 0 with routed experts")
            need(0 < self.n_activated_experts <= self.n_routed_experts, "num_experts_per_tok",
                 f"{self.n_activated_experts} must be in [1, n_routed_experts={self.n_routed_experts}]")
            need(self.n_expert_groups >= 1 and self.n_routed_experts % self.n_expert_groups == 0,
                 "n_group", f"{self.n_expert_groups} must divide n_routed_experts={self.n_routed_experts}")
            need(1 <= self.n_limited_groups <= self.n_expert_groups, "topk_group",
                 f"{self.n_limited_groups} must be in [1, n_group={self.n_expert_groups}]")
            per_group = self.n_routed_experts // self.n_expert_groups
            need(self.n_limited_groups * per_group >= self.n_activated_experts, "topk_group",
                 f"{self.n_limited_groups} groups of {per_group} experts cannot hold "
                 f"num_experts_per_tok={self.n_activated_experts}")
            if self.topk_method == "noaux_tc":
                need(per_group >= 2, "n_group", "noaux_tc scores groups by their top-2 experts")
        if self.rope_scaling:
            need(self.rope_factor >= 1.0, "rope_scaling.factor", "must be >= 1")
            need(self.original_seq_len > 0, "rope_scaling.original_max_position_embeddings", "must be > 0")
        return self

    # --- HF config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> ModelArgs:
        cfg = dict(cfg)
        unknown = sorted(k for k in cfg if k not in _KNOWN_HF_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}")
        model_type = cfg.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: missing config field 'model_type'")
        required = _REQUIRED_V3 if model_type == "deepseek_v3" else _REQUIRED_V2
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing config field(s) {missing}")
        kw: dict = {"model_type": model_type}
        for ours, theirs in HF_NAMES.items():
            if theirs in cfg and cfg[theirs] is not None:
                kw[ours] = cfg[theirs]
        _check_types(kw, source)
        if cfg.get("q_lora_rank") is None:
            kw["q_lora_rank"] = 0
        if model_type == "deepseek_v2":
            kw.setdefault("score_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("norm_topk_prob", False)
            kw.setdefault("route_scale", 1.0)
            kw.setdefault("n_mtp_layers", 0)
            kw.setdefault("n_dense_layers", 0)
            if kw.get("topk_method") == "greedy" and "n_expert_groups" not in kw:
                kw["n_expert_groups"], kw["n_limited_groups"] = 1, 1
        heads = cfg.get("num_key_value_heads")
        if heads is not None and heads != cfg["num_attention_heads"]:
            raise ConfigError(f"{source}: config field 'num_key_value_heads' ({heads}) contradicts "
                              f"num_attention_heads ({cfg['num_attention_heads']}); MLA has one KV per head")
        if cfg.get("attention_bias"):
            raise ConfigError(f"{source}: config field 'attention_bias' true is not a DeepSeek layout")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: config field 'hidden_act' {cfg['hidden_act']!r} is not silu")
        kw.update(_read_rope(cfg, source))
        kw["fp8"] = _read_quant(cfg.get("quantization_config"), source)
        kw["torch_dtype"] = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        kw["extra"] = {k: cfg[k] for k in _PASSTHROUGH if k in cfg}
        return cls(**kw).validate()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelArgs:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"{p}: no config.json")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return cls.from_hf(cfg, source=str(p))

    def to_hf(self) -> dict:
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        cfg: dict = {"architectures": [arch], "model_type": self.model_type}
        for ours, theirs in HF_NAMES.items():
            cfg[theirs] = getattr(self, ours)
        cfg["q_lora_rank"] = self.q_lora_rank or None
        cfg["num_key_value_heads"] = self.n_heads
        cfg["hidden_act"] = "silu"
        cfg["attention_bias"] = False
        if self.model_type == "deepseek_v2" and self.n_mtp_layers == 0:
            del cfg["num_nextn_predict_layers"]
        if self.rope_scaling:
            cfg["rope_scaling"] = {
                "type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
            }
        else:
            cfg["rope_scaling"] = None
        if self.fp8:
            cfg["quantization_config"] = dict(FP8_QUANT_CONFIG)
        cfg["torch_dtype"] = self.torch_dtype
        cfg.update(self.extra)
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        from mtp_spec.checkpoint import atomic_write_text

        atomic_write_text(Path(path) / "config.json", json.dumps(self.to_hf(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; choose from {sorted(PRESETS)}")
        return PRESETS[name]

    def with_(self, **kw) -> ModelArgs:
        return replace(self, **kw).validate()

    def asdict(self) -> dict:
        return asdict(self)


# ours -> HF
HF_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "moe_layer_freq": "moe_layer_freq",
    "n_heads": "num_attention_heads", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group", "n_limited_groups": "topk_group", "score_func": "scoring_func",
    "topk_method": "topk_method", "norm_topk_prob": "norm_topk_prob",
    "route_scale": "routed_scaling_factor", "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
    "n_mtp_layers": "num_nextn_predict_layers", "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}
_INT_FIELDS = {f.name for f in fields(ModelArgs) if f.type in ("int", "int | None")}
_FLOAT_FIELDS = {f.name for f in fields(ModelArgs) if f.type == "float"}
_BOOL_FIELDS = {f.name for f in fields(ModelArgs) if f.type == "bool"}
_REQUIRED_V3 = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor"]
_REQUIRED_V2 = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim"]
# Keys HF writes that carry no architecture (or that we check separately).
_PASSTHROUGH = ["auto_map", "aux_loss_alpha", "ep_size", "seq_aux", "pretraining_tp", "use_cache",
                "initializer_range", "attention_dropout", "transformers_version", "pad_token_id"]
_KNOWN_HF_KEYS = set(HF_NAMES.values()) | set(_PASSTHROUGH) | {
    "architectures", "model_type", "num_key_value_heads", "hidden_act", "attention_bias",
    "rope_scaling", "rope_parameters", "rope_interleave", "quantization_config", "torch_dtype",
    "dtype", "mlp_bias", "head_dim", "output_router_logits", "qk_head_dim", "router_aux_loss_coef",
}
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}


def _check_types(kw: dict, source: str) -> None:
    for k, v in kw.items():
        name = HF_NAMES.get(k, k)
        if k in _BOOL_FIELDS and not isinstance(v, bool):
            raise ConfigError(f"{source}: config field '{name}' must be a bool, got {v!r}")
        if k in _INT_FIELDS and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{source}: config field '{name}' must be an integer, got {v!r}")
        if k in _FLOAT_FIELDS and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{source}: config field '{name}' must be a number, got {v!r}")
        if k in ("score_func", "topk_method") and not isinstance(v, str):
            raise ConfigError(f"{source}: config field '{name}' must be a string, got {v!r}")


def _read_rope(cfg: dict, source: str) -> dict:
    rs = cfg.get("rope_scaling")
    rp = cfg.get("rope_parameters")
    if rs is None and isinstance(rp, dict) and rp.get("rope_type", "default") != "default":
        rs = rp
    out: dict = {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        out["rope_theta"] = float(rp["rope_theta"])
    if not rs:
        out["rope_scaling"] = False
        return out
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"{source}: config field 'rope_scaling.type' is {kind!r}; only 'yarn' is supported")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ConfigError(f"{source}: missing config field 'rope_scaling.{key}'")
    out.update(rope_scaling=True, rope_factor=float(rs["factor"]),
               original_seq_len=int(rs["original_max_position_embeddings"]),
               beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
               mscale=float(rs.get("mscale") or 0), mscale_all_dim=float(rs.get("mscale_all_dim") or 0))
    return out


def _read_quant(q: dict | None, source: str) -> bool:
    if q is None:
        return False
    if q.get("quant_method") != "fp8":
        raise ConfigError(f"{source}: config field 'quantization_config.quant_method' is "
                          f"{q.get('quant_method')!r}; only 'fp8' is supported")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{source}: config field 'quantization_config.fmt' must be 'e4m3'")
    if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
        raise ConfigError(f"{source}: config field 'quantization_config.weight_block_size' must be [128, 128]")
    return True


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_V3 = ModelArgs()
PRESETS: dict[str, ModelArgs] = {
    "deepseek-v3-671b": _V3,
    "deepseek-r1-671b": _V3,
    "deepseek-v2-236b": ModelArgs(
        model_type="deepseek_v2", vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536,
        n_layers=60, n_dense_layers=1, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=8, n_limited_groups=3, score_func="softmax", topk_method="group_limited_greedy",
        norm_topk_prob=False, route_scale=16.0, mscale=0.707, mscale_all_dim=0.707, n_mtp_layers=0,
        max_seq_len=163840, bos_token_id=100000, eos_token_id=100001, fp8=False),
    "deepseek-v2-lite-16b": ModelArgs(
        model_type="deepseek_v2", vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408,
        n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
        topk_method="greedy", norm_topk_prob=False, route_scale=1.0, q_lora_rank=0, mscale=0.707,
        mscale_all_dim=0.707, n_mtp_layers=0, max_seq_len=163840, bos_token_id=100000,
        eos_token_id=100001, fp8=False),
    # The shipped model (trained by `mtp-spec train` on the stdlib) and its draft-model sibling.
    "mtp-spec-small": ModelArgs(
        vocab_size=8192, dim=256, inter_dim=768, moe_inter_dim=192, n_layers=4, n_dense_layers=1, n_heads=4,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        original_seq_len=1024, rope_factor=4.0, max_seq_len=4096, fp8=True),
    "mtp-spec-mini": ModelArgs(
        vocab_size=8192, dim=128, inter_dim=384, moe_inter_dim=96, n_layers=2, n_dense_layers=1, n_heads=2,
        n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        original_seq_len=1024, rope_factor=4.0, max_seq_len=4096, fp8=True),
    # Tiny shapes for tests: small but every code path (LoRA q, groups, dense + MoE, MTP) is live.
    "tiny": ModelArgs(
        vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=2, n_dense_layers=1,
        n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
        n_limited_groups=2, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, original_seq_len=64, rope_factor=4.0, max_seq_len=256, fp8=True),
    "tiny-v2": ModelArgs(
        model_type="deepseek_v2", vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=2,
        n_dense_layers=1, n_heads=4, n_routed_experts=8, n_shared_experts=2, n_activated_experts=2,
        n_expert_groups=1, n_limited_groups=1, score_func="softmax", topk_method="greedy",
        norm_topk_prob=False, route_scale=1.0, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, original_seq_len=64, rope_factor=4.0, mscale=0.707,
        mscale_all_dim=0.707, max_seq_len=256, n_mtp_layers=0, fp8=False),
}
