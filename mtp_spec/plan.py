"""Model arithmetic: how many bytes a DeepSeek-V3-family model holds and reads, per GPU.

    plan      do the weights, the MTP layer, the KV cache and the activations fit on N GPUs?
    project   what decode speedup does MTP speculation give at draft length k and batch b, from a
              run's per-position acceptance and a cost per forward (a measured table, or a model of
              the bytes a step reads over the HBM bandwidth)?

Both count from the config, tensor by tensor (`weight_groups`), under the parallel scheme of issue 13
(world size N):
  - embedding and output head split by vocabulary rows (the MTP layer's own embed_tokens and
    shared_head.head too): each rank holds vocab/N rows;
  - MLA split by heads: wq_b (or wq) and wkv_b by output rows, wo by input columns; wq_a, wkv_a and
    their norms replicated; the latent KV cache is replicated (heads split, the latent is shared);
  - the dense MLP and the shared experts split like it (w1, w3 by rows, w2 by columns);
  - routed experts partitioned by index: each rank holds n_routed_experts/N whole experts;
  - router, e_score_correction_bias, every norm, eh_proj, enorm, hnorm replicated.
Bytes: FP8 weights keep e4m3 projections (1 byte) plus float32 scales per 128x128 block; everything
else is bf16, e_score_correction_bias float32. GB here is 1e9 bytes, as GPU memory is quoted.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtp_spec.config import ModelArgs
from mtp_spec.decoding.cost import CostModel, expected_tokens

GB = 1e9
GIB = 2**30
DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}
BLOCK = 128  # FP8 scale block (weight_block_size [128, 128])


# --- GPUs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    name: str
    mem_bytes: float
    hbm_tbs: float | None = None  # HBM bandwidth, TB/s
    bf16_tflops: float | None = None  # dense (no sparsity)
    fp8_tflops: float | None = None


# NVIDIA datasheets (SXM parts), as usually quoted; dense tensor-core rates, no sparsity.
# H100: 80 GB HBM3, 3.35 TB/s. H200: 141 GB HBM3e, 4.8 TB/s, H100's compute.
# B200: 180 GB HBM3e (DGX/HGX B200: 1,440 GB over 8 GPUs), 8 TB/s.
GPUS = {
    "H100": GPU("H100", 80e9, 3.35, 989.0, 1979.0),
    "H200": GPU("H200", 141e9, 4.8, 989.0, 1979.0),
    "B200": GPU("B200", 180e9, 8.0, 2250.0, 4500.0),
}
KNOWN_CLUSTERS = ("8xH100", "16xH100", "8xH200", "8xB200")


@dataclass(frozen=True)
class Cluster:
    n: int
    gpu: GPU

    @property
    def name(self) -> str:
        return f"{self.n}x{self.gpu.name}"


def parse_gpus(spec: str, flag: str = "--gpus") -> Cluster:
    """`8xH200`, `16xH100`, or a custom memory per GPU: `8x96GB` (1e9 bytes) or `4x80GiB`."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\S+)\s*", spec or "")
    want = (f"{flag} {spec!r}: expected NxGPU with GPU one of {', '.join(GPUS)} or a memory per GPU "
            "such as 96GB or 80GiB, e.g. 8xH200 or 8x96GB")
    if not m:
        raise ValueError(want)
    n, kind = int(m[1]), m[2]
    if n < 1:
        raise ValueError(f"{flag} {spec!r}: the number of GPUs must be >= 1")
    if kind.upper() in GPUS:
        return Cluster(n, GPUS[kind.upper()])
    mem = re.fullmatch(r"(\d+(?:\.\d+)?)(GB|GiB)", kind, flags=re.IGNORECASE)
    if not mem:
        raise ValueError(want)
    size = float(mem[1]) * (GIB if mem[2].lower() == "gib" else GB)
    if size <= 0:
        raise ValueError(f"{flag} {spec!r}: the memory per GPU must be > 0")
    return Cluster(n, GPU(kind, size))


# --- the model's tensors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """`copies` tensors of one shape (the same tensor in every layer, or in every expert)."""

    part: str  # embed, attention, dense_mlp, shared_experts, routed_experts, router, norms, head, mtp_input
    shape: tuple[int, ...]
    copies: int
    kind: str  # "proj": an FP8 projection (e4m3 + block scales in FP8 weights); "bf16"; "fp32"
    split: str  # "rep" (replicated), "rows" (output rows / vocab), "cols" (input columns), "experts"
    mtp: bool = False


def weight_groups(args: ModelArgs, mtp: bool = True) -> list[Weights]:
    """Every tensor of the checkpoint, grouped; `mtp` adds the MTP layers (own embedding and head)."""
    if args.family == "llama":
        raise ValueError(f"model_type {args.model_type!r}: the planner models the DeepSeek-V3/V2 architecture "
                         "(MLA + MoE) only")
    d, v = args.dim, args.vocab_size
    moe = sum(args.is_moe_layer(i) for i in range(args.n_layers))
    out = [Weights("embed", (v, d), 1, "bf16", "rows"), *_blocks(args, args.n_layers - moe, moe),
           Weights("norms", (d,), 1, "bf16", "rep"), Weights("head", (v, d), 1, "bf16", "rows")]
    n = args.n_mtp_layers if mtp else 0
    if n:
        own = [Weights("embed", (v, d), n, "bf16", "rows"), Weights("norms", (d,), 3 * n, "bf16", "rep"),
               Weights("mtp_input", (d, 2 * d), n, "bf16", "rep"), Weights("head", (v, d), n, "bf16", "rows")]
        dense_mtp = 0 if args.n_routed_experts else n  # MTP layers are MoE whenever the model has experts
        out += [_as_mtp(w) for w in own + _blocks(args, dense_mtp, n - dense_mtp)]
    return out


def _as_mtp(w: Weights) -> Weights:
    return Weights(w.part, w.shape, w.copies, w.kind, w.split, mtp=True)


def _blocks(args: ModelArgs, dense: int, moe: int) -> list[Weights]:
    """`dense` dense-MLP blocks and `moe` MoE blocks: MLA, FFN, and their norms."""
    d, h, n = args.dim, args.n_heads, dense + moe
    w = lambda part, shape, copies, kind, split: Weights(part, shape, copies, kind, split)
    out = [w("norms", (d,), 2 * n, "bf16", "rep")]  # attn_norm, ffn_norm
    if args.q_lora_rank:
        out += [w("attention", (args.q_lora_rank, d), n, "proj", "rep"),
                w("norms", (args.q_lora_rank,), n, "bf16", "rep"),
                w("attention", (h * args.qk_head_dim, args.q_lora_rank), n, "proj", "rows")]
    else:
        out.append(w("attention", (h * args.qk_head_dim, d), n, "proj", "rows"))
    out += [w("attention", (args.kv_lora_rank + args.qk_rope_head_dim, d), n, "proj", "rep"),
            w("norms", (args.kv_lora_rank,), n, "bf16", "rep"),
            w("attention", (h * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank), n, "proj", "rows"),
            w("attention", (d, h * args.v_head_dim), n, "proj", "cols")]
    if dense:
        out += [w("dense_mlp", (args.inter_dim, d), 2 * dense, "proj", "rows"),
                w("dense_mlp", (d, args.inter_dim), dense, "proj", "cols")]
    if moe:
        e, f = args.n_routed_experts, args.moe_inter_dim
        out.append(w("router", (e, d), moe, "bf16", "rep"))
        if args.topk_method == "noaux_tc":
            out.append(w("router", (e,), moe, "fp32", "rep"))
        out += [w("routed_experts", (f, d), 2 * moe * e, "proj", "experts"),
                w("routed_experts", (d, f), moe * e, "proj", "experts")]
        if args.n_shared_experts:
            s = args.n_shared_experts * f
            out += [w("shared_experts", (s, d), 2 * moe, "proj", "rows"),
                    w("shared_experts", (d, s), moe, "proj", "cols")]
    return out


def check_world(args: ModelArgs, world: int, flag: str = "--gpus") -> None:
    """The scheme splits heads and routed experts evenly; other splits round up."""
    if args.n_heads % world or (args.n_routed_experts and args.n_routed_experts % world):
        raise ValueError(f"{flag}: {world} GPUs cannot split {args.n_heads} attention heads and "
                         f"{args.n_routed_experts} routed experts evenly (the parallel scheme needs both)")


def _rank_shape(w: Weights, world: int) -> tuple[int, int, int]:
    """(copies, rows, cols) that one rank holds; 1-D tensors are (n, 1)."""
    rows, cols = (w.shape[0], w.shape[1]) if len(w.shape) == 2 else (w.shape[0], 1)
    copies = w.copies
    if w.split == "rows":
        rows = -(-rows // world)
    elif w.split == "cols":
        cols = -(-cols // world)
    elif w.split == "experts":
        copies //= world
    return copies, rows, cols


def params(groups: Sequence[Weights], world: int = 1) -> dict[str, int]:
    """Parameters per part on one rank (world 1: the whole model), scales excluded."""
    out: dict[str, int] = {}
    for w in groups:
        c, r, k = _rank_shape(w, world)
        out[w.part] = out.get(w.part, 0) + c * r * k
    return out


def weight_bytes(groups: Sequence[Weights], world: int = 1, weights: str = "fp8") -> dict[str, int]:
    """Bytes per part on one rank. FP8: e4m3 projections plus a float32 scale per 128x128 block of
    the rank's slice (a slice that cuts a block keeps a whole scale row); bf16: all dequantised."""
    if weights not in ("fp8", "bf16"):
        raise ValueError(f"--weights {weights!r}: expected fp8 or bf16")
    out: dict[str, int] = {}
    for w in groups:
        c, r, k = _rank_shape(w, world)
        if w.kind == "proj" and weights == "fp8":
            n = c * r * k + 4 * c * -(-r // BLOCK) * -(-k // BLOCK)
        else:
            n = c * r * k * (4 if w.kind == "fp32" else 2)
        out[w.part] = out.get(w.part, 0) + n
    return out


def kv_bytes(args: ModelArgs, batch: int, context: int, layers: int, kv_dtype: str = "bf16") -> int:
    """The MLA cache: the latent (kv_lora_rank) and the roped key (qk_rope_head_dim) per token and
    layer, the same on every rank."""
    return batch * context * layers * (args.kv_lora_rank + args.qk_rope_head_dim) * DTYPE_BYTES[kv_dtype]


def activation_bytes(args: ModelArgs, world: int, tokens: int, context: int, logit_rows: int) -> int:
    """One forward's working set on a rank, one layer alive at a time (inference frees the rest):
    bf16 tensors per token (residual, normed input, query path, absorbed queries, attention outputs,
    the MLP's w1/w3 outputs and product, routed-expert rows counted as if all top-k land on this rank),
    plus attention scores and probabilities in fp32 over the whole context (this repo's attention
    materialises them; a fused kernel would not), plus the gathered fp32 logits of `logit_rows`."""
    h = args.n_heads // world
    q = (args.q_lora_rank or 0) + h * args.qk_head_dim + h * (args.kv_lora_rank + args.qk_rope_head_dim)
    mlp = 3 * max(-(-args.inter_dim // world), args.n_activated_experts * args.moe_inter_dim)
    per_token = 2 * (4 * args.dim + q + h * (args.kv_lora_rank + args.v_head_dim) + mlp)
    return tokens * per_token + 2 * 4 * tokens * h * context + 4 * logit_rows * args.vocab_size


# --- plan -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    cluster: Cluster
    batch: int
    context: int
    weights: str
    kv_dtype: str
    with_mtp: bool
    reserve: float
    prefill_chunk: int
    k: int
    main_bytes: dict[str, int]
    mtp_bytes: dict[str, int]
    kv: int
    kv_layers: int
    activations: int
    act_phase: str

    @property
    def total(self) -> int:
        return sum(self.main_bytes.values()) + sum(self.mtp_bytes.values()) + self.kv + self.activations

    @property
    def usable(self) -> float:
        return self.cluster.gpu.mem_bytes * (1 - self.reserve)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def make_plan(args: ModelArgs, cluster: Cluster, batch: int = 8, context: int = 16384, weights: str = "fp8",
              with_mtp: bool = True, kv_dtype: str = "bf16", reserve: float = 0.10, prefill_chunk: int = 2048,
              k: int = 3, model: str = "") -> Plan:
    """Per-rank bytes for serving `batch` sequences of `context` tokens on `cluster`."""
    for flag, value in (("--batch", batch), ("--context", context), ("--prefill-chunk", prefill_chunk)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if k < 0:
        raise ValueError(f"--k must be >= 0, got {k}")
    if not 0 <= reserve < 1:
        raise ValueError(f"--reserve must be in [0, 1), got {reserve}")
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"--kv-dtype {kv_dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    if context > args.max_seq_len:
        raise ValueError(f"--context {context} exceeds the model's max_position_embeddings {args.max_seq_len}")
    check_world(args, cluster.n)
    with_mtp = with_mtp and args.n_mtp_layers > 0
    groups = weight_groups(args, with_mtp)
    by_part = lambda mtp: weight_bytes([w for w in groups if w.mtp == mtp], cluster.n, weights)
    layers = args.n_layers + (args.n_mtp_layers if with_mtp else 0)
    verify = batch * (k + 1)
    chunk = min(prefill_chunk, context)
    phases = {f"prefill chunk of {chunk} tokens": activation_bytes(args, cluster.n, chunk, context, 1),
              f"verify step of {batch}x{k + 1} tokens": activation_bytes(args, cluster.n, verify, context, verify)}
    phase = max(phases, key=phases.get)
    return Plan(model or args.model_type, cluster, batch, context, weights, kv_dtype, with_mtp, reserve,
                prefill_chunk, k, by_part(False), by_part(True) if with_mtp else {},
                kv_bytes(args, batch, context, layers, kv_dtype), layers, phases[phase], phase)


def max_batch(args: ModelArgs, cluster: Cluster, **kw) -> int:
    """The largest batch of `context`-token sequences that fits (0 if none does)."""
    kw.pop("batch", None)
    if not make_plan(args, cluster, batch=1, **kw).fits:
        return 0
    lo, hi = 1, 2
    while make_plan(args, cluster, batch=hi, **kw).fits and hi < 2**24:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if make_plan(args, cluster, batch=mid, **kw).fits else (lo, mid)
    return lo


_PART_NAMES = {"embed": "embedding (vocab rows)", "attention": "MLA projections", "dense_mlp": "dense MLP",
               "shared_experts": "shared experts", "routed_experts": "routed experts", "router": "router + bias",
               "norms": "norms", "head": "output head (vocab rows)", "mtp_input": "eh_proj"}


def render_plan(args: ModelArgs, p: Plan, others: Sequence[Plan] = ()) -> str:
    """The plan as text: per-rank bytes, the verdict, and which known GPU configs fit."""
    gb = lambda n: f"{n / GB:9.2f} GB"
    n, gpu = p.cluster.n, p.cluster.gpu
    full = weight_groups(args, p.with_mtp)
    total_params = sum(params(full).values())
    disk = sum(weight_bytes(full, 1, p.weights).values())
    experts = f"{args.n_routed_experts // n} of {args.n_routed_experts} routed experts" if args.n_routed_experts else ""
    lines = [
        f"{p.model} on {p.cluster.name}: {n} x {gpu.mem_bytes / GB:.1f} GB (GB = 1e9 bytes), {p.weights.upper()} "
        f"weights, {p.kv_dtype} KV cache, batch {p.batch} x context {p.context} tokens",
        f"model: {total_params / 1e9:.2f}B parameters ({args.n_layers} layers"
        + (f" + {args.n_mtp_layers} MTP layer(s) with their own embedding and head copies" if p.with_mtp else "")
        + f"), {disk / GB:.1f} GB in {p.weights.upper()} on one device",
        f"per rank ({n} ranks: vocab-parallel embedding and heads, {args.n_heads // n} of {args.n_heads} heads, "
        f"{experts}; latent KV cache replicated):",
    ]
    for name, parts in (("weights, main model", p.main_bytes), ("MTP layer", p.mtp_bytes)):
        if not parts:
            continue
        lines.append(f"  {name + ':':<48}{gb(sum(parts.values()))}")
        for part, b in sorted(parts.items(), key=lambda kv: -kv[1]):
            if b < 0.005 * GB:  # norms and the like: in the total, not worth a line
                continue
            lines.append(f"    {_PART_NAMES[part]:<46}{gb(b)}")
    if not p.with_mtp:
        lines.append(f"  {'MTP layer:':<48}  left out (--no-mtp or none in the config)")
    width = args.kv_lora_rank + args.qk_rope_head_dim
    lines += [
        f"  {f'KV cache ({p.batch} x {p.context} tokens x {p.kv_layers} layers x {width}):':<48}{gb(p.kv)}",
        f"  {'activations (' + p.act_phase + ')':<48}{gb(p.activations)}",
        f"  {'total:':<48}{gb(p.total)}",
        f"  {f'usable ({gpu.mem_bytes / GB:.1f} GB less a {p.reserve:.0%} reserve):':<48}{gb(p.usable)}",
        "  reserve: CUDA context, NCCL buffers, allocator fragmentation (vLLM's default gpu_memory_utilization "
        "is 0.9); set --reserve",
        "  activations: the larger of a prefill chunk (--prefill-chunk, one sequence, attending over the "
        "context) and a verify step of batch x (k+1) tokens (--k); one layer's bf16 tensors at a time, "
        "fp32 attention scores and probabilities, fp32 logits",
    ]
    if p.fits:
        lines.append(f"FITS on {p.cluster.name}: {(p.usable - p.total) / GB:.2f} GB of headroom per GPU")
    else:
        lines.append(f"DOES NOT FIT on {p.cluster.name}: needs {p.total / GB:.2f} GB per GPU, "
                     f"{(p.total - p.usable) / GB:.2f} GB more than the {p.usable / GB:.2f} GB usable"
                     + (" (the weights alone do not fit)"
                        if sum(p.main_bytes.values()) + sum(p.mtp_bytes.values()) > p.usable else ""))
    if others:
        fit = [o.cluster.name for o in others if o.fits]
        miss = [f"{o.cluster.name} ({o.total / GB:.1f} of {o.usable / GB:.1f} GB)" for o in others if not o.fits]
        lines.append(f"known configs at these settings: fit: {', '.join(fit) or 'none'}; "
                     f"do not fit: {', '.join(miss) or 'none'}")
    return "\n".join(lines)


def known_plans(args: ModelArgs, **kw) -> list[Plan]:
    """The same settings on every known GPU config the scheme can split the model over."""
    out = []
    for spec in KNOWN_CLUSTERS:
        cluster = parse_gpus(spec)
        try:
            out.append(make_plan(args, cluster, **kw))
        except ValueError:  # a world size that does not divide the heads or experts
            continue
    return out


def resolve_args(model: str) -> ModelArgs:
    """A preset name (mtp_spec.config.PRESETS), a model name (shipped, ...) or a checkpoint directory."""
    from mtp_spec.config import PRESETS

    if model in PRESETS:
        args = PRESETS[model]
    else:
        from mtp_spec.loader import model_args, resolve_model

        if not Path(model).exists() and model not in ("shipped", "shipped-draft"):
            raise ValueError(f"--model {model}: not a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                             "directory")
        args = model_args(resolve_model(model))
    if args.family == "llama":
        raise ValueError(f"--model {model}: a Llama-family model; plan and project model the DeepSeek-V3/V2 "
                         "architecture (MLA + MoE)")
    return args


# --- projection ---------------------------------------------------------------------------------------

def distinct_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts that `tokens` tokens touch when each picks top_k of
    n_experts uniformly (each expert is missed by one token with probability 1 - top_k/n_experts)."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens) if n_experts else 0.0


def parse_acceptance(spec: str) -> list[float]:
    """`--acceptance 0.8,0.6,0.45`: conditional acceptance per draft position, each in [0, 1]."""
    try:
        rates = [float(x) for x in spec.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0 <= r <= 1 for r in rates):
        raise ValueError(f"--acceptance {spec!r}: expected comma-separated rates in [0, 1], e.g. 0.8,0.6,0.45")
    return rates


@dataclass(frozen=True)
class Acceptance:
    cond: list[float]  # P(draft i accepted | drafts before it accepted)
    source: str
    num_drafts: int = 0


def acceptance_from_counts(records: Sequence[dict]) -> list[float]:
    """Conditional per-position acceptance pooled over records of any k: position i counts only
    records that drafted at least i+1 tokens (k > i), so mixing k=1 and k=4 runs does not bias it."""
    width = max((r["k"] for r in records), default=0)
    out = []
    for i in range(width):
        rows = [r for r in records if r["k"] > i]
        hit = sum(r["accepted_per_pos"][i] if i < len(r["accepted_per_pos"]) else 0 for r in rows)
        base = sum(r["num_drafts"] if i == 0 else (r["accepted_per_pos"][i - 1]
                                                   if i - 1 < len(r["accepted_per_pos"]) else 0) for r in rows)
        if base == 0:
            break
        out.append(hit / base)
    return out


def acceptance_from_run(path: str | os.PathLike, strategy: str = "mtp", temperature: float | None = None) -> Acceptance:
    """Acceptance measured by `mtp-spec run`: a results/<run-id> directory (or its requests.jsonl)."""
    from mtp_spec.experiment.records import read_records

    p = Path(path)
    file = p / "requests.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"--run {path}: no requests.jsonl (give a results/<run-id> directory of `mtp-spec run`)")
    # fixed-k records only: a record whose k varies per step (k "auto") has no per-position denominators
    recs = [r for r in read_records(file) if r.get("strategy") == strategy and type(r.get("k")) is int and r["k"] > 0]
    for r in recs:
        if not isinstance(r.get("accepted_per_pos"), list) or not isinstance(r.get("num_drafts"), int):
            raise ValueError(f"{file}: a record lacks accepted_per_pos / num_drafts")
    temps = sorted({r.get("temperature") for r in recs})
    if temperature is not None:
        recs = [r for r in recs if r.get("temperature") == temperature]
    elif len(temps) > 1:
        raise ValueError(f"--run {path}: records at temperatures {temps}; pick one with --temperature")
    if not recs or not any(r["num_drafts"] for r in recs):
        raise ValueError(f"--run {path}: no {strategy!r} records with drafts"
                         + (f" at temperature {temperature}" if temperature is not None else ""))
    return Acceptance(acceptance_from_counts(recs), f"{file} ({strategy}, {len(recs)} requests)",
                      sum(r["num_drafts"] for r in recs))


@dataclass(frozen=True)
class MeasuredCosts:
    """A measured cost table (decoding/cost.py's `CostModel`: the costs.json `mtp-spec run` writes, or
    experiments/validate_projection.py's) read at its measured points only: a projection does not
    interpolate, cells the table lacks are left out. A depth-k step is what the MTP proposer runs:
    verify(k + 1, b) + extend(k + 1, b) + (k - 1) draft(b) where the table has extends, else
    verify(k + 1, b) + k draft(b)."""

    cost: CostModel

    @property
    def device(self) -> str:
        return self.cost.device

    @property
    def verify(self) -> dict[tuple[int, int], float]:
        return dict(self.cost.verify_table.points)

    @property
    def draft(self) -> dict[int, float]:
        return {b: s for (_, b), s in self.cost.draft_table.points.items()}

    def verify_s(self, n: int, b: int) -> float | None:
        return self.cost.verify_table.points.get((n, b))

    def draft_s(self, b: int) -> float | None:
        return self.cost.draft_table.points.get((1, b))

    def mtp_s(self, k: int, b: int) -> float | None:
        """The MTP layer's share of a depth-k step."""
        if k == 0:
            return 0.0
        d = self.draft_s(b)
        ext = self.cost.extend_table.points.get((k + 1, b)) if self.cost.extend_table is not None else None
        if ext is not None:
            return ext if k == 1 else None if d is None else ext + (k - 1) * d
        return None if d is None else k * d

    @property
    def batches(self) -> list[int]:
        return sorted({b for n, b in self.cost.verify_table.points if n == 1})

    def describe(self) -> str:
        return f"measured cost table ({self.device})"

    def to_json(self) -> dict:
        return self.cost.to_json()

    @classmethod
    def from_json(cls, obj: dict, source: str = "cost table") -> MeasuredCosts:
        costs = cls(CostModel.from_json(obj, source))
        if not costs.batches:
            raise ValueError(f"{source}: 'verify' has no n_tokens = 1 entry (plain decode), the baseline")
        return costs

    @classmethod
    def load(cls, path: str | os.PathLike) -> MeasuredCosts:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--costs {p}: no such file")
        try:
            obj = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--costs {p}: not valid JSON ({e})") from None
        return cls.from_json(obj, f"--costs {p}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class BandwidthModel:
    """Seconds per forward from what it reads and computes on one rank, a roofline over the forward:
    max(bytes / (HBM bandwidth x efficiency), flops / (peak x efficiency)) plus a latency per collective
    (2 all-reduces per layer, after attention and after the FFN, plus the embedding's all-reduce and
    the logits' all-gather). Bytes: every weight a step touches (routed experts: the expected distinct
    experts of the step's tokens under uniform routing, `distinct_experts`) and the KV cache of every
    row over `context` tokens."""

    args: ModelArgs
    cluster: Cluster
    weights: str = "fp8"
    context: int = 4096
    kv_dtype: str = "bf16"
    efficiency: float = 0.7
    collective_s: float = 10e-6
    _parts: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        g = self.cluster.gpu
        if g.hbm_tbs is None or g.bf16_tflops is None:
            raise ValueError(f"--gpus {self.cluster.name}: a custom GPU has no bandwidth or peak rate; use one of "
                             f"{', '.join(GPUS)} or a measured table (--costs)")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"--efficiency must be in (0, 1], got {self.efficiency}")
        if self.collective_s < 0:
            raise ValueError(f"--allreduce-us must be >= 0, got {self.collective_s * 1e6}")
        if self.context < 1:
            raise ValueError(f"--context must be >= 1, got {self.context}")
        check_world(self.args, self.cluster.n)
        groups = weight_groups(self.args, True)
        for mtp in (False, True):
            mine = [w for w in groups if w.mtp == mtp]
            self._parts[mtp] = (weight_bytes(mine, self.cluster.n, self.weights), params(mine, self.cluster.n))

    def describe(self) -> str:
        g = self.cluster.gpu
        return (f"bandwidth model: {self.cluster.name} ({g.hbm_tbs} TB/s HBM, {g.bf16_tflops:.0f}/"
                f"{g.fp8_tflops:.0f} dense BF16/FP8 TFLOPS per GPU), efficiency {self.efficiency:.2f}, "
                f"{self.collective_s * 1e6:.0f} us per collective, context {self.context}")

    def _time(self, mtp: bool, tokens: int, rows: int, layers: int, moe_layers: int) -> float:
        a, n = self.args, self.cluster.n
        wbytes, wparams = self._parts[mtp]
        frac = distinct_experts(a.n_routed_experts, a.n_activated_experts, tokens) / max(a.n_routed_experts, 1)
        embed_rows = tokens * a.dim * 2  # only the looked-up rows are read
        bytes_ = (sum(b for p, b in wbytes.items() if p not in ("routed_experts", "embed"))
                  + frac * wbytes.get("routed_experts", 0) + embed_rows
                  + kv_bytes(a, rows, self.context, layers, self.kv_dtype))
        dense = sum(p for name, p in wparams.items() if name not in ("routed_experts", "embed"))
        expert = 3 * a.dim * a.moe_inter_dim
        wflops = 2 * tokens * dense + 2 * tokens * a.n_activated_experts / n * expert * moe_layers
        heads = a.n_heads // n
        aflops = 2 * tokens * heads * self.context * (2 * a.kv_lora_rank + a.qk_rope_head_dim) * layers
        g, eff = self.cluster.gpu, self.efficiency
        peak_w = g.fp8_tflops if self.weights == "fp8" else g.bf16_tflops
        compute = (wflops / peak_w + aflops / g.bf16_tflops) / (1e12 * eff)
        memory = bytes_ / (g.hbm_tbs * 1e12 * eff)
        collectives = (2 * layers + 2) * self.collective_s if n > 1 else 0.0
        return max(memory, compute) + collectives

    def verify_s(self, n_tokens: int, b: int) -> float:
        """The main model over b rows of n_tokens (n=1: a plain decode step)."""
        a = self.args
        moe = sum(a.is_moe_layer(i) for i in range(a.n_layers))
        return self._time(False, n_tokens * b, b, a.n_layers, moe)

    def draft_s(self, b: int) -> float:
        """One MTP draft step: the MTP layer (eh_proj, its block, its head) over b rows of one token."""
        return self._time(True, b, b, 1, 1 if self.args.n_routed_experts else 0)

    def mtp_s(self, k: int, b: int) -> float:
        """The MTP layer's share of a depth-k step: k passes that each read its weights (the extend's
        few extra tokens per row cost no more reads than a draft step's one)."""
        return k * self.draft_s(b)


@dataclass(frozen=True)
class Projection:
    k: int
    batch: int
    tokens_per_step: float
    verify_s: float
    draft_s: float
    step_s: float
    base_s: float
    speedup: float


def project(costs, cond: Sequence[float], ks: Sequence[int], batches: Sequence[int],
            overhead_s: float = 0.0) -> list[Projection]:
    """Decode speedup per (k, batch): tokens/step = 1 + sum_j prod_{i<=j} p_i; time/step =
    verify(k+1, b) + the MTP layer's share (`costs.mtp_s`) (+ a host overhead per step); speedup =
    (tokens/step / time) / (1 / verify(1, b)). Cells the cost table lacks are left out."""
    out = []
    for b in batches:
        base = costs.verify_s(1, b)
        if base is None:
            continue
        for k in ks:
            v, m = costs.verify_s(k + 1, b), costs.mtp_s(k, b)
            if v is None or m is None:
                continue
            step = v + m + overhead_s
            tokens = expected_tokens(cond, k)
            d = (costs.draft_s(b) or 0.0) if k else 0.0
            out.append(Projection(k, b, tokens, v, d, step, base + overhead_s, tokens / step * (base + overhead_s)))
    return out


def render_projection(cells: Sequence[Projection], acc: Acceptance, costs, assumptions: Sequence[str]) -> str:
    ks = sorted({c.k for c in cells})
    batches = sorted({c.batch for c in cells})
    get = {(c.k, c.batch): c for c in cells}
    rates = " ".join(f"{p:.3f}" for p in acc.cond)
    lines = [f"projected decode speedup of MTP speculation over plain decoding; {costs.describe()}",
             f"acceptance (conditional per position): {rates}  from {acc.source}"]
    if ks and max(ks) > len(acc.cond):
        lines.append(f"  k > {len(acc.cond)}: positions past the measured ones repeat the last rate "
                     f"{acc.cond[-1]:.3f} (extrapolated)")
    head = f"{'k':>3} {'tok/step':>8} " + " ".join(f"{'b=' + str(b):>7}" for b in batches)
    lines += ["", head]
    for k in ks:
        row = [f"{get[(k, b)].speedup:7.2f}" if (k, b) in get else f"{'-':>7}" for b in batches]
        lines.append(f"{k:>3} {expected_tokens(acc.cond, k):8.2f} " + " ".join(row))
    base = [f"{get[(0, b)].base_s * 1e3:7.2f}" if (0, b) in get else f"{'-':>7}" for b in batches]
    lines.append(f"{'plain step ms':>12} " + " ".join(base))
    lines += ["", "assumptions:", *(f"  - {a}" for a in assumptions)]
    return "\n".join(lines)


def projection_assumptions(overhead_s: float = 0.0, bandwidth: bool = False) -> list[str]:
    """What a projection assumes, printed with it and stored in its JSON."""
    host = (f"plus {overhead_s * 1e6:.0f} us of host work per step (sampling, read-back), plain and "
            "speculative steps alike" if overhead_s else "host work between forwards is not counted")
    out = [
        "speedup = (tokens per step / step time) / (1 / plain decode step time), decode phase only (no prefill)",
        "tokens per step = 1 + sum_j prod_{i<=j} p_i; acceptance does not depend on batch size",
        "step time = verify(k+1 tokens, b) + k x draft(b): the MTP layer's extend over the committed tokens "
        f"costs one draft step; {host}",
    ]
    if bandwidth:
        out += [
            "routed experts touched per layer = E x (1 - (1 - top_k/E)^tokens), uniform routing, E/N per rank "
            "(the busiest rank under real routing reads more)",
            "every rank reads the replicated latent KV cache of every row over the whole context, and all of "
            "its attention, dense, shared-expert, router, norm and vocabulary-slice head weights each forward",
            "a roofline per forward: max(bytes / bandwidth, flops / peak) at the stated efficiency; weight GEMMs "
            "at the weights' dtype peak, attention at the BF16 peak; real engines at small batch run above it "
            "(kernel launches, synchronisation), so small-batch cells are the least certain",
            "collectives: 2 per layer + 2 per forward at a fixed latency each (NVLink within a node; raise "
            "--allreduce-us across nodes, e.g. 16xH100)",
        ]
    return out


def projection_json(cells: Sequence[Projection], acc: Acceptance, costs, assumptions: Sequence[str]) -> dict:
    return {"costs": costs.describe(), "acceptance": asdict(acc), "assumptions": list(assumptions),
            "rows": [asdict(c) for c in cells]}
