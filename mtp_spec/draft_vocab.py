"""FR-Spec's frequency-ranked draft vocabulary (arXiv 2502.14856): the MTP head scores only the N most
frequent tokens, so a draft step reads N rows of the head instead of the whole vocabulary.

The main head still scores the whole vocabulary when verifying, so output stays lossless: greedy
drafts outside the N tokens are simply never proposed, and sampled drafts come from q restricted to
the N tokens and renormalised (q is 0 outside them, and the rejection rule handles such a q exactly).

Token frequencies are counted over a corpus (the model's training corpus for the shipped model) and
kept beside the checkpoint as `token_counts.json`: {"vocab_size", "tokens", "source", "ids", "counts"},
ids ranked by count (ties by id), tokens never seen left out. `mtp-spec count-tokens` writes one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mtp_spec.io import atomic_write_text

COUNTS_FILE = "token_counts.json"


def count_tokens(tok, texts: Iterable[str], vocab_size: int, eos_per_doc: bool = True,
                 batch: int = 64) -> np.ndarray:
    """Occurrences of every token id over `texts` (each encoded without specials, then followed by the
    tokenizer's eos when `eos_per_doc`, as the trainer lays out its corpus). Returns int64 (vocab_size,)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    eos = tok.eos_id if eos_per_doc else None
    chunk: list[str] = []

    def flush() -> None:
        for enc in tok.tok.encode_batch(chunk, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if len(ids) and int(ids.max()) >= vocab_size:
                raise ValueError(f"the tokenizer produced id {int(ids.max())}, outside the model's vocab_size "
                                 f"{vocab_size}: tokenizer and model do not match")
            counts[:] += np.bincount(ids, minlength=vocab_size)
            if eos is not None and eos < vocab_size:
                counts[eos] += 1
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return counts


def write_counts(path: str | os.PathLike, counts: np.ndarray, source: str) -> Path:
    """`token_counts.json` (or the file `path` names): the seen ids ranked by count, ties by id."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / COUNTS_FILE
    counts = np.asarray(counts, dtype=np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))  # count descending, then id ascending
    order = order[counts[order] > 0]
    doc = {"vocab_size": len(counts), "tokens": int(counts.sum()), "source": source,
           "ids": order.tolist(), "counts": counts[order].tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # one id and one count per line would double the size; a line per field keeps a diff readable enough
    atomic_write_text(path, "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items())
                      + "\n}\n")
    return path


def counts_file(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / COUNTS_FILE


def read_counts(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """Counts (vocab_size,) from a `token_counts.json` or the checkpoint directory that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / COUNTS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no token frequency file for the draft vocabulary; write one with "
                         f"`mtp-spec count-tokens --model {path.parent}`")
    try:
        doc = json.loads(path.read_text())
        ids, cnt, size = doc["ids"], doc["counts"], doc["vocab_size"]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a token frequency file (needs vocab_size, ids, counts: {e})") from None
    if size != vocab_size:
        raise ValueError(f"{path}: vocab_size {size} does not match the model's vocab_size {vocab_size}")
    if len(ids) != len(cnt) or any(not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"{path}: 'ids' and 'counts' must be equally long, ids in [0, {vocab_size})")
    out = np.zeros(vocab_size, dtype=np.int64)
    out[np.asarray(ids, dtype=np.int64)] = np.asarray(cnt, dtype=np.int64)
    return out


def top_ids(counts: np.ndarray, n: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """The n most frequent token ids (ties: lower id first), in id order; `within` limits the choice
    to those ids (an MTP layer trained with a restricted head can only draft from its own tokens)."""
    counts = np.asarray(counts, dtype=np.int64)
    pool = np.arange(len(counts)) if within is None else np.unique(within.cpu().numpy().astype(np.int64))
    if not 1 <= n <= len(pool):
        raise ValueError(f"draft vocabulary size must be in [1, {len(pool)}], got {n}")
    order = pool[np.lexsort((pool, -counts[pool]))]
    return torch.from_numpy(np.sort(order[:n]))


def draft_vocab_limit(model) -> int:
    """The largest draft vocabulary the model's MTP layers allow: the vocabulary, or the smallest
    vocabulary a layer was trained with (`MTPLayer.draft_vocab`, from the checkpoint)."""
    if model.mtp is None:
        raise ValueError("--draft-vocab: the model has no MTP layer to restrict")
    return min([model.args.vocab_size] + [len(layer.draft_vocab) for layer in model.mtp.layers
                                          if layer.draft_vocab is not None])


def apply_draft_vocab(model, n: int | None, counts: np.ndarray | str | os.PathLike | None = None,
                      where: str = "--draft-vocab") -> torch.Tensor | None:
    """Make every MTP layer of `model` draft from the n most frequent tokens (None: the layer's own
    vocabulary again, the full head or what it was trained with). `counts` is a counts array, a
    `token_counts.json`, or a checkpoint directory holding one. Returns the ids chosen (None: full).
    `where` names the option or field in errors."""
    if model.mtp is None:
        raise ValueError(f"{where}: the model has no MTP layer to restrict")
    limit = draft_vocab_limit(model)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit):
        raise ValueError(f"{where} must be a whole number in [1, {limit}] (the model's "
                         f"{'vocabulary' if limit == model.args.vocab_size else 'trained draft vocabulary'}), "
                         f"got {n!r}")
    if n is None or n == model.args.vocab_size:
        for layer in model.mtp.layers:
            layer.set_draft_vocab(None, runtime=True)  # back to the trained vocabulary (or the full head)
        return None
    if counts is None:
        raise ValueError(f"{where}: needs token frequencies (a {COUNTS_FILE} beside the checkpoint)")
    if not isinstance(counts, np.ndarray):
        counts = read_counts(counts, model.args.vocab_size)
    if len(counts) != model.args.vocab_size:
        raise ValueError(f"{where}: {len(counts)} token counts for a vocabulary of {model.args.vocab_size}")
    ids = None
    for layer in model.mtp.layers:
        ids = top_ids(counts, n, layer.draft_vocab)
        layer.set_draft_vocab(ids, runtime=True)
    return ids


class DraftHeads:
    """Draft vocabularies of several sizes on one model, each sub-head built once and switched by
    reference: a sweep whose rounds alternate sizes batch by batch pays for each head once (on
    DeepSeek-V3 a sub-head is rows of a 129,280 x 7,168 head, dequantised)."""

    def __init__(self, model, counts: np.ndarray | str | os.PathLike | None, where: str = "--draft-vocab"):
        self.model, self.counts, self.where = model, counts, where
        self.built: dict[int | None, list[tuple]] = {}

    def use(self, n: int | None) -> None:
        """Draft from the n most frequent tokens (0 or None: the layer's own vocabulary, as loaded)."""
        n = n or None
        if n not in self.built:
            if n is not None and self.counts is not None and not isinstance(self.counts, np.ndarray):
                self.counts = read_counts(self.counts, self.model.args.vocab_size)  # read once
            apply_draft_vocab(self.model, n, self.counts, self.where)
            self.built[n] = [(layer.draft_vocab, layer.sub_head, layer.sub_ids) for layer in self.model.mtp.layers]
            return
        for layer, (vocab, sub, ids) in zip(self.model.mtp.layers, self.built[n]):
            layer.draft_vocab, layer.sub_head, layer.sub_ids = vocab, sub, ids
