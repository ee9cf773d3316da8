"""Row-wise ops of a CPU step in C: RMSNorm, SwiGLU's silu(a) * b, and the rotary of both families.

A decode step of SmolLM2-135M spends ~8 of its ~20 ms outside the matrix products and attention,
in ~3,800 small torch ops (experiments/profile_cpu_step.py --ops). `F.rms_norm` alone, 61 calls,
took ~2 ms (~34 us a call: it upcasts, squares, means, adds, rsqrts and multiplies as separate
ops); here each of these ops is one call of a few microseconds.

Each row is computed alone and in a fixed order (sums of squares in 8-lane chunks into four
accumulators in turn, then a fixed horizontal sum), so a row's result does not depend on the other
rows in the call: a verify of k+1 tokens rounds exactly like k+1 single-token steps, as the linear
and attention kernels of kernels/cpu_linear.py do. The results differ from torch's in the last bits
(another summation order), so eager (`compile="off"`) stays the reference.
"""

from __future__ import annotations

import ctypes
import subprocess

import torch

from mtp_spec.kernels import cpu_linear

_SOURCE = cpu_linear.PRELUDE + r"""
static inline __m256 load8_w(const void* w, int bf16, int64_t i) {
  return bf16 ? load8_bf16((const uint16_t*)w + i) : load8_f32((const float*)w + i);
}
static inline float scalar_w(const void* w, int bf16, int64_t i) {
  return bf16 ? scalar_bf16(((const uint16_t*)w)[i]) : ((const float*)w)[i];
}

/* y = w * (x * 1 / sqrt(mean(x^2) + eps)), row by row; rows of x are xs floats apart. */
void rms_norm(const float* x, int64_t xs, const void* w, int bf16, float* y, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * xs;
    float* o = y + m * D;
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (int c = 0; i + 8 <= D; i += 8, c = (c + 1) & 3) {
      const __m256 v = _mm256_loadu_ps(r + i);
      a[c] = _mm256_fmadd_ps(v, v, a[c]);
    }
    float ss = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    for (; i < D; ++i) ss += r[i] * r[i];
    const float inv = 1.f / sqrtf(ss / (float)D + eps);
    const __m256 vi = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= D; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(load8_w(w, bf16, i), _mm256_mul_ps(_mm256_loadu_ps(r + i), vi)));
    for (; i < D; ++i) o[i] = scalar_w(w, bf16, i) * (r[i] * inv);
  }
}

/* y[m, j] = silu(g[m, j]) * g[m, I + j] for g (M x 2I), SwiGLU's gate and up halves side by side;
   every element the same way (8-lane exp; the I % 8 tail through the same code, padded). At -inf
   it gives -inf * up where torch gives NaN; activations never get there. */
void silu_mul(const float* g, float* y, int64_t M, int64_t I) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = g + m * 2 * I;
    const float* b = a + I;
    float* o = y + m * I;
    for (int64_t j = 0; j < I; j += 8) {
      __m256 va, vb;
      if (j + 8 <= I) {
        va = _mm256_loadu_ps(a + j);
        vb = _mm256_loadu_ps(b + j);
      } else {
        float ta[8] = {0}, tb[8] = {0};
        memcpy(ta, a + j, sizeof(float) * (I - j));
        memcpy(tb, b + j, sizeof(float) * (I - j));
        va = _mm256_loadu_ps(ta);
        vb = _mm256_loadu_ps(tb);
      }
      const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), va)));
      const __m256 r = _mm256_mul_ps(_mm256_div_ps(va, den), vb);
      if (j + 8 <= I) {
        _mm256_storeu_ps(o + j, r);
      } else {
        float t[8];
        _mm256_storeu_ps(t, r);
        memcpy(o + j, t, sizeof(float) * (I - j));
      }
    }
  }
}

/* Rotary for B x S tokens of H heads of D: with the token's cos and sin (D/2 each) and x1, x2 the
   halves (Llama's rotate_half) or the even and odd elements (DeepSeek's pairs, `pairs`), y = [x1 c -
   x2 s | x2 c + x1 s] (contiguous). x's batch rows are xb floats apart, tokens xs, heads xh. */
void rope(const float* x, int64_t xb, int64_t xs, int64_t xh, const float* cs, const float* sn, float* y,
          int64_t B, int64_t S, int64_t H, int64_t D, int pairs) {
  const int64_t h2 = D / 2, step = pairs ? 2 : 1, off = pairs ? 1 : h2;
  for (int64_t t = 0; t < B * S; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const float* r = x + (t / S) * xb + (t % S) * xs + h * xh;
      const float* c = cs + t * h2;
      const float* s = sn + t * h2;
      float* o = y + (t * H + h) * D;
      for (int64_t j = 0; j < h2; ++j) {
        const float x1 = r[j * step], x2 = r[j * step + off];
        o[j] = x1 * c[j] - x2 * s[j];
        o[j + h2] = x2 * c[j] + x1 * s[j];
      }
    }
}
"""

_lib = None
_tried = False


def _build():
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            lib = cpu_linear._compile("cpu_rows", _SOURCE, ["-mavx2", "-mfma"])
            lib.rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
            lib.silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
            lib.rope.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
                                 + [ctypes.c_int64] * 4 + [ctypes.c_int])
            for f in (lib.rms_norm, lib.silu_mul, lib.rope):
                f.restype = None
            _lib = lib
        except (OSError, subprocess.SubprocessError):
            pass  # the torch ops serve
    return _lib


def usable(x: torch.Tensor) -> bool:
    """Whether these kernels take x: fp32 on the CPU, last dim contiguous, outside torch.compile
    (shapes and dtypes only), and the kernels built. Callers ask only where `compile_steps` turned
    the CPU kernels on (so `cpu_linear.available()` and MTP_SPEC_CPU_LINEAR have had their say)."""
    return (not torch.compiler.is_compiling() and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.stride(-1) == 1 and x.dim() >= 2 and (_lib if _tried else _build()) is not None)


def rms_norm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """`usable`, and a weight the kernel reads (fp32 or bf16)."""
    return w.dtype in (torch.float32, torch.bfloat16) and usable(x)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * (x / rms(x)) over the last dim; w fp32 or bf16 (`rms_norm_usable`). Rows of x may be strided."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # a view where x's rows are evenly strided, else a copy
    w = w.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    _build().rms_norm(rows.data_ptr(), rows.stride(0), w.data_ptr(), int(w.dtype == torch.bfloat16), y.data_ptr(),
                      rows.shape[0], d, eps)
    return y


def silu_mul(g: torch.Tensor) -> torch.Tensor:
    """silu(g[..., :I]) * g[..., I:] for g (..., 2I)."""
    g = g.contiguous()
    i = g.shape[-1] // 2
    y = torch.empty(*g.shape[:-1], i, dtype=torch.float32)
    _build().silu_mul(g.data_ptr(), y.data_ptr(), g.numel() // (2 * i), i)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: bool) -> torch.Tensor:
    """x (b, s, h, d), or (b, s, d) for one head, rotated by cos, sin (broadcastable to (b, s, 1, d/2))
    the Llama way (halves) or DeepSeek's (pairs, output [even' | odd']), as layers.Rotary does. x may
    be a view into a wider output (any batch, token and head strides). Returns a contiguous tensor."""
    xv = x if x.dim() == 4 else x.unsqueeze(2)
    b, s, h, d = xv.shape
    cos = cos.expand(b, s, 1, d // 2).float().contiguous()
    sin = sin.expand(b, s, 1, d // 2).float().contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    _build().rope(xv.data_ptr(), xv.stride(0), xv.stride(1), xv.stride(2), cos.data_ptr(), sin.data_ptr(),
                  y.data_ptr(), b, s, h, d, int(pairs))
    return y
