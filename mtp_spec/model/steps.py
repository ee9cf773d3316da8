"""Compiled step functions: the blocks and the output head of a model, compiled once for step-sized
forwards (decode, verify, draft extend, draft step) and run eager for everything else (prefill).

`torch.compile` works per function, not per module: every block of a model runs the same code, so
one compilation per (block kind, shapes) serves all layers (with inline_inbuilt_nn_modules, weights
are inputs, not constants). Shapes are static (dynamic=False): decode is (b, 1), verify (b, k+1),
and attention reads the whole preallocated cache, so a run compiles a handful of variants and then
replays them. On CUDA, mode "reduce-overhead" would capture CUDA graphs as well; the loader does not
ask for it (on an H200, torch 2.11, the MTP draft steps crashed inside it; see loader.load).
"""

from __future__ import annotations

import time

import torch

STEP_TOKENS = 16  # forwards of at most this many tokens per row count as steps


class StepCompiler:
    """Runs functions compiled (when enabled and the forward is step-sized) or eager, and keeps
    count of compilations and the time they took."""

    def __init__(self):
        self.enabled = False  # blocks and heads run through torch.compile for step-sized forwards
        self.small_m = False  # few-row CPU products use kernels/cpu_linear
        self.mode: str | None = None
        self.compiles = 0
        self.compile_s = 0.0
        self._fns: dict = {}

    def enable(self, mode: str | None = None, blocks: bool = True, small_m: bool = False) -> None:
        self.small_m = small_m
        if not blocks:
            return
        import torch._dynamo

        # every (block kind x shape) variant is a cache entry of the same code object
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 512)
        self.enabled, self.mode = True, mode

    def active(self, tokens_per_row: int, step: bool) -> bool:
        """Compiled for the forwards the caller marks as steps (their shapes repeat), of step size."""
        return self.enabled and step and tokens_per_row <= STEP_TOKENS

    def run(self, fn, *args, compiled: bool):
        """fn(*args), through its compiled version when `compiled`."""
        if not compiled:
            return fn(*args)
        cfn = self._fns.get(fn)
        if cfn is None:
            cfn = self._fns[fn] = torch.compile(fn, dynamic=False, mode=self.mode)
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        out = cfn(*args)
        if counters["stats"]["unique_graphs"] != before:
            self.compiles += counters["stats"]["unique_graphs"] - before
            self.compile_s += time.perf_counter() - t0
        return out

    def summary(self) -> dict:
        from mtp_spec.kernels import cpu_linear

        return {"compiled": self.enabled, "small_m_kernel": self.small_m,
                "cpu_kernel": cpu_linear.kind() if self.small_m else None, "compiles": self.compiles,
                "compile_s": round(self.compile_s, 2)}
