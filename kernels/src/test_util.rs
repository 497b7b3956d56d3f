//! Helpers for the kernels' unit tests.

use candle_core::{Device, Result, Tensor};

/// A CPU f32 tensor of `shape` with values uniform in `[-range, range)`, reproducible by `seed`.
pub fn rand(shape: &[usize], seed: u64, range: f32) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-range..range)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// As [`rand`] with values in `[-1, 1)`.
pub fn rand_unit(shape: &[usize], seed: u64) -> Result<Tensor> {
    rand(shape, seed, 1.0)
}

/// Largest element-wise `|a - b|` of two same-shaped f32 tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}
