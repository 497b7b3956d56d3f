//! Prompt encoding, per family (as the registry's [`TextConditioning`] says), as diffusers'
//! `encode_prompt` does it, into the family-neutral [`PromptEmbeds`].
//!
//! Prompts longer than a tokenizer's budget (77 CLIP tokens; the T5 or Qwen
//! `--max-sequence-length`, Qwen's counting the chat template's tokens too) are truncated (diffusers' behaviour, so parity holds); the dropped text is returned as a
//! warning for the caller to show.

use crate::error::{Error, Result};
use crate::models::family::{FamilySpec, TextConditioning};
use crate::pipeline::model::{LoadedModel, TextStack};
use candle_core::{Tensor, D};

/// Embeddings of one prompt: the family-neutral text conditioning.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, tokens, D]`: the token sequence the denoiser attends to (CLIP hidden states for SD,
    /// T5 hidden states for FLUX).
    pub hidden: Tensor,
    /// `[1, P]`: a pooled vector (SDXL's text_embeds, FLUX's CLIP pooled projection).
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    /// On the denoiser's device in its dtype (text encoders placed on the CPU run in f32 there;
    /// diffusers likewise casts the embeddings to the transformer's dtype). A no-op when the
    /// encoders share the denoiser's device and dtype.
    fn for_denoiser(self, model: &LoadedModel) -> Result<Self> {
        let to = |t: Tensor| -> Result<Tensor> { Ok(t.to_device(&model.device)?.to_dtype(model.dtype)?) };
        Ok(Self { hidden: to(self.hidden)?, pooled: self.pooled.map(to).transpose()? })
    }

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

/// Encodes the prompt, and the negative prompt when classifier-free guidance is on, with the
/// family's default token budget.
pub fn encode_prompts(
    model: &LoadedModel,
    prompt: &str,
    negative: Option<&str>,
    with_negative: bool,
) -> Result<EncodedPrompts> {
    encode_prompts_with(model, prompt, negative, with_negative, None)
}

/// [`encode_prompts`] with `--max-sequence-length`: the long-context encoder's token budget
/// (None = the family's default; an error for families whose encoders have a fixed length).
pub fn encode_prompts_with(
    model: &LoadedModel,
    prompt: &str,
    negative: Option<&str>,
    with_negative: bool,
    max_sequence_length: Option<usize>,
) -> Result<EncodedPrompts> {
    let budget = sequence_budget(model.spec, max_sequence_length)?;
    let mut warnings = Vec::new();
    let stacks = model.text.get()?;
    let positive = encode_one(model, &stacks, prompt, budget, &mut warnings)?.for_denoiser(model)?;
    let negative = if !with_negative {
        None
    } else if negative.is_none() && model.spec.zeros_for_empty_negative && model.force_zeros_for_empty_prompt
    {
        Some(positive.zeros_like()?)
    } else {
        Some(encode_one(model, &stacks, negative.unwrap_or(""), budget, &mut warnings)?.for_denoiser(model)?)
    };
    Ok(EncodedPrompts { positive, negative, warnings })
}

/// The token budget for the family's long-context encoder, checked against its limit.
fn sequence_budget(spec: &FamilySpec, requested: Option<usize>) -> Result<Option<usize>> {
    match (spec.max_sequence_length, requested) {
        (_, Some(0)) => Err(Error::arg("max-sequence-length", "must be at least 1")),
        (Some((_, max)), Some(n)) if n > max => Err(Error::arg(
            "max-sequence-length",
            format!("{n} exceeds the {} family's limit of {max} tokens", spec.name),
        )),
        (Some(_), Some(n)) => Ok(Some(n)),
        (Some((default, _)), None) => Ok(Some(default)),
        (None, Some(n)) => Err(Error::arg(
            "max-sequence-length",
            format!("{n}: the {} family's text encoders have a fixed length (77 CLIP tokens)", spec.name),
        )),
        (None, None) => Ok(None),
    }
}

fn encode_one(
    model: &LoadedModel,
    stacks: &[TextStack],
    prompt: &str,
    budget: Option<usize>,
    warnings: &mut Vec<String>,
) -> Result<PromptEmbeds> {
    match model.spec.conditioning {
        TextConditioning::LastHidden => {
            let out = run_clip(model, first_stack(stacks)?, prompt, warnings)?;
            Ok(PromptEmbeds { hidden: out.last_hidden_state, pooled: None })
        }
        TextConditioning::PenultimateConcatPooled => {
            let mut hidden = Vec::with_capacity(stacks.len());
            let mut pooled = None;
            for stack in stacks {
                let out = run_clip(model, stack, prompt, warnings)?;
                // SDXL conditions on the penultimate layer of each encoder, concatenated.
                let n = out.hidden_states.len();
                let penultimate = out
                    .hidden_states
                    .get(n.saturating_sub(2))
                    .cloned()
                    .ok_or_else(|| Error::Unsupported("text encoder returned no hidden states".into()))?;
                hidden.push(penultimate);
                if let Some(embeds) = out.text_embeds {
                    pooled = Some(embeds);
                }
            }
            let pooled = pooled.ok_or_else(|| {
                Error::Unsupported("SDXL needs a text encoder with projection (text_encoder_2)".into())
            })?;
            Ok(PromptEmbeds { hidden: Tensor::cat(&hidden, D::Minus1)?, pooled: Some(pooled) })
        }
        TextConditioning::ClipPooledT5Tokens => {
            // FluxPipeline: CLIP's pooled output (77 tokens) + T5's last hidden state.
            let mut pooled = None;
            let mut hidden = None;
            for stack in stacks {
                match stack {
                    TextStack::Clip { .. } => pooled = Some(run_clip(model, stack, prompt, warnings)?.pooled),
                    TextStack::T5 { tokenizer, encoder } => {
                        let max_len = budget.unwrap_or(512);
                        let tokens = tokenizer.encode_padded(prompt, max_len)?;
                        if let Some(dropped) = tokens.truncated {
                            push_once(
                                warnings,
                                format!(
                                    "prompt longer than {max_len} T5 tokens (--max-sequence-length); \
                                     truncated (as diffusers does), dropped: \"{dropped}\""
                                ),
                            );
                        }
                        let ids = Tensor::from_vec(tokens.ids, (1, max_len), model.text.device())?;
                        hidden = Some(encoder.forward(&ids)?);
                    }
                    // Not a FLUX stack: the check below names what is missing.
                    TextStack::Qwen3 { .. } => {}
                }
            }
            match (hidden, pooled) {
                (Some(hidden), Some(pooled)) => Ok(PromptEmbeds { hidden, pooled: Some(pooled) }),
                _ => Err(Error::Unsupported(format!(
                    "the {} family needs a CLIP and a T5 text encoder",
                    model.spec.name
                ))),
            }
        }
        TextConditioning::QwenPenultimate => {
            // ZImagePipeline: the chat-templated prompt, hidden_states[-2], padding dropped.
            let TextStack::Qwen3 { tokenizer, encoder } = first_stack(stacks)? else {
                return Err(Error::Unsupported(format!(
                    "the {} family needs a Qwen3 text encoder",
                    model.spec.name
                )));
            };
            let max_len = budget.unwrap_or(512);
            let tokens = tokenizer.encode_prompt(prompt, max_len)?;
            if let Some(dropped) = tokens.truncated {
                push_once(
                    warnings,
                    format!(
                        "prompt longer than {max_len} Qwen tokens with its chat template \
                         (--max-sequence-length); truncated (as diffusers does), dropped: \"{dropped}\""
                    ),
                );
            }
            let n = tokens.ids.len();
            let ids = Tensor::from_vec(tokens.ids, (1, n), model.text.device())?;
            Ok(PromptEmbeds { hidden: encoder.forward_penultimate(&ids)?, pooled: None })
        }
    }
}

fn first_stack(stacks: &[TextStack]) -> Result<&TextStack> {
    stacks.first().ok_or_else(|| Error::Unsupported("the model has no text encoder".into()))
}

fn run_clip(
    model: &LoadedModel,
    stack: &TextStack,
    prompt: &str,
    warnings: &mut Vec<String>,
) -> Result<crate::models::clip::ClipOutput> {
    let TextStack::Clip { tokenizer, encoder } = stack else {
        return Err(Error::Unsupported("expected a CLIP text encoder".into()));
    };
    let tokens = tokenizer.encode_padded(prompt)?;
    if let Some(dropped) = tokens.truncated {
        push_once(
            warnings,
            format!(
                "prompt longer than {} tokens; truncated (as diffusers does), dropped: \"{dropped}\"",
                tokenizer.max_len()
            ),
        );
    }
    let len = tokens.ids.len();
    let ids = Tensor::from_vec(tokens.ids, (1, len), model.text.device())?;
    encoder.forward(&ids)
}

fn push_once(warnings: &mut Vec<String>, w: String) {
    if !warnings.contains(&w) {
        warnings.push(w);
    }
}
