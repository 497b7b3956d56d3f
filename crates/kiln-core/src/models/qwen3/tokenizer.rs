//! Qwen's byte-level BPE tokenizer, read from the folder's own `tokenizer.json` through the
//! `tokenizers` crate, with the prompt wrapped by the tokenizer's chat template as diffusers'
//! ZImagePipeline does: `apply_chat_template([{"role": "user", "content": prompt}],
//! add_generation_prompt=True, enable_thinking=True)`, then `max_length` truncation.
//!
//! Qwen's chat template (ChatML) renders one user message with a generation prompt as
//! `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n` (with `enable_thinking`
//! true it adds no empty think block). kiln renders that text itself rather than running a Jinja
//! engine, and checks that the folder's template is a ChatML one, so that a tokenizer with a
//! different template fails clearly instead of encoding the wrong text.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A prompt as the Qwen encoder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QwenTokens {
    /// The templated prompt's ids, at most `max_length` (no padding: Z-Image drops it).
    pub ids: Vec<u32>,
    /// The text dropped by truncation, decoded, if any.
    pub truncated: Option<String>,
}

/// A `tokenizer.json` tokenizer with its ChatML chat template.
#[derive(Clone)]
pub struct QwenTokenizer {
    inner: Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer").field("path", &self.path).finish()
    }
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

impl QwenTokenizer {
    /// Loads `dir/tokenizer.json` and checks the chat template (`chat_template.jinja`, or
    /// `chat_template` in tokenizer_config.json) and the ChatML special tokens.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::not_found(
                "Qwen tokenizer",
                path,
                "the tokenizer folder needs tokenizer.json (Qwen repos ship it)",
            ));
        }
        let template = chat_template(dir)?;
        if !template.contains(IM_START) || !template.contains(IM_END) {
            return Err(Error::config(
                dir.join("chat_template.jinja"),
                "the chat template is not Qwen's ChatML template (<|im_start|> ... <|im_end|>)",
            ));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| Error::config(&path, e.to_string()))?;
        for special in [IM_START, IM_END] {
            if inner.token_to_id(special).is_none() {
                return Err(Error::config(
                    &path,
                    format!("special token `{special}` is not in the vocabulary"),
                ));
            }
        }
        Ok(Self { inner, path })
    }

    /// The chat-templated text of a single user message with the generation prompt.
    pub fn apply_chat_template(prompt: &str) -> String {
        format!("{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n")
    }

    /// The ids of `text` as it is (no template), without truncation.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `prompt` through the chat template, truncated to `max_length` ids, as diffusers does.
    pub fn encode_prompt(&self, prompt: &str, max_length: usize) -> Result<QwenTokens> {
        let mut ids = self.encode_ids(&Self::apply_chat_template(prompt))?;
        let truncated = if ids.len() > max_length {
            let dropped = self.inner.decode(&ids[max_length..], true).map_err(|e| self.error(e))?;
            ids.truncate(max_length);
            Some(dropped)
        } else {
            None
        };
        Ok(QwenTokens { ids, truncated })
    }

    fn error(&self, e: tokenizers::Error) -> Error {
        Error::config(&self.path, e.to_string())
    }
}

/// The tokenizer's chat template: transformers 5 writes `chat_template.jinja`, 4.x a
/// `chat_template` string in tokenizer_config.json.
fn chat_template(dir: &Path) -> Result<String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(fs_err::read_to_string(&jinja)?);
    }
    let config = dir.join("tokenizer_config.json");
    if config.is_file() {
        if let Some(t) =
            crate::loaders::diffusers::read_json(&config)?.get("chat_template").and_then(|v| v.as_str())
        {
            return Ok(t.to_string());
        }
    }
    Err(Error::not_found(
        "Qwen chat template",
        jinja,
        "Z-Image encodes prompts through the tokenizer's chat template (chat_template.jinja or \
         tokenizer_config.json's chat_template)",
    ))
}
