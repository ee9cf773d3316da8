"""ModelArgs: one dataclass for DeepSeek-V3 and V2, read from and written to HF `config.json`.

Field names follow DeepSeek's reference `ModelArgs`; `HF_NAMES` is the mapping to the HF keys.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from mtp_spec.io import atomic_write_text


class ConfigError(ValueError):
    """A config.json (or preset) that cannot describe a model; the message names the field."""


@dataclass(frozen=True)
class ModelArgs:
    model_type: str = "deepseek_v3"  # or "deepseek_v2", or "kimi_k2" (the V3 architecture, other sizes)
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
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json read, for rewrites

    # --- derived ---------------------------------------------------------------
    @property
    def family(self) -> str:
        """The architecture: 'deepseek_v3' or 'deepseek_v2' (kimi_k2 is the V3 architecture)."""
        return "deepseek_v2" if self.model_type == "deepseek_v2" else "deepseek_v3"

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
        need(self.model_type in MODEL_TYPES, "model_type",
             f"'{self.model_type}' is not one of {', '.join(MODEL_TYPES)}")
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
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        raw, cfg = cfg, dict(cfg)
        model_type = cfg.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: missing config field 'model_type'")
        check_model_type(cfg, source)
        unknown = sorted(k for k in cfg if k not in _KNOWN_HF_KEYS)
        if unknown:  # as transformers does: newer releases and fine-tunes add keys; keep and ignore them
            warnings.warn(f"{source}: ignoring config field(s) mtp-spec does not know: {', '.join(unknown)}",
                          stacklevel=2)
        required = _REQUIRED_V2 if model_type == "deepseek_v2" else _REQUIRED_V3
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
        kw["raw"] = raw
        return cls(**kw).validate()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelArgs:
        return cls.from_hf(read_config_json(path), source=str(config_path(path)))

    def to_hf(self) -> dict:
        """The HF config.json. A config that was read from a file is rewritten key for key: every
        original key and value stays, and only the keys of fields that changed are rewritten."""
        fresh = self._fresh_hf()
        if not self.raw:
            return fresh
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = ModelArgs.from_hf(self.raw)
        out = json.loads(json.dumps(self.raw))  # a deep copy
        for f in fields(self):
            if f.name == "raw" or getattr(self, f.name) == getattr(before, f.name):
                continue
            if f.name in HF_NAMES:
                out[HF_NAMES[f.name]] = fresh[HF_NAMES[f.name]]
            elif f.name == "fp8":
                out.pop("quantization_config", None)
                if self.fp8:
                    out["quantization_config"] = fresh["quantization_config"]
            elif f.name == "torch_dtype":
                for key in ("torch_dtype", "dtype"):
                    if key in out or key == "torch_dtype":
                        out[key] = self.torch_dtype
            elif f.name in _ROPE_FIELDS:
                rs = out.get("rope_scaling") if isinstance(out.get("rope_scaling"), dict) else None
                if rs is None or not self.rope_scaling:
                    out["rope_scaling"] = fresh["rope_scaling"]
                else:
                    for key, value in (fresh["rope_scaling"] or {}).items():
                        if key != "type":
                            rs[key] = value
            else:
                out[f.name] = fresh.get(f.name, getattr(self, f.name))
        return out

    def _fresh_hf(self) -> dict:
        arch = "DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"
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
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path) / "config.json", json.dumps(self.to_hf(), indent=2) + "\n")

    @staticmethod
    def from_name(name: str) -> ModelArgs | LlamaArgs:
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
_REQUIRED_V3 = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor"]
_REQUIRED_V2 = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim"]
# Keys we read and check (or know to carry no architecture); other keys are kept and ignored, with a warning.
_KNOWN_HF_KEYS = set(HF_NAMES.values()) | {
    "architectures", "model_type", "num_key_value_heads", "hidden_act", "attention_bias",
    "rope_scaling", "rope_parameters", "rope_interleave", "quantization_config", "torch_dtype",
    "dtype", "mlp_bias", "head_dim", "output_router_logits", "qk_head_dim", "router_aux_loss_coef",
    "auto_map", "aux_loss_alpha", "ep_size", "seq_aux", "pretraining_tp", "use_cache", "initializer_range",
    "attention_dropout", "transformers_version", "pad_token_id", "scale_fmt",
}
_ROPE_FIELDS = {"rope_scaling", "rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim"}
MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
# Model types of DeepSeek's lineage whose architecture differs: say what is missing.
_NOT_IMPLEMENTED = {
    "deepseek_v32": "DeepSeek-V3.2's sparse attention (the lightning indexer: index_n_heads, index_head_dim, "
                    "index_topk) is not implemented",
    "deepseek": "DeepSeek-MoE v1 (softmax gate without MLA) is not implemented",
}


def check_model_type(cfg: dict, source: str) -> None:
    """Accept the DeepSeek-V3/V2 architectures (kimi_k2 included); refuse others with what they lack."""
    mt = cfg.get("model_type")
    if mt in _NOT_IMPLEMENTED:
        raise ConfigError(f"{source}: config field 'model_type' is {mt!r}: {_NOT_IMPLEMENTED[mt]}")
    if mt not in MODEL_TYPES:
        raise ConfigError(f"{source}: config field 'model_type' is {mt!r}; mtp-spec runs "
                          f"{', '.join(MODEL_TYPES)} (the DeepSeek-V3/V2 architectures) and llama")
    archs = cfg.get("architectures") or []
    if mt == "kimi_k2" and archs and "DeepseekV3ForCausalLM" not in archs:
        raise ConfigError(f"{source}: model_type 'kimi_k2' with architectures {archs}: only the "
                          "DeepseekV3ForCausalLM architecture is supported")


def config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / "config.json" if p.is_dir() else p


def read_config_json(path: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint directory (or the file itself), with named errors."""
    p = config_path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no config.json" if p.name == "config.json" else f"{p}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}


def _check_types(kw: dict, source: str, names: dict | None = None, cls: type | None = None) -> None:
    names = HF_NAMES if names is None else names
    cls = cls or ModelArgs
    types = {f.name: f.type for f in fields(cls)}
    for k, v in kw.items():
        name = names.get(k, k)
        kind = types.get(k)
        if kind == "bool" and not isinstance(v, bool):
            raise ConfigError(f"{source}: config field '{name}' must be a bool, got {v!r}")
        if kind in ("int", "int | None") and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{source}: config field '{name}' must be an integer, got {v!r}")
        if kind == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ConfigError(f"{source}: config field '{name}' must be a finite number, got {v!r}")
        if k in ("score_func", "topk_method") and not isinstance(v, str):
            raise ConfigError(f"{source}: config field '{name}' must be a string, got {v!r}")


def _read_rope(cfg: dict, source: str) -> dict:
    rs = cfg.get("rope_scaling")
    rp = cfg.get("rope_parameters")
    for key, v in (("rope_scaling", rs), ("rope_parameters", rp)):
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{source}: config field '{key}' must be an object or null, got {v!r}")
    if rs is None and rp is not None and rp.get("rope_type", "default") != "default":
        rs = rp
    out: dict = {}
    if rp is not None and "rope_theta" in rp:
        out["rope_theta"] = _number(rp["rope_theta"], "rope_parameters.rope_theta", source)
    if not rs:
        out["rope_scaling"] = False
        return out
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"{source}: config field 'rope_scaling.type' is {kind!r}; only 'yarn' is supported")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ConfigError(f"{source}: missing config field 'rope_scaling.{key}'")
    num = lambda key, default: _number(rs.get(key) or default, f"rope_scaling.{key}", source)
    orig = rs["original_max_position_embeddings"]
    if isinstance(orig, bool) or not isinstance(orig, int):
        raise ConfigError(f"{source}: config field 'rope_scaling.original_max_position_embeddings' must be an "
                          f"integer, got {orig!r}")
    out.update(rope_scaling=True, rope_factor=num("factor", 1.0), original_seq_len=orig,
               beta_fast=num("beta_fast", 32), beta_slow=num("beta_slow", 1), mscale=num("mscale", 0),
               mscale_all_dim=num("mscale_all_dim", 0))
    return out


def _number(v, name: str, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{source}: config field '{name}' must be a finite number, got {v!r}")
    return float(v)


def _read_quant(q: dict | None, source: str) -> bool:
    if q is None:
        return False
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: config field 'quantization_config' must be an object, got {q!r}")
    if q.get("quant_method") != "fp8":
        raise ConfigError(f"{source}: config field 'quantization_config.quant_method' is "
                          f"{q.get('quant_method')!r}; only 'fp8' is supported")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{source}: config field 'quantization_config.fmt' must be 'e4m3'")
    block = q.get("weight_block_size", [128, 128])
    if not isinstance(block, list) or block != [128, 128]:
        raise ConfigError(f"{source}: config field 'quantization_config.weight_block_size' must be [128, 128]")
    return True


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_V3 = ModelArgs()
PRESETS: dict[str, ModelArgs | LlamaArgs] = {
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


# --- the Llama family (SmolLM2 and its kin) -------------------------------------------------------------
@dataclass(frozen=True)
class LlamaArgs:
    """A Llama-family decoder: GQA attention with RoPE (rotate-half layout), SwiGLU MLP, RMSNorm,
    optionally tied embeddings. Its MTP layer (DeepSeek's structure with a Llama block) is not in
    config.json: it lives in the checkpoint's `mtp.safetensors`, whose metadata sets n_mtp_layers."""

    model_type: str = "llama"
    vocab_size: int = 49152
    dim: int = 576
    inter_dim: int = 1536
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    torch_dtype: str = "bfloat16"
    n_mtp_layers: int = 0
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    family = "llama"
    fp8 = False

    def validate(self) -> LlamaArgs:
        for f in ("vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"config field '{_LLAMA_NAMES.get(f, f)}': must be > 0")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config field 'num_key_value_heads': {self.n_kv_heads} does not divide "
                              f"num_attention_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError("config field 'head_dim': must be even (RoPE rotates pairs)")
        return self

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> LlamaArgs:
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing config field(s) {missing}")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ConfigError(f"{source}: config field '{key}' true is not supported for llama")
        rs = cfg.get("rope_scaling")
        if rs and not _default_rope(rs):
            raise ConfigError(f"{source}: config field 'rope_scaling' = {rs!r} is not supported for llama "
                              "(only plain RoPE)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: config field 'hidden_act' {cfg['hidden_act']!r} is not silu")
        kw: dict = {}
        for ours, theirs in _LLAMA_NAMES.items():
            if cfg.get(theirs) is not None:
                kw[ours] = cfg[theirs]
        kw.setdefault("n_kv_heads", kw["n_heads"])
        kw.setdefault("head_dim", kw["dim"] // kw["n_heads"])
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        _check_types(kw, source, _LLAMA_NAMES, LlamaArgs)
        kw["rope_theta"] = float(kw.get("rope_theta", 10000.0))
        kw["norm_eps"] = float(kw.get("norm_eps", 1e-6))
        kw["torch_dtype"] = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        return cls(**kw, raw=cfg).validate()

    def to_hf(self) -> dict:
        out = json.loads(json.dumps(self.raw)) if self.raw else {"architectures": ["LlamaForCausalLM"],
                                                                 "model_type": "llama", "hidden_act": "silu"}
        for ours, theirs in _LLAMA_NAMES.items():
            out[theirs] = getattr(self, ours)
        out["torch_dtype"] = self.torch_dtype
        return out

    def with_(self, **kw) -> LlamaArgs:
        return replace(self, **kw).validate()

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path) / "config.json", json.dumps(self.to_hf(), indent=2) + "\n")


_LLAMA_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}


def _default_rope(rs) -> bool:
    return isinstance(rs, dict) and rs.get("rope_type", rs.get("type", "default")) == "default"


def args_from_hf(cfg: dict, source: str = "config.json") -> ModelArgs | LlamaArgs:
    """Model arguments from an HF config dict, by its model_type."""
    if isinstance(cfg, dict) and cfg.get("model_type") == "llama":
        return LlamaArgs.from_hf(cfg, source)
    return ModelArgs.from_hf(cfg, source)


def read_args(path: str | os.PathLike) -> ModelArgs | LlamaArgs:
    """The model arguments of a checkpoint directory, by its config.json's model_type."""
    return args_from_hf(read_config_json(path), str(config_path(path)))


PRESETS["smollm2-135m"] = LlamaArgs()  # the real model's shapes (its weights come from the GGUF import)
PRESETS["tiny-llama"] = LlamaArgs(vocab_size=512, dim=128, inter_dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                  head_dim=32, max_seq_len=256, n_mtp_layers=1)
