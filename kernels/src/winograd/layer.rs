//! The SR nets' 3x3 layer: Winograd on CPU f32 (weights transformed once), candle's conv
//! elsewhere, both with the same fused epilogue.

use candle_core::{DType, Result, Tensor};

use super::{winograd_forward, Act, WinoInput, WinogradWeights};

/// A 3x3 stride-1 padding-1 convolution layer with bias, whose input may come in channel parts.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// Kept for the generic path only (the Winograd path holds transformed weights instead).
    weight: Option<Tensor>,
    bias: Tensor,
    cin: usize,
    cout: usize,
    winograd: Option<WinogradWeights>,
    bias_values: Vec<f32>,
}

impl Conv3x3 {
    /// `weight`: `[cout, cin, 3, 3]`; `bias`: `[cout]`. `splits` lists the channel counts of the
    /// inputs the layer will be given separately (their concatenation is the real input).
    pub fn new(weight: Tensor, bias: Tensor, splits: &[usize]) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) || splits.iter().sum::<usize>() != cin || bias.dims() != [cout] {
            candle_core::bail!(
                "conv weight {:?} / bias {:?}: expected [{cout}, {}, 3, 3] / [{cout}]",
                weight.dims(),
                bias.dims(),
                splits.iter().sum::<usize>()
            );
        }
        let winograd = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Some(WinogradWeights::new(&weight, splits)?)
        } else {
            None
        };
        let bias_values = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let weight = if winograd.is_some() { None } else { Some(weight) };
        Ok(Self { weight, bias, cin, cout, winograd, bias_values })
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    /// Whether this layer runs the Winograd path (CPU, f32).
    pub fn is_winograd(&self) -> bool {
        self.winograd.is_some()
    }

    /// Convolution of one input with fused epilogue: `out = res_scale * act(conv + b) + residual`
    /// (`res_scale` only with a residual).
    pub fn forward(&self, x: &Tensor, act: &Act, residual: Option<(&Tensor, f32)>) -> Result<Tensor> {
        let Some(weights) = &self.winograd else {
            return self.forward_generic(std::slice::from_ref(x), act, residual);
        };
        let mut inputs = Vec::new();
        let mut start = 0;
        for n in weights.splits() {
            inputs.push(WinoInput::new(&x.narrow(1, start, n)?)?);
            start += n;
        }
        let refs: Vec<&WinoInput> = inputs.iter().collect();
        self.forward_parts(&refs, act, residual)
    }

    /// As [`Conv3x3::forward`] on the channel concatenation of `parts` (already transformed).
    pub fn forward_parts(
        &self,
        parts: &[&WinoInput],
        act: &Act,
        residual: Option<(&Tensor, f32)>,
    ) -> Result<Tensor> {
        let Some(weights) = &self.winograd else {
            candle_core::bail!("conv: transformed inputs given to a layer that does not run Winograd");
        };
        // basicsr's `x5 * 0.2 + x`: the scale applies to the conv, the residual is added as is.
        let (scale, residual) = match residual {
            Some((r, s)) => (s, Some((r, 1.0))),
            None => (1.0, None),
        };
        winograd_forward(weights, parts, Some(&self.bias_values), act, scale, residual)
    }

    /// candle's conv2d (any device/dtype) with the same epilogue, on the channel concatenation
    /// of `parts`.
    pub fn forward_generic(
        &self,
        parts: &[Tensor],
        act: &Act,
        residual: Option<(&Tensor, f32)>,
    ) -> Result<Tensor> {
        let x = if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(parts, 1)? };
        if x.dim(1)? != self.cin {
            candle_core::bail!("conv: {} input channels, layer takes {}", x.dim(1)?, self.cin);
        }
        let Some(weight) = &self.weight else {
            // A Winograd layer: `forward` splits the input by parts (never comes back here).
            return self.forward(&x, act, residual);
        };
        let y = x.conv2d(weight, 1, 1, 1, 1)?.broadcast_add(&self.bias.reshape((1, self.cout, 1, 1))?)?;
        let y = act.apply(&y)?;
        match residual {
            Some((r, s)) => (y * f64::from(s))? + r,
            None => Ok(y),
        }
    }
}
