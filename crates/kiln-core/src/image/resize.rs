//! Separable resampling: a streaming Lanczos-3 resizer (rows in, rows out, holding only the
//! rows its vertical taps need) and ncnn-compatible bicubic for planar tiles.

use std::collections::VecDeque;

/// Taps of one output sample: first input index and weights (normalised to sum 1).
#[derive(Debug, Clone)]
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

fn lanczos3(x: f64) -> f64 {
    let x = x.abs();
    if x < 1e-9 {
        1.0
    } else if x < 3.0 {
        let px = std::f64::consts::PI * x;
        3.0 * px.sin() * (px / 3.0).sin() / (px * px)
    } else {
        0.0
    }
}

/// Lanczos-3 taps mapping `n_in` samples to `n_out` (widened when shrinking, to antialias).
fn lanczos_taps(n_in: usize, n_out: usize) -> Vec<Taps> {
    let ratio = n_in as f64 / n_out as f64;
    let filter_scale = ratio.max(1.0);
    let support = 3.0 * filter_scale;
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * ratio;
            let lo = ((center - support).floor() as isize).max(0) as usize;
            let hi = ((center + support).ceil() as isize).min(n_in as isize) as usize;
            let mut w: Vec<f64> =
                (lo..hi).map(|i| lanczos3((i as f64 + 0.5 - center) / filter_scale)).collect();
            let sum: f64 = w.iter().sum();
            if sum.abs() > 1e-12 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            Taps { start: lo, weights: w.into_iter().map(|v| v as f32).collect() }
        })
        .collect()
}

/// Resizes an interleaved image streamed row by row with Lanczos-3.
pub struct StreamResizer {
    out_width: usize,
    out_height: usize,
    channels: usize,
    x_taps: Vec<Taps>,
    y_taps: Vec<Taps>,
    in_width: usize,
    /// Horizontally resized input rows, starting at input row `first`.
    rows: VecDeque<Vec<f32>>,
    first: usize,
    received: usize,
    next_out: usize,
}

impl StreamResizer {
    pub fn new(
        in_width: usize,
        in_height: usize,
        out_width: usize,
        out_height: usize,
        channels: usize,
    ) -> Self {
        Self {
            out_width,
            out_height,
            channels,
            x_taps: lanczos_taps(in_width, out_width),
            y_taps: lanczos_taps(in_height, out_height),
            in_width,
            rows: VecDeque::new(),
            first: 0,
            received: 0,
            next_out: 0,
        }
    }

    /// Feeds whole input rows (interleaved); returns the output rows that became complete.
    pub fn push(&mut self, rows: &[f32]) -> Vec<f32> {
        let c = self.channels;
        let in_len = self.in_width * c;
        let mut out = Vec::new();
        for row in rows.chunks_exact(in_len) {
            let mut h = vec![0f32; self.out_width * c];
            for (x, taps) in self.x_taps.iter().enumerate() {
                for (k, &w) in taps.weights.iter().enumerate() {
                    let src = &row[(taps.start + k) * c..][..c];
                    for ch in 0..c {
                        h[x * c + ch] += w * src[ch];
                    }
                }
            }
            self.rows.push_back(h);
            self.received += 1;
            self.emit(&mut out);
        }
        out
    }

    fn emit(&mut self, out: &mut Vec<f32>) {
        while self.next_out < self.out_height {
            let taps = &self.y_taps[self.next_out];
            if taps.start + taps.weights.len() > self.received {
                break;
            }
            let base = out.len();
            out.resize(base + self.out_width * self.channels, 0.0);
            let dst = &mut out[base..];
            for (k, &w) in taps.weights.iter().enumerate() {
                let row = &self.rows[taps.start + k - self.first];
                for (d, &s) in dst.iter_mut().zip(row) {
                    *d += w * s;
                }
            }
            self.next_out += 1;
            // Drop rows no later output needs (taps start monotonically).
            let keep_from = self.y_taps.get(self.next_out).map_or(self.received, |t| t.start);
            while self.first < keep_from && !self.rows.is_empty() {
                self.rows.pop_front();
                self.first += 1;
            }
        }
    }

    pub fn rows_emitted(&self) -> usize {
        self.next_out
    }
}

/// Cubic convolution weights with A = -0.75 (ncnn/OpenCV/PyTorch bicubic).
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let w0 = ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
    let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let w2 = ((A + 2.0) * (1.0 - t) - (A + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0;
    [w0, w1, w2, 1.0 - w0 - w1 - w2]
}

fn bicubic_taps(n_in: usize, n_out: usize) -> Vec<(usize, [f32; 4])> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|o| {
            let f = (o as f32 + 0.5) * scale - 0.5;
            let s = f.floor();
            let w = cubic_weights(f - s);
            // Indices clamp to the edge (as ncnn's coefficient folding does).
            let mut folded = [0f32; 4];
            let idx: [usize; 4] =
                std::array::from_fn(|k| (s as isize - 1 + k as isize).clamp(0, n_in as isize - 1) as usize);
            let start = idx[0];
            for (i, wk) in idx.iter().zip(w) {
                folded[(i - start).min(3)] += wk;
            }
            (start, folded)
        })
        .collect()
}

/// Bicubic resize (align_corners = false, no antialias) of a planar `channels x h x w` buffer.
pub fn bicubic_planar(
    src: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    let xt = bicubic_taps(w, out_w);
    let yt = bicubic_taps(h, out_h);
    let mut tmp = vec![0f32; channels * h * out_w];
    for c in 0..channels {
        for y in 0..h {
            let row = &src[(c * h + y) * w..][..w];
            let dst = &mut tmp[(c * h + y) * out_w..][..out_w];
            for (x, (s, k)) in xt.iter().enumerate() {
                dst[x] = (0..4).map(|i| row.get(s + i).map_or(0.0, |v| v * k[i])).sum();
            }
        }
    }
    let mut out = vec![0f32; channels * out_h * out_w];
    for c in 0..channels {
        for (y, (s, k)) in yt.iter().enumerate() {
            let dst = &mut out[(c * out_h + y) * out_w..][..out_w];
            for i in 0..4 {
                if k[i] == 0.0 || s + i >= h {
                    continue;
                }
                let row = &tmp[(c * h + s + i) * out_w..][..out_w];
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d += k[i] * v;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanczos_preserves_constants_and_streams_all_rows() {
        let (w, h, ow, oh) = (37, 23, 91, 50);
        let input = vec![0.25f32; w * h * 3];
        let mut r = StreamResizer::new(w, h, ow, oh, 3);
        let mut out = Vec::new();
        for row in input.chunks(w * 3 * 5) {
            out.extend(r.push(row));
        }
        assert_eq!(out.len(), ow * oh * 3);
        assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-5));
    }

    #[test]
    fn bicubic_half_matches_direct_formula() {
        // Downscale a ramp by 2: sample at 2x+0.5 -> weights at t=0.5 are symmetric.
        let w = 16;
        let src: Vec<f32> = (0..w).map(|x| x as f32).collect();
        let out = bicubic_planar(&src, 1, 1, w, 1, w / 2);
        for (x, v) in out.iter().enumerate().skip(1).take(w / 2 - 2) {
            assert!((v - (2.0 * x as f32 + 0.5)).abs() < 1e-4, "{x}: {v}");
        }
    }
}
