//! T5's tokenizer, read from the folder's own `tokenizer.json` through the `tokenizers` crate
//! (the same implementation transformers 5 runs), padded and truncated the way diffusers calls
//! it: `tokenizer(prompt, padding="max_length", max_length=N, truncation=True)`.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// A prompt as T5 sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5Tokens {
    /// Exactly `max_length` ids: the prompt's tokens (truncated), `</s>`, then padding.
    pub ids: Vec<u32>,
    /// The text dropped by truncation, decoded, if any.
    pub truncated: Option<String>,
}

/// A `tokenizer.json` tokenizer with the pad token of its `tokenizer_config.json`.
#[derive(Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    pad_id: u32,
    pad_token: String,
    path: PathBuf,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer").field("path", &self.path).field("pad_id", &self.pad_id).finish()
    }
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json` (transformers' fast-tokenizer file; hub T5 folders ship it).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            let hint = if dir.join("spiece.model").is_file() {
                "only the SentencePiece spiece.model is present; kiln reads tokenizer.json (save the \
                 tokenizer with transformers' T5TokenizerFast to write it)"
            } else {
                "the T5 tokenizer folder needs tokenizer.json"
            };
            return Err(Error::not_found("T5 tokenizer", path, hint));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| Error::config(&path, e.to_string()))?;
        let config = dir.join("tokenizer_config.json");
        let pad_token = if config.is_file() {
            crate::loaders::diffusers::read_json(&config)?
                .get("pad_token")
                .and_then(token_content)
                .unwrap_or_else(|| "<pad>".into())
        } else {
            "<pad>".into()
        };
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            Error::config(&path, format!("pad token `{pad_token}` is not in the vocabulary"))
        })?;
        Ok(Self { inner, pad_id, pad_token, path })
    }

    /// The ids of `text` with special tokens, no truncation or padding.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `text` truncated and padded to `max_length` ids, as diffusers tokenizes for T5.
    pub fn encode_padded(&self, text: &str, max_length: usize) -> Result<T5Tokens> {
        let mut tok = self.inner.clone();
        tok.with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| self.error(e))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            pad_id: self.pad_id,
            pad_token: self.pad_token.clone(),
            ..Default::default()
        }));
        let ids = tok.encode(text, true).map_err(|e| self.error(e))?.get_ids().to_vec();
        let full = self.encode_ids(text)?;
        let truncated = if full.len() > max_length {
            // Truncation keeps `max_length - 1` prompt tokens before the appended `</s>`.
            let dropped = full.get(max_length.saturating_sub(1)..full.len().saturating_sub(1)).unwrap_or(&[]);
            Some(self.inner.decode(dropped, true).map_err(|e| self.error(e))?)
        } else {
            None
        };
        Ok(T5Tokens { ids, truncated })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    fn error(&self, e: tokenizers::Error) -> Error {
        Error::config(&self.path, e.to_string())
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
