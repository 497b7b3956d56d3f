//! Inference timestep spacing, with numpy's `linspace`/`arange`/`round` reproduced to the bit
//! (diffusers computes timesteps with numpy in float64).

use super::config::Spacing;

/// `np.linspace(start, stop, num, endpoint)` in float64: `k * step + start`, the last element
/// set to `stop` when `endpoint`.
pub fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut out: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|k| k as f64 / div as f64 * delta + start).collect()
        } else {
            (0..num).map(|k| k as f64 * step + start).collect()
        }
    } else {
        (0..num).map(|k| k as f64 * delta + start).collect()
    };
    if endpoint && num > 1 {
        if let Some(last) = out.last_mut() {
            *last = stop;
        }
    }
    out
}

/// `np.arange(start, stop, step)` for a float step: length `ceil((stop - start) / step)`,
/// element i = `start + i * delta` with `delta = (start + step) - start` (numpy's fill).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 || !len.is_finite() {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| if i == 0 { start } else { start + i as f64 * delta }).collect()
}

/// `np.round`: half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// The spacing shared by DDIM, PNDM and the Euler schedulers, in *descending* order and before
/// any integer cast: `linspace` → `np.linspace(0, T-1, n)`, `leading` →
/// `arange(n) * (T // n) + steps_offset`, `trailing` → `round(arange(T, 0, -T/n)) - 1`.
/// `round_linspace` rounds the linspace values (DDIM/PNDM do, the Euler schedulers do not).
pub fn spaced_timesteps(
    spacing: Spacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
    round_linspace: bool,
) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            let mut t = np_linspace(0.0, (num_train - 1) as f64, n, true);
            if round_linspace {
                t.iter_mut().for_each(|v| *v = np_round(*v));
            }
            t.reverse();
            t
        }
        Spacing::Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|k| (k * ratio) as f64 + steps_offset as f64).collect()
        }
        Spacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange(num_train as f64, 0.0, -ratio).into_iter().map(|v| np_round(v) - 1.0).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_and_arange_follow_numpy() {
        assert_eq!(np_linspace(0.0, 1.0, 5, true), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(np_linspace(0.0, 10.0, 4, false), vec![0.0, 2.5, 5.0, 7.5]);
        assert_eq!(np_linspace(3.0, 9.0, 1, true), vec![3.0]);
        assert_eq!(np_arange(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
    }

    #[test]
    fn spacing_matches_diffusers_examples() {
        // DDIM, SD1.5 config: leading, steps_offset 1.
        assert_eq!(spaced_timesteps(Spacing::Leading, 1000, 4, 1, true), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(spaced_timesteps(Spacing::Trailing, 1000, 4, 0, true), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(spaced_timesteps(Spacing::Linspace, 1000, 3, 0, true), vec![999.0, 500.0, 0.0]);
    }
}
