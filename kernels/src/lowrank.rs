//! Merging low-rank updates (LoRA) into a weight, on CPU f32, straight into the transposed
//! layout [`crate::Linear`] keeps.
//!
//! The composed way (candle ops: `up · down`, times the scale, plus the base, then the
//! Linear's transposed copy) allocates and walks the full weight four times per update. Here the
//! base is transposed once into a new buffer and every update is accumulated into it by one
//! gemm (`dstᵀ += scale · downᵀ · upᵀ`), so a warm model's LoRA switch and a load with LoRAs
//! touch each merged weight about twice. The result is returned as the `[out, in]` view of the
//! `[in, out]` buffer, which `Linear` takes without copying.

use candle_core::{DType, Result, Tensor};

/// One low-rank update `scale · up · down`: `up` `[out, rank]`, `down` `[rank, in]`.
pub struct LowRank<'a> {
    pub up: &'a Tensor,
    pub down: &'a Tensor,
    pub scale: f64,
}

/// `base + Σ scale · up · down` for a 2-D CPU `base` `[out, in]` in f32, returned as a view of
/// a contiguous `[in, out]` buffer (see the module docs). Errors on other devices, dtypes and
/// ranks: callers use [`merge_low_rank_reference`] there.
pub fn merge_low_rank_transposed(base: &Tensor, updates: &[LowRank]) -> Result<Tensor> {
    let (out_dim, in_dim) = base.dims2()?;
    if !base.device().is_cpu() || base.dtype() != DType::F32 {
        candle_core::bail!("merge_low_rank_transposed: base must be f32 on the CPU");
    }
    let dst = crate::linear::transpose_concat_values(&[base], in_dim, out_dim)?;
    accumulate(dst, out_dim, in_dim, updates)
}

/// [`merge_low_rank_transposed`] from the base's values, row-major `[out, in]` (e.g. straight
/// from a mapped weight file, so the base is never copied whole before it is transposed).
pub fn merge_low_rank_transposed_values(
    base: &[f32],
    (out_dim, in_dim): (usize, usize),
    updates: &[LowRank],
) -> Result<Tensor> {
    if base.len() != out_dim * in_dim {
        candle_core::bail!(
            "merge_low_rank_transposed: {} values for a [{out_dim}, {in_dim}] weight",
            base.len()
        );
    }
    let dst = crate::linear::transpose_concat_slices(&[(base, false)], in_dim, out_dim)?;
    accumulate(dst, out_dim, in_dim, updates)
}

/// Adds every update to `dst`, the `[in, out]` transposed base, and returns it as `[out, in]`.
fn accumulate(mut dst: Vec<f32>, out_dim: usize, in_dim: usize, updates: &[LowRank]) -> Result<Tensor> {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    for u in updates {
        let (o, rank) = u.up.dims2()?;
        let (r, i) = u.down.dims2()?;
        if o != out_dim || i != in_dim || r != rank {
            candle_core::bail!(
                "merge_low_rank_transposed: update up {:?} · down {:?} for a [{out_dim}, {in_dim}] weight",
                u.up.dims(),
                u.down.dims()
            );
        }
        let up = u.up.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let down = u.down.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // dstᵀ[i, j] += scale · Σ_p down[p, i] · up[j, p]: lhs = downᵀ (row stride 1, column
        // stride in), rhs = upᵀ (row stride 1, column stride rank), dst rows `out` apart.
        #[allow(unsafe_code)]
        // SAFETY: the shapes were checked above: lhs (i, p) = down[p·in + i] with i < in,
        // p < rank; rhs (p, j) = up[j·rank + p] with j < out; dst (i, j) = dst[i·out + j], all
        // in bounds of buffers of in·rank, out·rank and in·out values; dst is not shared.
        unsafe {
            gemm::gemm(
                in_dim,
                out_dim,
                rank,
                dst.as_mut_ptr(),
                1,
                out_dim as isize,
                true,
                down.as_ptr(),
                in_dim as isize,
                1,
                up.as_ptr(),
                rank as isize,
                1,
                1.0,
                u.scale as f32,
                false,
                false,
                false,
                parallelism,
            )
        };
    }
    Tensor::from_vec(dst, (in_dim, out_dim), &candle_core::Device::Cpu)?.t()
}

/// [`merge_low_rank_transposed`] by candle's ops (any device and dtype, computed in f32): the
/// reference the tests compare against.
pub fn merge_low_rank_reference(base: &Tensor, updates: &[LowRank]) -> Result<Tensor> {
    let mut merged = base.to_dtype(DType::F32)?;
    for u in updates {
        let delta = u.up.to_dtype(DType::F32)?.matmul(&u.down.to_dtype(DType::F32)?)?;
        merged = (merged + (delta * u.scale)?)?;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs_diff, rand_unit};

    #[test]
    fn matches_the_composed_merge_and_is_taken_by_linear_without_a_copy() -> Result<()> {
        let base = rand_unit(&[96, 80], 1)?;
        let (up1, down1) = (rand_unit(&[96, 8], 2)?, rand_unit(&[8, 80], 3)?);
        let (up2, down2) = (rand_unit(&[96, 4], 4)?, rand_unit(&[4, 80], 5)?);
        let updates = [
            LowRank { up: &up1, down: &down1, scale: 0.75 },
            LowRank { up: &up2, down: &down2, scale: -0.5 },
        ];
        let ours = merge_low_rank_transposed(&base, &updates)?;
        let reference = merge_low_rank_reference(&base, &updates)?;
        assert_eq!(ours.dims(), &[96, 80]);
        assert!(!ours.is_contiguous() && ours.t()?.is_contiguous());
        let diff = max_abs_diff(&ours.contiguous()?, &reference)?;
        assert!(diff < 1e-5, "max diff {diff}");
        // A Linear built from it computes what one built from the reference computes.
        let x = rand_unit(&[3, 80], 6)?;
        let a = crate::Linear::new(ours.clone(), None)?.forward_with(&x, crate::Epilogue::None)?;
        let b = crate::Linear::new(reference, None)?.forward_with(&x, crate::Epilogue::None)?;
        assert!(max_abs_diff(&a, &b)? < 1e-4);
        // From the base's raw values: the same bits.
        let values = base.flatten_all()?.to_vec1::<f32>()?;
        let from_values = merge_low_rank_transposed_values(&values, (96, 80), &updates)?;
        assert_eq!(max_abs_diff(&from_values.contiguous()?, &ours.contiguous()?)?, 0.0);
        assert!(merge_low_rank_transposed_values(&values[1..], (96, 80), &updates).is_err());
        // Wrong shapes are refused.
        let bad = [LowRank { up: &up1, down: &rand_unit(&[8, 81], 7)?, scale: 1.0 }];
        assert!(merge_low_rank_transposed(&base, &bad).is_err());
        Ok(())
    }
}
