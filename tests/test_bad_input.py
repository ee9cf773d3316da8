"""Every bad input a user can give ends in a named error: exit code 2, the culprit (argument, file,
line, tensor or field) in the message, no Python traceback, and nothing half-written left behind.

One table, one row per class of mistake; then a fuzz test over the checkpoint loader."""

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtp_spec
from mtp_spec.checkpoint import CheckpointError
from mtp_spec.cli import main
from mtp_spec.config import ConfigError, ModelArgs
from mtp_spec.random_model import write_random_checkpoint
from mtp_spec.tokenizer import byte_tokenizer_files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints and files the rows point at, built once."""
    d = tmp_path_factory.mktemp("bad")
    w = {"d": d}
    w["ckpt"] = write_random_checkpoint(d / "ckpt", "tiny", seed=1, extra_files=byte_tokenizer_files())
    w["bare"] = write_random_checkpoint(d / "bare", "tiny", seed=1)  # no tokenizer
    w["v2"] = write_random_checkpoint(d / "v2", "tiny-v2", seed=1, extra_files=byte_tokenizer_files())
    w["vocab"] = write_random_checkpoint(d / "vocab", ModelArgs.from_name("tiny").with_(vocab_size=384), seed=1)
    w["sharded"] = write_random_checkpoint(d / "sharded", "tiny", seed=1, max_shard_bytes=200_000)
    (d / "afile").write_text("x")
    (d / "noconfig").mkdir()
    for name, edit in {
        "badjson": lambda p: (p / "config.json").write_text("{not json"),
        "v32": lambda p: _edit_config(p, model_type="deepseek_v32", index_topk=2048),
        "badtok": lambda p: (p / "tokenizer.json").write_text('{"version": "1.0", "model": 7}'),
        "nochat": lambda p: _edit_json(p / "tokenizer_config.json", chat_template=None),
        "nan": lambda p: _edit_tensor(p, "model.layers.0.input_layernorm.weight", float("nan")),
        "missing": lambda p: _edit_tensors(p, lambda sd: sd.pop("model.norm.weight")),
    }.items():
        p = _copy(w["ckpt"], d / name)
        edit(p)
        w[name] = p
    for name, shard in {"abs": "/etc/hostname", "dotdot": "../ckpt/model.safetensors"}.items():
        p = _copy(w["sharded"], d / name)
        idx = json.loads((p / "model.safetensors.index.json").read_text())
        first = next(iter(idx["weight_map"]))
        idx["weight_map"][first] = shard
        (p / "model.safetensors.index.json").write_text(json.dumps(idx))
        w[name] = p
    p = _copy(w["sharded"], d / "truncated")
    last = sorted(p.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-1000])
    w["truncated"] = p
    (d / "prompts_bad.jsonl").write_text('{"prompt": "def f():"}\n{oops\n')
    (d / "prompts_nokey.jsonl").write_text('{"text": "def f():"}\n')
    (d / "exp_unknown.yaml").write_text("name: x\nstrategies: [{name: mtp}]\nbogus: 1\n")
    (d / "exp_badyaml.yaml").write_text("name: [x\n")
    (d / "notarun").mkdir()
    (d / "precious").mkdir()
    (d / "precious" / "notes.txt").write_text("keep me")
    w["precious"] = d / "precious"
    return w


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **kw) -> None:
    cfg = json.loads(path.read_text())
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def _edit_config(p: Path, **kw) -> None:
    _edit_json(p / "config.json", **kw)


def _edit_tensors(p: Path, fn) -> None:
    f = p / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def _edit_tensor(p: Path, name: str, value: float) -> None:
    _edit_tensors(p, lambda sd: sd[name].view(-1).__setitem__(0, value))


G = ["generate", "--model"]
# (class of mistake, argv built from the world, words the message must contain, paths that must not exist after)
ROWS = [
    ("cuda device without CUDA", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--device", "cuda"],
     ["--device cuda", "CUDA is not available"], []),
    ("not a device", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--device", "gpu"], ["--device 'gpu'"], []),
    ("temperature nan", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--temperature", "nan"],
     ["temperature", "nan"], []),
    ("temperature inf", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--temperature", "inf"],
     ["temperature", "inf"], []),
    ("temperature negative", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--temperature", "-1"],
     ["temperature"], []),
    ("top-p out of range", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--top-p", "1.5"], ["top_p"], []),
    ("top-k negative", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--top-k", "-1"], ["top_k"], []),
    ("malformed JSONL line", lambda w: [*G, w["ckpt"], "--prompt-file", w["d"] / "prompts_bad.jsonl"],
     ["prompts_bad.jsonl:2", "not a JSON object"], []),
    ("JSONL record without a prompt", lambda w: [*G, w["ckpt"], "--prompt-file", w["d"] / "prompts_nokey.jsonl"],
     ["prompts_nokey.jsonl:1", "'prompt'"], []),
    ("prompt file missing", lambda w: [*G, w["ckpt"], "--prompt-file", w["d"] / "nope.txt"],
     ["--prompt-file", "no such file"], []),
    ("relaxed not TOPN,DELTA", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--relaxed", "abc"],
     ["--relaxed 'abc'", "TOPN,DELTA"], []),
    ("relaxed with sampling", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--relaxed", "3,0.5",
                                         "--temperature", "0.7"], ["--relaxed", "greedy"], []),
    ("model is a file", lambda w: [*G, w["d"] / "afile", "--prompt-ids", "1,2"], ["afile", "is a file"], []),
    ("model dir missing", lambda w: [*G, w["d"] / "nowhere", "--prompt-ids", "1,2"], ["nowhere", "no such"], []),
    ("model dir without config.json", lambda w: [*G, w["d"] / "noconfig", "--prompt-ids", "1,2"],
     ["noconfig", "no config.json"], []),
    ("config.json not JSON", lambda w: [*G, w["badjson"], "--prompt-ids", "1,2"],
     ["badjson/config.json", "not valid JSON"], []),
    ("unimplemented architecture", lambda w: [*G, w["v32"], "--prompt-ids", "1,2"],
     ["model_type", "deepseek_v32", "indexer"], []),
    ("empty prompt", lambda w: [*G, w["ckpt"], ""], ["prompt 0 is empty"], []),
    ("mtp without an MTP layer", lambda w: [*G, w["v2"], "--prompt-ids", "1,2", "--strategy", "mtp"],
     ["needs an MTP layer", "num_nextn_predict_layers"], []),
    ("draft model with another vocabulary", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--strategy",
                                                        "draft-model", "--draft-model", w["vocab"]],
     ["--draft-model", "vocab_size 384", "512"], []),
    ("draft-model without --draft-model", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--strategy",
                                                      "draft-model"], ["needs --draft-model"], []),
    ("draft model dir missing", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--strategy", "draft-model",
                                            "--draft-model", w["d"] / "nowhere"], ["--draft-model", "nowhere"], []),
    ("k beyond the context", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--k", "300"],
     ["--k 300", "context of 256"], []),
    ("k zero", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--k", "0"], ["--k must be >= 1"], []),
    ("tree width zero", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--strategy", "mtp-tree",
                                   "--tree-width", "0"], ["--tree-width must be >= 1"], []),
    ("max-new-tokens zero", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--max-new-tokens", "0"],
     ["--max-new-tokens must be >= 1"], []),
    ("prompt ids not integers", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,x"], ["--prompt-ids", "integers"], []),
    ("prompt id outside the vocabulary", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,99999"],
     ["token ids outside [0, 512)"], []),
    ("text prompt without a tokenizer", lambda w: [*G, w["bare"], "hello"], ["no tokenizer.json", "--prompt-ids"],
     []),
    ("stop string without a tokenizer", lambda w: [*G, w["bare"], "--prompt-ids", "1,2", "--stop", "x"],
     ["--stop", "tokenizer"], []),
    ("corrupt tokenizer", lambda w: [*G, w["badtok"], "hello"], ["badtok/tokenizer.json", "not a valid tokenizer"],
     []),
    ("chat without a chat template", lambda w: [*G, w["nochat"], "hi", "--chat"], ["chat_template"], []),
    ("NaN weights", lambda w: [*G, w["nan"], "--prompt-ids", "1,2"],
     ["model.layers.0.input_layernorm.weight", "NaN"], []),
    ("missing tensor", lambda w: [*G, w["missing"], "--prompt-ids", "1,2"], ["model.norm.weight", "missing"], []),
    ("truncated shard", lambda w: [*G, w["truncated"], "--prompt-ids", "1,2"], ["truncated", "model-0000"], []),
    ("index names an absolute shard path", lambda w: [*G, w["abs"], "--prompt-ids", "1,2"],
     ["/etc/hostname", "leaves the checkpoint directory"], []),
    ("index names a shard outside with ..", lambda w: [*G, w["dotdot"], "--prompt-ids", "1,2"],
     ["../ckpt/model.safetensors", "leaves the checkpoint directory"], []),
    ("convert onto its own source", lambda w: ["convert", w["ckpt"], w["ckpt"]], ["is the source"], []),
    ("convert into its own source", lambda w: ["convert", w["ckpt"], w["ckpt"] / "bf16"], ["inside the source"],
     ["ckpt/bf16"]),
    ("convert of a truncated checkpoint", lambda w: ["convert", w["truncated"], w["d"] / "conv-out"],
     ["truncated"], ["conv-out"]),
    ("convert to an unknown format", lambda w: ["convert", "--to", "fp4", w["ckpt"], w["d"] / "fp4-out"],
     ["--to fp4"], ["fp4-out"]),
    ("init-random over a directory that is not a checkpoint",
     lambda w: ["init-random", w["d"] / "precious"], ["precious", "refusing to replace"], []),
    ("init-random unknown preset", lambda w: ["init-random", w["d"] / "r-out", "--preset", "huge"],
     ["unknown preset 'huge'"], ["r-out"]),
    ("run with a missing config", lambda w: ["run", w["d"] / "nope.yaml"], ["nope.yaml", "no such"], []),
    ("run with an unknown config key", lambda w: ["run", w["d"] / "exp_unknown.yaml"], ["exp_unknown.yaml", "bogus"],
     []),
    ("run with invalid YAML", lambda w: ["run", w["d"] / "exp_badyaml.yaml"], ["exp_badyaml.yaml", "not valid YAML"],
     []),
    ("resume of a directory that is not a run", lambda w: ["run", "configs/quickstart.yaml", "--resume",
                                                            w["d"] / "notarun"], ["notarun", "not a run directory"],
     []),
    ("report of a directory without records", lambda w: ["report", w["d"] / "notarun"],
     ["notarun", "no requests.jsonl"], []),
    ("unknown strategy (argparse)", lambda w: [*G, w["ckpt"], "--prompt-ids", "1,2", "--strategy", "medusa"],
     ["--strategy", "medusa"], []),
]


def _run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        return e.code


def _tree_hash(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_the_table_covers_at_least_25_classes():
    assert len({r[0] for r in ROWS}) == len(ROWS) >= 25


@pytest.mark.parametrize("name,argv,words,absent", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gives_a_named_error_and_exit_code_2(world, capsys, monkeypatch, name, argv, words, absent):
    monkeypatch.chdir(Path(__file__).parent.parent)  # configs/ paths are relative to the repo
    before = {k: _tree_hash(world[k]) for k in ("ckpt", "precious")}
    rc = _run(argv(world))
    err = capsys.readouterr().err
    assert rc == 2, err
    for w in words:
        assert str(w) in err, (w, err)
    assert "Traceback" not in err
    for rel in absent:
        assert not (world["d"] / rel).exists(), rel
    leftovers = [p.name for p in world["d"].rglob(".*tmp-*")]
    assert leftovers == []
    assert {k: _tree_hash(world[k]) for k in ("ckpt", "precious")} == before  # inputs are never modified


def test_a_bad_input_in_a_real_process_prints_one_line_and_no_traceback(world):
    out = subprocess.run([sys.executable, "-m", "mtp_spec.cli", "generate", "--model", str(world["ckpt"]),
                          "--prompt-ids", "1,2", "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("mtp-spec: error: --device cuda") and "Traceback" not in out.stderr


# --- fuzz: the loader meets damaged files ----------------------------------------------------------
def _mutate(data: bytes, rng: random.Random, header_only: bool) -> bytes:
    b = bytearray(data)
    limit = len(b)
    if header_only and len(b) > 8:
        limit = min(len(b), 8 + int.from_bytes(b[:8], "little"))
    kind = rng.choice(["flip", "flip", "truncate", "insert"])
    if kind == "truncate":
        return bytes(b[: rng.randrange(0, limit)])
    if kind == "insert":
        i = rng.randrange(0, limit)
        return bytes(b[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) + b[i:])
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(0, limit)] ^= 1 << rng.randrange(8)
    return bytes(b)


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang()


@pytest.mark.parametrize("target", ["config.json", "model.safetensors.index.json", "shard header"])
def test_fuzzed_checkpoint_files_give_only_named_errors(world, tmp_path, target):
    rng = random.Random(hash(target) % 1000)
    src = world["sharded"]
    shard = sorted(src.glob("model-*.safetensors"))[0].name
    fname = shard if target == "shard header" else target
    original = (src / fname).read_bytes()
    p = _copy(src, tmp_path / "f")
    outcomes = {"loaded": 0, "named": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(40):
            (p / fname).write_bytes(_mutate(original, rng, header_only=target == "shard header"))
            signal.alarm(30)
            try:
                mtp_spec.load(p)
                outcomes["loaded"] += 1
            except (ConfigError, CheckpointError) as e:
                assert str(e), i
                assert str(p) in str(e) or "config" in str(e), str(e)
                outcomes["named"] += 1
            except _Hang:
                pytest.fail(f"mutation {i} of {fname} hung the loader")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["named"] >= 20, outcomes  # most damage is caught, and caught by name


def test_a_model_type_of_the_v3_architecture_under_another_name_loads(world, tmp_path):
    p = _copy(world["ckpt"], tmp_path / "kimi")
    _edit_config(p, model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"])
    model = mtp_spec.load(p)
    ref = mtp_spec.load(world["ckpt"])
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_unknown_keys_load_with_a_warning_and_survive_a_conversion(world, tmp_path, recwarn):
    p = _copy(world["ckpt"], tmp_path / "extra")
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(head_dim=64, qk_head_dim=24, rope_interleave=True, mlp_bias=False, dtype="float32",
               torch_dtype="float32", index_topk=2048, some_future_key={"a": [1, 2]}, transformers_version="4.57.0")
    cfg["rope_scaling"]["rope_type"] = "yarn"
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="index_topk, some_future_key"):
        mtp_spec.load(p)
    assert main(["convert", str(p), str(tmp_path / "bf16")]) == 0
    out = json.loads((tmp_path / "bf16" / "config.json").read_text())
    changed = {k for k in set(cfg) | set(out) if cfg.get(k) != out.get(k)}
    assert changed == {"quantization_config", "torch_dtype", "dtype"}
    assert "quantization_config" not in out and out["torch_dtype"] == out["dtype"] == "bfloat16"
    assert out["rope_scaling"] == cfg["rope_scaling"] and out["some_future_key"] == {"a": [1, 2]}


def test_training_output_keeps_the_main_configs_keys(world, tmp_path):
    from mtp_spec.train.trainer import TrainConfig, build_model

    p = _copy(world["ckpt"], tmp_path / "main")
    _edit_config(p, head_dim=64, transformers_version="4.57.0")
    cfg = TrainConfig(out=str(tmp_path / "o"), mtp_only=str(p), seq_len=16)
    _, args = build_model(cfg, 300)
    hf = args.to_hf()
    assert hf["head_dim"] == 64 and hf["transformers_version"] == "4.57.0"

