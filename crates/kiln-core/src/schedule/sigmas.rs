//! Sigma schedules (k-diffusion's sigma = sqrt((1 - alpha_bar) / alpha_bar)): the training
//! table, interpolation at inference timesteps, Karras and exponential spacing, and the inverse
//! map from a sigma back to a (fractional) training timestep.

/// The training sigmas, indexed by training timestep, in float32 as diffusers computes them
/// (`((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` on a float32 tensor).
pub fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.interp(x, arange(len(table)), table)`.
pub fn interp(x: f64, table: &[f32]) -> f64 {
    let Some(&last) = table.last() else {
        return f64::NAN;
    };
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return table[0] as f64;
    }
    let top = (table.len() - 1) as f64;
    if x >= top {
        return last as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return table[j] as f64;
    }
    let (lo, hi) = (table[j] as f64, table[j + 1] as f64);
    let slope = hi - lo;
    slope * (x - j as f64) + lo
}

/// Karras et al. (2022) spacing with rho = 7 between `sigma_max` and `sigma_min` (diffusers'
/// `_convert_to_karras`).
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    super::spacing::np_linspace(0.0, 1.0, n, true)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Log-uniform spacing from `sigma_max` down to `sigma_min` (diffusers' `_convert_to_exponential`).
pub fn exponential(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    super::spacing::np_linspace(sigma_max.ln(), sigma_min.ln(), n, true).into_iter().map(f64::exp).collect()
}

/// The log of the training sigmas, in float32 (diffusers: `np.log` of a float32 array).
pub fn log_sigmas(training: &[f32]) -> Vec<f32> {
    training.iter().map(|s| s.ln()).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates to
/// `log(sigma)`. `log_sigmas` needs at least two entries.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(log_sigma - log_sigmas >= 0): the first index reaching the final count.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut low_idx = 0usize;
    for (j, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = j;
        }
    }
    let low_idx = low_idx.min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `(sigma**2 + 1) ** 0.5` evaluated in float32, as diffusers does on its float32 sigma tensor.
pub fn input_scale_f32(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_hits_table_points_and_interpolates() {
        let table = [1.0f32, 2.0, 4.0];
        assert_eq!(interp(0.0, &table), 1.0);
        assert_eq!(interp(1.5, &table), 3.0);
        assert_eq!(interp(2.0, &table), 4.0);
        assert_eq!(interp(7.0, &table), 4.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let table: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let logs = log_sigmas(&table);
        assert!((sigma_to_t(4.0, &logs) - 3.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.5, &logs), 0.0);
        assert_eq!(sigma_to_t(100.0, &logs), 9.0);
    }
}
