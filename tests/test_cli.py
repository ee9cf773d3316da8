"""`mtp-spec` as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

import mtp_spec
from mtp_spec.cli import main
from mtp_spec.decoding.engine import Engine
from mtp_spec.decoding.proposers import MTPProposer
from mtp_spec.tokenizer import write_byte_tokenizer

KEYS = {"text", "token_ids", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos",
        "tokens_per_s", "strategy", "k"}


@pytest.fixture(scope="module")
def ckpt(tiny_fp8):
    write_byte_tokenizer(tiny_fp8)
    return tiny_fp8


def test_generate_json_honours_the_key_contract(ckpt, capsys):
    rc = main(["generate", "--model", str(ckpt), "--prompt", "def f(x):", "--prompt", "import os",
               "--max-new-tokens", "12", "--k", "2", "--json"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    model = mtp_spec.load(ckpt, max_len=256)
    from mtp_spec.tokenizer import TextTokenizer

    tok = TextTokenizer(ckpt)
    ref = Engine(model, MTPProposer(model, 2)).generate([tok.encode("def f(x):"), tok.encode("import os")], 12,
                                                       eos_id=tok.eos_id)
    for rec, r in zip(lines, ref):
        assert KEYS <= set(rec)
        assert rec["token_ids"] == r.token_ids and rec["text"] == tok.decode(r.token_ids)
        assert rec["strategy"] == "mtp" and rec["k"] == 2
        assert rec["num_draft_tokens"] == r.metrics.num_draft_tokens


@pytest.mark.parametrize("strategy", ["vanilla", "mtp", "mtp-tree", "mtp-ngram", "ngram"])
def test_every_strategy_gives_the_same_greedy_text(ckpt, capsys, strategy):
    main(["generate", "--model", str(ckpt), "--prompt-ids", "5,6,7,5,6", "--max-new-tokens", "10", "--json",
          "--strategy", strategy])
    rec = json.loads(capsys.readouterr().out)
    main(["generate", "--model", str(ckpt), "--prompt-ids", "5,6,7,5,6", "--max-new-tokens", "10", "--json",
          "--strategy", "vanilla"])
    assert rec["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]


@pytest.mark.parametrize("argv,msg", [
    (["--prompt-ids", "1,2", "--k", "0"], "--k must be >= 1"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--prompt-ids", "1," * 300 + "1"], "301-token prompt"),  # the tiny context is 256
    (["--prompt-file", "/nonexistent.txt"], "no such file"),
    (["--prompt-ids", "1,2", "--strategy", "draft-model"], "needs --draft-model"),
])
def test_bad_input_exits_non_zero_with_a_named_error(ckpt, capsys, argv, msg):
    rc = main(["generate", "--model", str(ckpt), *argv])
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_mtp_on_a_checkpoint_without_mtp_is_refused(tmp_path, capsys):
    assert main(["init-random", str(tmp_path / "v2"), "--preset", "tiny-v2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "v2"), "--prompt-ids", "1,2", "--strategy", "mtp"]) == 2
    assert "needs an MTP layer" in capsys.readouterr().err


def test_convert_command(tmp_path, ckpt, capsys):
    assert main(["convert", "--to", "bf16", str(ckpt), str(tmp_path / "bf16")]) == 0
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (tmp_path / "bf16" / "tokenizer.json").exists()
    assert main(["convert", "--to", "fp4", str(ckpt), str(tmp_path / "x")]) == 2


def test_readme_main_job_runs_as_a_subprocess(tmp_path):
    env = dict(os.environ, MTP_SPEC_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "mtp_spec.cli", "generate", "def fibonacci(n):",
                          "--max-new-tokens", "16"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "AL " in out.stdout and "per-position acceptance" in out.stdout
