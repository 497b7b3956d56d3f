//! GroupNorm (+ optional SiLU) in one pass per group on CPU (f32), one kernel per call on CUDA
//! (f32/f16/bf16, kernels/cuda/group_norm.cu, `cuda` feature); candle's composed ops elsewhere.

use crate::cpu::f32_values;
use crate::fastmath;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupNormOp {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
}

impl GroupNormOp {
    /// (channels, spatial size) of input `xl`, checked against the groups and the affine
    /// parameters' lengths.
    fn check(&self, xl: &Layout, w_len: usize, b_len: usize) -> Result<(usize, usize)> {
        let dims = xl.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("kiln-group-norm: expected [B, C, ...], got {dims:?}");
        }
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        if self.groups == 0 || c % self.groups != 0 || w_len != c || b_len != c {
            candle_core::bail!(
                "kiln-group-norm: {c} channels, {} groups, affine {w_len}/{b_len}",
                self.groups
            );
        }
        Ok((c, spatial))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "kiln-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_values("kiln-group-norm", "input", xs, xl)?;
        let w = f32_values("kiln-group-norm", "weight", ws, wl)?;
        let b = f32_values("kiln-group-norm", "bias", bs, bl)?;
        let (c, spatial) = self.check(xl, w.len(), b.len())?;
        let per_group = (c / self.groups) * spatial;
        let mut out = vec![0f32; x.len()];
        let (eps, silu, cpg) = (self.eps, self.silu, c / self.groups);
        out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(i, (dst, src))| {
            let g = i % self.groups;
            let affine = group_affine(src, &w[g * cpg..][..cpg], &b[g * cpg..][..cpg], eps);
            for ((d, s), (scale, shift)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).zip(affine) {
                if silu {
                    fastmath::affine_silu(d, s, scale, shift);
                } else {
                    fastmath::affine(d, s, scale, shift);
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (c, spatial) = self.check(xl, wl.shape().elem_count(), bl.shape().elem_count())?;
        let batch = xl.shape().dims()[0];
        let out = crate::cuda::group_norm::forward(
            (xs, xl),
            (ws, wl),
            (bs, bl),
            crate::cuda::group_norm::Dims { batch, channels: c, groups: self.groups, spatial },
            self.eps as f32,
            self.silu,
        )?;
        Ok((out, xl.shape().clone()))
    }
}

/// One group's per-channel `(scale, shift)` with `norm(x) = x * scale + shift`, from the group's
/// values `src` and its channels' `gamma`/`beta`. Two passes in f64: exact enough to match
/// torch's f32 Welford to ~1e-6. The kernel and [`GroupNorm::input_norm`] both use it, so a
/// norm fused into the next conv computes the same bits as the kernel.
fn group_affine<'a>(
    src: &[f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f64,
) -> impl Iterator<Item = (f32, f32)> + 'a {
    let n = src.len() as f64;
    let mean = fastmath::sum_f64(src) / n;
    let var = fastmath::centered_square_sum_f64(src, mean) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    gamma.iter().zip(beta).map(move |(&w, &b)| {
        let scale = (rstd * w as f64) as f32;
        let shift = (b as f64 - mean * rstd * w as f64) as f32;
        (scale, shift)
    })
}

/// A normalisation whose statistics are known, as a per-channel affine map optionally followed
/// by SiLU: `silu?(x * scale + shift)`. A conv applies it to its input as it reads it
/// ([`crate::Conv2d::forward_normed`]), so the normalised feature map is never written out: at a
/// 4096² VAE decode that is half a gigabyte per norm layer.
#[derive(Debug, Clone, PartialEq)]
pub struct InputNorm {
    /// Per batch item and channel (`batch * channels` values, item-major).
    scale: Vec<f32>,
    shift: Vec<f32>,
    silu: bool,
}

impl InputNorm {
    /// `scale` and `shift` hold one value per batch item and channel, item-major.
    pub fn new(scale: Vec<f32>, shift: Vec<f32>, silu: bool) -> Result<Self> {
        if scale.len() != shift.len() || scale.is_empty() {
            candle_core::bail!("input norm: {} scales and {} shifts", scale.len(), shift.len());
        }
        Ok(Self { scale, shift, silu })
    }

    /// Batch items × channels it covers.
    pub fn len(&self) -> usize {
        self.scale.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scale.is_empty()
    }

    /// Writes the normalised `src` (values of item-channel `bc`) to `dst`.
    #[inline]
    pub fn apply_row(&self, bc: usize, dst: &mut [f32], src: &[f32]) {
        let (scale, shift) = (self.scale[bc], self.shift[bc]);
        if self.silu {
            fastmath::affine_silu(dst, src, scale, shift);
        } else {
            fastmath::affine(dst, src, scale, shift);
        }
    }

    /// The normalised feature map (`x`: `[B, C, ...]`, CPU f32, `B * C` = [`Self::len`]).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        if dims.len() < 2 || dims[0] * dims[1] != self.len() {
            candle_core::bail!("input norm for {} channels applied to {dims:?}", self.len());
        }
        let plane: usize = dims[2..].iter().product();
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; values.len()];
        out.par_chunks_mut(plane.max(1))
            .zip(values.par_chunks(plane.max(1)))
            .enumerate()
            .for_each(|(bc, (d, s))| self.apply_row(bc, d, s));
        Tensor::from_vec(out, dims, x.device())
    }
}

/// GroupNorm with candle_nn's weights (`weight`, `bias` of [C]).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { inner, weight, bias, groups, eps })
    }

    /// The per-channel scale (gamma), `[C]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The per-channel shift (beta), `[C]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    fn fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        let op = GroupNormOp { groups: self.groups, eps: self.eps, silu };
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            return Ok(Some(x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op)?));
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            // The kernel takes affine parameters in the input's dtype or in f32.
            let w_dtype = self.weight.dtype();
            let (weight, bias) =
                if self.bias.dtype() == w_dtype && (w_dtype == x.dtype() || w_dtype == DType::F32) {
                    (self.weight.clone(), self.bias.clone())
                } else {
                    (self.weight.to_dtype(DType::F32)?, self.bias.to_dtype(DType::F32)?)
                };
            return Ok(Some(x.contiguous()?.apply_op3_no_bwd(&weight, &bias, &op)?));
        }
        Ok(None)
    }

    /// This norm (with SiLU after it when `silu`) of `x` as an [`InputNorm`] for the next conv to
    /// apply as it reads `x`: the statistics of `x`, computed as the fused kernel does (same
    /// bits). None where the kernel does not run on the CPU (other devices and dtypes).
    pub fn input_norm(&self, x: &Tensor, silu: bool) -> Result<Option<InputNorm>> {
        if !(x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32) {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let dims = x.dims();
        if dims.len() < 2 || self.groups == 0 || dims[1] % self.groups != 0 {
            candle_core::bail!("kiln-group-norm: {dims:?} for {} groups", self.groups);
        }
        let (batch, c) = (dims[0], dims[1]);
        let cpg = c / self.groups;
        let per_group = cpg * dims[2..].iter().product::<usize>();
        let (gamma, beta) = (self.weight.to_vec1::<f32>()?, self.bias.to_vec1::<f32>()?);
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("kiln-group-norm: affine {}/{} for {c} channels", gamma.len(), beta.len());
        }
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("kiln-group-norm: needs a CPU tensor");
        };
        let values = f32_values("kiln-group-norm", "input", cpu, layout)?;
        let eps = self.eps;
        let affine: Vec<Vec<(f32, f32)>> = values
            .par_chunks(per_group.max(1))
            .take(batch * self.groups)
            .enumerate()
            .map(|(i, src)| {
                let g = i % self.groups;
                group_affine(src, &gamma[g * cpg..][..cpg], &beta[g * cpg..][..cpg], eps).collect()
            })
            .collect();
        let (scale, shift) = affine.into_iter().flatten().unzip();
        Ok(Some(InputNorm::new(scale, shift, silu)?))
    }

    /// `silu(group_norm(x))`, fused on CPU and CUDA.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, true)? {
            Some(y) => Ok(y),
            None => candle_nn::ops::silu(&self.inner.forward(x)?),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.fused(x, false)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

/// Loads like `candle_nn::group_norm`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    GroupNorm::new(weight, bias, channels, groups, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn matches_candle_reference() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3f32, (2, 12, 5, 7), &dev)? + 1.5)?;
        let w = Tensor::randn(1f32, 0.5f32, 12, &dev)?;
        let b = Tensor::randn(0f32, 0.5f32, 12, &dev)?;
        let gn = GroupNorm::new(w.clone(), b.clone(), 12, 4, 1e-5)?;
        let reference = candle_nn::GroupNorm::new(w, b, 12, 4, 1e-5)?.forward(&x)?;
        let diff = max_abs_diff(&gn.forward(&x)?, &reference)?;
        assert!(diff < 1e-5, "norm diff {diff}");
        let silu_ref = candle_nn::ops::silu(&reference)?;
        let diff = max_abs_diff(&gn.forward_silu(&x)?, &silu_ref)?;
        assert!(diff < 1e-5, "silu diff {diff}");
        Ok(())
    }

    /// The norm as an input norm, materialised, is the kernel's output bit for bit.
    #[test]
    fn input_norm_equals_the_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3f32, (2, 12, 5, 7), &dev)? + 1.5)?;
        let gn = GroupNorm::new(
            Tensor::randn(1f32, 0.5, 12, &dev)?,
            Tensor::randn(0f32, 0.5, 12, &dev)?,
            12,
            4,
            1e-5,
        )?;
        for silu in [false, true] {
            let Some(norm) = gn.input_norm(&x, silu)? else { panic!("CPU f32 has an input norm") };
            let kernel = if silu { gn.forward_silu(&x)? } else { gn.forward(&x)? };
            assert_eq!(max_abs_diff(&norm.apply(&x)?, &kernel)?, 0.0, "silu {silu}");
        }
        Ok(())
    }
}
