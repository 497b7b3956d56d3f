//! Fused scaled-dot-product attention, `softmax(q·kᵀ·scale [+ causal mask])·v`.
//!
//! On CPU (f32) a flash-attention-style kernel: each task takes one (batch, head, block of
//! queries), walks the keys in blocks, and keeps a running row max and sum (online softmax), so
//! the full score matrix is never materialised; the block products are gemm microkernels.
//! On CUDA (f32/f16/bf16, head sizes up to 512; `cuda` feature) the same algorithm as one kernel
//! (kernels/cuda/attention.cu, f32 accumulation). Elsewhere (Metal, CPU half precision, wider
//! heads) candle's composed ops, with the softmax in f32.
//!
//! Two layouts are accepted, both with a unit stride on the last dimension and any other
//! strides (so narrowed views of a fused q/k/v projection need no copy):
//! - [`attention`]: `[batch, heads, tokens, head_dim]`, output `[batch, heads, q_tokens, v_dim]`;
//! - [`attention_bnc`]: `[batch, tokens, heads * head_dim]` (what a linear layer produces),
//!   output `[batch, q_tokens, heads * v_dim]`, so no head split/merge copies are needed.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::gemm_f32;
use crate::fastmath;

/// Block products run inside the op's own rayon split.
const NO_PAR: gemm::Parallelism = gemm::Parallelism::None;

/// Most queries per task: each task streams all of its head's keys and values once, so larger
/// blocks re-read them less often (VAE heads are 512 wide); [`q_block`] shrinks it to keep
/// every thread busy.
const MAX_Q_BLOCK: usize = 256;
/// Score columns per block: a 256 x 256 f32 tile (256 KiB) stays in L2.
const KV_BLOCK: usize = 256;

/// Queries per task: about four tasks per thread, between 16 and [`MAX_Q_BLOCK`].
fn q_block(batch_heads: usize, n_q: usize) -> usize {
    let target_tasks = 4 * rayon::current_num_threads().max(1);
    let rows = (batch_heads * n_q).div_ceil(target_tasks).div_ceil(16) * 16;
    rows.clamp(16, MAX_Q_BLOCK).min(n_q.max(1))
}

/// `kᵀ` per (batch, head): `[batch * heads, dim, tokens]`, contiguous, so the score gemms read
/// their right-hand side row-major (gemm packs a transposed operand much more slowly).
fn transpose_keys(k: &[f32], kv: &View) -> Vec<f32> {
    const TILE: usize = 32;
    let (d, n) = (kv.dim, kv.tokens);
    let mut kt = vec![0f32; kv.batch * kv.heads * d * n];
    kt.par_chunks_mut((d * n).max(1)).enumerate().for_each(|(bh, dst)| {
        let base = kv.base(bh / kv.heads, bh % kv.heads);
        for j0 in (0..n).step_by(TILE) {
            for p0 in (0..d).step_by(TILE) {
                for j in j0..(j0 + TILE).min(n) {
                    let row = &k[base + j * kv.sn..];
                    for p in p0..(p0 + TILE).min(d) {
                        dst[p * n + j] = row[p];
                    }
                }
            }
        }
    });
    kt
}

/// How one operand's elements are addressed: element (b, h, n, d) sits at
/// `offset + b*sb + h*sh + n*sn + d`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub(crate) offset: usize,
    pub(crate) sb: usize,
    pub(crate) sh: usize,
    pub(crate) sn: usize,
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) tokens: usize,
    pub(crate) dim: usize,
}

impl View {
    fn new(layout: &Layout, bnc_heads: Option<usize>) -> Result<Self> {
        let dims = layout.shape().dims();
        let stride = layout.stride();
        let offset = layout.start_offset();
        match bnc_heads {
            None => {
                let [batch, heads, tokens, dim] = dims else {
                    candle_core::bail!("kiln-attention: expected [batch, heads, tokens, dim], got {dims:?}");
                };
                if *dim > 1 && stride[3] != 1 {
                    candle_core::bail!("kiln-attention: the last dimension must have unit stride");
                }
                Ok(Self {
                    offset,
                    sb: stride[0],
                    sh: stride[1],
                    sn: stride[2],
                    batch: *batch,
                    heads: *heads,
                    tokens: *tokens,
                    dim: *dim,
                })
            }
            Some(heads) => {
                let [batch, tokens, channels] = dims else {
                    candle_core::bail!("kiln-attention: expected [batch, tokens, channels], got {dims:?}");
                };
                if heads == 0 || channels % heads != 0 {
                    candle_core::bail!("kiln-attention: {channels} channels do not split into {heads} heads");
                }
                if *channels > 1 && stride[2] != 1 {
                    candle_core::bail!("kiln-attention: the last dimension must have unit stride");
                }
                let dim = channels / heads;
                Ok(Self {
                    offset,
                    sb: stride[0],
                    sh: dim,
                    sn: stride[1],
                    batch: *batch,
                    heads,
                    tokens: *tokens,
                    dim,
                })
            }
        }
    }

    fn base(&self, b: usize, h: usize) -> usize {
        self.offset + b * self.sb + h * self.sh
    }

    /// Largest index the view touches, plus one (0 for an empty view).
    pub(crate) fn extent(&self) -> usize {
        if self.batch == 0 || self.heads == 0 || self.tokens == 0 || self.dim == 0 {
            return 0;
        }
        self.base(self.batch - 1, self.heads - 1) + (self.tokens - 1) * self.sn + self.dim
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionOp {
    pub(crate) scale: f32,
    pub(crate) causal: bool,
    /// `Some(heads)` for the `[batch, tokens, heads * dim]` layout.
    pub(crate) bnc_heads: Option<usize>,
}

impl AttentionOp {
    /// One task: queries `i0 .. i0 + rows` of head `h` in batch `b`, written to `out` rows
    /// (`out_sn` apart).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        (q, qv): (&[f32], &View),
        (kt, kv): (&[f32], &View),
        (v, vv): (&[f32], &View),
        (b, h, i0, rows): (usize, usize, usize, usize),
        out: &mut [f32],
        out_sn: usize,
    ) {
        let (d, dv) = (qv.dim, vv.dim);
        let mut qbuf = vec![0f32; rows * d];
        let qbase = qv.base(b, h);
        for r in 0..rows {
            let src = &q[qbase + (i0 + r) * qv.sn..][..d];
            for (dst, &s) in qbuf[r * d..(r + 1) * d].iter_mut().zip(src) {
                *dst = s * self.scale;
            }
        }
        let mut acc = vec![0f32; rows * dv];
        let mut row_max = vec![f32::NEG_INFINITY; rows];
        let mut row_sum = vec![0f32; rows];
        // Keys after the last query of the block are masked for all of its rows.
        let kv_end = if self.causal { kv.tokens.min(i0 + rows) } else { kv.tokens };
        let kb_max = KV_BLOCK.min(kv_end.max(1));
        let mut scores = vec![0f32; rows * kb_max];
        let n_k = kv.tokens;
        let (kt_base, vbase) = ((b * kv.heads + h) * d * n_k, vv.base(b, h));
        let mut j0 = 0;
        while j0 < kv_end {
            let kb = KV_BLOCK.min(kv_end - j0);
            let s = &mut scores[..rows * kb];
            let kt_block = &kt[kt_base + j0..];
            let v_block = &v[vbase + j0 * vv.sn..];
            #[allow(unsafe_code)]
            // SAFETY: s is [rows, kb]; qbuf is [rows, d]; the kᵀ block reads
            // kt[kt_base + p*n_k + j0 + j] for p < d, j < kb, inside this head's [d, n_k] slab.
            unsafe {
                gemm_f32(
                    (rows, kb, d),
                    s.as_mut_ptr(),
                    kb,
                    false,
                    qbuf.as_ptr(),
                    d,
                    kt_block.as_ptr(),
                    (n_k, 1),
                    1.0,
                    NO_PAR,
                )
            };
            for r in 0..rows {
                let row = &mut s[r * kb..(r + 1) * kb];
                let valid = if self.causal { kb.min((i0 + r + 1).saturating_sub(j0)) } else { kb };
                row[valid..].fill(0.0);
                if valid == 0 {
                    continue;
                }
                let new_max = row_max[r].max(fastmath::max(&row[..valid]));
                let sum = fastmath::exp_shifted_sum(&mut row[..valid], new_max);
                let rescale =
                    if row_max[r] == f32::NEG_INFINITY { 0.0 } else { fastmath::exp(row_max[r] - new_max) };
                if rescale != 1.0 {
                    acc[r * dv..(r + 1) * dv].iter_mut().for_each(|a| *a *= rescale);
                }
                row_sum[r] = row_sum[r] * rescale + sum;
                row_max[r] = new_max;
            }
            #[allow(unsafe_code)]
            // SAFETY: acc is [rows, dv]; s is [rows, kb]; the v block reads v[j*sn + p] for
            // j < kb, p < dv, in bounds by the extent check in cpu_fwd.
            unsafe {
                gemm_f32(
                    (rows, dv, kb),
                    acc.as_mut_ptr(),
                    dv,
                    true,
                    s.as_ptr(),
                    kb,
                    v_block.as_ptr(),
                    (vv.sn, 1),
                    1.0,
                    NO_PAR,
                )
            };
            j0 += kb;
        }
        for r in 0..rows {
            let inv = if row_sum[r] > 0.0 { 1.0 / row_sum[r] } else { 0.0 };
            let dst = &mut out[r * out_sn..r * out_sn + dv];
            for (o, &a) in dst.iter_mut().zip(&acc[r * dv..(r + 1) * dv]) {
                *o = a * inv;
            }
        }
    }
}

impl AttentionOp {
    /// The three operands' views, checked against each other.
    fn views(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<(View, View, View)> {
        let (qv, kv, vv) =
            (View::new(ql, self.bnc_heads)?, View::new(kl, self.bnc_heads)?, View::new(vl, self.bnc_heads)?);
        if (qv.batch, qv.heads) != (kv.batch, kv.heads)
            || (kv.batch, kv.heads, kv.tokens) != (vv.batch, vv.heads, vv.tokens)
            || qv.dim != kv.dim
        {
            candle_core::bail!(
                "kiln-attention: mismatched q {:?}, k {:?}, v {:?}",
                ql.shape().dims(),
                kl.shape().dims(),
                vl.shape().dims()
            );
        }
        Ok((qv, kv, vv))
    }

    /// The output's (batch, head, token) strides and shape: contiguous in the input's layout
    /// family.
    fn output(&self, qv: &View, vv: &View) -> ([usize; 3], Shape) {
        let (batch, heads, n_q, dv) = (qv.batch, qv.heads, qv.tokens, vv.dim);
        match self.bnc_heads {
            None => ([heads * n_q * dv, n_q * dv, dv], Shape::from_dims(&[batch, heads, n_q, dv])),
            Some(_) => ([n_q * heads * dv, dv, heads * dv], Shape::from_dims(&[batch, n_q, heads * dv])),
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "kiln-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("kiln-attention: only f32 is supported on CPU");
        };
        let (qv, kv, vv) = self.views(ql, kl, vl)?;
        if qv.extent() > q.len() || kv.extent() > k.len() || vv.extent() > v.len() {
            candle_core::bail!("kiln-attention: a layout reaches past its storage");
        }
        let (batch, heads, n_q, dv) = (qv.batch, qv.heads, qv.tokens, vv.dim);
        let mut out = vec![0f32; batch * heads * n_q * dv];
        let ([out_sb, out_sh, out_sn], shape) = self.output(&qv, &vv);
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), shape));
        }
        if kv.tokens == 0 {
            // softmax over no keys: torch returns NaN; an all-zero output is the saner answer.
            return Ok((CpuStorage::F32(out), shape));
        }
        let kt = transpose_keys(k, &kv);
        let q_rows = q_block(batch * heads, n_q);
        let q_blocks = n_q.div_ceil(q_rows);
        let out_addr = out.as_mut_ptr() as usize;
        let out_len = out.len();
        (0..batch * heads * q_blocks).into_par_iter().for_each(|task| {
            let (bh, qb) = (task / q_blocks, task % q_blocks);
            let (b, h) = (bh / heads, bh % heads);
            let i0 = qb * q_rows;
            let rows = q_rows.min(n_q - i0);
            let start = b * out_sb + h * out_sh + i0 * out_sn;
            let len = (rows - 1) * out_sn + dv;
            debug_assert!(start + len <= out_len);
            #[allow(unsafe_code)]
            // SAFETY: tasks write disjoint elements (their own head's dv columns of their own
            // query rows); the slice spans other heads' columns too, which this task never
            // touches, and start + len <= out_len by construction.
            let dst = unsafe { std::slice::from_raw_parts_mut((out_addr as *mut f32).add(start), len) };
            self.block((q, &qv), (&kt, &kv), (v, &vv), (b, h, i0, rows), dst, out_sn);
        });
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (qv, kv, vv) = self.views(ql, kl, vl)?;
        let (out_strides, shape) = self.output(&qv, &vv);
        let out = crate::cuda::attention::forward(
            [(qs, &qv), (ks, &kv), (vs, &vv)],
            out_strides,
            self.scale,
            self.causal,
        )?;
        Ok((out, shape))
    }
}

/// Whether [`attention`] and [`attention_bnc`] run a fused kernel (online softmax, the score
/// matrix never held) for operands on `device` in `dtype` with heads `head_dim` wide: the CPU in
/// f32; with the `cuda` feature, a CUDA GPU in f32/f16/bf16 with heads up to 512 wide (unless
/// `KILN_CUDA_ATTENTION=composed`). Otherwise they take candle's composed ops, which materialise
/// the whole score matrix, so callers with long sequences may want to chunk the queries.
pub fn attention_is_fused(device: &Device, dtype: DType, head_dim: usize) -> bool {
    if device.is_cpu() {
        return dtype == DType::F32;
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return crate::cuda::attention::enabled()
            && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
            && head_dim <= crate::cuda::attention::MAX_HEAD_DIM;
    }
    let _ = head_dim;
    false
}

/// [`attention_is_fused`] for these operands (q/k and v head sizes `dims`), all of one dtype.
pub(crate) fn use_fused(q: &Tensor, k: &Tensor, v: &Tensor, dims: (usize, usize)) -> bool {
    let dtype = q.dtype();
    [k, v].iter().all(|t| t.dtype() == dtype) && attention_is_fused(q.device(), dtype, dims.0.max(dims.1))
}

/// `softmax(q·kᵀ·scale)·v` over `[batch, heads, tokens, head_dim]`; `causal` masks keys after
/// each query (query i sees keys 0..=i). k/v may have a different token count from q.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let last = |t: &Tensor| t.dims().last().copied().unwrap_or(0);
    if use_fused(q, k, v, (last(q), last(v))) {
        let op = AttentionOp { scale: scale as f32, causal, bnc_heads: None };
        return q.apply_op3_no_bwd(k, v, &op);
    }
    attention_reference(q, k, v, scale, causal)
}

/// [`attention`] over `[batch, tokens, heads * head_dim]` inputs, returning
/// `[batch, q_tokens, heads * v_dim]`.
pub fn attention_bnc(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let head = |t: &Tensor| t.dims().last().copied().unwrap_or(0) / heads.max(1);
    if use_fused(q, k, v, (head(q), head(v))) {
        let op = AttentionOp { scale: scale as f32, causal, bnc_heads: Some(heads) };
        return q.apply_op3_no_bwd(k, v, &op);
    }
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        if heads == 0 || c % heads != 0 {
            candle_core::bail!("attention: {c} channels do not split into {heads} heads");
        }
        t.reshape((b, n, heads, c / heads))?.transpose(1, 2)?.contiguous()
    };
    let out = attention_reference(&split(q)?, &split(k)?, &split(v)?, scale, causal)?;
    let (b, h, n, d) = out.dims4()?;
    out.transpose(1, 2)?.reshape((b, n, h * d))
}

/// candle's composed attention over `[batch, heads, tokens, dim]`: the reference for the fused
/// kernels and the path where they do not run (Metal, CPU half precision, heads over 512 wide). Half-precision scores go through the softmax in f32.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    // Contiguous operands: candle 0.11.1's CPU matmul mis-handles some transposed batched inputs.
    let k_t = k.t()?.contiguous()?;
    let scores = (q.contiguous()? * scale)?.matmul(&k_t)?.to_dtype(DType::F32)?;
    let scores = if causal {
        let (n_q, n_k) = (q.dim(2)?, k.dim(2)?);
        let mask: Vec<f32> = (0..n_q)
            .flat_map(|i| (0..n_k).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        scores.broadcast_add(&Tensor::from_vec(mask, (n_q, n_k), q.device())?)?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(&v.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn matches_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, heads, q tokens, kv tokens, dim, v dim, causal): self/cross attention, CLIP's
        // 77 tokens, several query and key blocks, VAE-like single wide head.
        let cases = [
            (1, 1, 5, 5, 8, 8, false),
            (2, 3, 37, 29, 16, 16, false),
            (1, 5, 200, 77, 64, 64, false),
            (2, 4, 77, 77, 32, 32, true),
            (1, 2, 130, 130, 8, 8, true),
            (1, 1, 1100, 1100, 40, 40, false),
            (1, 1, 90, 700, 24, 12, false),
        ];
        for (i, &(b, h, nq, nk, d, dv, causal)) in cases.iter().enumerate() {
            let q = Tensor::randn(0f32, 1.0, (b, h, nq, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, h, nk, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, h, nk, dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt() * 2.0;
            let expected = attention_reference(&q, &k, &v, scale, causal)?;
            let got = attention(&q, &k, &v, scale, causal)?;
            assert_eq!(got.dims(), expected.dims());
            let diff = max_abs_diff(&got, &expected)?;
            assert!(diff < 1e-4, "case {i}: diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn strided_views_and_bnc_layout() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, m, heads, d) = (2, 70, 77, 4, 16);
        let c = heads * d;
        // A fused q/k/v projection output, narrowed without copies.
        let qkv = Tensor::randn(0f32, 1.0, (b, n, 3 * c), &dev)?;
        let (q, k, v) = (qkv.narrow(2, 0, c)?, qkv.narrow(2, c, c)?, qkv.narrow(2, 2 * c, c)?);
        let scale = 0.25;
        for causal in [false, true] {
            let got = attention_bnc(&q, &k, &v, heads, scale, causal)?;
            let split = |t: &Tensor| t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
            let expected = attention_reference(
                &split(&q.contiguous()?)?,
                &split(&k.contiguous()?)?,
                &split(&v.contiguous()?)?,
                scale,
                causal,
            )?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
            let diff = max_abs_diff(&got, &expected)?;
            assert!(diff < 1e-4, "causal {causal}: diff {diff}");
        }
        // Cross-attention in bnc layout: 77 context tokens.
        let ctx = Tensor::randn(0f32, 1.0, (b, m, 2 * c), &dev)?;
        let (k, v) = (ctx.narrow(2, 0, c)?, ctx.narrow(2, c, c)?);
        let got = attention_bnc(&q, &k, &v, heads, scale, false)?;
        let split = |t: &Tensor, len: usize| {
            t.contiguous()?.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let expected = attention_reference(&split(&q, n)?, &split(&k, m)?, &split(&v, m)?, scale, false)?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
        let diff = max_abs_diff(&got, &expected)?;
        assert!(diff < 1e-4, "cross: diff {diff}");
        // A transposed [b, h, n, d] view (non-contiguous token stride) in the 4-D entry point.
        let q4 = q.contiguous()?.reshape((b, n, heads, d))?.transpose(1, 2)?;
        let got = attention(&q4, &q4, &q4, scale, false)?;
        let expected =
            attention_reference(&q4.contiguous()?, &q4.contiguous()?, &q4.contiguous()?, scale, false)?;
        let diff = max_abs_diff(&got, &expected)?;
        assert!(diff < 1e-4, "transposed view: diff {diff}");
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 2, 4, 6), DType::F32, &dev)?;
        assert!(attention(&q, &k, &k, 1.0, false).is_err());
        Ok(())
    }
}

#[cfg(test)]
mod batch_invariance {
    use super::*;
    use crate::test_util::{max_abs_diff, rand_unit};

    /// A batched image must equal the same image made alone, bit for bit (replay of batched
    /// drafts): each batch item's attention is computed the same way whatever the batch.
    #[test]
    fn batched_equals_single_bit_for_bit() -> Result<()> {
        for &(heads, tq, tk, d) in
            &[(2, 64, 64, 16), (2, 64, 7, 16), (1, 1024, 1024, 32), (4, 256, 77, 40), (1, 64, 64, 512)]
        {
            let q = rand_unit(&[4, heads, tq, d], 1)?;
            let k = rand_unit(&[4, heads, tk, d], 2)?;
            let v = rand_unit(&[4, heads, tk, d], 3)?;
            let all = attention(&q, &k, &v, 0.125, false)?;
            for i in 0..4 {
                let one =
                    attention(&q.narrow(0, i, 1)?, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?, 0.125, false)?;
                let diff = max_abs_diff(&one, &all.narrow(0, i, 1)?)?;
                assert_eq!(diff, 0.0, "{heads} heads {tq}x{tk} d{d}: item {i}");
            }
        }
        Ok(())
    }
}
