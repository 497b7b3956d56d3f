//! Prompt encoding, per family, as diffusers' `encode_prompt` does it.
//!
//! Prompts longer than the tokenizer's 77 tokens are truncated (diffusers' behaviour, so parity
//! holds); the dropped text is returned as a warning for the caller to show.

use crate::error::Result;
use crate::loaders::diffusers::Family;
use crate::pipeline::model::{LoadedModel, TextStack};
use candle_core::{Tensor, D};

/// Embeddings of one prompt.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// [1, 77, D]: the UNet's encoder_hidden_states.
    pub hidden: Tensor,
    /// SDXL: [1, P] pooled projection of the second encoder (the UNet's text_embeds).
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            hidden: self.hidden.zeros_like()?,
            pooled: self.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
        })
    }
}

/// Positive and (when guidance is on) negative embeddings, plus truncation warnings.
#[derive(Debug, Clone)]
pub struct EncodedPrompts {
    pub positive: PromptEmbeds,
    pub negative: Option<PromptEmbeds>,
    pub warnings: Vec<String>,
}

/// Encodes the prompt, and the negative prompt when classifier-free guidance is on.
pub fn encode_prompts(
    model: &LoadedModel,
    prompt: &str,
    negative: Option<&str>,
    with_negative: bool,
) -> Result<EncodedPrompts> {
    let mut warnings = Vec::new();
    let positive = encode_one(model, prompt, &mut warnings)?;
    let negative = if !with_negative {
        None
    } else if negative.is_none()
        && model.family == Family::StableDiffusionXl
        && model.force_zeros_for_empty_prompt
    {
        Some(positive.zeros_like()?)
    } else {
        Some(encode_one(model, negative.unwrap_or(""), &mut warnings)?)
    };
    Ok(EncodedPrompts { positive, negative, warnings })
}

fn encode_one(model: &LoadedModel, prompt: &str, warnings: &mut Vec<String>) -> Result<PromptEmbeds> {
    match model.family {
        Family::StableDiffusion => {
            let stack = &model.text[0];
            let out = run_encoder(model, stack, prompt, warnings)?;
            Ok(PromptEmbeds { hidden: out.last_hidden_state, pooled: None })
        }
        Family::StableDiffusionXl => {
            let mut hidden = Vec::with_capacity(model.text.len());
            let mut pooled = None;
            for stack in &model.text {
                let out = run_encoder(model, stack, prompt, warnings)?;
                // SDXL conditions on the penultimate layer of each encoder, concatenated.
                let n = out.hidden_states.len();
                let penultimate = out.hidden_states.get(n.saturating_sub(2)).cloned().ok_or_else(|| {
                    crate::Error::Unsupported("text encoder returned no hidden states".into())
                })?;
                hidden.push(penultimate);
                if let Some(embeds) = out.text_embeds {
                    pooled = Some(embeds);
                }
            }
            let pooled = pooled.ok_or_else(|| {
                crate::Error::Unsupported("SDXL needs a text encoder with projection (text_encoder_2)".into())
            })?;
            Ok(PromptEmbeds { hidden: Tensor::cat(&hidden, D::Minus1)?, pooled: Some(pooled) })
        }
    }
}

fn run_encoder(
    model: &LoadedModel,
    stack: &TextStack,
    prompt: &str,
    warnings: &mut Vec<String>,
) -> Result<crate::models::clip::ClipOutput> {
    let tokens = stack.tokenizer.encode_padded(prompt)?;
    if let Some(dropped) = tokens.truncated {
        let w = format!(
            "prompt longer than {} tokens; truncated (as diffusers does), dropped: \"{dropped}\"",
            stack.tokenizer.max_len()
        );
        if !warnings.contains(&w) {
            warnings.push(w);
        }
    }
    let len = tokens.ids.len();
    let ids = Tensor::from_vec(tokens.ids, (1, len), &model.device)?;
    stack.encoder.forward(&ids)
}
