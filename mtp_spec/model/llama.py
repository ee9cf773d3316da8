"""The Llama family's decoder block: grouped-query attention with RoPE, then a SwiGLU MLP.

It presents the same interface as DeepSeek's `Block` (`forward(x, step, cache)`, `fuse()`), so the
one `Transformer`, its MTP layer, the caches and the engine run either family unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from mtp_spec.config import LlamaArgs
from mtp_spec.kernels import cpu_linear
from mtp_spec.model.attention import Step, attention_dtype
from mtp_spec.model.layers import Linear, RMSNorm, Rotary
from mtp_spec.model.moe import MLP


def cache_widths(args: LlamaArgs) -> dict[str, int]:
    """GQA caches every KV head's key and value per token."""
    return {"k": args.n_kv_heads * args.head_dim, "v": args.n_kv_heads * args.head_dim}


class GQA(nn.Module):
    """Attention with n_heads queries sharing n_kv_heads keys/values (head h reads KV head h // group)."""

    def __init__(self, args: LlamaArgs, rotary: Rotary):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, self.n_heads * self.hd)
        self.wk = Linear(args.dim, self.n_kv * self.hd)
        self.wv = Linear(args.dim, self.n_kv * self.hd)
        self.wo = Linear(self.n_heads * self.hd, args.dim)
        self.scale = self.hd ** -0.5
        self.rotary = [rotary]  # a list keeps the shared table out of this module's state
        self.fused: list[Linear] = []  # wq, wk, wv as one projection, set at load
        self.small_m = False  # set by compile_steps(): few-query attention on the CPU uses the C kernel

    def fuse(self) -> None:
        if (f := Linear.concat([self.wq, self.wk, self.wv])) is not None:
            self.fused = [f]

    def forward(self, x: torch.Tensor, step: Step, cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.fused[0](x) if self.fused else torch.cat([self.wq(x), self.wk(x), self.wv(x)], -1)
        rot = self.rotary[0]
        rope = step.rope or rot.tables(step.positions)
        nq, nk = self.n_heads * self.hd, self.n_kv * self.hd
        qk = rot(qkv[..., : nq + nk].view(b, s, self.n_heads + self.n_kv, self.hd), rope)  # one rotation
        q, k, v = qk[:, :, : self.n_heads], qk[:, :, self.n_heads:].reshape(b, s, nk), qkv[..., nq + nk:]
        if cache is not None:
            ck, cv = cache
            ck.index_put_((step.rows, step.slots), k.to(ck.dtype))
            cv.index_put_((step.rows, step.slots), v.to(cv.dtype))
            k, v = ck, cv
        dt = attention_dtype(x)
        t = k.shape[1]
        kh, vh = k.view(b, t, self.n_kv, self.hd), v.view(b, t, self.n_kv, self.hd)
        if self.small_m and s <= cpu_linear.MAX_M and cpu_linear.attention_usable(kh, vh) \
                and not torch.compiler.is_compiling():
            o = cpu_linear.attention(q, kh, vh, step.mask, self.scale)
            return self.wo(o.reshape(b, s, self.n_heads * self.hd).to(x.dtype))
        q = q.to(dt).view(b, s, self.n_kv, self.n_heads // self.n_kv, self.hd)
        k, v = k.to(dt).view(b, t, self.n_kv, self.hd), v.to(dt).view(b, t, self.n_kv, self.hd)
        scores = torch.einsum("bskgd,btkd->bskgt", q, k) * self.scale
        scores = scores.masked_fill(~step.mask[:, :, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(dt)
        o = torch.einsum("bskgt,btkd->bskgd", probs, v)
        return self.wo(o.reshape(b, s, self.n_heads * self.hd).to(x.dtype))


class LlamaBlock(nn.Module):
    def __init__(self, args: LlamaArgs, layer_id: int, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = GQA(args, rotary)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim)

    def forward(self, x: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), step, kv)
        return x + self.ffn(self.ffn_norm(x))

    def fuse(self) -> None:
        self.attn.fuse()
        self.ffn.fuse()
