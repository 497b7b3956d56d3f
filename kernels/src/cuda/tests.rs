//! The CUDA kernels against the CPU ops (`cpu_fwd`, the reference) on random inputs. They need a
//! GPU: without one they fail, unless `KILN_SKIP_GPU_TESTS=1` says to skip them.
//! Run on a GPU machine: `cargo test --release -p kiln-kernels --features cuda -- cuda::`
//! (`--features cudnn` adds the cuDNN convolution tests in [`cudnn`]).

use crate::attention::{attention, attention_bnc, use_fused, AttentionOp};
use crate::norm::{GroupNorm, GroupNormOp};
use crate::test_util::rand;
use candle_core::{DType, Device, Result, Tensor};

/// The first CUDA device, or `None` (test skipped) if there is none and KILN_SKIP_GPU_TESTS=1.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) if std::env::var("KILN_SKIP_GPU_TESTS").as_deref() == Ok("1") => {
            eprintln!("skipped: no CUDA device ({e}) and KILN_SKIP_GPU_TESTS=1");
            None
        }
        Err(e) => {
            panic!("no CUDA device could be opened ({e}); set KILN_SKIP_GPU_TESTS=1 to skip the GPU tests")
        }
    }
}

/// Per-dtype bar: |got - want| <= abs + rel * |want| element by element. The reference sees the
/// same (rounded) inputs, so half precision only adds accumulation order and the output rounding.
fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1.6e-2, 1.6e-2),
        _ => (2e-5, 1e-4),
    }
}

/// `x` rounded to `dtype` and back: the values both sides compute on.
fn rounded(x: &Tensor, dtype: DType) -> Result<Tensor> {
    x.to_dtype(dtype)?.to_dtype(DType::F32)
}

fn assert_close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) -> Result<()> {
    assert_within(got, want, dtype, tolerance(dtype), what)
}

/// As [`assert_close`] with the bar `(abs, rel)`.
fn assert_within(
    got: &Tensor,
    want: &Tensor,
    dtype: DType,
    (abs, rel): (f32, f32),
    what: &str,
) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), dtype, "{what}: dtype");
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut worst = (0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let excess = (g - w).abs() - (abs + rel * w.abs());
        assert!(g.is_finite(), "{what}: element {i} is {g}");
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= 0.0, "{what} ({dtype:?}): element {i} is {}, reference {}", got[i], want[i]);
    Ok(())
}

#[cfg(feature = "cudnn")]
mod cudnn;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn cuda_attention_matches_cpu() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    // (batch, heads, q tokens, kv tokens, q/k dim, v dim, causal): tiny heads, CLIP (64, causal,
    // 77 tokens), SD1 head sizes 40/80/160, SD2/SDXL 64, the VAE's single 512-wide head, causal
    // with Lq < Lk and Lq > Lk, v narrower than q/k, every kernel variant.
    let cases = [
        (1, 1, 5, 5, 8, 8, false),
        (2, 3, 37, 29, 16, 16, false),
        (1, 5, 200, 77, 64, 64, false),
        (2, 4, 77, 77, 64, 64, true),
        (1, 2, 130, 130, 40, 40, true),
        (2, 8, 256, 77, 40, 40, false),
        (1, 8, 300, 300, 80, 80, false),
        (1, 2, 70, 90, 128, 128, true),
        (1, 2, 90, 70, 64, 64, true),
        (1, 8, 100, 77, 160, 160, false),
        (1, 2, 33, 40, 256, 256, true),
        (1, 1, 1024, 1024, 512, 512, false),
        (1, 1, 64, 300, 512, 512, true),
        (1, 1, 90, 700, 24, 12, false),
        (1, 1, 17, 33, 200, 300, false),
    ];
    for (i, &(b, h, nq, nk, d, dv, causal)) in cases.iter().enumerate() {
        let q = rand(&[b, h, nq, d], 3 * i as u64, 2.0)?;
        let k = rand(&[b, h, nk, d], 3 * i as u64 + 1, 2.0)?;
        let v = rand(&[b, h, nk, dv], 3 * i as u64 + 2, 1.0)?;
        let scale = 2.0 / (d as f32).sqrt();
        let op = AttentionOp { scale, causal, bnc_heads: None };
        for dtype in DTYPES {
            let (qr, kr, vr) = (rounded(&q, dtype)?, rounded(&k, dtype)?, rounded(&v, dtype)?);
            // The reference: the CPU op's cpu_fwd on the same values in f32.
            let want = qr.apply_op3_no_bwd(&kr, &vr, &op)?;
            let to_gpu = |t: &Tensor| t.to_dtype(dtype)?.to_device(&gpu);
            let (qg, kg, vg) = (to_gpu(&q)?, to_gpu(&k)?, to_gpu(&v)?);
            let what = format!("case {i} {:?}", cases[i]);
            assert_close(&qg.apply_op3_no_bwd(&kg, &vg, &op)?, &want, dtype, &what)?;
            // The public entry point takes the fused op too.
            assert!(
                use_fused(&qg, &kg, &vg, (d, dv)),
                "{what}: not fused on CUDA (KILN_CUDA_ATTENTION set?)"
            );
            assert_close(&attention(&qg, &kg, &vg, scale as f64, causal)?, &want, dtype, &what)?;
        }
    }
    Ok(())
}

#[test]
fn cuda_attention_strided_views_and_bnc_layout() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let (b, n, m, heads, d) = (2, 150, 77, 8, 40);
    let c = heads * d;
    let qkv = rand(&[b, n, 3 * c], 7, 2.0)?;
    let ctx = rand(&[b, m, 2 * c], 8, 2.0)?;
    let scale = 1.0 / (d as f64).sqrt();
    for dtype in DTYPES {
        let qkv_r = rounded(&qkv, dtype)?;
        let ctx_r = rounded(&ctx, dtype)?;
        let qkv_g = qkv.to_dtype(dtype)?.to_device(&gpu)?;
        let ctx_g = ctx.to_dtype(dtype)?.to_device(&gpu)?;
        let thirds = |t: &Tensor| -> Result<[Tensor; 3]> {
            Ok([t.narrow(2, 0, c)?, t.narrow(2, c, c)?, t.narrow(2, 2 * c, c)?])
        };
        let [q, k, v] = thirds(&qkv_r)?;
        let [qg, kg, vg] = thirds(&qkv_g)?;
        // Self-attention straight on a fused projection's narrowed (strided) output.
        for causal in [false, true] {
            let want = attention_bnc(&q, &k, &v, heads, scale, causal)?;
            let got = attention_bnc(&qg, &kg, &vg, heads, scale, causal)?;
            assert_close(&got, &want, dtype, &format!("bnc self-attention, causal {causal}"))?;
        }
        // Cross-attention: 77 context tokens, k/v narrowed from one tensor.
        let (kc, vc) = (ctx_r.narrow(2, 0, c)?, ctx_r.narrow(2, c, c)?);
        let (kcg, vcg) = (ctx_g.narrow(2, 0, c)?, ctx_g.narrow(2, c, c)?);
        let want = attention_bnc(&q, &kc, &vc, heads, scale, false)?;
        let got = attention_bnc(&qg, &kcg, &vcg, heads, scale, false)?;
        assert_close(&got, &want, dtype, "bnc cross-attention")?;
        // A transposed [b, h, n, d] view in the 4-D entry point.
        let split = |t: &Tensor| t.contiguous()?.reshape((b, n, heads, d))?.transpose(1, 2);
        let (q4, q4g) = (split(&q)?, split(&qg)?);
        let want = attention(&q4, &q4, &q4, scale, false)?;
        let got = attention(&q4g, &q4g, &q4g, scale, false)?;
        assert_close(&got, &want, dtype, "transposed 4-D view")?;
    }
    Ok(())
}

#[test]
fn cuda_group_norm_matches_cpu() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    // (shape, groups, offset added to x): UNet/VAE shapes, any spatial rank, a group larger than
    // a block's threads many times over, and a large mean (the variance must not cancel).
    let cases: [(&[usize], usize, f32); 6] = [
        (&[2, 64, 9, 11], 32, 0.0),
        (&[1, 12, 5, 7], 4, 3.0),
        (&[2, 32, 50], 8, -1.0),
        (&[1, 8, 2, 3, 4], 2, 0.5),
        (&[1, 320, 64, 64], 32, 0.0),
        (&[1, 128, 256, 256], 32, 20.0),
    ];
    for (i, &(shape, groups, offset)) in cases.iter().enumerate() {
        let c = shape[1];
        let x = (rand(shape, 20 + i as u64, 2.0)? + offset as f64)?;
        let w = (rand(&[c], 40 + i as u64, 0.5)? + 1.0)?;
        let bias = rand(&[c], 60 + i as u64, 0.5)?;
        for dtype in DTYPES {
            for silu in [false, true] {
                let op = GroupNormOp { groups, eps: 1e-5, silu };
                let what = format!("case {i} {shape:?} / {groups}, silu {silu}");
                let (xr, wr, br) = (rounded(&x, dtype)?, rounded(&w, dtype)?, rounded(&bias, dtype)?);
                let want = xr.apply_op3_no_bwd(&wr, &br, &op)?;
                let xg = x.to_dtype(dtype)?.to_device(&gpu)?;
                let (wg, bg) = (w.to_dtype(dtype)?.to_device(&gpu)?, bias.to_dtype(dtype)?.to_device(&gpu)?);
                // Affine parameters in the input's dtype.
                assert_close(&xg.apply_op3_no_bwd(&wg, &bg, &op)?, &want, dtype, &what)?;
                // The public layer (its weights in the input's dtype).
                let layer = GroupNorm::new(wg.clone(), bg.clone(), c, groups, 1e-5)?;
                let got =
                    if silu { layer.forward_silu(&xg)? } else { candle_core::Module::forward(&layer, &xg)? };
                assert_close(&got, &want, dtype, &format!("{what}, GroupNorm layer"))?;
            }
        }
        // Half-precision input with f32 affine parameters (the `_wf32` kernels), and with
        // parameters in the other half type (the layer converts them to f32).
        for dtype in [DType::F16, DType::BF16] {
            let op = GroupNormOp { groups, eps: 1e-5, silu: true };
            let want = rounded(&x, dtype)?.apply_op3_no_bwd(&w, &bias, &op)?;
            let xg = x.to_dtype(dtype)?.to_device(&gpu)?;
            let (wg, bg) = (w.to_device(&gpu)?, bias.to_device(&gpu)?);
            let what = format!("case {i}, {dtype:?} input, f32 affine");
            assert_close(&xg.apply_op3_no_bwd(&wg, &bg, &op)?, &want, dtype, &what)?;
            let other = if dtype == DType::F16 { DType::BF16 } else { DType::F16 };
            let (wo, bo) = (w.to_dtype(other)?, bias.to_dtype(other)?);
            let want = rounded(&x, dtype)?.apply_op3_no_bwd(
                &wo.to_dtype(DType::F32)?,
                &bo.to_dtype(DType::F32)?,
                &op,
            )?;
            let layer = GroupNorm::new(wo.to_device(&gpu)?, bo.to_device(&gpu)?, c, groups, 1e-5)?;
            let what = format!("case {i}, {dtype:?} input, {other:?} affine");
            assert_close(&layer.forward_silu(&xg)?, &want, dtype, &what)?;
        }
    }
    Ok(())
}
