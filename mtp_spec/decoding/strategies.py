"""The strategy registry: a name and its settings -> a Proposer. The CLI, the experiment runner and
the benchmarks build proposers here, so a new strategy is registered in one place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtp_spec.decoding import proposers as P
from mtp_spec.decoding.cost import CostModel, load_prior, measure
from mtp_spec.decoding.timing import measure_steps

STRATEGIES = ("vanilla", "mtp", "mtp-tree", "mtp-ngram", "ngram", "draft-model")
MTP_DRAFTERS = ("mtp", "mtp-tree", "mtp-ngram")  # the strategies that draft with the MTP layer
AUTO_K_MAX = 4  # deepest draft chain `k="auto"` considers
# Not strategies of ours: other implementations an experiment times on the same prompts and weights
# (transformers' model class for the checkpoint: plain greedy `generate`, and its prompt lookup).
PEERS = ("transformers", "transformers-lookup")


@torch.no_grad()
def peer_generate(hf, prompt: list[int], max_new: int, eos_id: int | None, lookup: int | None = None) -> list[int]:
    """A peer's greedy output: transformers' `generate` on one prompt (with prompt lookup of `lookup`
    tokens for 'transformers-lookup'); the new token ids."""
    x = torch.tensor([prompt])
    out = hf.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id,
                      prompt_lookup_num_tokens=lookup)
    return out[0, x.shape[1]:].tolist()


def make_proposer(strategy: str, model, k: int | str, tree_width: int = 2, draft=None, ngram_max: int = 3,
                  sample_drafts: bool = True, compile: str = "off", k_max: int = AUTO_K_MAX,
                  cost: CostModel | None = None, batches: Sequence[int] = (1, 4)) -> P.Proposer:
    """`draft` is a loaded draft model (a Transformer) or a checkpoint directory for `draft-model`.
    k="auto" (mtp only): the depth 0..k_max is chosen before every step from acceptance and `cost`
    (a CostModel; None: measured on the model now, at `batches`), starting from the acceptance recorded beside the
    model's weights (`acceptance.json`), if any."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; choose from {', '.join(STRATEGIES)}")
    if strategy == "vanilla":
        return P.Proposer()
    if k == "auto":
        if strategy != "mtp":
            raise ValueError(f"--k auto works with strategy 'mtp' only, not '{strategy}'")
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}")
        prior = load_prior(getattr(model, "source", None))
        if cost is None:
            cost = measure(model, batches, range(1, k_max + 2), max_len=min(256, model.max_len))
            measure_steps(model, cost, batches, k_max)
        return P.AutoMTPProposer(model, k_max, cost=cost, prior=prior, sample_drafts=sample_drafts)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"--k must be >= 1 or 'auto', got {k!r}")
    if strategy == "mtp":
        return P.MTPProposer(model, k, sample_drafts=sample_drafts)
    if strategy == "mtp-tree":
        return P.MTPTreeProposer(model, k, tree_width)
    if strategy == "ngram":
        return P.NGramProposer(k, n_max=ngram_max)
    if strategy == "mtp-ngram":
        return P.MTPNGramProposer(model, k, ngram_max=ngram_max, sample_drafts=sample_drafts)
    if draft is None:
        raise ValueError("strategy 'draft-model' needs --draft-model DIR")
    if not isinstance(draft, torch.nn.Module):
        from mtp_spec.loader import load, resolve_model

        dev = next(model.parameters()).device
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.element_size() > 1)
        draft = load(resolve_model(draft, "--draft-model"), device=dev, dtype=dtype, part="main",
                     max_len=model.max_len, compile=compile)
    if draft.args.vocab_size != model.args.vocab_size:
        src = getattr(draft, "source", "the draft model")
        raise ValueError(f"--draft-model {src}: vocab_size {draft.args.vocab_size} differs from the "
                         f"target's {model.args.vocab_size}; the draft must share the tokenizer")
    return P.DraftModelProposer(draft, k, sample_drafts=sample_drafts)
