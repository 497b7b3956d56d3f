// Fused scaled-dot-product attention, out = softmax(q·kᵀ·scale [+ causal mask])·v, flash-attention
// style: online softmax over tiles of keys, the score matrix is never materialised.
//
// Operands: element (b, h, n, i) of q/k/v/out sits at ptr[b*sb + h*sh + n*sn + i] (unit stride on
// the head dimension; any other strides), so both [batch, heads, tokens, dim] tensors and the
// [batch, tokens, heads*dim] output of a linear layer are read without copies. d = q/k head size,
// dv = v/out head size. Causal (as kiln_kernels::attention's CPU op): query i sees keys 0..=i.
//
// Work split: a group of G threads (inside one warp) owns one query row; thread `lane` of the
// group holds dims lane, lane+G, ..., lane+(C-1)G of the scaled query and of the output
// accumulator in registers (so a row is C*G = DPAD >= max(d, dv) wide, zero-padded). A block
// holds ROWS rows and walks the keys in tiles of BK: K and V tiles are staged in shared memory as
// f32 (one global read per block), each score is a C-long dot product per thread plus a
// butterfly reduction over the group, then the running max/sum are rescaled once per tile.
// Scores are kept in the log2 domain (q pre-multiplied by scale*log2(e)) so exp is exp2f.
// Everything accumulates in f32 whatever T is.
#include "kiln_dtype.cuh"
#include <math_constants.h>

namespace {

typedef unsigned long long u64;

template <typename T, int C, int G, int ROWS, int BK>
__device__ __forceinline__ void attention_impl(
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ out,
    unsigned int heads, unsigned int n_q, unsigned int n_k, unsigned int d, unsigned int dv,
    float scale_log2, int causal,
    u64 qsb, u64 qsh, u64 qsn, u64 ksb, u64 ksh, u64 ksn,
    u64 vsb, u64 vsh, u64 vsn, u64 osb, u64 osh, u64 osn) {
  constexpr int DPAD = C * G;
  constexpr int THREADS = ROWS * G;
  static_assert(G <= 32 && (G & (G - 1)) == 0, "a row's group lies inside one warp");
  static_assert(THREADS % 32 == 0, "whole warps");
  __shared__ float k_tile[BK][DPAD];
  __shared__ float v_tile[BK][DPAD];

  const unsigned int q_blocks = (n_q + ROWS - 1) / ROWS;
  const unsigned int bh = blockIdx.x / q_blocks;
  const unsigned int q0 = (blockIdx.x % q_blocks) * ROWS;
  const unsigned int b = bh / heads, h = bh % heads;
  const unsigned int lane = threadIdx.x % G;
  const unsigned int row = q0 + threadIdx.x / G;
  const bool row_ok = row < n_q;

  float qr[C], acc[C];
  const T *q_row = q + b * qsb + h * qsh + (u64)(row_ok ? row : 0) * qsn;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const unsigned int dim = i * G + lane;
    qr[i] = (row_ok && dim < d) ? kiln::to_f32(q_row[dim]) * scale_log2 : 0.0f;
    acc[i] = 0.0f;
  }
  float row_max = -CUDART_INF_F, row_sum = 0.0f;

  // Keys after the block's last query are masked for all of its rows.
  const unsigned int q_end = min(q0 + ROWS, n_q);
  const unsigned int kv_end = causal ? min(n_k, q_end) : n_k;
  const T *k_head = k + b * ksb + h * ksh;
  const T *v_head = v + b * vsb + h * vsh;

  // Every thread runs the same number of tiles, so the barriers and full-warp shuffles match.
  for (unsigned int j0 = 0; j0 < kv_end; j0 += BK) {
    __syncthreads();
    for (unsigned int idx = threadIdx.x; idx < BK * DPAD; idx += THREADS) {
      const unsigned int j = idx / DPAD, dim = idx % DPAD;
      const unsigned int key = j0 + j;
      const bool key_ok = key < kv_end;
      k_tile[j][dim] = (key_ok && dim < d) ? kiln::to_f32(k_head[(u64)key * ksn + dim]) : 0.0f;
      v_tile[j][dim] = (key_ok && dim < dv) ? kiln::to_f32(v_head[(u64)key * vsn + dim]) : 0.0f;
    }
    __syncthreads();

    float s[BK];
    float tile_max = -CUDART_INF_F;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      float p = 0.0f;
#pragma unroll
      for (int i = 0; i < C; ++i) p = fmaf(qr[i], k_tile[j][i * G + lane], p);
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) p += __shfl_xor_sync(0xffffffffu, p, off, G);
      const unsigned int key = j0 + j;
      const bool ok = key < kv_end && (!causal || key <= row);
      s[j] = ok ? p : -CUDART_INF_F;
      tile_max = fmaxf(tile_max, s[j]);
    }
    if (tile_max == -CUDART_INF_F) continue;  // every key of this tile masked for this row
    const float new_max = fmaxf(row_max, tile_max);
    const float rescale = exp2f(row_max - new_max);  // 0 on the first live tile (row_max = -inf)
    row_sum *= rescale;
#pragma unroll
    for (int i = 0; i < C; ++i) acc[i] *= rescale;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      const float p = exp2f(s[j] - new_max);  // 0 for masked keys
      row_sum += p;
#pragma unroll
      for (int i = 0; i < C; ++i) acc[i] = fmaf(p, v_tile[j][i * G + lane], acc[i]);
    }
    row_max = new_max;
  }

  if (!row_ok) return;
  // No keys at all: zeros (as the CPU op), not torch's NaN.
  const float inv = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
  T *out_row = out + b * osb + h * osh + (u64)row * osn;
#pragma unroll
  for (int i = 0; i < C; ++i) {
    const unsigned int dim = i * G + lane;
    if (dim < dv) out_row[dim] = kiln::from_f32<T>(acc[i] * inv);
  }
}

}  // namespace

// One entry point per (padded head size, dtype): kiln_attention_d{DPAD}_{f32,f16,bf16}.
// Keep the table in kernels/src/attention/cuda.rs (DPAD, ROWS, ROWS * G) in step with this one.
#define KILN_ATTENTION(DPAD, C, G, ROWS, BK, SUFFIX, T)                                              \
  extern "C" __global__ void __launch_bounds__(ROWS * G) kiln_attention_d##DPAD##_##SUFFIX(      \
      const T *q, const T *k, const T *v, T *out, unsigned int heads, unsigned int n_q,          \
      unsigned int n_k, unsigned int d, unsigned int dv, float scale_log2, int causal, u64 qsb,  \
      u64 qsh, u64 qsn, u64 ksb, u64 ksh, u64 ksn, u64 vsb, u64 vsh, u64 vsn, u64 osb, u64 osh,  \
      u64 osn) {                                                                                 \
    static_assert(DPAD == C * G, "padded head size");                                            \
    attention_impl<T, C, G, ROWS, BK>(q, k, v, out, heads, n_q, n_k, d, dv, scale_log2, causal, \
                                      qsb, qsh, qsn, ksb, ksh, ksn, vsb, vsh, vsn, osb, osh,     \
                                      osn);                                                      \
  }

#define KILN_ATTENTION_ALL_TYPES(DPAD, C, G, ROWS, BK)       \
  KILN_ATTENTION(DPAD, C, G, ROWS, BK, f32, float)           \
  KILN_ATTENTION(DPAD, C, G, ROWS, BK, f16, __half)          \
  KILN_ATTENTION(DPAD, C, G, ROWS, BK, bf16, __nv_bfloat16)

// Shared memory per block: 2 * BK * DPAD * 4 bytes <= 32 KiB.
KILN_ATTENTION_ALL_TYPES(32, 4, 8, 16, 32)
KILN_ATTENTION_ALL_TYPES(40, 5, 8, 16, 32)   // SD1 64x64-latent level (320 ch / 8 heads)
KILN_ATTENTION_ALL_TYPES(64, 8, 8, 16, 32)   // CLIP, SD2, SDXL
KILN_ATTENTION_ALL_TYPES(80, 5, 16, 16, 32)  // SD1 (640 / 8)
KILN_ATTENTION_ALL_TYPES(128, 8, 16, 16, 32)
KILN_ATTENTION_ALL_TYPES(160, 5, 32, 8, 16)  // SD1 (1280 / 8)
KILN_ATTENTION_ALL_TYPES(256, 8, 32, 8, 16)
KILN_ATTENTION_ALL_TYPES(512, 16, 32, 8, 8)  // VAE mid-block: one 512-wide head
