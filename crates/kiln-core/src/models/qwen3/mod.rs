//! kiln's Qwen3 text encoder (transformers' `Qwen3Model`, Z-Image's `text_encoder`: grouped-query
//! causal attention with per-head RMS norms on q and k, rotate-half RoPE, SwiGLU MLP) and its
//! byte-level BPE tokenizer read from `tokenizer.json` through the chat template ([`tokenizer`]).
//!
//! kiln's own rather than candle-transformers' `qwen3`: that model returns the final-normed last
//! layer only, while Z-Image conditions on `hidden_states[-2]` — the second-to-last layer's
//! output before the final norm. Here the forward pass stops there, so the last layer and the
//! final norm are never loaded. The maths follows transformers 5.25 (float32 norm statistics,
//! softmax and RoPE tables, as transformers computes them).

pub mod tokenizer;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use kiln_kernels::{linear, linear_no_bias, Linear};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The fields of a transformers `Qwen3Config` the encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x writes `rope_theta`; transformers 5 writes `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl Qwen3Config {
    /// Parses and checks a config.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        let cfg: Qwen3Config = serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        if cfg.hidden_act != "silu" {
            return Err(Error::config(
                path,
                format!("Qwen3 activation `{}` is not supported", cfg.hidden_act),
            ));
        }
        let heads = cfg.num_attention_heads;
        let kv = cfg.kv_heads();
        if heads == 0 || kv == 0 || heads % kv != 0 || cfg.head_dim() % 2 != 0 {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}, \
                     with an even head_dim"
                ),
            ));
        }
        if cfg.num_hidden_layers < 2 {
            return Err(Error::config(path, "the second-to-last hidden state needs at least 2 layers"));
        }
        if let Some(kind) = cfg.rope_type() {
            if kind != "default" {
                return Err(Error::config(path, format!("rope_type `{kind}` is not supported")));
            }
        }
        Ok(cfg)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `rope_parameters.rope_theta`, else `rope_theta`, else transformers' default 10000.
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    fn rope_type(&self) -> Option<&str> {
        self.rope_parameters.as_ref()?.get("rope_type")?.as_str()
    }
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    input_norm: Tensor,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// transformers' `Qwen3Model` up to its second-to-last layer: token ids → `hidden_states[-2]`.
#[derive(Debug, Clone)]
pub struct Qwen3Encoder {
    config: Qwen3Config,
    embed: kiln_kernels::Embedding,
    layers: Vec<Layer>,
    dtype: DType,
}

impl Qwen3Encoder {
    /// Builds the encoder from `Qwen3Model` weights (`embed_tokens`, `layers.*`) or a
    /// `Qwen3ForCausalLM` checkpoint's (the same under `model.`).
    pub fn new(config: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("model.embed_tokens.weight") { vb.pp("model") } else { vb };
        let (d, hd, inner) = (config.hidden_size, config.head_dim(), config.intermediate_size);
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        let proj = |i: usize, o: usize, vb: VarBuilder| {
            if config.attention_bias {
                linear(i, o, vb)
            } else {
                linear_no_bias(i, o, vb)
            }
        };
        let embed =
            kiln_kernels::Embedding::new(vb.pp("embed_tokens").get((config.vocab_size, d), "weight")?, d)?;
        // hidden_states[-2] is the output of layer n-2: the last layer is never run.
        let layers = (0..config.num_hidden_layers - 1)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                let a = l.pp("self_attn");
                let m = l.pp("mlp");
                Ok(Layer {
                    q: proj(d, heads * hd, a.pp("q_proj"))?,
                    k: proj(d, kv * hd, a.pp("k_proj"))?,
                    v: proj(d, kv * hd, a.pp("v_proj"))?,
                    o: linear_no_bias(heads * hd, d, a.pp("o_proj"))?,
                    q_norm: a.pp("q_norm").get(hd, "weight")?,
                    k_norm: a.pp("k_norm").get(hd, "weight")?,
                    input_norm: l.pp("input_layernorm").get(d, "weight")?,
                    post_norm: l.pp("post_attention_layernorm").get(d, "weight")?,
                    gate: linear_no_bias(d, inner, m.pp("gate_proj"))?,
                    up: linear_no_bias(d, inner, m.pp("up_proj"))?,
                    down: linear_no_bias(inner, d, m.pp("down_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config: config.clone(), embed, layers, dtype: vb.dtype() })
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// `[B, L]` u32 ids, all attended (no padding: Z-Image drops padded positions, and under a
    /// causal mask right-padding does not change the others) → `hidden_states[-2]` `[B, L, D]`.
    pub fn forward_penultimate(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let rope = self.rope(len, ids.device())?;
        let mut x = self.embed_tokens(ids)?;
        for i in 0..self.layers.len() {
            x = self.layer(i, &x, &rope)?;
        }
        Ok(x.to_dtype(self.dtype)?)
    }

    /// The token embeddings `[B, L, D]` the first layer reads (public, with [`Self::layer`] and
    /// [`Self::rope`], so that benchmarks can time layers one at a time).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.forward(ids)?)
    }

    /// The (cos, sin) RoPE tables for `len` positions.
    pub fn rope(&self, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        rope_tables(len, self.config.head_dim(), self.config.theta(), device)
    }

    /// Decoder layer `i` (of the `num_hidden_layers - 1` that are run) on `x` `[B, L, D]`.
    pub fn layer(&self, i: usize, x: &Tensor, rope: &(Tensor, Tensor)) -> Result<Tensor> {
        let layer = &self.layers[i];
        let (b, len, _) = x.dims3()?;
        let cfg = &self.config;
        let (heads, kv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps;
        let (cos, sin) = rope;
        let h = rms_norm(x, &layer.input_norm, eps)?;
        let split = |t: Tensor, n: usize| t.reshape((b, len, n, hd));
        let q = rms_norm(&split(layer.q.forward(&h)?, heads)?, &layer.q_norm, eps)?.transpose(1, 2)?;
        let k = rms_norm(&split(layer.k.forward(&h)?, kv)?, &layer.k_norm, eps)?.transpose(1, 2)?;
        let v = split(layer.v.forward(&h)?, kv)?.transpose(1, 2)?;
        let q = apply_rope(&q, cos, sin)?;
        let k = repeat_kv(&apply_rope(&k, cos, sin)?, heads / kv)?;
        let v = repeat_kv(&v, heads / kv)?;
        let attn = kiln_kernels::attention(&q, &k, &v, 1.0 / (hd as f64).sqrt(), true)?;
        let attn = attn.transpose(1, 2)?.reshape((b, len, heads * hd))?;
        let x = (x + layer.o.forward(&attn)?)?;

        let h = rms_norm(&x, &layer.post_norm, eps)?;
        let a = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
        Ok((x + layer.down.forward(&a)?)?)
    }
}

/// transformers' Qwen3RMSNorm: float32 statistics, the weight applied in the input dtype.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(x.dtype())?;
    Ok(normed.broadcast_mul(weight)?)
}

/// `[1, 1, L, head_dim]` cos/sin tables as transformers' default rotary embedding builds them:
/// `inv_freq = 1 / theta^(2k/d)` and `position · inv_freq` in float32 (so long prompts round as
/// they do there), each frequency's angle repeated over both halves.
fn rope_tables(len: usize, hd: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let inv: Vec<f32> = (0..half).map(|k| 1.0 / (theta as f32).powf((2 * k) as f32 / hd as f32)).collect();
    let mut cos = Vec::with_capacity(len * hd);
    let mut sin = Vec::with_capacity(len * hd);
    for p in 0..len {
        let angles: Vec<f32> = inv.iter().map(|f| p as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| (*a as f64).cos() as f32));
            sin.extend(angles.iter().map(|a| (*a as f64).sin() as f32));
        }
    }
    Ok((Tensor::from_vec(cos, (1, 1, len, hd), device)?, Tensor::from_vec(sin, (1, 1, len, hd), device)?))
}

/// `x·cos + rotate_half(x)·sin` on `[B, H, L, D]` in float32, back in x's dtype.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(3)?;
    let xf = x.to_dtype(DType::F32)?;
    let rotated = Tensor::cat(&[&xf.narrow(3, d / 2, d / 2)?.neg()?, &xf.narrow(3, 0, d / 2)?], 3)?;
    Ok((xf.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?.to_dtype(x.dtype())?)
}

/// Grouped-query attention: each key/value head serves `rep` consecutive query heads.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.contiguous()?);
    }
    let (b, kv, l, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv, rep, l, d))?.reshape((b, kv * rep, l, d))?)
}
