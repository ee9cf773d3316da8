"""A small-M linear for the CPU: y = x W^T for a few rows, reading W once.

Decode and verification multiply a handful of rows by every weight. MKL and oneDNN are far from the
memory limit there, and bf16 on AVX2 CPUs is worse: 4 rows cost ~3.5x one row
(experiments/bench_linear.py), so a verify of k+1 tokens costs nearly k+1 decode steps and
speculation cannot pay. This kernel streams each weight row once (prefetching ahead), converts bf16
to fp32 in registers, and keeps two 8-lane accumulators per input row, up to 4 input rows per pass
over a weight row (more rows take further passes over the same row, then in L1): memory-bound up to
M = 4 and no register spills above (16 rows in one pass spilled and cost twice as much).

Every output element is reduced in the same order whatever M is (16-wide chunks alternating between
two accumulators, their sum, a fixed horizontal sum, then the K % 16 tail in order), so a row's
result does not depend on which other rows share the call: a verify of k+1 tokens rounds exactly as
k+1 single-token decodes would (batch invariance). The attention kernel gives each (batch row, head,
query position) its own task and sums its dot products in a fixed order, for the same reason; it
scores 8 keys at a time (a hadd tree per key), takes the softmax's exponentials 8 lanes at a time and
keeps the weighted sum of values in registers: 1.9-2.9x faster than one key at a time with scalar
expf at 1-8 queries of SmolLM2 over 160 cached tokens (experiments/profile_cpu_step.py --base b36087d).

On CPUs with AVX-512 BF16 (Zen 4, Sapphire Rapids and later) there is a second kernel for bf16
weights, opt-in (MTP_SPEC_CPU_BF16_DOT=1): the input rows are rounded to bf16 once per call (round
to nearest even) and VDPBF16PS sums each pair of products into fp32 accumulators (the rounding of a
bf16 GEMM on a GPU; the same for every row whatever M is, so batch invariance holds). It halves the
instructions per weight, but on this project's Zen 4 it did not pay where it matters: whole SmolLM2
forwards of 1 / 4 tokens took 17.7 / 23.4 ms against 17.0 / 21.9 ms with the AVX2 kernel (taking
turns; it wins from ~5 rows up), and a 512-bit version was slower still at one row
(experiments/profile_cpu_step.py).

The kernels are plain C with intrinsics and OpenMP, compiled with the system's C compiler on first
use (about a second) into ~/.cache/mtp-spec/kernels and called through ctypes; `available()` says
whether that worked, `kind()` which kernel bf16 weights take. The linear is registered as a torch
custom op, so compiled steps call it without a graph break.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MAX_M = 16
# Shared by every C source here and in cpu_rows.py: loads, the fixed-order horizontal sum, FOR_M.
PRELUDE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* unrolled, so the per-row accumulators stay in registers (a plain loop kept them on the stack) */
#define FOR_M(M) _Pragma("GCC unroll 4") for (int m = 0; m < (M); ++m)

static inline __m256 load8_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline float scalar_bf16(uint16_t v) { uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float scalar_f32(float v) { return v; }
static inline float hsum(__m256 v) {  /* (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1 */
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
/* e^x for 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Horner), times
   2^n built in the exponent bits; relative error ~2e-7, inputs clamped to [-87, 88]. Scalar expf in
   a loop cost ~1.8 ms of a 4-token SmolLM2 forward (SwiGLU) and most of the attention kernel's time. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2 in two parts (Cody-Waite) */
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
"""
_SOURCE = PRELUDE + r"""
#define PREFETCH 1024  /* elements ahead of the row being read */

#define ROW(M, T)                                                                                   \
static void row_##T##_##M(const float* __restrict x, const void* w, float* __restrict y,             \
                          int64_t N, int64_t K, int64_t n) {                                        \
  const T##_t* row = (const T##_t*)w + n * K;                                                       \
  __m256 a0[M], a1[M];                                                                              \
  FOR_M(M) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }                            \
  int64_t k = 0;                                                                                    \
  for (; k + 16 <= K; k += 16) {                                                                    \
    _mm_prefetch((const char*)(row + k + PREFETCH), _MM_HINT_T0);                                   \
    __m256 w0 = load8_##T(row + k), w1 = load8_##T(row + k + 8);                                    \
    FOR_M(M) {                                                                                      \
      a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);                          \
      a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);                      \
    }                                                                                               \
  }                                                                                                 \
  FOR_M(M) {                                                                                        \
    float s = hsum(_mm256_add_ps(a0[m], a1[m]));                                                    \
    for (int64_t j = k; j < K; ++j) s += scalar_##T(row[j]) * x[m * K + j];                         \
    y[m * N + n] = s;                                                                               \
  }                                                                                                 \
}
typedef uint16_t bf16_t;
typedef float f32_t;
#define BOTH(M) ROW(M, bf16) ROW(M, f32)
BOTH(1) BOTH(2) BOTH(3) BOTH(4)

typedef void (*row_fn)(const float*, const void*, float*, int64_t, int64_t, int64_t);
static const row_fn ROWS[2][5] = {
  {0, row_f32_1, row_f32_2, row_f32_3, row_f32_4}, {0, row_bf16_1, row_bf16_2, row_bf16_3, row_bf16_4}};

/* Up to 4 input rows per pass over a weight row (two accumulators each: 8 + 2 of AVX2's 16
   registers; 16 input rows at once spilled and cost 2x); more rows take further passes over the
   same weight row, which is then in L1, so the weights are still read from memory once. */
int small_m_linear(const float* x, const void* w, float* y, int64_t M, int64_t N, int64_t K, int bf16, int nt) {
  if (M < 1 || M > 16) return 1;
  const row_fn* fns = ROWS[bf16];
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mm = M - m0 < 4 ? M - m0 : 4;
      fns[mm](x + m0 * K, w, y + m0 * N, N, K, n);
    }
  return 0;
}

/* q . k for 8 keys kt floats apart, as one vector: each key's products summed over 8-lane chunks in
   order (the Dk % 8 tail masked in), then its lanes as ((0+1)+(2+3))+((4+5)+(6+7)) by a hadd tree.
   dot1 is the same sum for one key, in the same order, for the last T % 8 keys. */
static inline __m256i tail_mask(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline __m256 dot8(const float* q, const float* k, int64_t kt, int64_t Dk) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= Dk; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j)
      a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * kt + i), a[j]);
  }
  if (i < Dk) {
    const __m256i mk = tail_mask(Dk - i);
    const __m256 qv = _mm256_maskload_ps(q + i, mk);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k + j * kt + i, mk), a[j]);
  }
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}
static inline float dot1(const float* q, const float* k, int64_t Dk) {
  __m256 a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= Dk; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a);
  if (i < Dk) {
    const __m256i mk = tail_mask(Dk - i);
    a = _mm256_fmadd_ps(_mm256_maskload_ps(q + i, mk), _mm256_maskload_ps(k + i, mk), a);
  }
  float l[8];
  _mm256_storeu_ps(l, a);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* One task per (batch row, head, query position), so even one decode query splits over the threads
   (the 9 heads of a SmolLM2 step); tasks write disjoint outputs, and each sums in a fixed order, so
   a query's result does not depend on the other queries in the call. Keys past the query's last
   visible one are not read, masked scores among the rest become -inf (by selection, so whatever a
   masked slot holds cannot leak), the softmax's exponentials run 8 lanes at a time, and the weighted
   sum of values keeps 64 output lanes in registers across all positions (scaled by 1 / sum at the
   end). A NaN score gives a NaN output, as in torch. */
void attention(const float* q, const float* k, const float* v, const uint8_t* mask, float* out,
               int64_t B, int64_t S, int64_t H, int64_t KVH, int64_t Dk, int64_t Dv, int64_t T,
               int64_t kb, int64_t kt, int64_t kh, int64_t vb, int64_t vt, int64_t vh, float scale, int nt) {
  const int64_t group = H / KVH;
#pragma omp parallel num_threads(nt)
  {
    float* p = (float*)malloc(sizeof(float) * (T + 8));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * H * S; ++task) {
      const int64_t b = task / (H * S), h = (task / S) % H, s = task % S, g = h / group;
      const float* kr = k + b * kb + g * kh;
      const float* vr = v + b * vb + g * vh;
      const uint8_t* mr = mask + (b * S + s) * T;
      const float* qq = q + ((b * S + s) * H + h) * Dk;
      float* o = out + ((b * S + s) * H + h) * Dv;
      int64_t n = T;  /* keys past the query's last visible one are never read */
      while (n > 0 && !mr[n - 1]) --n;
      __m256 vmx = _mm256_set1_ps(-INFINITY);
      const __m256 ninf = vmx, vscale = _mm256_set1_ps(scale);
      __m256 vnan = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 8 <= n; t += 8) {  /* masked scores are -inf by selection: garbage keys do not leak */
        const __m256i mb = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(mr + t)));
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(mb, _mm256_setzero_si256()));
        const __m256 sc = _mm256_blendv_ps(ninf, _mm256_mul_ps(dot8(qq, kr + t * kt, kt, Dk), vscale), keep);
        _mm256_storeu_ps(p + t, sc);
        vmx = _mm256_max_ps(vmx, sc);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(sc, sc, _CMP_UNORD_Q));
      }
      float mx = -INFINITY, lanes[8];
      _mm256_storeu_ps(lanes, vmx);
      for (int j = 0; j < 8; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
      int nan = _mm256_movemask_ps(vnan) != 0;
      for (; t < n; ++t) {
        p[t] = mr[t] ? dot1(qq, kr + t * kt, Dk) * scale : -INFINITY;
        if (p[t] > mx) mx = p[t];
        nan |= p[t] != p[t];
      }
      if (nan || mx == -INFINITY) {  /* NaN in, NaN out; nothing to attend to (a padding row): zeros */
        for (int64_t d = 0; d < Dv; ++d) o[d] = nan ? NAN : 0.f;
        continue;
      }
      for (int64_t u = n; u < ((n + 7) & ~(int64_t)7); ++u) p[u] = -INFINITY;
      vmx = _mm256_set1_ps(mx);
      __m256 acc = _mm256_setzero_ps();
      for (t = 0; t < n; t += 8) {  /* masked lanes (-inf) become exactly 0 */
        const __m256 x = _mm256_loadu_ps(p + t);
        const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(x, vmx)));
        _mm256_storeu_ps(p + t, e);
        acc = _mm256_add_ps(acc, e);
      }
      const __m256 inv = _mm256_set1_ps(1.f / hsum(acc));
      int64_t d = 0;
      for (; d + 64 <= Dv; d += 64) {
        __m256 a[8];
        for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
        for (int64_t u = 0; u < n; ++u) {
          if (!mr[u]) continue;
          const __m256 w = _mm256_set1_ps(p[u]);
          const float* vv = vr + u * vt + d;
          _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j)
            a[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vv + 8 * j), a[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(o + d + 8 * j, _mm256_mul_ps(a[j], inv));
      }
      for (; d + 8 <= Dv; d += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t u = 0; u < n; ++u)
          if (mr[u]) a = _mm256_fmadd_ps(_mm256_set1_ps(p[u]), _mm256_loadu_ps(vr + u * vt + d), a);
        _mm256_storeu_ps(o + d, _mm256_mul_ps(a, inv));
      }
      for (; d < Dv; ++d) {
        float a = 0.f;
        for (int64_t u = 0; u < n; ++u)
          if (mr[u]) a += p[u] * vr[u * vt + d];
        o[d] = a * _mm256_cvtss_f32(inv);
      }
    }
    free(p);
  }
}
"""

_BF16_SOURCE = PRELUDE + r"""
#define PREFETCH 1024  /* bf16 elements ahead of the row being read */

/* One weight row against M input rows (bf16), on 256-bit registers (512-bit ones made the one-row
   decode ~8% slower on Zen 4): 32 elements per step in two 16-element chunks, each into its own
   accumulator; then a full 16-chunk of the tail into a0, the last 1..15 elements masked into a1
   (zeros add nothing); then a0 + a1 and the fixed horizontal sum. */
#define ROW(M)                                                                                      \
static void row_##M(const uint16_t* __restrict x, const uint16_t* w, float* __restrict y,          \
                    int64_t N, int64_t K, int64_t n) {                                              \
  const uint16_t* row = w + n * K;                                                                  \
  __m256 a0[M], a1[M];                                                                              \
  FOR_M(M) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }                            \
  int64_t k = 0;                                                                                    \
  for (; k + 32 <= K; k += 32) {                                                                    \
    _mm_prefetch((const char*)(row + k + PREFETCH), _MM_HINT_T0);                                   \
    const __m256bh w0 = (__m256bh)_mm256_loadu_si256((const __m256i*)(row + k));                    \
    const __m256bh w1 = (__m256bh)_mm256_loadu_si256((const __m256i*)(row + k + 16));               \
    FOR_M(M) {                                                                                      \
      a0[m] = _mm256_dpbf16_ps(a0[m], (__m256bh)_mm256_loadu_si256((const __m256i*)(x + m * K + k)), w0); \
      a1[m] = _mm256_dpbf16_ps(a1[m], (__m256bh)_mm256_loadu_si256((const __m256i*)(x + m * K + k + 16)), \
                               w1);                                                                 \
    }                                                                                               \
  }                                                                                                 \
  if (k + 16 <= K) {                                                                                \
    const __m256bh wt = (__m256bh)_mm256_loadu_si256((const __m256i*)(row + k));                    \
    FOR_M(M) a0[m] = _mm256_dpbf16_ps(a0[m], (__m256bh)_mm256_loadu_si256((const __m256i*)(x + m * K + k)), wt); \
    k += 16;                                                                                        \
  }                                                                                                 \
  if (k < K) {                                                                                      \
    const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);                                          \
    const __m256bh wt = (__m256bh)_mm256_maskz_loadu_epi16(mk, row + k);                            \
    FOR_M(M) a1[m] = _mm256_dpbf16_ps(a1[m], (__m256bh)_mm256_maskz_loadu_epi16(mk, x + m * K + k), wt); \
  }                                                                                                 \
  FOR_M(M) y[m * N + n] = hsum(_mm256_add_ps(a0[m], a1[m]));                                        \
}
ROW(1) ROW(2) ROW(3) ROW(4)
typedef void (*row_fn)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t);
static const row_fn ROWS[5] = {0, row_1, row_2, row_3, row_4};

/* x (M x K fp32) is rounded to bf16 here (nearest even); then up to 4 rows per pass over each
   weight row, more rows in further passes over the same (cached) weight row. */
int small_m_linear_bf16_dot(const float* xf, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K, int nt) {
  uint16_t* x = (uint16_t*)malloc(sizeof(uint16_t) * (M * K + 16));
  if (!x) return 1;
  int64_t i = 0;
  for (; i + 16 <= M * K; i += 16)
    _mm256_storeu_si256((__m256i*)(x + i),
                        (__m256i)_mm256_cvtne2ps_pbh(_mm256_loadu_ps(xf + i + 8), _mm256_loadu_ps(xf + i)));
  for (; i < M * K; ++i)
    x[i] = (uint16_t)_mm_extract_epi16((__m128i)_mm_cvtneps_pbh(_mm_set_ss(xf[i])), 0);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mm = M - m0 < 4 ? M - m0 : 4;
      ROWS[mm](x + m0 * K, w, y + m0 * N, N, K, n);
    }
  free(x);
  return 0;
}
"""
_BF16_FLAGS = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
               "-mprefer-vector-width=256"]

_lib = None
_tried = False
_dot = None  # the kernel bf16 weights take instead of the AVX2 one (opt-in)
_dot_tried = False
_dot_lib = None
_dot_lib_tried = False


def _cache_dir() -> Path:
    home = Path(os.environ.get("MTP_SPEC_HOME", Path.home() / ".cache" / "mtp-spec"))
    return home / "kernels"


def _compile(name: str, source: str, flags: list[str]) -> ctypes.CDLL:
    """Compile a C source once per machine (keyed by its hash and flags) and load it."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise OSError("no C compiler")
    tag = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:12]
    so = _cache_dir() / f"{name}-{tag}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(source)
            subprocess.run([cc, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out)],
                           check=True, capture_output=True, timeout=120)
            os.replace(out, so)
    return ctypes.CDLL(str(so))


def _build():
    """The AVX2 kernels, built on first use; None if that fails."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    try:
        lib = _compile("small_m_linear", _SOURCE, ["-mavx2", "-mfma"])
        lib.small_m_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
        lib.small_m_linear.restype = ctypes.c_int
        lib.attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 13 + [ctypes.c_float, ctypes.c_int]
        lib.attention.restype = None
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        print(f"[mtp-spec] CPU small-M linear kernel unavailable ({type(e).__name__}); using F.linear",
              file=sys.stderr)
    return _lib


def _cpu_has_bf16_dot() -> bool:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= set(flags)


def bf16_dot_kernel():
    """The AVX-512 BF16 linear, built, where the CPU has it and the compiler knows it; else None.
    Whether `linear` uses it is `MTP_SPEC_CPU_BF16_DOT`'s call (off unless set to 1)."""
    global _dot_lib, _dot_lib_tried
    if not _dot_lib_tried:
        _dot_lib_tried = True
        if _cpu_has_bf16_dot() and _build() is not None:
            try:
                lib = _compile("small_m_linear_bf16_dot", _BF16_SOURCE, _BF16_FLAGS)
                lib.small_m_linear_bf16_dot.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                lib.small_m_linear_bf16_dot.restype = ctypes.c_int
                _dot_lib = lib
            except (OSError, subprocess.SubprocessError):
                pass  # an older compiler: the AVX2 kernel takes bf16 weights
    return _dot_lib


def _build_dot():
    """The kernel `linear` uses for bf16 weights when it is not the AVX2 one."""
    global _dot, _dot_tried
    if not _dot_tried:
        _dot_tried = True
        _dot = bf16_dot_kernel() if os.environ.get("MTP_SPEC_CPU_BF16_DOT", "0") == "1" else None
    return _dot


def kind() -> str | None:
    """Which kernel bf16 weights take: "avx512-bf16-dot" (inputs rounded to bf16), "avx2" (fp32
    inputs), or None when the kernels are unavailable. fp32 weights always take the AVX2 kernel."""
    if not available():
        return None
    return "avx512-bf16-dot" if _build_dot() is not None else "avx2"


def available() -> bool:
    """True when the CPU has AVX2 + FMA and the kernel is built (building it now if needed).
    MTP_SPEC_CPU_LINEAR=0 turns it off (F.linear everywhere)."""
    if os.environ.get("MTP_SPEC_CPU_LINEAR", "1") == "0":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512", "AVX512_BF16", "AMX"):
        return False
    return _build() is not None


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the kernel takes this call (shapes and dtypes only: safe to ask while compiling). Any
    number of rows: more than 16 run 16 at a time, which gives the same numbers row by row."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32)
            and w.dim() == 2 and x.shape[-1] == w.shape[1] and x.numel() > 0)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T on the CPU, with bf16 or fp32 weights, 16 rows of x per call.
    Accumulates in fp32 and returns x's dtype; bf16 weights round x to bf16 first where the AVX-512
    BF16 kernel runs (`kind()`). A direct call (a few us of Python); compiled code calls the
    `small_m_linear` custom op, which wraps it."""
    dtype = x.dtype
    if dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    k, n = x.shape[-1], w.shape[0]
    m = x.numel() // k
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if not w.is_contiguous():
        w = w.contiguous()
    lib, bf16, nt = _lib or _build(), int(w.dtype == torch.bfloat16), torch.get_num_threads()
    dot = _build_dot() if bf16 else None
    xp, yp = x.data_ptr(), y.data_ptr()
    for lo in range(0, m, MAX_M):
        if dot is not None:
            rc = dot.small_m_linear_bf16_dot(xp + 4 * lo * k, w.data_ptr(), yp + 4 * lo * n, min(MAX_M, m - lo), n, k,
                                             nt)
        else:
            rc = lib.small_m_linear(xp + 4 * lo * k, w.data_ptr(), yp + 4 * lo * n, min(MAX_M, m - lo), n, k, bf16, nt)
        if rc:
            raise MemoryError(f"CPU linear kernel failed ({rc}) on {m} x {k} @ {n} x {k}")
    return y if dtype == torch.float32 else y.to(dtype)


def step_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`linear`, through the custom op while torch.compile traces (a plain call would break the graph)."""
    return small_m_linear(x, w) if torch.compiler.is_compiling() else linear(x, w)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for few queries over a whole cache, fp32 on the CPU.

    q (B, S, H, Dk) contiguous; k (B, T, KVH, Dk) and v (B, T, KVH, Dv) may be strided views of a
    cache (the last dim contiguous); mask (B, S, T) bool. Head h reads KV head h // (H // KVH).
    Returns (B, S, H, Dv). Each query's result is independent of the others in the call."""
    B, S, H, Dk = q.shape
    T, KVH, Dv = k.shape[1], k.shape[2], v.shape[3]
    q = q.float().contiguous()
    mask = mask.contiguous().view(torch.uint8)
    out = torch.empty(B, S, H, Dv, dtype=torch.float32)
    _build().attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), B, S, H, KVH,
                       Dk, Dv, T, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                       scale, torch.get_num_threads())
    return out


def attention_usable(k: torch.Tensor, v: torch.Tensor) -> bool:
    return (k.device.type == "cpu" and k.dtype == v.dtype == torch.float32 and k.stride(-1) == 1
            and v.stride(-1) == 1 and k.dim() == v.dim() == 4)


@torch.library.custom_op("mtp_spec::small_m_linear", mutates_args=())
def small_m_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`linear` as a torch op, so that torch.compile can call it without a graph break."""
    return linear(x, w)


@small_m_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])
