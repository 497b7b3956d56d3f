//! CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`), as the
//! Stable Diffusion pipelines use it: last hidden state, per-layer hidden states, the pooled
//! EOS state and its projection.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Key prefix under which transformers 4 saves `CLIPTextModel` (and every version saves
/// `CLIPTextModelWithProjection`) weights.
pub const TEXT_MODEL_PREFIX: &str = "text_model";
/// Stands in for the weight file in errors from [`ClipTextModel::new`], which only sees a
/// VarBuilder; [`ClipTextModel::load`] replaces it with the file path.
const WEIGHTS_PLACEHOLDER: &str = "the text encoder weights";

/// `eos_token_id` in config.json: one id, or (rarely) a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum EosTokenId {
    One(u32),
    Many(Vec<u32>),
}

/// A component's `config.json` (transformers' `CLIPTextConfig`, same defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu`, `gelu`, `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`, `relu`, `silu`.
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: EosTokenId,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: EosTokenId::One(49407),
        }
    }
}

impl ClipTextConfig {
    /// Reads a text encoder's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::arg("CLIP text config", msg));
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return bad("vocab_size and max_position_embeddings must be positive".to_string());
        }
        Ok(())
    }
}

/// Outputs of [`ClipTextModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `[B, L, hidden]` after the final layer norm (SD 1.x/2.x prompt embeddings).
    pub last_hidden_state: Tensor,
    /// transformers' `output_hidden_states`: the embeddings, then each layer's output (before
    /// the final layer norm); `num_hidden_layers + 1` tensors. SDXL uses `[len - 2]`.
    pub hidden_states: Vec<Tensor>,
    /// `[B, hidden]`: the final-LN state at each row's EOS position.
    pub pooled: Tensor,
    /// `[B, projection_dim]`: `pooled @ text_projection` (CLIPTextModelWithProjection only).
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" | "gelu_python" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => return Err(Error::Unsupported(format!("CLIP hidden_act `{other}`"))),
        })
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // x * sigmoid(1.702 x)
            Self::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            Self::GeluErf => xs.gelu_erf()?,
            Self::GeluTanh => xs.gelu()?,
            Self::Relu => xs.relu()?,
            Self::Silu => xs.silu()?,
        })
    }
}

/// Which position of each row is pooled.
#[derive(Debug, Clone)]
enum EosRule {
    /// Legacy configs with `eos_token_id == 2`: the position of the largest id.
    ArgmaxId,
    /// First position holding one of these ids (position 0 when none does, like torch's argmax).
    FirstOf(Vec<u32>),
}

impl EosRule {
    fn position(&self, row: &[u32]) -> usize {
        match self {
            Self::ArgmaxId => {
                let mut best = 0;
                for (i, &id) in row.iter().enumerate() {
                    if id > row[best] {
                        best = i;
                    }
                }
                best
            }
            Self::FirstOf(eos) => row.iter().position(|id| eos.contains(id)).unwrap_or(0),
        }
    }
}

/// Self-attention with q/k/v fused into one projection; the attention itself is kiln's fused
/// causal kernel, reading q, k and v straight out of the projection's output.
#[derive(Debug, Clone)]
struct Attention {
    qkv_proj: kiln_kernels::Linear,
    out_proj: kiln_kernels::Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &ClipTextConfig, vb: &VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let part = |name: &str| -> Result<(Tensor, Option<Tensor>)> {
            let vb = vb.pp(name);
            Ok((tensor(&vb, "weight", &[h, h])?, Some(tensor(&vb, "bias", &[h])?)))
        };
        Ok(Self {
            qkv_proj: kiln_kernels::Linear::concat(&[part("q_proj")?, part("k_proj")?, part("v_proj")?])?,
            out_proj: linear(vb, "out_proj", h, h, true)?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `xs`: `[B, L, hidden]`; causal (query i sees tokens 0..=i).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = self.num_heads * self.head_dim;
        let qkv = self.qkv_proj.forward(xs)?;
        let (q, k, v) =
            (qkv.narrow(2, 0, hidden)?, qkv.narrow(2, hidden, hidden)?, qkv.narrow(2, 2 * hidden, hidden)?);
        let scale = (self.head_dim as f64).powf(-0.5);
        // Softmax in f32 whatever the dtype, as transformers does for half-precision models.
        let out = kiln_kernels::attention_bnc(&q, &k, &v, self.num_heads, scale, true)?;
        Ok(self.out_proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: kiln_kernels::Linear,
    fc2: kiln_kernels::Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: &VarBuilder, activation: Activation) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: layer_norm(vb, "layer_norm1", h, cfg.layer_norm_eps)?,
            self_attn: Attention::new(cfg, &vb.pp("self_attn"))?,
            layer_norm2: layer_norm(vb, "layer_norm2", h, cfg.layer_norm_eps)?,
            fc1: linear(&mlp, "fc1", h, i, true)?,
            fc2: linear(&mlp, "fc2", i, h, true)?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.layer_norm1.forward(xs)?)?;
        let xs = (xs + attn)?;
        let normed = self.layer_norm2.forward(&xs)?;
        // Exact GELU (OpenCLIP-H, SD 2.x) is fused into fc1; other activations run after it.
        let mlp = match self.activation {
            Activation::GeluErf => self.fc1.forward_with(&normed, kiln_kernels::Epilogue::GeluErf)?,
            other => other.apply(&self.fc1.forward(&normed)?)?,
        };
        let mlp = self.fc2.forward(&mlp)?;
        Ok((xs + mlp)?)
    }
}

/// CLIP text transformer, optionally with the `text_projection` head.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: kiln_kernels::Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_rule: EosRule,
    vocab_size: usize,
    max_positions: usize,
}

impl ClipTextModel {
    /// Builds the model from `vb`. Accepts keys with or without the `text_model.` prefix
    /// (transformers 4 saves CLIPTextModel with it, transformers 5 without;
    /// CLIPTextModelWithProjection has it in both); loads the root-level
    /// `text_projection.weight` when `with_projection`. Missing or wrongly shaped tensors are
    /// reported by their full key.
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder, with_projection: bool) -> Result<Self> {
        cfg.validate()?;
        let activation = Activation::parse(&cfg.hidden_act)?;
        let tm = match text_model_prefix(&vb) {
            Some(prefix) => vb.pp(prefix),
            None => vb.clone(),
        };
        let h = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding =
            kiln_kernels::Embedding::new(tensor(&emb, "token_embedding.weight", &[cfg.vocab_size, h])?, h)?;
        let position_embedding =
            Embedding::new(tensor(&emb, "position_embedding.weight", &[cfg.max_position_embeddings, h])?, h);
        let layers_vb = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, &layers_vb.pp(i), activation))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(&tm, "final_layer_norm", h, cfg.layer_norm_eps)?;
        let text_projection = if with_projection {
            let dim = cfg.projection_dim.ok_or_else(|| {
                Error::arg("CLIP text config", "projection_dim is null but the model has a text projection")
            })?;
            Some(Linear::new(tensor(&vb, "text_projection.weight", &[dim, h])?, None))
        } else {
            None
        };
        let eos_rule = match &cfg.eos_token_id {
            EosTokenId::One(2) => EosRule::ArgmaxId,
            EosTokenId::One(id) => EosRule::FirstOf(vec![*id]),
            EosTokenId::Many(ids) => EosRule::FirstOf(ids.clone()),
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            eos_rule,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Reads safetensors `files` (whole, into memory) and builds the model; errors name the file.
    pub fn load(
        cfg: &ClipTextConfig,
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        with_projection: bool,
    ) -> Result<Self> {
        let first =
            files.first().ok_or_else(|| Error::arg("text encoder weights", "no weight files given"))?;
        for file in files {
            if !file.is_file() {
                return Err(Error::not_found("text encoder weights", file, ""));
            }
        }
        let mut tensors = std::collections::HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(file, device)
                .map_err(|e| Error::Weights { path: file.clone(), msg: e.to_string() })?;
            tensors.extend(loaded);
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::new(cfg, vb, with_projection).map_err(|e| match e {
            Error::MissingTensor { name, .. } => {
                let path = if files.len() == 1 {
                    first.clone()
                } else {
                    PathBuf::from(
                        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
                    )
                };
                Error::MissingTensor { path, name }
            }
            other => other,
        })
    }

    /// Runs the encoder on `input_ids` (`[B, L]`, u32 or i64, `L <= max_position_embeddings`).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        let (b, l) = input_ids.dims2().map_err(|_| {
            Error::arg("input_ids", format!("expected shape [batch, length], got {:?}", input_ids.dims()))
        })?;
        if l == 0 || l > self.max_positions {
            return Err(Error::arg(
                "input_ids",
                format!("length {l} must be between 1 and max_position_embeddings {}", self.max_positions),
            ));
        }
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let rows = input_ids.to_vec2::<u32>()?;
        for (r, row) in rows.iter().enumerate() {
            if let Some((c, id)) = row.iter().enumerate().find(|(_, &id)| id as usize >= self.vocab_size) {
                return Err(Error::arg(
                    "input_ids",
                    format!("token id {id} at [{r}, {c}] is outside the vocabulary ({})", self.vocab_size),
                ));
            }
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, l as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(&input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?.unsqueeze(0)?)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(xs.clone());
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
            hidden_states.push(xs.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;

        let flat_index: Vec<u32> =
            rows.iter().enumerate().map(|(r, row)| (r * l + self.eos_rule.position(row)) as u32).collect();
        let flat_index = Tensor::from_vec(flat_index, b, device)?;
        let hidden = last_hidden_state.dim(D::Minus1)?;
        let pooled = last_hidden_state.reshape((b * l, hidden))?.index_select(&flat_index, 0)?;
        let text_embeds = match &self.text_projection {
            Some(projection) => Some(projection.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput { last_hidden_state, hidden_states, pooled, text_embeds })
    }

    /// Padded sequence length the position table allows (77 for CLIP).
    pub fn max_position_embeddings(&self) -> usize {
        self.max_positions
    }
}

/// Returns `Some("text_model")` when the weights hold the text transformer under the
/// `text_model.` prefix, `None` when its keys sit at the root.
pub fn text_model_prefix(vb: &VarBuilder) -> Option<&'static str> {
    vb.contains_tensor(&format!("{TEXT_MODEL_PREFIX}.embeddings.token_embedding.weight"))
        .then_some(TEXT_MODEL_PREFIX)
}

/// Same as [`text_model_prefix`] over a list of key names (e.g. a safetensors header).
pub fn text_model_prefix_of_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    let wanted = format!("{TEXT_MODEL_PREFIX}.embeddings.token_embedding.weight");
    keys.into_iter().any(|k| k == wanted).then_some(TEXT_MODEL_PREFIX)
}

/// Fetches `name` under `vb`, checking presence and shape so errors carry the full key.
fn tensor(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Tensor> {
    let full_name = if vb.prefix().is_empty() { name.to_string() } else { format!("{}.{name}", vb.prefix()) };
    if !vb.contains_tensor(name) {
        return Err(Error::MissingTensor { path: PathBuf::from(WEIGHTS_PLACEHOLDER), name: full_name });
    }
    let t = vb.get_unchecked(name)?;
    if t.dims() != shape {
        return Err(Error::ShapeMismatch {
            name: full_name,
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(t)
}

fn linear(
    vb: &VarBuilder,
    name: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<kiln_kernels::Linear> {
    let vb = vb.pp(name);
    let weight = tensor(&vb, "weight", &[out_dim, in_dim])?;
    let bias = if bias { Some(tensor(&vb, "bias", &[out_dim])?) } else { None };
    Ok(kiln_kernels::Linear::new(weight, bias)?)
}

fn layer_norm(vb: &VarBuilder, name: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
    let vb = vb.pp(name);
    Ok(LayerNorm::new(tensor(&vb, "weight", &[dim])?, tensor(&vb, "bias", &[dim])?, eps))
}
