//! kiln's T5 encoder (transformers' `T5EncoderModel`, the v1.1 layout FLUX's text_encoder_2
//! uses: RMS layer norms without bias, unscaled attention with a relative position bias from the
//! first block, gated-GELU feed-forward) and its tokenizer read from `tokenizer.json`.
//!
//! kiln's own rather than candle-transformers' `t5`: that module builds the decoder-capable
//! model with its own config type and caches, while a diffusion pipeline needs the encoder's
//! last hidden state only, under the same error naming and weight loading as kiln's other
//! encoders. The maths follows transformers 5.25 step by step (float32 norm statistics and
//! softmax, as transformers computes them in half precision too).

pub mod tokenizer;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use kiln_kernels::{linear_no_bias, Linear};
use serde::Deserialize;
use std::path::Path;

/// The fields of a transformers `T5Config` the encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
    pub dense_act_fn: Option<String>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Relu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact (erf) GELU.
    GeluErf,
}

impl T5Config {
    /// Parses and checks a config.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        let cfg: T5Config = serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        cfg.activation(path)?;
        if cfg.num_heads == 0 || cfg.d_kv == 0 || cfg.relative_attention_num_buckets < 2 {
            return Err(Error::config(
                path,
                "num_heads, d_kv and relative_attention_num_buckets must be positive",
            ));
        }
        Ok(cfg)
    }

    /// (gated, activation) from `feed_forward_proj` (`[gated-]act`) and `dense_act_fn`.
    fn activation(&self, path: &Path) -> Result<(bool, Act)> {
        let (gated, act) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(act) => (true, act),
            None => (false, self.feed_forward_proj.as_str()),
        };
        // transformers maps "gated-gelu" to gelu_new.
        let act = if act == "gelu" && gated { "gelu_new" } else { act };
        let act = self.dense_act_fn.as_deref().unwrap_or(act);
        let act = match act {
            "relu" => Act::Relu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "gelu" => Act::GeluErf,
            other => return Err(Error::config(path, format!("T5 activation `{other}` is not supported"))),
        };
        Ok((gated, act))
    }
}

/// transformers' T5LayerNorm: RMS norm without mean subtraction, statistics in float32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(self.weight.dtype())?.broadcast_mul(&self.weight)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: RmsNorm,
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    ff_norm: RmsNorm,
}

/// transformers' `T5EncoderModel`: token ids → last hidden state `[B, L, d_model]`.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    config: T5Config,
    embed: kiln_kernels::Embedding,
    relative_bias: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    act: Act,
    dtype: DType,
}

impl T5Encoder {
    /// Builds the encoder from `shared.weight` (or `encoder.embed_tokens.weight`) and the
    /// `encoder.*` weights; `config_path` names the config in errors.
    pub fn new(config: &T5Config, config_path: &Path, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = config.activation(config_path)?;
        let (d, inner, ff) = (config.d_model, config.num_heads * config.d_kv, config.d_ff);
        let embed_name = if vb.contains_tensor("shared.weight") { "shared" } else { "encoder.embed_tokens" };
        let embed =
            kiln_kernels::Embedding::new(vb.pp(embed_name).get((config.vocab_size, d), "weight")?, d)?;
        let enc = vb.pp("encoder");
        let relative_bias = Embedding::new(
            enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias")
                .get((config.relative_attention_num_buckets, config.num_heads), "weight")?,
            config.num_heads,
        );
        let blocks = (0..config.num_layers)
            .map(|i| {
                let b = enc.pp(format!("block.{i}"));
                let attn = b.pp("layer.0.SelfAttention");
                let dense = b.pp("layer.1.DenseReluDense");
                let (wi_0, wi_1) = if gated {
                    (linear_no_bias(d, ff, dense.pp("wi_0"))?, Some(linear_no_bias(d, ff, dense.pp("wi_1"))?))
                } else {
                    (linear_no_bias(d, ff, dense.pp("wi"))?, None)
                };
                Ok(Block {
                    q: linear_no_bias(d, inner, attn.pp("q"))?,
                    k: linear_no_bias(d, inner, attn.pp("k"))?,
                    v: linear_no_bias(d, inner, attn.pp("v"))?,
                    o: linear_no_bias(inner, d, attn.pp("o"))?,
                    attn_norm: RmsNorm::new(d, config.layer_norm_epsilon, b.pp("layer.0.layer_norm"))?,
                    wi_0,
                    wi_1,
                    wo: linear_no_bias(ff, d, dense.pp("wo"))?,
                    ff_norm: RmsNorm::new(d, config.layer_norm_epsilon, b.pp("layer.1.layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            embed,
            relative_bias,
            blocks,
            final_norm: RmsNorm::new(d, config.layer_norm_epsilon, enc.pp("final_layer_norm"))?,
            act,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// `[B, L]` u32 token ids (no attention mask, as FluxPipeline calls it) → `[B, L, d_model]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let mut x = self.embed_tokens(ids)?;
        let bias = self.position_bias(len, ids.device())?;
        for i in 0..self.blocks.len() {
            x = self.block(i, &x, &bias)?;
        }
        let out = self.final_norm.forward(&x)?;
        Ok(out.to_dtype(self.dtype)?)
    }

    /// The token embeddings `[B, L, d_model]` the first block reads (public, with [`Self::block`]
    /// and [`Self::position_bias`], so that benchmarks can time blocks one at a time).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.forward(ids)?)
    }

    /// Encoder block `i` (self-attention with the shared position bias, then the feed-forward).
    pub fn block(&self, i: usize, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let block = &self.blocks[i];
        let (b, len, _) = x.dims3()?;
        let (heads, d_kv) = (self.config.num_heads, self.config.d_kv);
        let h = block.attn_norm.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, len, heads, d_kv))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(block.q.forward(&h)?)?;
        let k = split(block.k.forward(&h)?)?;
        let v = split(block.v.forward(&h)?)?;
        // T5 does not scale the scores; softmax runs in float32 (transformers' `.float()`).
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, len, heads * d_kv))?;
        let x = (x + block.o.forward(&attn)?)?;

        let h = block.ff_norm.forward(&x)?;
        let a = block.wi_0.forward(&h)?;
        let a = match self.act {
            Act::Relu => a.relu()?,
            Act::GeluTanh => a.gelu()?,
            Act::GeluErf => a.gelu_erf()?,
        };
        let a = match &block.wi_1 {
            Some(wi_1) => (a * wi_1.forward(&h)?)?,
            None => a,
        };
        Ok((x + block.wo.forward(&a)?)?)
    }

    /// `[1, heads, L, L]` float32 relative position bias (bidirectional buckets).
    pub fn position_bias(&self, len: usize, device: &Device) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..len)
            .flat_map(|q| (0..len).map(move |k| (q, k)))
            .map(|(q, k)| {
                relative_bucket(
                    k as i64 - q as i64,
                    self.config.relative_attention_num_buckets,
                    self.config.relative_attention_max_distance,
                )
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (len, len), device)?;
        let bias = self.relative_bias.forward(&buckets)?; // [L, L, heads]
        Ok(bias.permute((2, 0, 1))?.unsqueeze(0)?.to_dtype(DType::F32)?)
    }
}

/// transformers' `_relative_position_bucket` (bidirectional): half the buckets per direction,
/// exact below `num_buckets / 4`, logarithmic up to `max_distance` (float32 log, truncated).
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = ((n as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32)
            * (half - max_exact) as f32;
        let large = max_exact + ratio as i64;
        bucket += large.min(half - 1);
    }
    bucket as u32
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_match_transformers() {
        // transformers' T5Attention._relative_position_bucket(bidirectional, 32, 128).
        let got: Vec<u32> = [-200, -128, -20, -8, -7, -1, 0, 1, 7, 8, 9, 20, 64, 127, 128, 500]
            .iter()
            .map(|&r| relative_bucket(r, 32, 128))
            .collect();
        assert_eq!(got, vec![15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 24, 26, 30, 31, 31, 31]);
    }
}
