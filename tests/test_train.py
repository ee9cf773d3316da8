"""Corpus, tokenizer and joint main+MTP training."""

import csv
import json

import pytest
import torch

from mtp_spec.train import corpus
from mtp_spec.train.trainer import TrainConfig, train

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n<|eos|>\n" for i in range(400))


def _cfg(tmp_path, **kw):
    (tmp_path / "train.txt").write_text(kw.pop("text", TEXT))
    base = dict(out=str(tmp_path / "run"), preset="tiny", corpus=str(tmp_path / "train.txt"), vocab_size=300,
                steps=40, batch=8, seq_len=48, lr=3e-3, warmup=5, save_every=10, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run):
    rows = list(csv.DictReader(open(run / "loss.csv")))
    return [float(r["main_loss"]) for r in rows], [float(r["mtp_loss"]) for r in rows]


def test_micro_training_lowers_main_and_mtp_loss(tmp_path):
    cfg = _cfg(tmp_path)
    model_dir = train(cfg, progress=False)
    main, mtp = _losses(tmp_path / "run")
    assert len(main) == 40
    assert sum(main[-5:]) / 5 < 0.7 * sum(main[:5]) / 5
    assert sum(mtp[-5:]) / 5 < 0.7 * sum(mtp[:5]) / 5
    import mtp_spec

    m = mtp_spec.load(model_dir)
    assert m.args.fp8 and m.mtp is not None
    assert (model_dir / "tokenizer.json").exists()
    assert json.loads((model_dir / "training.json").read_text())["seed"] == 3


def test_resuming_gives_the_same_next_step_loss(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    straight = _cfg(tmp_path / "a", steps=12, save_every=4)
    train(straight, progress=False)
    ref = list(csv.DictReader(open(tmp_path / "a" / "run" / "loss.csv")))

    (tmp_path / "b").mkdir()
    killed = _cfg(tmp_path / "b", steps=12, save_every=4)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # dies during step 7; the last saved state is step 4
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(killed, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(killed, progress=False)
    got = list(csv.DictReader(open(tmp_path / "b" / "run" / "loss.csv")))
    assert [r["step"] for r in got] == [str(i) for i in range(1, 13)]  # nothing lost, nothing repeated
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train(_cfg(tmp_path, text="\n<|eos|>\n"), progress=False)


def test_vocabulary_that_does_not_fit_the_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train(_cfg(tmp_path, vocab_size=600), progress=False)  # tiny preset embeds 512 tokens


def test_corpus_split_holds_out_at_least_five_percent_of_modules_and_matches_the_committed_list():
    docs = corpus.stdlib_docs()
    train_docs, held = corpus.split(docs)
    modules = [d for d in docs if not d.is_topic]
    held_modules = [d for d in held if not d.is_topic]
    assert len(held_modules) >= 0.05 * len(modules)
    assert not {d.name for d in train_docs} & {d.name for d in held}
    committed = set(corpus.HELDOUT_FILE.read_text().split())
    assert {d.name for d in held} <= committed
    assert len(corpus.code_prompts(held)) >= 100 and len(corpus.prose_prompts(held)) >= 100


def test_mtp_only_trains_a_fresh_mtp_layer_on_a_frozen_main_model(tmp_path):
    import mtp_spec
    from mtp_spec.config import ModelArgs
    from mtp_spec.random_model import write_random_checkpoint
    from mtp_spec.train.tokenizer import train_tokenizer

    train_tokenizer([TEXT], tmp_path / "tok", 300)
    main_dir = write_random_checkpoint(tmp_path / "v2", ModelArgs.from_name("tiny-v2"), seed=1, dtype=torch.float32)
    cfg = _cfg(tmp_path, mtp_only=str(main_dir), tokenizer=str(tmp_path / "tok"), steps=30)
    out = train(cfg, progress=False)
    main, mtp = _losses(tmp_path / "run")
    assert sum(mtp[-5:]) / 5 < 0.8 * sum(mtp[:5]) / 5
    assert max(main) - min(main) < 0.5  # the main model does not learn (only the data changes)
    before = mtp_spec.load(main_dir)
    after = mtp_spec.load(out)
    assert after.mtp is not None and after.args.n_mtp_layers == 1
    w0, w1 = before.layers[0].attn.wq.weight, after.layers[0].attn.wq.weight  # frozen, up to the fp8 export
    assert ((w1 - w0).abs() <= w0.abs() * 2**-4 + 1e-6).all()
