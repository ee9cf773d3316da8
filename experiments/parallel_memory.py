"""Peak host memory per rank when loading a checkpoint split across N ranks (issue 13, item 2).

Writes a random bf16 checkpoint in the real layout (V3's structure, small widths, many experts, so
that most bytes are in split tensors), then for each world size spawns N gloo ranks on this machine.
Each rank records its memory after `import torch` and the process group (the baseline), loads its
share with `mtp_spec.load`, runs one forward, and records above the baseline: its anonymous resident
memory (what it holds) and its peak resident set (VmHWM, the checkpoint pages mapped while reading
included). The table compares them with the bytes the rank read and its share of the checkpoint.

    python experiments/parallel_memory.py                    # world sizes 1, 2, 4
    python experiments/parallel_memory.py --sizes 1,2 --experts 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtp_spec.parallel as parallel
from mtp_spec.config import ModelArgs
from mtp_spec.random_model import write_random_checkpoint

MB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _worker(rank: int, size: int, port: int, ckpt: str, out: str) -> None:
    from mtp_spec.loader import load

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    parallel.set_world(parallel.World(rank, size, grouped=size > 1))
    base, anon0 = _status_kib("VmRSS"), _status_kib("RssAnon")
    model = load(ckpt, dtype=torch.bfloat16)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():  # one forward, so every split layer has run its collectives
        model(torch.tensor([[1, 2, 3]]))
    # VmHWM: this process's peak resident set (file pages mapped while reading included); ru_maxrss
    # would carry the parent's peak across exec
    Path(out, f"{size}-{rank}.json").write_text(json.dumps(
        {"peak_kib": _status_kib("VmHWM") - base, "anon_kib": _status_kib("RssAnon") - anon0,
         "bytes_read": model.bytes_loaded, "param_bytes": held}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shard-mb", type=int, default=32)
    a = ap.parse_args()
    args = ModelArgs.from_name("tiny").with_(
        dim=512, n_heads=8, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, q_lora_rank=256,
        kv_lora_rank=128, inter_dim=2048, moe_inter_dim=1024, n_routed_experts=a.experts, n_activated_experts=4,
        n_expert_groups=1, n_limited_groups=1, n_layers=a.layers, n_dense_layers=1, vocab_size=32768, fp8=False)
    with tempfile.TemporaryDirectory() as tmp:
        # many shards, as the real checkpoint's 163 (a rank's share is ~20 shards of V3 on 8 GPUs)
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", args, seed=0, max_shard_bytes=a.shard_mb * MB)
        total = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))
        print(f"checkpoint: {total / MB:.0f} MiB bf16 in {len(list(Path(ckpt).glob('*.safetensors')))} shards, "
              f"{a.layers} layers, {a.experts} routed experts, "
              f"vocab {args.vocab_size}")
        print(f"{'rank':>5} | {'read MiB':>8} | {'read / (total/N)':>16} | {'params MiB':>10} | "
              f"{'resident after load MiB':>23} | {'peak MiB':>8} | {'peak / params':>13}")
        for size in (int(s) for s in a.sizes.split(",")):
            port = socket.socket()
            port.bind(("127.0.0.1", 0))
            p = port.getsockname()[1]
            port.close()
            mp.spawn(_worker, args=(size, p, str(ckpt), tmp), nprocs=size, join=True)
            for r in range(size):
                d = json.loads(Path(tmp, f"{size}-{r}.json").read_text())
                peak, anon = d["peak_kib"] * 1024, d["anon_kib"] * 1024
                print(f"{size:>3}.{r} | {d['bytes_read'] / MB:8.1f} | {d['bytes_read'] / (total / size):16.2f} | "
                      f"{d['param_bytes'] / MB:10.1f} | {anon / MB:23.1f} | {peak / MB:8.1f} | "
                      f"{peak / d['param_bytes']:13.2f}")


if __name__ == "__main__":
    main()
