// Fused GroupNorm (+ optional SiLU) over contiguous [batch, channels, spatial...] input:
//   y = (x - mean_g) * rsqrt(var_g + eps) * weight[c] + bias[c];  silu: y * sigmoid(y)
// with biased (population) variance, as torch.nn.GroupNorm. One block per (batch, group): the
// group's cpg * spatial values are contiguous. Two reads for the statistics (sum, then the
// centred sum of squares: no cancellation when |mean| >> std), one read + write for the output.
// Statistics and arithmetic in f32 whatever the element type T; the affine parameters W are
// either T (the model's dtype) or f32.
#include "kiln_dtype.cuh"

namespace {

typedef unsigned long long u64;

constexpr int THREADS = 1024;

// Sum over the block; every thread gets the total. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : 0.0f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename W>
__device__ __forceinline__ void group_norm_impl(const T *__restrict__ x, const W *__restrict__ weight,
                                                const W *__restrict__ bias, T *__restrict__ out,
                                                unsigned int channels, unsigned int groups,
                                                unsigned int spatial, float eps, int silu) {
  __shared__ float scratch[32];
  const unsigned int b = blockIdx.x / groups, g = blockIdx.x % groups;
  const unsigned int cpg = channels / groups;
  const unsigned int n = cpg * spatial;  // < 2^32, checked by the caller
  const u64 base = ((u64)b * channels + (u64)g * cpg) * spatial;
  const T *src = x + base;
  T *dst = out + base;

  float sum = 0.0f;
  for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) sum += kiln::to_f32(src[i]);
  const float mean = block_sum(sum, scratch) / (float)n;
  float sq = 0.0f;
  for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
    const float c = kiln::to_f32(src[i]) - mean;
    sq = fmaf(c, c, sq);
  }
  const float var = block_sum(sq, scratch) / (float)n;
  const float rstd = 1.0f / sqrtf(var + eps);

  for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
    const unsigned int ch = g * cpg + i / spatial;
    const float scale = rstd * kiln::to_f32(weight[ch]);
    const float shift = kiln::to_f32(bias[ch]) - mean * scale;
    float y = kiln::to_f32(src[i]) * scale + shift;
    if (silu) y = y / (1.0f + expf(-y));
    dst[i] = kiln::from_f32<T>(y);
  }
}

}  // namespace

// kiln_group_norm_{x dtype}[_wf32 when the affine parameters are f32]; launched with THREADS
// threads and batch * groups blocks (kernels/src/norm.rs).
#define KILN_GROUP_NORM(NAME, T, W)                                                             \
  extern "C" __global__ void __launch_bounds__(THREADS)                                         \
      NAME(const T *x, const W *weight, const W *bias, T *out, unsigned int channels,           \
           unsigned int groups, unsigned int spatial, float eps, int silu) {                    \
    group_norm_impl<T, W>(x, weight, bias, out, channels, groups, spatial, eps, silu);         \
  }

KILN_GROUP_NORM(kiln_group_norm_f32, float, float)
KILN_GROUP_NORM(kiln_group_norm_f16, __half, __half)
KILN_GROUP_NORM(kiln_group_norm_bf16, __nv_bfloat16, __nv_bfloat16)
KILN_GROUP_NORM(kiln_group_norm_f16_wf32, __half, float)
KILN_GROUP_NORM(kiln_group_norm_bf16_wf32, __nv_bfloat16, float)
