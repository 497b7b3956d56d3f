//! The UNet's config.json (diffusers `UNet2DConditionModel`), with diffusers' defaults for absent
//! keys, and its resolution into per-block construction plans. Values kiln does not implement are
//! refused here with [`Error::Unsupported`] naming the key, so a model never runs half-supported.

use serde::Deserialize;

use crate::error::{Error, Result};

/// A value given once for all blocks or once per block (diffusers accepts both).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value per block, in down-block order.
    Each(Vec<T>),
    /// The same value for every block.
    One(T),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// Expands to one value per block; a list must have exactly `blocks` entries.
    fn expand(&self, blocks: usize, key: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); blocks]),
            PerBlock::Each(list) if list.len() == blocks => Ok(list.clone()),
            PerBlock::Each(list) => Err(config_error(
                key,
                format!("has {} entries ({list:?}) but there are {blocks} down blocks", list.len()),
            )),
        }
    }
}

/// diffusers' `UNet2DConditionModel` config (unet/config.json). Unknown keys are ignored; absent
/// keys take diffusers 0.42's defaults, so `UNetConfig::default()` is diffusers' default UNet.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: Option<serde_json::Value>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    /// Per block; a nested per-layer list (asymmetric UNets) is refused.
    pub transformer_layers_per_block: PerBlock<PerBlock<usize>>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the number of attention *heads* unless `num_attention_heads` is set
    /// (diffusers' naming quirk, huggingface/diffusers#2011).
    pub attention_head_dim: Option<PerBlock<usize>>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    /// Only changes numerics of diffusers' non-SDPA attention in half precision; kept for
    /// completeness, kiln's attention always takes the softmax in f32.
    pub upcast_attention: Option<bool>,
    pub resnet_time_scale_shift: String,
    /// Not used by the block types kiln supports (diffusers only passes it to others).
    pub resnet_skip_time_act: bool,
    /// Not used by the block types kiln supports (diffusers only passes it to others).
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    /// Only used by `UNetMidBlock2DSimpleCrossAttn`, which kiln does not support.
    pub mid_block_only_cross_attention: Option<bool>,
    /// Not used by the block types kiln supports.
    pub cross_attention_norm: Option<String>,
    /// Only used by addition_embed_type "text", which kiln does not support.
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(PerBlock::One(1)),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: Some(PerBlock::One(8)),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: Some(false),
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

impl UNetConfig {
    /// Parses a unet/config.json.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs_err::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
    }
}

/// Cross-attention settings of a block that has transformers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AttentionPlan {
    pub heads: usize,
    pub head_dim: usize,
    /// Transformer layers per Transformer2DModel.
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

/// Everything needed to build one down or up block.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BlockPlan {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Up blocks only: channels coming from the previous (deeper) up block.
    pub prev_output_channels: usize,
    pub num_layers: usize,
    pub attention: Option<AttentionPlan>,
    /// Down blocks: add a Downsample2D; up blocks: add an Upsample2D.
    pub resample: bool,
}

/// The config resolved into per-block plans.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UNetPlan {
    pub time_embed_dim: usize,
    pub groups: usize,
    pub down: Vec<BlockPlan>,
    /// The mid block's channels and attention; None for mid_block_type null.
    pub mid: Option<(usize, AttentionPlan)>,
    pub up: Vec<BlockPlan>,
    pub text_time: Option<TextTimePlan>,
}

/// SDXL's `addition_embed_type: "text_time"` sizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TextTimePlan {
    pub time_embed_dim: usize,
    pub projection_input_dim: usize,
}

fn config_error(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::arg(format!("UNet config `{key}`"), msg.to_string())
}

fn unsupported(key: &str, value: impl std::fmt::Debug, supported: &str) -> Error {
    Error::Unsupported(format!("UNet config `{key}` = {value:?} (kiln supports {supported})"))
}

impl UNetConfig {
    /// Refuses every setting kiln does not implement, naming the config key.
    fn check_supported(&self) -> Result<()> {
        if self.time_embedding_type != "positional" {
            return Err(unsupported("time_embedding_type", &self.time_embedding_type, "\"positional\""));
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return Err(unsupported("act_fn", &self.act_fn, "\"silu\""));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift, "\"default\""));
        }
        if self.class_embed_type.is_some() {
            return Err(unsupported("class_embed_type", &self.class_embed_type, "null"));
        }
        if self.num_class_embeds.is_some() {
            return Err(unsupported("num_class_embeds", self.num_class_embeds, "null"));
        }
        if self.class_embeddings_concat {
            return Err(unsupported("class_embeddings_concat", true, "false"));
        }
        match self.addition_embed_type.as_deref() {
            None | Some("text_time") => {}
            Some(other) => return Err(unsupported("addition_embed_type", other, "null or \"text_time\"")),
        }
        if self.encoder_hid_dim.is_some() {
            return Err(unsupported("encoder_hid_dim", self.encoder_hid_dim, "null"));
        }
        if self.encoder_hid_dim_type.is_some() {
            return Err(unsupported("encoder_hid_dim_type", &self.encoder_hid_dim_type, "null"));
        }
        if self.time_embedding_act_fn.is_some() {
            return Err(unsupported("time_embedding_act_fn", &self.time_embedding_act_fn, "null"));
        }
        if self.timestep_post_act.is_some() {
            return Err(unsupported("timestep_post_act", &self.timestep_post_act, "null"));
        }
        if self.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", true, "false"));
        }
        if self.attention_type != "default" {
            return Err(unsupported("attention_type", &self.attention_type, "\"default\""));
        }
        if self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
                "null",
            ));
        }
        for (key, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k % 2 == 0 {
                return Err(unsupported(key, k, "odd kernel sizes"));
            }
        }
        let only_cross = match &self.only_cross_attention {
            PerBlock::One(v) => *v,
            PerBlock::Each(list) => list.iter().any(|v| *v),
        };
        if only_cross {
            return Err(unsupported("only_cross_attention", &self.only_cross_attention, "false"));
        }
        Ok(())
    }

    /// Validates the config and resolves it into per-block plans, exactly as diffusers'
    /// `UNet2DConditionModel.__init__` does.
    pub(crate) fn plan(&self) -> Result<UNetPlan> {
        self.check_supported()?;
        let blocks = self.down_block_types.len();
        if blocks == 0 {
            return Err(config_error("down_block_types", "is empty"));
        }
        if self.up_block_types.len() != blocks {
            return Err(config_error(
                "up_block_types",
                format!("has {} entries but down_block_types has {blocks}", self.up_block_types.len()),
            ));
        }
        if self.block_out_channels.len() != blocks {
            return Err(config_error(
                "block_out_channels",
                format!("has {} entries but down_block_types has {blocks}", self.block_out_channels.len()),
            ));
        }
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            other => return Err(unsupported("norm_num_groups", other, "a positive group count")),
        };
        let attention_head_dim =
            self.attention_head_dim.as_ref().ok_or_else(|| config_error("attention_head_dim", "is null"))?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(blocks, "num_attention_heads")?,
            None => attention_head_dim.expand(blocks, "attention_head_dim")?,
        };
        let cross_dims = self.cross_attention_dim.expand(blocks, "cross_attention_dim")?;
        let layers = self.layers_per_block.expand(blocks, "layers_per_block")?;
        let transformer_layers = self
            .transformer_layers_per_block
            .expand(blocks, "transformer_layers_per_block")?
            .into_iter()
            .map(|v| match v {
                PerBlock::One(n) => Ok(n),
                PerBlock::Each(list) => Err(unsupported(
                    "transformer_layers_per_block",
                    list,
                    "one layer count per block (no per-layer lists)",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(i) = layers.iter().position(|&n| n == 0) {
            return Err(config_error("layers_per_block", format!("block {i} has 0 layers")));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % groups != 0 {
                return Err(config_error(
                    "block_out_channels",
                    format!(
                        "block {i} has {c} channels, not a positive multiple of norm_num_groups {groups}"
                    ),
                ));
            }
        }
        let attention = |channels: usize, heads: usize, cross_dim: usize, t_layers: usize, key: &str| {
            if heads == 0 || heads > channels {
                return Err(config_error(key, format!("{heads} heads for {channels} channels")));
            }
            Ok(AttentionPlan {
                heads,
                head_dim: channels / heads,
                transformer_layers: t_layers,
                cross_attention_dim: cross_dim,
                use_linear_projection: self.use_linear_projection,
            })
        };
        let heads_key =
            if self.num_attention_heads.is_some() { "num_attention_heads" } else { "attention_head_dim" };

        let mut down = Vec::with_capacity(blocks);
        let mut output_channels = self.block_out_channels[0];
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let in_channels = output_channels;
            output_channels = self.block_out_channels[i];
            let has_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(unsupported(
                        "down_block_types",
                        other,
                        "\"CrossAttnDownBlock2D\" and \"DownBlock2D\"",
                    ))
                }
            };
            down.push(BlockPlan {
                in_channels,
                out_channels: output_channels,
                prev_output_channels: 0,
                num_layers: layers[i],
                attention: if has_attention {
                    Some(attention(
                        output_channels,
                        heads[i],
                        cross_dims[i],
                        transformer_layers[i],
                        heads_key,
                    )?)
                } else {
                    None
                },
                resample: i + 1 != blocks,
            });
        }

        let last = blocks - 1;
        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let channels = self.block_out_channels[last];
                Some((
                    channels,
                    attention(channels, heads[last], cross_dims[last], transformer_layers[last], heads_key)?,
                ))
            }
            Some(other) => {
                return Err(unsupported("mid_block_type", other, "\"UNetMidBlock2DCrossAttn\" and null"));
            }
        };

        let reversed_channels: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(blocks);
        let mut output_channels = reversed_channels[0];
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let rev = last - i;
            let prev_output_channels = output_channels;
            output_channels = reversed_channels[i];
            let in_channels = reversed_channels[(i + 1).min(last)];
            let has_attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(unsupported(
                        "up_block_types",
                        other,
                        "\"CrossAttnUpBlock2D\" and \"UpBlock2D\"",
                    ));
                }
            };
            up.push(BlockPlan {
                in_channels,
                out_channels: output_channels,
                prev_output_channels,
                num_layers: layers[rev] + 1,
                attention: if has_attention {
                    Some(attention(
                        output_channels,
                        heads[rev],
                        cross_dims[rev],
                        transformer_layers[rev],
                        heads_key,
                    )?)
                } else {
                    None
                },
                resample: i != last,
            });
        }

        let time_embed_dim = self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4);
        let text_time = match self.addition_embed_type.as_deref() {
            Some("text_time") => Some(TextTimePlan {
                time_embed_dim: self.addition_time_embed_dim.ok_or_else(|| {
                    config_error("addition_time_embed_dim", "is required by addition_embed_type text_time")
                })?,
                projection_input_dim: self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    config_error(
                        "projection_class_embeddings_input_dim",
                        "is required by addition_embed_type text_time",
                    )
                })?,
            }),
            _ => None,
        };
        Ok(UNetPlan { time_embed_dim, groups, down, mid, up, text_time })
    }
}
