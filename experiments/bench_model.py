"""Model benchmark: prefill and decode tokens/s and peak load memory, ours vs transformers.

Same checkpoint (written here, random, in the DeepSeek layout), same threads, batch 1, greedy.
Each measurement runs in a fresh subprocess so that peak RSS belongs to it alone.

    python experiments/bench_model.py [--threads 2] [--sizes tiny,100m] [--out results/bench_model.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

SIZES = {
    "tiny": dict(preset="tiny"),
    # ~100M parameters: a scaled-down V3 (MLA with q LoRA, 1 dense + 5 MoE layers, 16 experts, MTP).
    "100m": dict(preset="tiny", vocab_size=32000, dim=768, inter_dim=2048, moe_inter_dim=384, n_layers=6,
                 n_dense_layers=1, n_heads=8, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
                 n_expert_groups=4, n_limited_groups=2, q_lora_rank=384, kv_lora_rank=256,
                 qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=4096,
                 original_seq_len=4096, rope_factor=1.0, rope_scaling=False),
}


def rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM). Not ru_maxrss: that survives exec, so a
    child would inherit the parent's high-water mark."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(impl: str, path: str, threads: int, prompt_len: int, new: int) -> dict:
    torch.set_num_threads(threads)
    if impl == "transformers":
        import transformers  # noqa: F401  (import cost outside the load measurement)
    import mtp_spec
    from mtp_spec.decoding.engine import Engine

    base = rss_mb()
    t0 = time.perf_counter()
    if impl == "ours":
        model = mtp_spec.load(path, dtype=torch.float32, part="main", max_len=prompt_len + new + 8)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    peak = rss_mb() - base
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    vocab = model.config.vocab_size if impl == "transformers" else model.args.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def prefill():
        with torch.no_grad():
            model(ids)

    prefill()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        prefill()
    prefill_tps = reps * prompt_len / (time.perf_counter() - t0)

    def decode() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            if impl == "ours":
                Engine(model).generate([ids[0].tolist()], max_new_tokens=new)
            else:
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - t0

    decode()
    # decode tokens/s excludes the prefill: time(new tokens) - time(1 token)
    t_all = min(decode() for _ in range(2))
    t_one = min(_time_one(model, impl, ids) for _ in range(2))
    return dict(impl=impl, load_s=load_s, params_mb=params_mb, load_peak_rss_mb=peak,
                prefill_tps=prefill_tps, decode_tps=(new - 1) / (t_all - t_one), threads=threads)


def _time_one(model, impl, ids) -> float:
    from mtp_spec.decoding.engine import Engine

    t0 = time.perf_counter()
    with torch.no_grad():
        if impl == "ours":
            Engine(model).generate([ids[0].tolist()], max_new_tokens=1)
        else:
            model.generate(ids, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="tiny,100m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default="results/bench_model.json")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "PATH"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.threads, a.prompt_len, a.new)))
        return
    from mtp_spec.config import ModelArgs
    from mtp_spec.random_model import write_random_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            spec = dict(SIZES[size])
            args = ModelArgs.from_name(spec.pop("preset")).with_(fp8=False, **spec)
            path = write_random_checkpoint(Path(tmp) / size, args, seed=0, dtype=torch.bfloat16)
            n_params = sum(v.numel() for k, v in load_file(str(path / "model.safetensors")).items()
                           if f"layers.{args.n_layers}." not in k)
            for impl in ("ours", "transformers"):
                out = subprocess.run([sys.executable, __file__, "--worker", impl, str(path), "--threads",
                                      str(a.threads), "--prompt-len", str(a.prompt_len), "--new", str(a.new)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(size=size, main_params_m=n_params / 1e6)
                rows.append(r)
    print(f"\nbatch 1, greedy, fp32 compute from a bf16 checkpoint, {a.threads} threads, prompt {a.prompt_len}, "
          f"{a.new} new tokens, torch {torch.__version__}")
    print(f"{'size':6} {'impl':13} {'params':>8} {'weights MB':>10} {'load peak MB':>12} {'peak/weights':>12} "
          f"{'prefill tok/s':>13} {'decode tok/s':>12}")
    for r in rows:
        print(f"{r['size']:6} {r['impl']:13} {r['main_params_m']:7.1f}M {r['params_mb']:10.1f} "
              f"{r['load_peak_rss_mb']:12.1f} {r['load_peak_rss_mb'] / r['params_mb']:12.2f} "
              f"{r['prefill_tps']:13.1f} {r['decode_tps']:12.1f}")
    for size in a.sizes.split(","):
        o, t = (next(r for r in rows if r["size"] == size and r["impl"] == i) for i in ("ours", "transformers"))
        print(f"{size}: ours/transformers decode {o['decode_tps'] / t['decode_tps']:.2f}x, "
              f"prefill {o['prefill_tps'] / t['prefill_tps']:.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
