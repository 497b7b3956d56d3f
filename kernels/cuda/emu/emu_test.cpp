// Checks the kernels in ../ under the host emulation (cuda_emu.h) against double-precision
// references: attention (every head-size variant, causal or not, Lq != Lk, strided [b, n, h*d]
// views, v narrower/wider than q/k) and GroupNorm (+SiLU). Run with ./run.sh.
#include "cuda_emu.h"
#include <cstdio>
#include <random>
#include <string>
#include "../attention.cu"
#include "../group_norm.cu"

static int failures = 0;

static std::vector<float> rnd(size_t n, unsigned seed, float lo, float hi) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto &x : v) x = d(g);
  return v;
}

typedef void (*AttnFn)(const float *, const float *, const float *, float *, unsigned, unsigned, unsigned,
                       unsigned, unsigned, float, int, u64, u64, u64, u64, u64, u64, u64, u64, u64, u64,
                       u64, u64);

struct Variant { unsigned dpad, rows, threads; AttnFn f; };
static const Variant VARIANTS[] = {
    {32, 16, 128, kiln_attention_d32_f32},   {40, 16, 128, kiln_attention_d40_f32},
    {64, 16, 128, kiln_attention_d64_f32},   {80, 16, 256, kiln_attention_d80_f32},
    {128, 16, 256, kiln_attention_d128_f32}, {160, 8, 256, kiln_attention_d160_f32},
    {256, 8, 256, kiln_attention_d256_f32},  {512, 8, 256, kiln_attention_d512_f32},
};

// bnc: q/k/v are narrowed thirds of one [b, n, 3*h*d] tensor (only when nq == nk, d == dv);
// otherwise [b, h, n, d] contiguous.
static void attention_case(unsigned b, unsigned h, unsigned nq, unsigned nk, unsigned d, unsigned dv,
                           bool causal, bool bnc) {
  float scale = 2.0f / std::sqrt((float)d);
  std::vector<float> q, k, v;
  u64 qs[3], ks[3], vs[3], qoff = 0, koff = 0, voff = 0;
  std::vector<float> qkv;
  if (bnc) {
    unsigned c = h * d;
    qkv = rnd((size_t)b * nq * 3 * c, 1 + nq + d, -2, 2);
    u64 s[3] = {(u64)nq * 3 * c, d, 3ull * c};
    for (int i = 0; i < 3; ++i) qs[i] = ks[i] = vs[i] = s[i];
    qoff = 0; koff = c; voff = 2 * c;
  } else {
    q = rnd((size_t)b * h * nq * d, 2 + nq, -2, 2);
    k = rnd((size_t)b * h * nk * d, 3 + nk, -2, 2);
    v = rnd((size_t)b * h * nk * dv, 4 + nk, -1, 1);
    qs[0] = (u64)h * nq * d; qs[1] = (u64)nq * d; qs[2] = d;
    ks[0] = (u64)h * nk * d; ks[1] = (u64)nk * d; ks[2] = d;
    vs[0] = (u64)h * nk * dv; vs[1] = (u64)nk * dv; vs[2] = dv;
  }
  const float *qp = bnc ? qkv.data() + qoff : q.data();
  const float *kp = bnc ? qkv.data() + koff : k.data();
  const float *vp = bnc ? qkv.data() + voff : v.data();
  std::vector<float> out((size_t)b * h * nq * dv, NAN);
  u64 os[3] = {(u64)h * nq * dv, (u64)nq * dv, dv};
  if (bnc) { os[0] = (u64)nq * h * dv; os[1] = dv; os[2] = (u64)h * dv; }
  unsigned width = std::max(d, dv);
  const Variant *var = nullptr;
  for (auto &vv : VARIANTS) if (vv.dpad >= width) { var = &vv; break; }
  unsigned blocks = b * h * ((nq + var->rows - 1) / var->rows);
  emu_launch(blocks, var->threads, [&] {
    var->f(qp, kp, vp, out.data(), h, nq, nk, d, dv, scale * 1.4426950408889634f, causal, qs[0], qs[1],
           qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], os[0], os[1], os[2]);
  });
  // Reference in double.
  double worst = 0;
  for (unsigned bi = 0; bi < b; ++bi)
    for (unsigned hi = 0; hi < h; ++hi)
      for (unsigned i = 0; i < nq; ++i) {
        std::vector<double> s(nk);
        double m = -INFINITY;
        unsigned kend = causal ? std::min(nk, i + 1) : nk;
        for (unsigned j = 0; j < kend; ++j) {
          double acc = 0;
          for (unsigned p = 0; p < d; ++p)
            acc += (double)qp[bi * qs[0] + hi * qs[1] + i * qs[2] + p] *
                   (double)kp[bi * ks[0] + hi * ks[1] + j * ks[2] + p];
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (unsigned j = 0; j < kend; ++j) sum += std::exp(s[j] - m);
        for (unsigned p = 0; p < dv; ++p) {
          double o = 0;
          for (unsigned j = 0; j < kend; ++j) o += std::exp(s[j] - m) * vp[bi * vs[0] + hi * vs[1] + j * vs[2] + p];
          o = kend ? o / sum : 0;
          float got = out[bi * os[0] + hi * os[1] + i * os[2] + p];
          double err = std::fabs(got - o) / (2e-5 + 1e-4 * std::fabs(o));
          if (!(err <= worst)) worst = std::isnan(got) ? INFINITY : std::max(worst, err);
        }
      }
  bool ok = worst <= 1.0;
  failures += !ok;
  printf("%s attention b%u h%u nq%u nk%u d%u dv%u causal%d bnc%d: worst err/tol %.3g\n", ok ? "ok  " : "FAIL", b,
         h, nq, nk, d, dv, causal, bnc, worst);
}

static void group_norm_case(unsigned b, unsigned c, unsigned groups, unsigned spatial, float offset, bool silu) {
  auto x = rnd((size_t)b * c * spatial, 7 + c + spatial, -2 + offset, 2 + offset);
  auto w = rnd(c, 8, 0.5, 1.5);
  auto bias = rnd(c, 9, -0.5, 0.5);
  std::vector<float> out(x.size(), NAN);
  float eps = 1e-5f;
  emu_launch(b * groups, 1024, [&] {
    kiln_group_norm_f32(x.data(), w.data(), bias.data(), out.data(), c, groups, spatial, eps, silu);
  });
  double worst = 0;
  unsigned cpg = c / groups;
  for (unsigned bi = 0; bi < b; ++bi)
    for (unsigned g = 0; g < groups; ++g) {
      size_t base = ((size_t)bi * c + (size_t)g * cpg) * spatial, n = (size_t)cpg * spatial;
      double mean = 0, var = 0;
      for (size_t i = 0; i < n; ++i) mean += x[base + i];
      mean /= n;
      for (size_t i = 0; i < n; ++i) var += (x[base + i] - mean) * (x[base + i] - mean);
      var /= n;
      double rstd = 1 / std::sqrt(var + eps);
      for (size_t i = 0; i < n; ++i) {
        unsigned ch = g * cpg + i / spatial;
        double y = (x[base + i] - mean) * rstd * w[ch] + bias[ch];
        if (silu) y = y / (1 + std::exp(-y));
        float got = out[base + i];
        double err = std::fabs(got - y) / (1e-5 + 1e-4 * std::fabs(y));
        if (!(err <= worst)) worst = std::isnan(got) ? INFINITY : std::max(worst, err);
      }
    }
  bool ok = worst <= 1.0;
  failures += !ok;
  printf("%s group_norm b%u c%u g%u spatial%u offset%g silu%d: worst err/tol %.3g\n", ok ? "ok  " : "FAIL", b, c,
         groups, spatial, offset, silu, worst);
}

int main() {
  attention_case(1, 1, 5, 5, 8, 8, false, false);
  attention_case(2, 3, 37, 29, 16, 16, false, false);
  attention_case(1, 2, 77, 77, 64, 64, true, false);
  attention_case(1, 2, 130, 130, 40, 40, true, false);
  attention_case(1, 2, 50, 77, 40, 40, false, false);
  attention_case(1, 2, 40, 45, 80, 80, false, false);
  attention_case(1, 2, 70, 90, 128, 128, true, false);
  attention_case(1, 2, 90, 70, 64, 64, true, false);
  attention_case(1, 2, 20, 33, 160, 160, false, false);
  attention_case(1, 1, 33, 40, 256, 256, true, false);
  attention_case(1, 1, 40, 70, 512, 512, false, false);
  attention_case(1, 1, 20, 30, 512, 512, true, false);
  attention_case(1, 1, 30, 70, 24, 12, false, false);
  attention_case(1, 1, 17, 33, 200, 300, false, false);
  attention_case(2, 4, 37, 37, 40, 40, false, true);
  attention_case(2, 4, 37, 37, 40, 40, true, true);
  group_norm_case(2, 64, 32, 99, 0, false);
  group_norm_case(1, 12, 4, 35, 3, true);
  group_norm_case(2, 32, 8, 50, -1, false);
  group_norm_case(1, 8, 2, 24, 0.5, true);
  group_norm_case(1, 64, 4, 4096, 20, true);
  group_norm_case(1, 4, 1, 1, 0, false);
  printf("%d failures\n", failures);
  return failures != 0;
}
