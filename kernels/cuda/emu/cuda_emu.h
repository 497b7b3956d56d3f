// Host emulation of the CUDA features kiln's kernels use, on ONE OS thread: every CUDA thread of
// a block is a coroutine (ucontext), blocks run one after another, and __syncthreads / warp
// shuffles are barriers at which the scheduler switches threads. It checks the kernels' indexing,
// masking, tiling and reduction logic on a machine without a GPU (and aborts on a barrier some
// threads never reach); it says nothing about the PTX nvcc makes.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

struct emu_dim3 { unsigned int x = 1, y = 1, z = 1; };
// The running coroutine's indices (only one runs at a time).
inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

namespace emu {

enum Wait { NONE, BLOCK_BARRIER, WARP_BARRIER, DONE };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  Wait wait = NONE;
};

inline std::vector<Fiber> fibers;
inline ucontext_t scheduler;
inline unsigned int current = 0;
inline std::vector<float> shfl;
inline const std::function<void()> *kernel = nullptr;
constexpr size_t STACK = 256 * 1024;

inline void wait(Wait w) {
  fibers[current].wait = w;
  swapcontext(&fibers[current].ctx, &scheduler);
}

inline void entry() {
  (*kernel)();
  fibers[current].wait = DONE;
  swapcontext(&fibers[current].ctx, &scheduler);
}

[[noreturn]] inline void fail(const char *what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u)\n", what, blockIdx.x);
  std::abort();
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::BLOCK_BARRIER); }

inline float __shfl_xor_sync(unsigned int, float v, int lane_mask, int width = 32) {
  const unsigned int t = threadIdx.x, warp = t / 32, lane = t % 32;
  emu::shfl[t] = v;
  emu::wait(emu::WARP_BARRIER);
  const unsigned int src = lane ^ (unsigned int)lane_mask;
  // Outside the width-sized segment: own value (CUDA's rule).
  const float r = (src / width == lane / width) ? emu::shfl[warp * 32 + src] : v;
  emu::wait(emu::WARP_BARRIER);
  return r;
}

using std::max;
using std::min;

inline void emu_launch(unsigned int grid, unsigned int block, const std::function<void()> &kernel) {
  using namespace emu;
  if (block % 32 != 0) fail("block size is not a whole number of warps");
  gridDim.x = grid;
  blockDim.x = block;
  emu::kernel = &kernel;
  shfl.assign(block, 0.0f);
  fibers.resize(block);
  for (auto &f : fibers)
    if (!f.stack) f.stack.reset(new char[STACK]);
  for (unsigned int b = 0; b < grid; ++b) {
    blockIdx.x = b;
    for (unsigned int t = 0; t < block; ++t) {
      Fiber &f = fibers[t];
      f.wait = NONE;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = STACK;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, entry, 0);
    }
    for (;;) {
      // Run every runnable thread until it waits or finishes.
      for (unsigned int t = 0; t < block; ++t) {
        if (fibers[t].wait != NONE) continue;
        current = t;
        threadIdx.x = t;
        swapcontext(&scheduler, &fibers[t].ctx);
      }
      unsigned int done = 0, at_block = 0;
      for (auto &f : fibers) done += f.wait == DONE, at_block += f.wait == BLOCK_BARRIER;
      if (done == block) break;
      bool released = false;
      // A warp barrier opens when all 32 lanes are at it.
      for (unsigned int w = 0; w < block / 32; ++w) {
        unsigned int at_warp = 0, warp_done = 0;
        for (unsigned int l = 0; l < 32; ++l) {
          at_warp += fibers[w * 32 + l].wait == WARP_BARRIER;
          warp_done += fibers[w * 32 + l].wait == DONE;
        }
        if (at_warp == 32) {
          for (unsigned int l = 0; l < 32; ++l) fibers[w * 32 + l].wait = NONE;
          released = true;
        } else if (at_warp > 0 && warp_done > 0) {
          fail("a warp shuffle waits for lanes that have exited");
        }
      }
      // __syncthreads opens when every thread is at it.
      if (!released && at_block == block) {
        for (auto &f : fibers) f.wait = NONE;
        released = true;
      }
      if (!released) fail("deadlock: threads wait at barriers the others never reach");
    }
  }
}
