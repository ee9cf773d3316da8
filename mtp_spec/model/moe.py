"""Feed-forward layers: the dense SwiGLU MLP, the routing Gate, and MoE with shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mtp_spec.parallel as parallel
from mtp_spec.config import ModelArgs
from mtp_spec.kernels import FP8, act_quant, backend, cpu_linear, cpu_rows, grouped_fp8_gemm
from mtp_spec.model.layers import ColumnParallelLinear, Linear, RowParallelLinear


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Used for dense layers, each expert and the shared experts.

    `parallel`: the hidden features are split across ranks (w1, w3 by rows, w2 by columns) and w2's
    partial sums are all-reduced, unless `reduce` is False (MoE folds them into its own all-reduce).
    Routed experts are never split: whole experts are partitioned among ranks instead."""

    def __init__(self, dim: int, inter_dim: int, parallel: bool = False, reduce: bool = True):
        super().__init__()
        if parallel:
            self.w1 = ColumnParallelLinear(dim, inter_dim, "intermediate_size")
            self.w2 = RowParallelLinear(inter_dim, dim, "intermediate_size", reduce=reduce)
            self.w3 = ColumnParallelLinear(dim, inter_dim, "intermediate_size")
        else:
            self.w1 = Linear(dim, inter_dim)
            self.w2 = Linear(inter_dim, dim)
            self.w3 = Linear(dim, inter_dim)
        self.fused: list[Linear] = []  # w1 and w3 as one projection, set at load (outside the state dict)
        self.small_m = False  # set by compile_steps(): CPU steps use kernels/cpu_rows

    def fuse(self) -> None:
        if (f := Linear.concat([self.w1, self.w3])) is not None:
            self.fused = [f]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            h = self.fused[0](x)
            if self.small_m and cpu_rows.usable(h):
                return self.w2(cpu_rows.silu_mul(h))
            h1, h3 = h.chunk(2, dim=-1)
            return self.w2(F.silu(h1) * h3)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


STEP_ROWS = 256  # rows (batch x tokens) up to which a CUDA router runs its batch-invariant product


class Gate(nn.Module):
    """Chooses top-k experts per token.

    V3 (noaux_tc): sigmoid scores; `bias` (e_score_correction_bias) shifts the scores for selection
    only; groups ranked by the sum of their top-2; weights renormalised, times route_scale.
    V2: softmax scores, greedy or group-limited (group max), no renormalisation."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups, self.topk_groups = args.n_expert_groups, args.n_limited_groups
        self.score_func, self.method = args.score_func, args.topk_method
        self.norm_topk_prob, self.route_scale = args.norm_topk_prob, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.bias = nn.Parameter(torch.zeros(args.n_routed_experts)) if self.method == "noaux_tc" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda and x.shape[0] <= STEP_ROWS:
            # cuBLAS picks its fp32 kernel by the row count, so a step and a verify would round the
            # router's logits differently, and a near-tie between experts can flip (measured on an
            # H200: 22% of first-position argmaxes of a random 16B model). Products in float64,
            # rounded to fp32, agree whatever the row count (bar a value within 1e-16 of a rounding
            # boundary): the routing of decode and verify steps stays batch-invariant.
            logits = F.linear(x.double(), self.weight.double()).float()
        else:
            logits = F.linear(x.float(), self.weight.float())
        if self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        n = scores.shape[0]
        if self.method == "noaux_tc":
            choice = scores + self.bias.float()
            groups = choice.view(n, self.n_groups, -1).topk(2, dim=-1)[0].sum(-1)
            choice = self._keep_groups(choice, groups, float("-inf"))
            idx = choice.topk(self.topk, dim=-1, sorted=False)[1]
            weights = scores.gather(1, idx)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        elif self.method == "group_limited_greedy":
            groups = scores.view(n, self.n_groups, -1).amax(-1)
            weights, idx = self._keep_groups(scores, groups, 0.0).topk(self.topk, dim=-1, sorted=False)
        else:
            weights, idx = scores.topk(self.topk, dim=-1, sorted=False)
        if self.training:  # the expert load, for auxiliary-loss-free balancing
            self.load = torch.bincount(idx.flatten(), minlength=self.weight.shape[0])
        return weights * self.route_scale, idx

    def _keep_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        keep = group_scores.topk(self.topk_groups, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        mask = mask[:, :, None].expand(-1, -1, scores.shape[1] // self.n_groups).reshape(scores.shape)
        return scores.masked_fill(~mask, fill)


class MoE(nn.Module):
    """Routed experts (top-k per token by the Gate) plus shared experts.

    Three ways to run the routed experts, picked by shapes alone (so a compiled step never branches
    on values): `_dense` runs every expert on every token and weighs the unchosen ones by zero (cheapest
    when experts are few: no gathers, no host sync); `_gathered` gathers the chosen experts' weights per
    token (few tokens, many experts); `_looped` groups tokens by expert (many tokens: prefill and
    training; it reads the expert counts back to the host). FP8 weights on a GPU take `_grouped`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Gate(args)
        self.topk = args.n_activated_experts
        w = parallel.world()
        # expert parallelism: this rank holds experts [start, end); the others are None (their tensors
        # are never read), so parameter names keep the global expert index
        self.start, self.end = w.part(args.n_routed_experts, "n_routed_experts")
        self.n_experts = args.n_routed_experts
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim) if self.start <= i < self.end else None
                                     for i in range(args.n_routed_experts))
        self.shared_experts = (MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, parallel=True, reduce=False)
                               if args.n_shared_experts else None)
        self.stacked: dict[str, torch.Tensor] | None = None
        self.dense = args.n_routed_experts <= 4 * self.topk  # few experts: run them all (see _dense)
        self.small_m = False  # set by compile_steps(): the dense path's products use the CPU kernel

    @property
    def local_experts(self) -> list[MLP]:
        """The experts this rank holds, in index order (all of them in a single process)."""
        return self.experts[self.start:self.end]

    def _local(self, weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing onto this rank's experts: other ranks' choices weigh zero (shapes stay fixed; the
        rows they add to a local expert cost compute, not correctness)."""
        if self.end - self.start == self.n_experts:
            return weights, idx
        local = idx - self.start
        mine = (local >= 0) & (local < self.end - self.start)
        return weights * mine, local.clamp(0, self.end - self.start - 1)

    def stack(self) -> None:
        """At load: stack every expert's w1|w3 into (E, 2I, D) and w2, transposed, into (E, I, D); the
        experts keep their weights as views, so nothing is stored twice. FP8 weights use `pack_fp8`."""
        w1 = [e.w1.weight for e in self.local_experts]
        if any(w.dtype == FP8 for w in w1):
            return
        inter = w1[0].shape[0]
        w13 = torch.stack([torch.cat([e.w1.weight.data, e.w3.weight.data]) for e in self.local_experts])
        w2t = torch.stack([e.w2.weight.data.T for e in self.local_experts])
        for i, e in enumerate(self.local_experts):
            e.w1.weight = nn.Parameter(w13[i, :inter], requires_grad=False)
            e.w3.weight = nn.Parameter(w13[i, inter:], requires_grad=False)
            e.w2.weight = nn.Parameter(w2t[i].T, requires_grad=False)
        self.stacked = {"w13": w13, "w2t": w2t}
        if self.dense:  # every expert's w2 side by side as one (D, E I) weight, for the small-M kernel
            self.stacked["w2_all"] = w2t.reshape(-1, w2t.shape[-1]).T.contiguous()
        if self.shared_experts is not None:
            self.shared_experts.fuse()

    def pack_fp8(self) -> bool:
        """Stack the experts' e4m3 weights and scales into (E, N, K) tensors that the experts keep as
        views (no copy stays behind), so that one grouped kernel runs every selected expert at once;
        w1 and w3 side by side as one (E, 2I, K) weight when I is whole 128-blocks (one GEMM for both)."""
        self.packed = None
        for name in ("w1", "w2", "w3"):
            lins = [getattr(e, name) for e in self.local_experts]
            if any(lin.weight.dtype != FP8 for lin in lins):
                return False
        inter = self.local_experts[0].w1.weight.shape[0]
        groups = [("w13", ("w1", "w3")), ("w2", ("w2",))] if inter % 128 == 0 else \
            [("w1", ("w1",)), ("w3", ("w3",)), ("w2", ("w2",))]
        packed = {}
        for key, names in groups:
            w = torch.stack([torch.cat([getattr(e, n).weight.data for n in names]) for e in self.local_experts])
            s = torch.stack([torch.cat([getattr(e, n).scale for n in names]) for e in self.local_experts])
            for i, e in enumerate(self.local_experts):
                for j, n in enumerate(names):
                    lin = getattr(e, n)
                    rows, srows = lin.weight.shape[0], lin.scale.shape[0]
                    lin.weight = nn.Parameter(w[i, j * rows:(j + 1) * rows], requires_grad=False)
                    lin.scale = s[i, j * srows:(j + 1) * srows]
            packed[key] = (w, s)
        self.packed = packed
        return True

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """FP8 experts on the GPU: rows sorted by expert on the device (no read-back), grouped GEMMs."""
        from mtp_spec.kernels.triton_fp8 import route

        t, k = idx.shape
        tok = torch.arange(t, device=x.device).repeat_interleave(k)
        e = idx.flatten()
        routing = route(e, len(self.local_experts))
        xq, xs = act_quant(x.contiguous())
        a, a_s = xq.view(torch.uint8)[tok].view(FP8), xs[tok].contiguous()  # gather bytes: fp8 indexing is patchy
        if "w13" in self.packed:
            h1, h3 = grouped_fp8_gemm(a, a_s, *self.packed["w13"], e, routing=routing).chunk(2, dim=-1)
        else:
            h1 = grouped_fp8_gemm(a, a_s, *self.packed["w1"], e, routing=routing)
            h3 = grouped_fp8_gemm(a, a_s, *self.packed["w3"], e, routing=routing)
        hq, hs = act_quant((F.silu(h1) * h3).contiguous())
        y = grouped_fp8_gemm(hq, hs, *self.packed["w2"], e, routing=routing)
        return (y * weights.flatten()[:, None]).view(t, k, -1).sum(1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        packed = getattr(self, "packed", None)
        if packed and backend(x) == "triton" and x.shape[-1] % 128 == 0 and packed["w2"][0].shape[-1] % 128 == 0:
            y = self._grouped(x, *self._local(weights, idx))
        elif self.stacked is not None and self.dense:
            y = self._dense(x, weights, idx)
        elif self.stacked is not None and x.shape[0] * self.topk <= 64:
            y = self._gathered(x, *self._local(weights, idx))
        else:
            y = self._looped(x, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return parallel.all_reduce(y).view(shape)  # this rank's experts + its share of the shared ones

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        e, two_i, d = self.stacked["w13"].shape
        w13 = self.stacked["w13"].reshape(e * two_i, d)
        if self.small_m and cpu_linear.usable(x, w13):
            h = cpu_linear.step_linear(x, w13)
        else:
            h = F.linear(x, w13.to(x.dtype))
        h = h.view(-1, e, 2, two_i // 2)
        a = F.silu(h[:, :, 0]) * h[:, :, 1]  # (t, e, i)
        combine = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        combine = combine.scatter(1, idx, weights.to(x.dtype))[:, self.start:self.end]  # this rank's experts
        a = (a * combine[:, :, None]).reshape(x.shape[0], -1)
        if self.small_m and cpu_linear.usable(a, self.stacked["w2_all"]):
            return cpu_linear.step_linear(a, self.stacked["w2_all"])
        return a @ self.stacked["w2t"].reshape(-1, d).to(x.dtype)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t, k = idx.shape
        w13 = self.stacked["w13"][idx.flatten()].to(x.dtype)  # (t k, 2I, D)
        w2t = self.stacked["w2t"][idx.flatten()].to(x.dtype)  # (t k, I, D)
        xs = x.repeat_interleave(k, 0)
        h = torch.bmm(w13, xs[:, :, None])[:, :, 0]
        h1, h3 = h.chunk(2, dim=-1)
        y = torch.bmm((F.silu(h1) * h3)[:, None, :], w2t)[:, 0]
        return (y.view(t, k, -1) * weights.to(x.dtype)[:, :, None]).sum(1)

    def _looped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        counts = torch.bincount(idx.flatten(), minlength=self.n_experts).tolist()
        for e, c in enumerate(counts):
            if c == 0 or self.experts[e] is None:  # unchosen, or another rank's expert
                continue
            tok, slot = torch.where(idx == e)
            out = self.experts[e](x[tok]) * weights[tok, slot, None]
            y.index_add_(0, tok, out.to(y.dtype))
        return y
