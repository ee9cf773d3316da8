"""Tensor and expert parallelism on the CPU (gloo): world sizes 2 and 4 against one process.

Each case spawns N ranks that load a tiny checkpoint in the real layout, compute logits, generate
greedily with every strategy and sample with a fixed seed; every rank writes what it got to a JSON
file, and the test compares ranks with each other and with the single-process run done here.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtp_spec.parallel as parallel
from mtp_spec.checkpoint import CheckpointReader
from mtp_spec.config import ModelArgs
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.sampling import SamplingParams
from mtp_spec.decoding.strategies import STRATEGIES, make_proposer
from mtp_spec.loader import load
from mtp_spec.random_model import write_random_checkpoint

PROMPTS = [[5, 17, 301, 44, 9, 120, 7], [88, 3, 250, 61]]
# fp8 splits must fall on 128-row blocks: heads of 192/256/128 wide, hidden sizes of 512
TP_ARGS = dict(dim=256, n_heads=8, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=128,
               kv_lora_rank=64, inter_dim=512, moe_inter_dim=512)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(ckpt: str, draft: str | None, strategies: list[str], keep_fp8: bool, compile: str = "off") -> dict:
    """What one process computes; the same code runs in every rank and in the single process."""
    model = load(ckpt, dtype=torch.float32, compile=compile, keep_fp8=keep_fp8)
    out: dict = {"bytes_loaded": model.bytes_loaded,
                 "fp8_weights": sum(p.dtype == torch.float8_e4m3fn for p in model.parameters())}
    with torch.no_grad():
        x = torch.tensor([PROMPTS[0]])
        out["logits"] = model(x).logits[0].tolist()
    for s in strategies:
        prop = make_proposer(s, model, 3, draft=draft)
        res = Engine(model, prop).generate(PROMPTS, max_new_tokens=12)
        out[f"greedy/{s}"] = [r.token_ids for r in res]
    sp = SamplingParams(temperature=0.9)
    for s in ("vanilla", "mtp"):
        res = Engine(model, make_proposer(s, model, 2)).generate(PROMPTS, max_new_tokens=12, sp=sp, seed=7)
        out[f"sampled/{s}"] = [r.token_ids for r in res]
    out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def _worker(rank: int, size: int, port: int, job: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    parallel.set_world(parallel.World(rank, size, grouped=True))
    try:
        res = _job(*job)
    except ValueError as e:  # a refused split: every rank refuses before any collective
        res = {"error": str(e)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    parallel.shutdown()  # together: a bare destroy_process_group aborted rank 0 in 2 runs of 15
    os._exit(0)  # and skip the interpreter's finalisation, where gloo can still abort rank 0 (as cli.main)


def _spawn(size: int, job: tuple, tmp: Path) -> list[dict]:
    out = tmp / f"ws{size}"
    out.mkdir()
    mp.spawn(_worker, args=(size, _free_port(), job, str(out)), nprocs=size, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    main = write_random_checkpoint(root / "tiny-bf16", ModelArgs.from_name("tiny").with_(fp8=False), seed=3)
    draft = write_random_checkpoint(root / "draft", ModelArgs.from_name("tiny").with_(fp8=False, n_layers=1,
                                                                                      n_mtp_layers=0), seed=4)
    fp8 = write_random_checkpoint(root / "tiny-tp-fp8", ModelArgs.from_name("tiny").with_(**TP_ARGS), seed=5)
    return {"main": str(main), "draft": str(draft), "fp8": str(fp8), "bad": str(
        write_random_checkpoint(root / "tiny-fp8", "tiny", seed=6))}


@pytest.fixture(scope="module")
def single(ckpts):
    return _job(ckpts["main"], ckpts["draft"], list(STRATEGIES), False)


def _rel_err(a, b) -> float:
    a, b = torch.tensor(a), torch.tensor(b)
    return float((a - b).abs().max() / b.abs().max())


def _replicated_bytes(path: str) -> int:
    """Bytes of the tensors every rank reads whole (classified here by name, independently of the code)."""
    split = re.compile(r"embed_tokens|lm_head|shared_head\.head|q_b_proj|q_proj|kv_b_proj|o_proj|"
                       r"mlp\.(gate|up|down)_proj|shared_experts|mlp\.experts\.")
    r = CheckpointReader(path)
    total = 0
    for k in r.keys():
        if not split.search(k):
            dt, sh = r.dtype_shape(k)
            total += int(torch.tensor(sh).prod()) * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dt]
    return total


@pytest.mark.parametrize("size,compile", [(2, "off"), (4, "off"), (2, "auto")])
def test_world_sizes_match_one_process(ckpts, single, size, compile, tmp_path):
    ranks = _spawn(size, (ckpts["main"], ckpts["draft"], list(STRATEGIES), False, compile), tmp_path)
    for r in ranks[1:]:  # every rank holds the same logits and takes the same decisions
        assert {k: v for k, v in r.items() if k not in ("bytes_loaded", "maxrss_kib")} == \
               {k: v for k, v in ranks[0].items() if k not in ("bytes_loaded", "maxrss_kib")}
    got = ranks[0]
    assert _rel_err(got["logits"], single["logits"]) <= 1e-5
    for s in STRATEGIES:  # greedy output of every strategy equals single-process vanilla
        assert got[f"greedy/{s}"] == single["greedy/vanilla"], s
    for s in ("vanilla", "mtp"):  # sampling with a fixed seed is reproducible across world sizes
        assert got[f"sampled/{s}"] == single[f"sampled/{s}"], s
    # each rank reads the replicated tensors whole and 1/N of the split ones
    rep, total = _replicated_bytes(ckpts["main"]), single["bytes_loaded"]
    assert 0 < rep < total // 4
    for r in ranks:
        assert r["bytes_loaded"] == rep + (total - rep) // size


def test_fp8_checkpoint_split_on_block_boundaries(ckpts, tmp_path, monkeypatch):
    """Each rank keeps its e4m3 slices and their 128x128 scales. The GEMM runs the torch reference
    (the ranks inherit the variable): the Triton kernel in the CPU interpreter takes ~2.5 s a
    forward here, and test_kernels checks it against that reference."""
    monkeypatch.setenv("MTP_SPEC_KERNELS", "torch")
    ref = _job(ckpts["fp8"], None, ["vanilla", "mtp"], True)
    ranks = _spawn(2, (ckpts["fp8"], None, ["vanilla", "mtp"], True), tmp_path)
    assert ranks[0]["logits"] == ranks[1]["logits"]
    assert min(r["fp8_weights"] for r in (*ranks, ref)) > 0  # the e4m3 path, not dequantised at load
    assert _rel_err(ranks[0]["logits"], ref["logits"]) <= 1e-5
    assert ranks[0]["greedy/mtp"] == ranks[0]["greedy/vanilla"] == ref["greedy/vanilla"]
    rep = _replicated_bytes(ckpts["fp8"])
    assert ranks[0]["bytes_loaded"] == rep + (ref["bytes_loaded"] - rep) // 2


def test_a_split_that_cuts_a_scale_block_is_refused(ckpts, tmp_path):
    ranks = _spawn(2, (ckpts["bad"], None, ["vanilla"], True), tmp_path)
    for r in ranks:
        assert "error" in r
        assert "q_b_proj.weight" in r["error"] and "world size 2" in r["error"] and "128x128" in r["error"]


def test_bad_weights_in_one_ranks_share_stop_every_rank(ckpts, tmp_path):
    """NaN in the last vocabulary rows (rank 1's slice of the head): rank 1 refuses them by name and
    rank 0, which read clean weights, stops too instead of waiting for rank 1 in a collective."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-head"
    shutil.copytree(ckpts["main"], bad)
    (f,) = bad.glob("*.safetensors")
    state = load_file(f)
    state["lm_head.weight"][-1, 0] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    ranks = _spawn(2, (str(bad), None, ["vanilla"], False), tmp_path)
    assert "lm_head.weight" in ranks[1]["error"] and "NaN" in ranks[1]["error"]
    assert "another rank could not load its share" in ranks[0]["error"]


def test_uneven_splits_are_refused_by_name():
    with parallel.using(parallel.World(rank=0, size=3)), torch.device("meta"):
        from mtp_spec.model import Transformer

        with pytest.raises(ValueError, match="vocab_size = 512 does not split evenly across world size 3"):
            Transformer(ModelArgs.from_name("tiny"), max_len=8)
        with pytest.raises(ValueError, match="num_attention_heads = 4 does not split evenly across world size 3"):
            Transformer(ModelArgs.from_name("tiny").with_(vocab_size=516), max_len=8)


def test_torchrun_generate_prints_once_and_matches_one_process(ckpts, tmp_path):
    """The launch a user types: `torchrun --nproc-per-node 2 -m mtp_spec generate ...`."""
    import subprocess
    import sys

    cmd = ["-m", "mtp_spec", "generate", "--model", ckpts["main"], "--prompt-ids", "5,17,301,44",
           "--max-new-tokens", "10", "--strategy", "mtp", "--k", "2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), *cmd], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    lines = [json.loads(x) for x in two.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 1 printed nothing
    assert lines[0]["token_ids"] == json.loads(one.stdout.splitlines()[-1])["token_ids"]


def test_torchrun_run_writes_once_and_resumes_after_a_cut(ckpts, tmp_path):
    """`torchrun --nproc-per-node 2 -m mtp_spec run CONFIG`: rank 0 alone writes the run directory, the
    records equal a one-process run's, and a run whose records were cut mid-line (what a kill leaves)
    resumes under torchrun without losing or duplicating a request."""
    import subprocess
    import sys

    import yaml

    from mtp_spec.experiment.records import RECHECK, read_records
    from mtp_spec.tokenizer import write_byte_tokenizer

    write_byte_tokenizer(Path(ckpts["main"]))
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": f"p{i}", "category": "code", "prompt": f"def f{i}(x): return x"})
                             + "\n" for i in range(4)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "t", "model": ckpts["main"], "suites": [str(suite)], "prompts_per_suite": 4,
        "strategies": [{"name": "mtp", "k": [2]}, {"name": "ngram", "k": [3]}],
        "sweep": {"temperature": [0.0, 0.8], "batch_size": [2], "max_new_tokens": [10]}, "warmup": 0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
        pre = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                   str(nproc), "--master-port", str(_free_port())]
        p = subprocess.run([*pre, "-m", "mtp_spec", "run", str(cfg), "--no-progress", *args], capture_output=True,
                           text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    def tokens(run_dir: Path) -> dict:
        return {(r["cell"], r["prompt_id"]): r["token_ids"] for r in read_records(run_dir / "requests.jsonl")}

    launch("--out", str(tmp_path / "one"), nproc=1)
    two = launch("--out", str(tmp_path / "two"))
    assert two.stdout.count("results:") == 1  # rank 1 printed nothing
    (one_dir,), (two_dir,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    assert tokens(two_dir) == tokens(one_dir)  # greedy and seeded sampling alike
    req = two_dir / "requests.jsonl"
    lines = req.read_text().splitlines(keepends=True)
    n = len(lines)
    req.write_text("".join(lines[: n // 2]) + lines[n // 2][:25])  # a kill cuts the last line short
    (two_dir / RECHECK).unlink()
    launch("--resume", str(two_dir))
    after = read_records(req)
    keys = [(r["cell"], r["prompt_id"]) for r in after]
    assert len(keys) == n == len(set(keys))
    assert [json.dumps(r) for r in after[: n // 2]] == [x.strip() for x in lines[: n // 2]]
    assert tokens(two_dir) == tokens(one_dir)
    assert all(r["lossless"] is True for r in after if r["strategy"] != "vanilla" and r["temperature"] == 0)
    # timings of two world sizes must not mix in one run: a different size is refused, by name
    p = subprocess.run([sys.executable, "-m", "mtp_spec", "run", str(cfg), "--resume", str(two_dir)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "started at world size 2" in p.stderr
