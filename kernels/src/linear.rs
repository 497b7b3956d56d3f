//! Linear layers as one direct gemm per call on CPU, with the bias and an optional GELU / GEGLU
//! epilogue fused in, the work split into one coarse block per thread (candle's `Linear` runs
//! bias and activation as separate passes and lets gemm synchronise its threads per block).
//!
//! On CPU the weight is kept transposed, `[in, out]` row-major: gemm then reads it as a
//! column-major left operand (it computes the transposed product) without repacking it on every
//! call, which made the 77-row text-encoder products ~30% faster. The transpose replaces the
//! copy [`Linear::concat`] makes anyway, and runs once at load.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Storage, Tensor, D,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::cpu::{f32_values, gemm_f32};
use crate::fastmath;
use crate::host::{HostF32, LayerValues};

/// What is applied to the linear output before it is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// Exact (erf) GELU.
    GeluErf,
    /// diffusers' GEGLU: the output's two halves `[hidden, gate]` become `hidden * gelu(gate)`.
    Geglu,
}

#[derive(Debug, Clone)]
struct LinearCpu {
    bias: Option<Arc<Vec<f32>>>,
    epilogue: Epilogue,
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]`, single-threaded (callers split the work); rows of
/// dst and of rhs are `row_stride` apart (both are column ranges of `[.., row_stride]` matrices).
///
/// # Safety
/// `lhs[i * lhs_rs + p]`, `rhs[p * row_stride + j]`, `dst[i * row_stride + j]` for `i < m`,
/// `p < k`, `j < n` must be in bounds, and no other thread may touch those `dst` elements.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    row_stride: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
) {
    gemm_f32(
        (m, n, k),
        dst,
        row_stride,
        accumulate,
        lhs,
        lhs_rs,
        rhs,
        (row_stride, 1),
        1.0,
        gemm::Parallelism::None,
    )
}

impl CustomOp2 for LinearCpu {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_values("kiln-linear", "input", xs, xl)?;
        let w = f32_values("kiln-linear", "weight", ws, wl)?;
        let (k, n) = wl.shape().dims2()?;
        self.run(x, xl.shape().dims(), w, k, n)
    }
}

/// [`LinearCpu`] with the transposed weight held by the op (host values, e.g. mapped from a
/// file) instead of passed as a tensor.
#[derive(Debug, Clone)]
struct LinearHost {
    op: LinearCpu,
    weight_t: HostF32,
    in_dim: usize,
    out_dim: usize,
}

impl CustomOp1 for LinearHost {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values("kiln-linear", "input", xs, xl)?;
        self.op.run(x, xl.shape().dims(), self.weight_t.values(), self.in_dim, self.out_dim)
    }
}

impl LinearCpu {
    /// `epilogue(x w + b)` for `x` of `dims` (last = k) and `w` row-major `[k, n]`.
    fn run(&self, x: &[f32], dims: &[usize], w: &[f32], k: usize, n: usize) -> Result<(CpuStorage, Shape)> {
        if w.len() != k * n {
            candle_core::bail!("kiln-linear: weight of {} values for {k}x{n}", w.len());
        }
        if dims.last() != Some(&k) {
            candle_core::bail!("kiln-linear: input {dims:?} does not end in the weight's {k} inputs");
        }
        if let Some(b) = &self.bias {
            if b.len() != n {
                candle_core::bail!("kiln-linear: bias of {} for {n} outputs", b.len());
            }
        }
        let m = x.len() / k.max(1);
        let mut dst = vec![0f32; m * n];
        if let Some(b) = &self.bias {
            dst.par_chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(b));
        }
        let accumulate = self.bias.is_some();
        let threads = rayon::current_num_threads().max(1);
        let gelu = self.epilogue == Epilogue::GeluErf;
        // Batch invariance: every batch item (the rows of one sequence of a [.., tokens, in]
        // input; each row of a 2-D input) is split and multiplied the same way whatever else is
        // in the batch, so a batched image equals the same image made alone, bit for bit (gemm's
        // blocking, and so its rounding, depends on the shapes it is given).
        let item_rows = if dims.len() >= 3 { dims[dims.len() - 2].max(1) } else { 1 };
        let items = m / item_rows;
        // Row chunks pay for packing the whole weight each; under ~128 rows a chunk spends about
        // as long packing as multiplying (a 128-token caption through a 3840-wide Z-Image block
        // ran 2x slower split by rows than by columns), so short sequences split columns.
        if item_rows >= n || item_rows >= 256 * threads {
            // Split rows: each thread reads the whole weight, which stays in cache for small n.
            let rows = item_rows.div_ceil(threads * 2).max(1);
            let chunks_per_item = item_rows.div_ceil(rows);
            let dst_addr = dst.as_mut_ptr() as usize;
            (0..items * chunks_per_item).into_par_iter().for_each(|c| {
                let (item, chunk) = (c / chunks_per_item, c % chunks_per_item);
                let r0 = item * item_rows + chunk * rows;
                let mr = rows.min(item_rows - chunk * rows);
                let d = dst_addr as *mut f32;
                #[allow(unsafe_code)]
                // SAFETY: rows r0..r0+mr of the [m, n] dst belong to this task alone; x's rows
                // r0..r0+mr of [m, k] and w [k, n] are in bounds.
                unsafe {
                    let d = d.add(r0 * n);
                    gemm_rows(mr, n, k, d, n, accumulate, x.as_ptr().add(r0 * k), k, w.as_ptr());
                    if gelu {
                        fastmath::gelu_erf_inplace(std::slice::from_raw_parts_mut(d, mr * n));
                    }
                }
            });
        } else {
            // Few rows (text encoders, short captions): split columns so each thread streams its
            // own weight slice.
            let cols = n.div_ceil(threads).div_ceil(16) * 16;
            let col_chunks = n.div_ceil(cols);
            let dst_addr = dst.as_mut_ptr() as usize;
            (0..items * col_chunks).into_par_iter().for_each(|c| {
                let (item, chunk) = (c / col_chunks, c % col_chunks);
                let (r0, j0) = (item * item_rows, chunk * cols);
                let nc = cols.min(n - j0);
                let d = dst_addr as *mut f32;
                #[allow(unsafe_code)]
                // SAFETY: rows r0..r0+item_rows, columns j0..j0+nc of the [m, n] dst belong to
                // this task alone; w's columns j0..j0+nc of [k, n] and x's rows of [m, k] are in
                // bounds.
                unsafe {
                    let d = d.add(r0 * n + j0);
                    gemm_rows(
                        item_rows,
                        nc,
                        k,
                        d,
                        n,
                        accumulate,
                        x.as_ptr().add(r0 * k),
                        k,
                        w.as_ptr().add(j0),
                    );
                    if gelu {
                        for i in 0..item_rows {
                            let row = std::slice::from_raw_parts_mut(d.add(i * n), nc);
                            fastmath::gelu_erf_inplace(row);
                        }
                    }
                }
            });
        }
        let mut out_dims = dims.to_vec();
        if self.epilogue == Epilogue::Geglu {
            let half = n / 2;
            let mut out = vec![0f32; m * half];
            out.par_chunks_mut(half.max(1)).zip(dst.par_chunks(n.max(1))).for_each(|(o, row)| {
                let (hidden, gate) = row.split_at(half);
                fastmath::geglu(o, hidden, gate);
            });
            if let Some(last) = out_dims.last_mut() {
                *last = half;
            }
            return Ok((CpuStorage::F32(out), Shape::from_dims(&out_dims)));
        }
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(dst), Shape::from_dims(&out_dims)))
    }
}

#[derive(Debug, Clone)]
enum Repr {
    /// CPU f32: `weight_t` is the weight transposed, `[in, out]`, contiguous; bias copied out
    /// for the op.
    Cpu { weight_t: Tensor, bias: Option<Arc<Vec<f32>>>, bias_tensor: Option<Tensor> },
    /// CPU f32 with the transposed weight as host values (a mapped file's range): the same
    /// kernel, no tensor owning the values.
    Host { weight_t: HostF32, bias: Option<Arc<Vec<f32>>> },
    /// Anything else: candle's own layer.
    Candle(candle_nn::Linear),
}

/// A linear layer (`y = x wᵀ + b`) loaded from candle_nn's layout (`weight` `[out, in]`).
#[derive(Debug, Clone)]
pub struct Linear {
    repr: Repr,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// `weight`: `[out, in]`; `bias`: `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::concat(&[(weight, bias)])
    }

    /// One layer computing several layers' outputs side by side (e.g. fused q/k/v projections).
    /// All parts must share the input width and either all have a bias or none.
    pub fn concat(parts: &[(Tensor, Option<Tensor>)]) -> Result<Self> {
        let mut sources: Vec<&Tensor> = parts.iter().map(|(w, _)| w).collect();
        sources.extend(parts.iter().filter_map(|(_, b)| b.as_ref()));
        crate::reuse::derive("linear", &sources, || {
            let layer = Self::concat_new(parts)?;
            // The CPU layer keeps only the transposed copy; each part's weight is a view of it.
            let mut views = Vec::new();
            if let Repr::Cpu { weight_t, .. } = &layer.repr {
                let mut start = 0;
                for (w, _) in parts {
                    let rows = w.dims2()?.0;
                    views.push((w.id(), weight_t.narrow(1, start, rows)?.t()?));
                    start += rows;
                }
            }
            Ok((layer, views))
        })
    }

    fn concat_new(parts: &[(Tensor, Option<Tensor>)]) -> Result<Self> {
        let Some((first, _)) = parts.first() else {
            candle_core::bail!("linear concat: no parts");
        };
        let in_dim = first.dims2()?.1;
        let mut out_dim = 0;
        for (w, b) in parts {
            let (o, i) = w.dims2()?;
            if i != in_dim {
                candle_core::bail!("linear concat: parts take {in_dim} and {i} inputs");
            }
            if let Some(b) = b {
                if b.dims() != [o] {
                    candle_core::bail!("linear bias {:?} for {o} outputs", b.dims());
                }
            }
            out_dim += o;
        }
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|(_, b)| b.as_ref()).collect();
        let bias = match biases {
            Some(b) if b.len() == 1 => Some(b[0].clone()),
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None if parts.iter().all(|(_, b)| b.is_none()) => None,
            None => candle_core::bail!("linear concat: some parts have a bias and some do not"),
        };
        let cpu_f32 = parts.iter().all(|(w, _)| w.device().is_cpu() && w.dtype() == DType::F32)
            && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
        let repr = if cpu_f32 {
            let bias_vec = match &bias {
                Some(b) => Some(Arc::new(b.to_vec1::<f32>()?)),
                None => None,
            };
            let weights: Vec<&Tensor> = parts.iter().map(|(w, _)| w).collect();
            let weight_t = match weights.as_slice() {
                // Already stored transposed (a LoRA-merged weight, see `lowrank`): no copy.
                [w] if w.t()?.is_contiguous() => w.t()?,
                _ => transpose_concat(&weights, in_dim, out_dim)?,
            };
            Repr::Cpu { weight_t, bias: bias_vec, bias_tensor: bias }
        } else {
            let weight = match parts {
                [(w, _)] => w.clone(),
                _ => Tensor::cat(&parts.iter().map(|(w, _)| w).collect::<Vec<_>>(), 0)?,
            };
            Repr::Candle(candle_nn::Linear::new(weight, bias))
        };
        Ok(Self { repr, in_dim, out_dim })
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `epilogue(x wᵀ + b)`; with [`Epilogue::Geglu`] the last dimension halves.
    pub fn forward_with(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        match &self.repr {
            Repr::Cpu { weight_t, bias, .. } if x.device().is_cpu() && x.dtype() == DType::F32 => {
                let op = LinearCpu { bias: bias.clone(), epilogue };
                x.contiguous()?.apply_op2_no_bwd(weight_t, &op)
            }
            Repr::Host { weight_t, bias } if x.device().is_cpu() && x.dtype() == DType::F32 => {
                let op = LinearHost {
                    op: LinearCpu { bias: bias.clone(), epilogue },
                    weight_t: weight_t.clone(),
                    in_dim: self.in_dim,
                    out_dim: self.out_dim,
                };
                x.contiguous()?.apply_op1_no_bwd(&op)
            }
            _ => {
                let y = self.forward_plain(x)?;
                apply_epilogue(&y, epilogue)
            }
        }
    }

    /// candle's composition (also the reference the tests compare against).
    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        match &self.repr {
            Repr::Cpu { weight_t, bias_tensor, .. } => {
                let y = x.broadcast_matmul(&weight_t.to_dtype(x.dtype())?)?;
                match bias_tensor {
                    Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?),
                    None => Ok(y),
                }
            }
            Repr::Host { weight_t, bias } => {
                let w = Tensor::from_slice(weight_t.values(), (self.in_dim, self.out_dim), x.device())?;
                let y = x.broadcast_matmul(&w.to_dtype(x.dtype())?)?;
                match bias {
                    Some(b) => y.broadcast_add(
                        &Tensor::from_slice(b, self.out_dim, x.device())?.to_dtype(x.dtype())?,
                    ),
                    None => Ok(y),
                }
            }
            Repr::Candle(lin) => lin.forward(x),
        }
    }

    /// A CPU f32 layer computing from `weight_t`, the weight transposed (`[in, out]`
    /// row-major, as [`Linear::cpu_values`] gives it), without copying it.
    pub fn from_host(
        weight_t: HostF32,
        in_dim: usize,
        out_dim: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        if weight_t.len() != in_dim * out_dim || bias.as_ref().is_some_and(|b| b.len() != out_dim) {
            candle_core::bail!(
                "linear from host values: {} weight and {:?} bias values for {in_dim} -> {out_dim}",
                weight_t.len(),
                bias.as_ref().map(Vec::len)
            );
        }
        let repr = Repr::Host { weight_t, bias: bias.map(Arc::new) };
        Ok(Self { repr, in_dim, out_dim })
    }

    /// The values a CPU f32 layer computes from: the weight transposed (`[in, out]` row-major)
    /// and the bias. `None` for a layer kept by candle (another device or dtype).
    pub fn cpu_values(&self) -> Result<Option<LayerValues>> {
        match &self.repr {
            Repr::Cpu { weight_t, bias, .. } => {
                let values = weight_t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                Ok(Some(self.values(values, bias)))
            }
            Repr::Host { weight_t, bias } => Ok(Some(self.values(weight_t.values().to_vec(), bias))),
            Repr::Candle(_) => Ok(None),
        }
    }

    /// What [`Linear::cpu_values`] would give, without copying: the weight's dims and whether
    /// there is a bias.
    pub fn cpu_shape(&self) -> Option<(Vec<usize>, bool)> {
        match &self.repr {
            Repr::Cpu { bias, .. } | Repr::Host { bias, .. } => {
                Some((vec![self.in_dim, self.out_dim], bias.is_some()))
            }
            Repr::Candle(_) => None,
        }
    }

    fn values(&self, weight: Vec<f32>, bias: &Option<Arc<Vec<f32>>>) -> LayerValues {
        LayerValues { weight, dims: vec![self.in_dim, self.out_dim], bias: bias.as_ref().map(|b| b.to_vec()) }
    }
}

/// The `[out_i, in]` weights stacked along `out` and transposed: one `[in, sum out_i]` tensor.
fn transpose_concat(weights: &[&Tensor], in_dim: usize, out_dim: usize) -> Result<Tensor> {
    let out = transpose_concat_values(weights, in_dim, out_dim)?;
    Tensor::from_vec(out, (in_dim, out_dim), weights[0].device())
}

/// The values of [`transpose_concat`], row-major `[in, sum out_i]`. A part already stored
/// transposed (a view of an `[in, out_i]` buffer, as LoRA merges leave their weights) has its
/// rows copied as they are; the others are transposed.
pub(crate) fn transpose_concat_values(
    weights: &[&Tensor],
    in_dim: usize,
    out_dim: usize,
) -> Result<Vec<f32>> {
    // Each part as a row-major matrix, and whether that matrix is `[in, out_i]` (transposed).
    let stored = weights
        .iter()
        .map(|w| match w.t() {
            Ok(t) if t.is_contiguous() && w.rank() == 2 => Ok((t, true)),
            _ => Ok((w.contiguous()?, false)),
        })
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = stored.iter().map(|(w, transposed)| (w.storage_and_layout(), *transposed)).collect();
    let mut parts = Vec::with_capacity(guards.len());
    for ((storage, layout), transposed) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("kiln-linear: weight must be on the CPU");
        };
        parts.push((f32_values("kiln-linear", "weight", cpu, layout)?, *transposed));
    }
    transpose_concat_slices(&parts, in_dim, out_dim)
}

/// [`transpose_concat_values`] on raw values: each part row-major `[out_i, in]`, or `[in, out_i]`
/// when its flag says it is stored transposed.
pub(crate) fn transpose_concat_slices(
    parts: &[(&[f32], bool)],
    in_dim: usize,
    out_dim: usize,
) -> Result<Vec<f32>> {
    // (first output column, values, transposed) of each part.
    let mut sources = Vec::with_capacity(parts.len());
    let mut j0 = 0;
    for &(values, transposed) in parts {
        if values.len() % in_dim.max(1) != 0 {
            candle_core::bail!("kiln-linear: a weight part of {} values for {in_dim} inputs", values.len());
        }
        sources.push((j0, values, transposed));
        j0 += values.len() / in_dim.max(1);
    }
    if j0 != out_dim || in_dim == 0 {
        candle_core::bail!("kiln-linear: weight parts make {j0} outputs of {in_dim} inputs, not {out_dim}");
    }
    let mut out: Vec<f32> = Vec::with_capacity(in_dim * out_dim);
    crate::cpu::advise_huge_pages(out.spare_capacity_mut());
    // Tiles of TILE x TILE: the TILE source rows a tile reads are fetched together and stay in
    // L1 while the tile's output rows are written contiguously (a column-at-a-time transpose is
    // bound by one cache miss per value).
    const TILE: usize = 64;
    out.spare_capacity_mut()[..in_dim * out_dim].par_chunks_mut(TILE * out_dim.max(1)).enumerate().for_each(
        |(block, dst)| {
            let i0 = block * TILE;
            let rows = dst.len() / out_dim.max(1);
            for &(j0, src, transposed) in &sources {
                let part_out = src.len() / in_dim.max(1);
                if transposed {
                    for r in 0..rows {
                        let row = &src[(i0 + r) * part_out..][..part_out];
                        for (slot, &v) in dst[r * out_dim + j0..][..part_out].iter_mut().zip(row) {
                            slot.write(v);
                        }
                    }
                    continue;
                }
                for jt in (0..part_out).step_by(TILE) {
                    let cols = TILE.min(part_out - jt);
                    for r in 0..rows {
                        let d = &mut dst[r * out_dim + j0 + jt..][..cols];
                        for (c, slot) in d.iter_mut().enumerate() {
                            slot.write(src[(jt + c) * in_dim + i0 + r]);
                        }
                    }
                }
            }
        },
    );
    #[allow(unsafe_code)]
    // SAFETY: the parts' output columns tile 0..out_dim and the blocks tile the rows, so every
    // one of the in_dim * out_dim values was written above.
    unsafe {
        out.set_len(in_dim * out_dim)
    };
    Ok(out)
}

/// The epilogue as candle ops.
pub fn apply_epilogue(y: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
    match epilogue {
        Epilogue::None => Ok(y.clone()),
        Epilogue::GeluErf => y.gelu_erf(),
        Epilogue::Geglu => {
            let half = y.dim(D::Minus1)? / 2;
            let hidden = y.narrow(D::Minus1, 0, half)?;
            let gate = y.narrow(D::Minus1, half, half)?;
            hidden * gate.gelu_erf()?
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Epilogue::None)
    }
}

/// Loads `weight` `[out, in]` and `bias` `[out]` like `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

/// Loads `weight` `[out, in]` like `candle_nn::linear_no_bias`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((out_dim, in_dim), "weight")?, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn matches_candle_linear() -> Result<()> {
        let dev = Device::Cpu;
        // (leading dims, in, out): text-encoder-like (few rows) and UNet-like (many rows) shapes.
        let cases: [(&[usize], usize, usize); 5] = [
            (&[1, 77], 64, 96),
            (&[2, 77], 48, 33),
            (&[1, 300], 40, 24),
            (&[3], 5, 7),
            (&[2, 3, 50], 16, 130),
        ];
        for (i, (lead, k, n)) in cases.into_iter().enumerate() {
            let mut shape = lead.to_vec();
            shape.push(k);
            let x = Tensor::randn(0f32, 1.0, shape, &dev)?;
            let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 0.3, n, &dev)?;
            for bias in [None, Some(b.clone())] {
                let reference = candle_nn::Linear::new(w.clone(), bias.clone()).forward(&x)?;
                let ours = Linear::new(w.clone(), bias.clone())?;
                let d = max_abs_diff(&ours.forward(&x)?, &reference)?;
                assert!(d < 1e-4, "case {i}: plain diff {d}");
                let d = max_abs_diff(&ours.forward_with(&x, Epilogue::GeluErf)?, &reference.gelu_erf()?)?;
                assert!(d < 1e-4, "case {i}: gelu diff {d}");
                if n % 2 == 0 {
                    let reference = apply_epilogue(&reference, Epilogue::Geglu)?;
                    let d = max_abs_diff(&ours.forward_with(&x, Epilogue::Geglu)?, &reference)?;
                    assert!(d < 1e-4, "case {i}: geglu diff {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn concat_equals_separate_layers() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 9, 16), &dev)?;
        let parts: Vec<(Tensor, Option<Tensor>)> = (0..3)
            .map(|_| Ok((Tensor::randn(0f32, 0.3, (8, 16), &dev)?, Some(Tensor::randn(0f32, 0.3, 8, &dev)?))))
            .collect::<Result<_>>()?;
        let fused = Linear::concat(&parts)?.forward(&x)?;
        for (i, (w, b)) in parts.iter().enumerate() {
            let separate = candle_nn::Linear::new(w.clone(), b.clone()).forward(&x)?;
            let d = max_abs_diff(&fused.narrow(2, i * 8, 8)?, &separate)?;
            assert!(d < 1e-5, "part {i}: diff {d}");
        }
        // Parts stored transposed (views of [in, out] buffers, as LoRA merges leave them), alone
        // or mixed with plain ones, give the same fused weight bit for bit.
        let transposed: Vec<(Tensor, Option<Tensor>)> = parts
            .iter()
            .enumerate()
            .map(|(i, (w, b))| Ok((if i == 1 { w.clone() } else { w.t()?.contiguous()?.t()? }, b.clone())))
            .collect::<Result<_>>()?;
        assert!(!transposed[0].0.is_contiguous() && transposed[1].0.is_contiguous());
        let again = Linear::concat(&transposed)?.forward(&x)?;
        assert_eq!(max_abs_diff(&again, &fused)?, 0.0);
        Ok(())
    }

    /// A layer rebuilt from its own host values (as a mapped layout file gives them) computes
    /// the same bits as the layer it came from.
    #[test]
    fn host_values_layer_equals_tensor_layer_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        for &(m, k, n) in &[(77, 64, 96), (300, 40, 24), (5, 16, 130)] {
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev)?;
            for bias in [None, Some(Tensor::randn(0f32, 0.3, n, &dev)?)] {
                let lin = Linear::new(Tensor::randn(0f32, 0.3, (n, k), &dev)?, bias)?;
                let Some(v) = lin.cpu_values()? else { panic!("a CPU f32 layer has values") };
                assert_eq!(v.dims, [k, n]);
                let host = Linear::from_host(v.weight.into(), k, n, v.bias)?;
                for epilogue in [Epilogue::None, Epilogue::GeluErf] {
                    let want = lin.forward_with(&x, epilogue)?;
                    assert_eq!(max_abs_diff(&host.forward_with(&x, epilogue)?, &want)?, 0.0);
                }
                let d = max_abs_diff(&host.forward_plain(&x)?, &lin.forward_plain(&x)?)?;
                assert!(d < 1e-5, "reference path: {d}");
            }
        }
        assert!(Linear::from_host(vec![0f32; 5].into(), 2, 3, None).is_err());
        Ok(())
    }

    /// A batched image must equal the same image made alone, bit for bit: each batch item (a
    /// sequence of a 3-D input, a row of a 2-D one) is multiplied the same way whatever the batch.
    #[test]
    fn batched_equals_single_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        for &(m, k, n) in &[(16, 32, 32), (64, 32, 64), (77, 1024, 1024), (256, 320, 1280), (3, 40, 1000)] {
            let x = Tensor::randn(0f32, 1.0, (4, m, k), &dev)?;
            let lin = Linear::new(
                Tensor::randn(0f32, 0.3, (n, k), &dev)?,
                Some(Tensor::randn(0f32, 0.3, n, &dev)?),
            )?;
            for epilogue in [Epilogue::None, Epilogue::GeluErf] {
                let all = lin.forward_with(&x, epilogue)?;
                for i in 0..4 {
                    let one = lin.forward_with(&x.narrow(0, i, 1)?, epilogue)?;
                    assert_eq!(max_abs_diff(&one, &all.narrow(0, i, 1)?)?, 0.0, "{m}x{k}->{n}: item {i}");
                }
            }
            // 2-D input: each row is an item.
            let rows = x.narrow(1, 0, 1)?.squeeze(1)?;
            let all = lin.forward(&rows)?;
            for i in 0..4 {
                assert_eq!(max_abs_diff(&lin.forward(&rows.narrow(0, i, 1)?)?, &all.narrow(0, i, 1)?)?, 0.0);
            }
        }
        Ok(())
    }
}
