use super::*;

use crate::test_util::rand;

/// Max |a - b| relative to max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / m.max(1e-6))
}

#[test]
fn custom_op_matches_candle_conv2d() -> Result<()> {
    // (batch, cin, cout, h, w): odd sizes, sizes below one tile, batch > 1, awkward channels.
    let cases = [
        (1, 3, 5, 9, 7),
        (2, 6, 4, 8, 13),
        (1, 4, 3, 1, 1),
        (3, 7, 11, 5, 6),
        (1, 13, 17, 23, 19),
        (2, 37, 29, 14, 33),
        (1, 64, 32, 70, 41),
    ];
    for (i, &(b, cin, cout, h, w)) in cases.iter().enumerate() {
        let x = rand(&[b, cin, h, w], i as u64, 1.0)?;
        let wt = rand(&[cout, cin, 3, 3], 100 + i as u64, 0.5)?;
        let ours = conv3x3_winograd(&x, &wt)?;
        let reference = x.conv2d(&wt, 1, 1, 1, 1)?;
        let d = rel_diff(&ours, &reference)?;
        assert!(d < 1e-5, "case {i} {b}x{cin}->{cout} {h}x{w}: rel diff {d}");
    }
    Ok(())
}

#[test]
fn bands_and_batches_match_candle_conv2d() -> Result<()> {
    // Wide and tall enough for several product bands, with batch 2.
    let x = rand(&[2, 24, 150, 210], 7, 1.0)?;
    let wt = rand(&[96, 24, 3, 3], 8, 0.3)?;
    let ours = conv3x3_winograd(&x, &wt)?;
    let reference = x.conv2d(&wt, 1, 1, 1, 1)?;
    let d = rel_diff(&ours, &reference)?;
    assert!(d < 1e-5, "rel diff {d}");
    Ok(())
}

#[test]
fn fused_epilogue_and_parts_match_reference() -> Result<()> {
    for &(b, cin, cout, h, w) in &[(1, 3, 5, 9, 7), (2, 6, 4, 8, 13), (1, 9, 3, 1, 1), (2, 21, 10, 17, 11)] {
        let x = rand(&[b, cin, h, w], 1, 1.0)?;
        let wt = rand(&[cout, cin, 3, 3], 2, 0.3)?;
        let bias = rand(&[cout], 3, 0.1)?;
        let res = rand(&[b, cout, h, w], 4, 1.0)?;
        let slopes: Vec<f32> = (0..cout).map(|o| 0.05 * o as f32).collect();
        let conv = x.conv2d(&wt, 1, 1, 1, 1)?.broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
        // Split the input into three parts to exercise the part sums.
        let splits = [cin / 3, cin / 3, cin - 2 * (cin / 3)];
        let weights = WinogradWeights::new(&wt, &splits)?;
        let mut inputs = Vec::new();
        let mut start = 0;
        for n in splits {
            inputs.push(WinoInput::new(&x.narrow(1, start, n)?)?);
            start += n;
        }
        let refs: Vec<&WinoInput> = inputs.iter().collect();
        let bias_values = bias.to_vec1::<f32>()?;
        for act in [Act::None, Act::Leaky(0.2), Act::Prelu(slopes.clone())] {
            let want = ((act.apply(&conv)? * 0.5)? + (&res * 0.25)?)?;
            let got = winograd_forward(&weights, &refs, Some(&bias_values), &act, 0.5, Some((&res, 0.25)))?;
            let d = rel_diff(&got, &want)?;
            assert!(d < 1e-5, "{b}x{cin}->{cout} {h}x{w} {act:?}: rel diff {d}");
        }
        // The SR layer: `0.2 * conv + residual` and its generic path agree with it too.
        let layer = Conv3x3::new(wt.clone(), bias.clone(), &splits)?;
        let want = ((act_leaky(&conv)? * 0.2)? + &res)?;
        let got = layer.forward_parts(&refs, &Act::Leaky(0.2), Some((&res, 0.2)))?;
        assert!(rel_diff(&got, &want)? < 1e-5);
        let got = layer.forward(&x, &Act::Leaky(0.2), Some((&res, 0.2)))?;
        assert!(rel_diff(&got, &want)? < 1e-5);
    }
    Ok(())
}

fn act_leaky(y: &Tensor) -> Result<Tensor> {
    candle_nn::ops::leaky_relu(y, 0.2)
}

#[test]
fn mismatched_parts_are_refused() -> Result<()> {
    let wt = rand(&[4, 6, 3, 3], 2, 0.3)?;
    let weights = WinogradWeights::new(&wt, &[3, 3])?;
    let x = WinoInput::new(&rand(&[1, 6, 5, 5], 1, 1.0)?)?;
    assert!(winograd_forward(&weights, &[&x], None, &Act::None, 1.0, None).is_err());
    assert!(WinogradWeights::new(&wt, &[4, 3]).is_err());
    let res = rand(&[1, 4, 5, 6], 3, 1.0)?;
    let a = WinoInput::new(&rand(&[1, 3, 5, 5], 1, 1.0)?)?;
    assert!(winograd_forward(&weights, &[&a, &a], None, &Act::None, 1.0, Some((&res, 1.0))).is_err());
    Ok(())
}

/// Transforming the input band by band, and reading it through a norm, changes no bit: the
/// streamed conv equals the whole-map transform on the (materialised) normalised map.
#[test]
fn streamed_input_and_fused_norm_equal_the_whole_map_transform() -> Result<()> {
    // Tall enough for several bands (192 tiles a band at least), batch 2, odd sizes.
    for &(b, cin, cout, h, w) in &[(2, 24, 40, 150, 61), (1, 8, 5, 9, 7), (1, 16, 16, 200, 30)] {
        let x = rand(&[b, cin, h, w], 11, 1.0)?;
        let wt = rand(&[cout, cin, 3, 3], 12, 0.3)?;
        let bias = rand(&[cout], 13, 0.1)?.to_vec1::<f32>()?;
        let res = rand(&[b, cout, h, w], 14, 1.0)?;
        let res_values = res.flatten_all()?.to_vec1::<f32>()?;
        let weights = WinogradWeights::new(&wt, &[cin])?;
        let epilogue =
            Epilogue { bias: Some(&bias), act: &Act::None, scale: 0.5, residual: Some((&res_values, 0.25)) };
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let whole = conv_winograd(&weights, &[&WinoInput::new(&x)?], &epilogue)?;
        let streamed = conv_winograd_streamed(&weights, &values, (b, h, w), None, &epilogue)?;
        assert!(whole == streamed, "{b}x{cin}->{cout} {h}x{w}: streamed differs");
        let norm = crate::GroupNorm::new(rand(&[cin], 15, 0.5)?, rand(&[cin], 16, 0.5)?, cin, 4, 1e-6)?;
        for silu in [false, true] {
            let Some(input_norm) = norm.input_norm(&x, silu)? else { panic!("CPU f32 has an input norm") };
            let normed = if silu { norm.forward_silu(&x)? } else { candle_core::Module::forward(&norm, &x)? };
            let whole = conv_winograd(&weights, &[&WinoInput::new(&normed)?], &epilogue)?;
            let fused = conv_winograd_streamed(&weights, &values, (b, h, w), Some(&input_norm), &epilogue)?;
            assert!(whole == fused, "{b}x{cin}->{cout} {h}x{w} silu {silu}: fused norm differs");
        }
    }
    Ok(())
}
