// Tile blend: accumulates a planar tile [C, tile_rows, tile_cols] into an interleaved strip
// [strip_rows, strip_width, C] with separable weights (raised-cosine feathers from the planner):
//   strip[sr + r, sc + j, c] += tile[c, tr + r, tc + j] * wx[j] * wy[r]
// weights = [wy (rows) | wx (cols)]. One thread per strip element written, so no atomics; rows with
// wy == 0 are skipped as the CPU reference (kiln_kernels::blend::blend_tile_slice) skips them.
extern "C" __global__ void kiln_blend_tile_f32(
    float *strip, const float *tile, const float *weights,
    unsigned int strip_width, unsigned int channels,
    unsigned int tile_rows, unsigned int tile_cols,
    unsigned int strip_row, unsigned int strip_col,
    unsigned int tile_row, unsigned int tile_col,
    unsigned int rows, unsigned int cols) {
  const unsigned long long n = (unsigned long long)rows * cols * channels;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    const unsigned int c = (unsigned int)(i % channels);
    const unsigned int j = (unsigned int)((i / channels) % cols);
    const unsigned int r = (unsigned int)(i / ((unsigned long long)channels * cols));
    const float wy = weights[r];
    if (wy == 0.0f) continue;
    const float wx = weights[rows + j];
    const float v = tile[((unsigned long long)c * tile_rows + tile_row + r) * tile_cols + tile_col + j];
    float *dst = strip + (((unsigned long long)(strip_row + r) * strip_width + strip_col + j) * channels + c);
    // Same association as the CPU reference: (v * wx) * wy, then add.
    *dst = *dst + __fmul_rn(__fmul_rn(v, wx), wy);
  }
}
