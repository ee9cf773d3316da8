"""The decoder: embedding, blocks, final norm, head. DeepSeek-V3/V2 blocks (MLA; dense first, then
MoE) or Llama-family blocks (GQA, SwiGLU), chosen by the config's family; everything else is shared.

`Transformer.forward` returns hidden states for every position (the MTP module consumes them) and
logits for every position, or only at `logits_at` (prefill and draft extend need one row each).

Speed: after `compile_steps()`, forwards of at most STEP_TOKENS tokens per row (decode, verify,
draft steps) run compiled blocks; longer ones (prefill) run eager. Eager stays the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import mtp_spec.parallel as parallel
from mtp_spec.cache import KVCache
from mtp_spec.config import ModelArgs
from mtp_spec.model.attention import cache_dtype, cache_widths, make_step
from mtp_spec.model.block import Block
from mtp_spec.model.layers import ColumnParallelLinear, ParallelEmbedding, RMSNorm, Rotary, activation_dtype
from mtp_spec.model.llama import LlamaBlock
from mtp_spec.model.llama import cache_widths as llama_cache_widths
from mtp_spec.model.moe import MoE
from mtp_spec.model.mtp import MTP
from mtp_spec.model.steps import StepCompiler


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (b, s, vocab), or (b, m, vocab) at logits_at
    hidden_states: torch.Tensor  # (b, s, dim), after the final norm
    prenorm_hidden: torch.Tensor  # (b, s, dim), the residual stream before it


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_len: int | None = None, main: bool = True, mtp: bool = True):
        super().__init__()
        self.args = args
        self.max_len = max_len or min(args.max_seq_len, 8192)
        self.rotary = Rotary(args, self.max_len)
        self.has_main = main
        if args.family == "llama" and parallel.world().size > 1:
            raise ValueError(f"tensor parallelism is implemented for the DeepSeek family; this {args.model_type} "
                             f"model runs in one process (world size {parallel.world().size} requested)")
        block, self.cache_widths = (LlamaBlock, llama_cache_widths) if args.family == "llama" else (Block, cache_widths)
        if main:
            self.embed = ParallelEmbedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(block(args, i, self.rotary) for i in range(args.n_layers))
            self.norm = RMSNorm(args.dim, args.norm_eps)
            self.head = ColumnParallelLinear(args.dim, args.vocab_size, "vocab_size", gather=True)
        self.steps = StepCompiler()
        self.mtp = None
        if mtp and args.n_mtp_layers > 0:
            self.mtp = MTP(args, self.rotary, steps=self.steps, block=block, cache_widths=self.cache_widths)
        if args.family == "llama":  # the post-hoc MTP layer shares the main embedding and head
            if main and args.tie_word_embeddings:
                self.head.weight = self.embed.weight
            for layer in self.mtp.layers if self.mtp is not None and main else []:
                layer.embed, layer.head = self.embed, self.head

    def materialize(self, device: torch.device | str, keep_fp8: bool = False) -> Transformer:
        """Finish a model whose parameters were loaded into a meta-built skeleton: rebuild the
        non-persistent rotary tables on `device`, stack FP8 experts for the grouped kernel, and fuse
        projections that read the same input."""
        real = Rotary(self.args, self.max_len).to(device)
        self.rotary.cos, self.rotary.sin = real.cos, real.sin
        if self.has_main and self.args.family == "llama" and self.args.tie_word_embeddings:
            self.head.weight = self.embed.weight  # loading replaced the embedding's parameter
        if self.mtp is not None and self.has_main and self.args.family == "llama":
            for layer in self.mtp.layers:
                layer.embed, layer.head = self.embed, self.head
        for m in self.modules():
            if isinstance(m, MoE) and keep_fp8:
                m.pack_fp8()
            if isinstance(m, (Block, LlamaBlock)):
                m.fuse()
        if self.mtp is not None:
            for layer in self.mtp.layers:
                layer.set_draft_vocab(layer.draft_vocab)
        return self

    def compile_steps(self, blocks: bool = True, mode: str | None = None) -> StepCompiler:
        """The fast path for step-sized forwards (MTP layers included): few-row products on the CPU go
        to the small-M kernel (when it builds), and with `blocks` the blocks and heads run compiled."""
        from mtp_spec.kernels import cpu_linear

        fast = next(self.parameters()).device.type == "cpu" and cpu_linear.available()
        for m in self.modules():
            for part in [m, *getattr(m, "fused", []), *getattr(m, "sub_head", [])]:
                if hasattr(part, "small_m"):  # Linear, and the attention modules
                    part.small_m = fast
        self.steps.enable(mode if blocks else None, blocks=blocks, small_m=fast)
        return self.steps

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.args.n_layers, batch, max_len or self.max_len, self.cache_widths(self.args), p.device,
                       dtype or cache_dtype(p))

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                absorb: bool = True, logits_at: torch.Tensor | None = None, step: bool = False) -> ModelOutput:
        """Run new tokens (b, s). With a cache, they are written at per-row `start` (default: the cache's
        lengths) and every row attends over its cache; the lengths are not changed here, the caller
        decides what to keep. logits_at (b, m) picks the positions that go through the head. `step`
        marks a forward whose shapes repeat (decode, verify): it may run compiled."""
        if not self.has_main:
            raise RuntimeError("this model was loaded with the MTP layer only; load the main model too")
        step = make_step(tokens, start, cache, tree_mask, positions, absorb, self.rotary)
        compiled = self.steps.active(tokens.shape[1], step)
        h = self.embed(tokens)
        h = h.to(activation_dtype(h))
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            h = self.steps.run(type(layer).forward, layer, h, step, kv, compiled=compiled)
        normed = self.norm(h)
        sel = normed if logits_at is None else normed.gather(1, logits_at[:, :, None].expand(-1, -1, h.shape[-1]))
        logits = self.steps.run(type(self.head).forward, self.head, sel, compiled=compiled)
        return ModelOutput(logits=logits, hidden_states=normed, prenorm_hidden=h)
