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
