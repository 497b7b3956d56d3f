//! The VAE's single-head spatial self-attention (diffusers' `Attention` with
//! `_from_deprecated_attn_block=True`), whole-map or over overlapping windows for large latents,
//! and the scaled dot-product attention it runs.

use super::blocks::{group_norm, Norms};
use super::with_f32_values;
use crate::error::{Error, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use kiln_kernels::{GroupNorm, InputNorm, Linear};

/// Most attention scores materialised at once; longer sequences are processed in query chunks so a
/// 1024² SDXL decode does not allocate a 16384² score matrix per image in one go.
const MAX_SCORES_PER_CHUNK: usize = 1 << 26;

/// Scaled dot-product attention, `softmax(q·kᵀ·scale)·v`, over `[batch, heads, tokens, head_dim]`
/// tensors. The softmax runs in f32 whatever the input dtype (diffusers declares
/// `upcast_softmax=True` for the VAE). Where kiln has a fused kernel (CPU f32; CUDA f32/f16/bf16
/// in CUDA builds) it runs that, which never materialises the score matrix; elsewhere the query
/// chunks below.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if kiln_kernels::attention_is_fused(q.device(), q.dtype(), q.dim(3)?.max(v.dim(3)?)) {
        return Ok(kiln_kernels::attention(q, k, v, scale, false)?);
    }
    chunked_attention(q, k, v, scale, MAX_SCORES_PER_CHUNK)
}

/// [`scaled_dot_product_attention`] materialising at most about `max_scores` scores at a time.
fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, max_scores: usize) -> Result<Tensor> {
    let (batch, heads, n_q, _) = q.dims4()?;
    let n_kv = k.dim(2)?;
    let dtype = q.dtype();
    let q = (q * scale)?;
    // Contiguous operands: see the note on candle's CPU matmul in `SpatialAttention::forward`.
    let k_t = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let rows = (max_scores / (batch * heads * n_kv).max(1)).clamp(1, n_q.max(1));
    let mut chunks = Vec::with_capacity(n_q.div_ceil(rows));
    let mut start = 0;
    while start < n_q {
        let len = rows.min(n_q - start);
        let q_chunk = q.narrow(2, start, len)?.contiguous()?;
        let scores = q_chunk.matmul(&k_t)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        chunks.push(probs.matmul(&v)?);
        start += len;
    }
    Ok(Tensor::cat(&chunks, 2)?)
}

/// Loads a projection of the attention block (weight, bias). Weights may be `[c, c]` (diffusers) or
/// `[c, c, 1, 1]` (1×1 convs of original LDM checkpoints converted without reshaping).
fn attention_linear(channels: usize, vb: VarBuilder) -> Result<(Tensor, Option<Tensor>)> {
    let weight = vb.get_unchecked_dtype("weight", vb.dtype())?;
    let weight = match weight.dims() {
        [o, i] if *o == channels && *i == channels => weight,
        [o, i, 1, 1] if *o == channels && *i == channels => weight.reshape((channels, channels))?,
        found => {
            return Err(Error::ShapeMismatch {
                name: format!("{}.weight", vb.prefix()),
                expected: vec![channels, channels],
                found: found.to_vec(),
            })
        }
    };
    let bias = vb.get(channels, "bias")?;
    Ok((weight, Some(bias)))
}

/// The VAE's spatial self-attention: group norm, q/k/v projections, attention, output projection,
/// residual, divided by `rescale_output_factor` (1 in the VAE). Accepts both the current key names
/// (`to_q`, `to_k`, `to_v`, `to_out.0`) and the deprecated ones (`query`, `key`, `value`,
/// `proj_attn`) that some converted folders still carry.
#[derive(Debug, Clone)]
pub(crate) struct SpatialAttention {
    group_norm: GroupNorm,
    /// to_q, to_k and to_v side by side (one gemm).
    to_qkv: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl SpatialAttention {
    /// `head_dim` is the attention head size; the VAE always passes `channels` (one head).
    pub(crate) fn new(channels: usize, head_dim: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        if head_dim == 0 || channels % head_dim != 0 {
            return Err(Error::arg(
                "attention_head_dim",
                format!("{head_dim} does not divide {channels} channels"),
            ));
        }
        let deprecated = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, out) = if deprecated {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, vb.pp("group_norm"))?,
            to_qkv: Linear::concat(&[
                attention_linear(channels, vb.pp(q))?,
                attention_linear(channels, vb.pp(k))?,
                attention_linear(channels, vb.pp(v))?,
            ])?,
            to_out: {
                let (weight, bias) = attention_linear(channels, vb.pp(out))?;
                Linear::new(weight, bias)?
            },
            heads: channels / head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, norms: &mut dyn Norms) -> Result<Tensor> {
        Ok(self.forward_windowed(xs, norms, usize::MAX)?.0)
    }

    /// [`Self::forward`], with the attention itself over overlapping windows of at most
    /// `window`² pixels once the feature map is larger than that (blended like image tiles); the
    /// norm and the projections still see the whole map. Whole-map attention is quadratic in the
    /// pixels: at a 4096² decode's 512² latent it is 140 TFLOP, more than the rest of the decode.
    /// Returns the output and the number of windows (1: whole-map attention, as diffusers).
    pub(crate) fn forward_windowed(
        &self,
        xs: &Tensor,
        norms: &mut dyn Norms,
        window: usize,
    ) -> Result<(Tensor, usize)> {
        let (b, c, h, w) = xs.dims4()?;
        if h > window || w > window {
            if let Some(norm) = norms.input_norm(&self.group_norm, None, xs)? {
                return self.forward_windows_fused(xs, &norm, window);
            }
        }
        // [b, hw, c], made contiguous: candle 0.11.1's CPU matmul folds the batch of a transposed lhs
        // against a broadcast rhs (what `Linear` does for 3-D inputs) into one gemm and gets it wrong.
        let tokens =
            norms.apply(&self.group_norm, None, xs)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let (attended, windows) = if h <= window && w <= window {
            (self.attend(&self.to_qkv.forward(&tokens)?, c)?, 1)
        } else {
            self.attend_windows(&tokens, (b, c, h, w), window)?
        };
        drop(tokens);
        let out = self.to_out.forward(&attended)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok(((out + xs)?, windows))
    }

    /// softmax(q·kᵀ·scale)·v over `qkv` = `[b, n, 3c]` (q, k, v side by side) → `[b, n, c]`.
    fn attend(&self, qkv: &Tensor, c: usize) -> Result<Tensor> {
        let (b, n, _) = qkv.dims3()?;
        let head_dim = c / self.heads;
        let (q, k, v) = (qkv.narrow(2, 0, c)?, qkv.narrow(2, c, c)?, qkv.narrow(2, 2 * c, c)?);
        if kiln_kernels::attention_is_fused(qkv.device(), qkv.dtype(), head_dim) {
            // Fused kernel straight on the projection's [b, n, heads * head_dim] output.
            return Ok(kiln_kernels::attention_bnc(&q, &k, &v, self.heads, self.scale, false)?);
        }
        let split_heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) =
            (split_heads(q.contiguous()?)?, split_heads(k.contiguous()?)?, split_heads(v.contiguous()?)?);
        let attended = scaled_dot_product_attention(&q, &k, &v, self.scale)?;
        Ok(attended.transpose(1, 2)?.reshape((b, n, c))?)
    }

    /// The windowed forward pass on CPU f32 with the least memory: each window reads its part
    /// of `xs` through the norm, projects q/k/v, attends and projects back on its own (the
    /// output projection commutes with the blend, whose weights sum to 1), and each finished
    /// strip of blended rows is added to `xs` straight into the output. Beside `xs` and the
    /// output only one window's and one strip's activations are alive (at a 4096² decode's 512²
    /// latent the map is half a gigabyte; the composed path holds five).
    fn forward_windows_fused(&self, xs: &Tensor, norm: &InputNorm, window: usize) -> Result<(Tensor, usize)> {
        use crate::tiling::{StripAssembler, TileOutput};
        use rayon::prelude::*;
        let (b, c, h, w) = xs.dims4()?;
        let plan = window_plan(h, w, window)?;
        let plane = h * w;
        let out = with_f32_values(xs, |src| -> Result<Vec<f32>> {
            let mut out = vec![0f32; b * c * h * w];
            for i in 0..b {
                let mut assembler = StripAssembler::new(plan.clone(), 1, c);
                let mut y0 = 0;
                for row in 0..plan.y.cores.len() {
                    let ys = clamp_range(plan.y.window(row), h);
                    for col in 0..plan.x.cores.len() {
                        let xr = clamp_range(plan.x.window(col), w);
                        let (ny, nx) = (ys.len(), xr.len());
                        let n = ny * nx;
                        let mut planar = vec![0f32; c * n];
                        planar.par_chunks_mut(n).enumerate().for_each(|(ch, dst)| {
                            let src_plane = &src[(i * c + ch) * plane..][..plane];
                            for (k, y) in ys.clone().enumerate() {
                                let row_src = &src_plane[y * w + xr.start..][..nx];
                                norm.apply_row(i * c + ch, &mut dst[k * nx..][..nx], row_src);
                            }
                        });
                        let tokens = Tensor::from_vec(planar, (c, n), xs.device())?
                            .t()?
                            .contiguous()?
                            .reshape((1, n, c))?;
                        let attended = self.attend(&self.to_qkv.forward(&tokens)?, c)?;
                        drop(tokens);
                        let projected = self.to_out.forward(&attended)?;
                        drop(attended);
                        let planar = projected.reshape((n, c))?.t()?.flatten_all()?.to_vec1::<f32>()?;
                        let origin = (ys.start as isize, xr.start as isize);
                        assembler.add(row, col, &TileOutput { data: &planar, rows: ny, cols: nx, origin })?;
                    }
                    // The finished rows (interleaved: row, column, channel), added to the input.
                    let strip = assembler.finish_row(row);
                    let rows = strip.len() / (w * c).max(1);
                    let out_item = &mut out[i * c * plane..][..c * plane];
                    out_item.par_chunks_mut(plane).enumerate().for_each(|(ch, dst)| {
                        let src_plane = &src[(i * c + ch) * plane..][..plane];
                        for p in y0 * w..(y0 + rows) * w {
                            dst[p] = strip[(p - y0 * w) * c + ch] + src_plane[p];
                        }
                    });
                    y0 += rows;
                }
            }
            Ok(out)
        })??;
        Ok((Tensor::from_vec(out, (b, c, h, w), xs.device())?, plan.tile_count()))
    }

    /// [`Self::attend`] over overlapping windows of the `h x w` map of normalised `tokens`
    /// (cores of at most `window`, an eighth of it as context and cross-fade), blended with the
    /// image tiler's weights. Each window projects its own q/k/v, so the whole map's (three times
    /// the activation) is never held.
    fn attend_windows(
        &self,
        tokens: &Tensor,
        (b, c, h, w): (usize, usize, usize, usize),
        window: usize,
    ) -> Result<(Tensor, usize)> {
        use crate::tiling::{StripAssembler, TileOutput};
        let plan = window_plan(h, w, window)?;
        let clamp = clamp_range;
        let map = tokens.reshape((b, h, w, c))?;
        let mut images = Vec::with_capacity(b);
        for i in 0..b {
            let mut assembler = StripAssembler::new(plan.clone(), 1, c);
            let mut rows = Vec::with_capacity(h * w * c);
            for row in 0..plan.y.cores.len() {
                let ys = clamp(plan.y.window(row), h);
                for col in 0..plan.x.cores.len() {
                    let xs = clamp(plan.x.window(col), w);
                    let part =
                        map.narrow(0, i, 1)?.narrow(1, ys.start, ys.len())?.narrow(2, xs.start, xs.len())?;
                    let part = part.contiguous()?.reshape((1, ys.len() * xs.len(), c))?;
                    let attended = self.attend(&self.to_qkv.forward(&part)?, c)?;
                    // The assembler takes planar channels x rows x cols.
                    let planar = attended.reshape((ys.len() * xs.len(), c))?.t()?.to_dtype(DType::F32)?;
                    let data = planar.flatten_all()?.to_vec1::<f32>()?;
                    let origin = (ys.start as isize, xs.start as isize);
                    assembler.add(
                        row,
                        col,
                        &TileOutput { data: &data, rows: ys.len(), cols: xs.len(), origin },
                    )?;
                }
                rows.extend(assembler.finish_row(row));
            }
            images.push(Tensor::from_vec(rows, (1, h * w, c), tokens.device())?.to_dtype(tokens.dtype())?);
        }
        Ok((Tensor::cat(&images, 0)?, plan.tile_count()))
    }
}

/// The attention windows over an `h x w` map: cores of at most `window`, an eighth of it as
/// context and cross-fade around each.
fn window_plan(h: usize, w: usize, window: usize) -> Result<crate::tiling::TilePlan> {
    let margin = (window / 8).max(1);
    let options = crate::tiling::TileOptions {
        max_tile: window,
        max_tile_rows: window,
        halo: margin,
        border: 0,
        feather: margin,
        multiple: 1,
    };
    crate::tiling::TilePlan::new(w, h, options)
}

/// A window range clamped to `[0, len)` (no context past the map's edges, as untiled).
fn clamp_range(r: std::ops::Range<isize>, len: usize) -> std::ops::Range<usize> {
    r.start.max(0) as usize..(r.end.max(0) as usize).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::vae::blocks::{Activation, PlainNorms};
    use candle_core::Device;

    #[test]
    fn chunked_attention_matches_one_pass() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let scale = 1.0 / 8f64.sqrt();
        // Reference: plain softmax(q kᵀ s) v in one go.
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let expected = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        for max_scores in [1, 2 * 3 * 29 * 5, usize::MAX / 2] {
            let got = chunked_attention(&q, &k, &v, scale, max_scores)?;
            let diff = (got - &expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "max_scores {max_scores}: diff {diff}");
        }
        Ok(())
    }

    /// A spatial attention with random weights; `to_v` all zeros when `constant_v` (every token's
    /// value is then `to_v`'s bias, whatever it attends to).
    fn attention(c: usize, constant_v: bool) -> Result<SpatialAttention> {
        let dev = Device::Cpu;
        let mut map = std::collections::HashMap::new();
        map.insert("group_norm.weight".to_string(), Tensor::randn(1f32, 0.1, c, &dev)?);
        map.insert("group_norm.bias".to_string(), Tensor::randn(0f32, 0.1, c, &dev)?);
        for name in ["to_q", "to_k", "to_v", "to_out.0"] {
            let weight = if constant_v && name == "to_v" {
                Tensor::zeros((c, c), DType::F32, &dev)?
            } else {
                Tensor::randn(0f32, 0.5, (c, c), &dev)?
            };
            map.insert(format!("{name}.weight"), weight);
            map.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.5, c, &dev)?);
        }
        SpatialAttention::new(c, c, 2, VarBuilder::from_tensors(map, DType::F32, &dev))
    }

    #[test]
    fn windowed_attention_is_whole_map_in_one_window_and_its_weights_sum_to_one() -> Result<()> {
        let xs = Tensor::randn(0f32, 1.0, (1, 8, 12, 20), &Device::Cpu)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
        };
        let att = attention(8, false)?;
        let whole = att.forward(&xs, &mut PlainNorms)?;
        let (one, n) = att.forward_windowed(&xs, &mut PlainNorms, 20)?;
        assert_eq!((n, max_diff(&one, &whole)?), (1, 0.0));
        // Small windows attend to less than the whole map: a different result.
        let (windowed, n) = att.forward_windowed(&xs, &mut PlainNorms, 6)?;
        assert!(n > 1 && max_diff(&windowed, &whole)? > 1e-3, "{n}");
        // With one value everywhere, any window's attention gives that value: the windows'
        // blend weights must sum to one at every pixel for the result to equal the whole map's.
        let att = attention(8, true)?;
        let whole = att.forward(&xs, &mut PlainNorms)?;
        for window in [3, 5, 6, 11] {
            let (windowed, n) = att.forward_windowed(&xs, &mut PlainNorms, window)?;
            let diff = max_diff(&windowed, &whole)?;
            assert!(n > 1 && diff < 1e-4, "window {window}: {n} windows, diff {diff}");
        }
        Ok(())
    }

    /// A Norms that never fuses (the trait's default `input_norm`): the composed path.
    struct Composed;

    impl Norms for Composed {
        fn apply(&mut self, norm: &GroupNorm, act: Option<Activation>, xs: &Tensor) -> Result<Tensor> {
            PlainNorms.apply(norm, act, xs)
        }
    }

    /// The fused windowed pass (norm read per window, output projection per window, strips
    /// added into the output) computes what the composed one does.
    #[test]
    fn fused_windows_equal_the_composed_windowed_pass() -> Result<()> {
        let xs = (Tensor::randn(0f32, 1.0, (2, 8, 23, 17), &Device::Cpu)? + 0.5)?;
        let att = attention(8, false)?;
        for window in [4, 6, 9] {
            let (fused, n) = att.forward_windowed(&xs, &mut PlainNorms, window)?;
            let (composed, m) = att.forward_windowed(&xs, &mut Composed, window)?;
            let diff = (fused - composed)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(n == m && n > 1 && diff < 1e-4, "window {window}: {n}/{m} windows, diff {diff}");
        }
        Ok(())
    }
}
