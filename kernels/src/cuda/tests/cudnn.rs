//! The cuDNN convolution (`cuda::cudnn`, the `cudnn` feature) against kiln's CPU convolution
//! (`Conv2dOp::cpu_fwd`, the reference) on random inputs, its plan cache (a repeated call is a hit
//! and gives the same bits) and the cache's bounds. Run on a GPU machine:
//! `cargo test --release -p kiln-kernels --features cudnn -- cuda::tests::cudnn`.

use super::{assert_within, gpu, rand, rounded, DTYPES};
use crate::conv::{conv2d_forward, conv2d_forward_im2col, uses_cudnn, Conv2d, Conv2dOp};
use crate::cuda::cudnn::{cache_stats, CacheStats, DEVICE_CAPACITY, MAX_WORKSPACE_BYTES, PLAN_CAPACITY};
use candle_core::{CudaDevice, DType, Device, Module, Result, Tensor};
use candle_nn::Conv2dConfig;
use std::sync::Mutex;

/// The tests count cache hits and evict devices: one at a time, so none sees another's calls.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Per-dtype bar for outputs of magnitude ~1 (weights scaled by 1/sqrt(fan-in)): f32 allows for
/// cuDNN's FFT/Winograd algorithms' rounding over up to 4608-term sums (a wrong element is off
/// by ~1); half precision adds the output's rounding (the accumulation is f32 on both sides).
fn conv_tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1.6e-2, 1.6e-2),
        _ => (1e-4, 1e-4),
    }
}

fn cuda_device(device: &Device) -> &CudaDevice {
    match device {
        Device::Cuda(d) => d,
        _ => panic!("not a CUDA device"),
    }
}

fn stats(device: &Device) -> CacheStats {
    cache_stats(cuda_device(device)).unwrap_or_default()
}

/// The elements' bit patterns (as f32, which holds f16/bf16 exactly).
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().map(|x| x.to_bits()).collect())
}

/// Input `[b, c, h, w]` in [-1, 1) and weight `[o, c, k, k]` scaled so outputs are ~1.
fn operands(
    (b, c, h, w): (usize, usize, usize, usize),
    (o, k): (usize, usize),
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    let x = rand(&[b, c, h, w], seed, 1.0)?;
    let wt = rand(&[o, c, k, k], seed + 1, (3.0 / (c * k * k) as f32).sqrt())?;
    Ok((x, wt))
}

#[test]
fn cudnn_conv_matches_cpu_and_hits_its_cache() -> Result<()> {
    let _serial = serial();
    let Some(gpu) = gpu() else { return Ok(()) };
    // (batch, cin, h, w, cout, kernel, stride, padding): 3x3 s1 p1 on odd sizes, 3x3 s2 p0/p1
    // (batch 2, odd), 1x1 (batch 2), a 5x5 p2, SD's latent conv_in, an SD-VAE-like 512-channel
    // 64x64 layer.
    let cases = [
        (1, 8, 17, 23, 16, 3, 1, 1),
        (2, 16, 32, 32, 8, 3, 2, 0),
        (2, 16, 33, 31, 24, 3, 2, 1),
        (1, 32, 65, 64, 32, 3, 2, 1),
        (2, 32, 19, 21, 64, 1, 1, 0),
        (1, 6, 9, 13, 5, 5, 1, 2),
        (1, 4, 64, 64, 320, 3, 1, 1),
        (1, 512, 64, 64, 512, 3, 1, 1),
    ];
    for (i, &(b, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
        let (x, wt) = operands((b, c, h, w), (o, k), 10 * i as u64)?;
        let op = Conv2dOp { stride: s, padding: p };
        for dtype in DTYPES {
            let what = format!("case {i} {:?} {dtype:?}", cases[i]);
            // The reference: the CPU op's cpu_fwd on the same (rounded) values in f32.
            let want = rounded(&x, dtype)?.apply_op2_no_bwd(&rounded(&wt, dtype)?, &op)?;
            let (xg, wg) = (x.to_dtype(dtype)?.to_device(&gpu)?, wt.to_dtype(dtype)?.to_device(&gpu)?);
            let before = stats(&gpu);
            let first = xg.apply_op2_no_bwd(&wg, &op)?;
            let after_first = stats(&gpu);
            assert_within(&first, &want, dtype, conv_tolerance(dtype), &what)?;
            assert_eq!(after_first.misses, before.misses + 1, "{what}: a new shape must be planned");
            assert!(after_first.workspace_bytes <= MAX_WORKSPACE_BYTES.next_multiple_of(1 << 20));
            // The second call takes the kept plan and workspace, and gives the same bits.
            let second = xg.apply_op2_no_bwd(&wg, &op)?;
            let after_second = stats(&gpu);
            assert_eq!(after_second.misses, after_first.misses, "{what}: planned again");
            assert_eq!(after_second.hits, after_first.hits + 1, "{what}: no cache hit");
            assert_eq!(after_second.workspace_bytes, after_first.workspace_bytes, "{what}: workspace");
            assert!(bits(&first)? == bits(&second)?, "{what}: the cached call gave other bits");
        }
    }
    Ok(())
}

#[test]
fn cudnn_conv_through_the_public_entry_points() -> Result<()> {
    let _serial = serial();
    let Some(gpu) = gpu() else { return Ok(()) };
    // (batch, cin, h, w, cout, kernel, stride, padding): Winograd-sized on the CPU, im2col-sized,
    // strided, 1x1.
    let cases = [
        (2, 16, 64, 64, 16, 3, 1, 1),
        (1, 8, 20, 18, 12, 3, 1, 1),
        (1, 8, 21, 19, 4, 3, 2, 1),
        (2, 8, 9, 7, 6, 1, 1, 0),
    ];
    for (i, &(b, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
        let (x, wt) = operands((b, c, h, w), (o, k), 100 + 10 * i as u64)?;
        let bias = rand(&[o], 105 + 10 * i as u64, 1.0)?;
        let cfg = Conv2dConfig { padding: p, stride: s, ..Default::default() };
        for dtype in DTYPES {
            let what = format!("case {i} {:?} {dtype:?}", cases[i]);
            let (xr, wr, br) = (rounded(&x, dtype)?, rounded(&wt, dtype)?, rounded(&bias, dtype)?);
            let to_gpu = |t: &Tensor| t.to_dtype(dtype)?.to_device(&gpu);
            let (xg, wg, bg) = (to_gpu(&x)?, to_gpu(&wt)?, to_gpu(&bias)?);
            assert!(uses_cudnn(&xg, &wg), "{what}: not routed to cuDNN (KILN_CUDA_CONV set?)");
            let tol = conv_tolerance(dtype);
            let plain = conv2d_forward_im2col(&xr, &wr, s, p)?;
            let misses = stats(&gpu).misses;
            assert_within(&conv2d_forward(&xg, &wg, s, p)?, &plain, dtype, tol, &what)?;
            assert_within(&conv2d_forward_im2col(&xg, &wg, s, p)?, &plain, dtype, tol, &what)?;
            assert_eq!(stats(&gpu).misses, misses + 1, "{what}: the entry points did not run the cuDNN op");
            // The layer: bias, residual and scale after the conv (candle ops on CUDA, each
            // rounding to the dtype again, hence the looser bar).
            let tol = (tol.0 * 4.0, tol.1 * 2.0);
            let layer_cpu = Conv2d::new(wr.clone(), Some(br.clone()), cfg)?;
            let layer_gpu = Conv2d::new(wg.clone(), Some(bg.clone()), cfg)?;
            assert_within(&layer_gpu.forward(&xg)?, &layer_cpu.forward(&xr)?, dtype, tol, &what)?;
            let residual = rand(plain.dims(), 107 + 10 * i as u64, 1.0)?;
            let want = layer_cpu.forward_add(&xr, &rounded(&residual, dtype)?, 0.5)?;
            let got = layer_gpu.forward_add(&xg, &to_gpu(&residual)?, 0.5)?;
            assert_within(&got, &want, dtype, tol, &format!("{what}, forward_add"))?;
            assert_eq!(stats(&gpu).misses, misses + 1, "{what}: the layer planned its conv again");
        }
    }
    Ok(())
}

#[test]
fn cudnn_cache_is_bounded() -> Result<()> {
    let _serial = serial();
    let Some(_) = gpu() else { return Ok(()) };
    // A fresh device (its own cache): more distinct shapes than the cache keeps.
    let gpu = Device::new_cuda(0)?;
    let op = Conv2dOp { stride: 1, padding: 1 };
    let wt = rand(&[2, 1, 3, 3], 1, 0.5)?;
    let wg = wt.to_device(&gpu)?;
    let shapes = PLAN_CAPACITY + 8;
    let input = |i: usize| rand(&[1, 1, 3 + i % 20, 3 + i / 20], 1000 + i as u64, 1.0);
    let mut first_result = None;
    for i in 0..shapes {
        let x = input(i)?;
        let got = x.to_device(&gpu)?.apply_op2_no_bwd(&wg, &op)?;
        assert!(stats(&gpu).plans <= PLAN_CAPACITY, "shape {i}: {:?}", stats(&gpu));
        if i == 0 || i % 37 == 0 {
            let want = x.apply_op2_no_bwd(&wt, &op)?;
            assert_within(&got, &want, DType::F32, conv_tolerance(DType::F32), &format!("shape {i}"))?;
        }
        if i == 0 {
            first_result = Some(bits(&got)?);
        }
    }
    let s = stats(&gpu);
    assert_eq!((s.plans, s.misses, s.hits, s.evictions), (PLAN_CAPACITY, shapes as u64, 0, 8), "{s:?}");
    // The first shape was evicted (least recently used): planned again, same algorithm, same bits.
    let again = input(0)?.to_device(&gpu)?.apply_op2_no_bwd(&wg, &op)?;
    let s = stats(&gpu);
    assert_eq!((s.plans, s.misses, s.evictions), (PLAN_CAPACITY, shapes as u64 + 1, 9), "{s:?}");
    assert!(Some(bits(&again)?) == first_result, "a re-planned shape gave other bits");
    // The most recent shape is still kept.
    input(shapes - 1)?.to_device(&gpu)?.apply_op2_no_bwd(&wg, &op)?;
    assert_eq!(stats(&gpu).hits, 1);

    // Devices: the least recently used device's cache goes when a further device convolves.
    let x = input(0)?;
    let others = (0..DEVICE_CAPACITY).map(|_| Device::new_cuda(0)).collect::<Result<Vec<_>>>()?;
    for other in &others {
        x.to_device(other)?.apply_op2_no_bwd(&wt.to_device(other)?, &op)?;
    }
    assert!(cache_stats(cuda_device(&gpu)).is_none(), "the oldest device's cache was kept");
    for other in &others {
        assert_eq!(stats(other).plans, 1);
    }
    // An evicted device starts a new cache and still convolves correctly.
    let again = x.to_device(&gpu)?.apply_op2_no_bwd(&wg, &op)?;
    assert!(Some(bits(&again)?) == first_result, "a device's new cache gave other bits");
    assert_eq!(stats(&gpu).plans, 1);
    Ok(())
}
