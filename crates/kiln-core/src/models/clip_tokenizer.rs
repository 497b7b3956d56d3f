//! CLIP BPE tokenizer, matching transformers' `CLIPTokenizer` (tokenizers backend, transformers 5)
//! and the way diffusers pads and truncates prompts.
//!
//! Pipeline, as the `tokenizers` library runs it for CLIP:
//! 1. added (special) tokens are cut out of the raw text — those marked `normalized` are matched
//!    after normalisation instead;
//! 2. normalisation: NFC, every whitespace run -> one space, lowercase (char by char);
//! 3. pre-tokenisation: keep the matches of CLIP's pattern, then split each piece again with
//!    GPT-2's pattern (the ByteLevel pre-tokenizer), and map its UTF-8 bytes to unicode symbols;
//! 4. BPE over the symbols with `</w>` appended to the last one, lowest merge rank first.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use serde_json::Value;
use unicode_normalization_alignments::UnicodeNormalization;

use crate::error::{Error, Result};

const END_OF_WORD: &str = "</w>";
/// CLIP's context length; used when the folder gives no usable `model_max_length`.
const DEFAULT_MAX_LEN: usize = 77;
/// transformers writes 1e30 ("unlimited") when a tokenizer has no max length; such values are
/// treated as absent.
const MAX_SANE_MAX_LEN: u64 = 1 << 20;
/// Words whose BPE result is remembered (the same bound as the `tokenizers` library).
const CACHE_CAPACITY: usize = 10_000;

/// CLIP's pre-tokenisation pattern (the Split pre-tokenizer of transformers' CLIPTokenizer).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's pattern, which the ByteLevel pre-tokenizer applies to each CLIP piece. Pieces hold no
/// whitespace, so the original's optional leading space and whitespace alternatives (which need
/// look-ahead) never apply. In practice this only splits a literal `<|endoftext|>` typed in a
/// prompt into `<|`, `endoftext`, `|>`.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// A prompt tokenised the way diffusers feeds it to a CLIP text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedTokens {
    /// `[bos] + ids[..max_len-2] + [eos]`, padded with the pad id to `max_len`.
    pub ids: Vec<u32>,
    /// The text diffusers would report as truncated (the removed tokens, decoded), if any.
    pub truncated: Option<String>,
}

/// A token matched in the text before BPE (bos/eos/pad/unk and any `added_tokens_decoder` entry).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    /// Matched in the normalised text (true) or the raw text (false).
    normalized: bool,
}

/// CLIP byte-level BPE tokenizer loaded from a hub tokenizer folder.
#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    id_to_token: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (usize, u32)>,
    byte_encoder: [char; 256],
    byte_decoder: HashMap<char, u8>,
    added_tokens: Vec<AddedToken>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_len: usize,
    whitespace: Regex,
    clip_pattern: Regex,
    byte_level_pattern: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipTokenizer {
    /// Loads `vocab.json` + `merges.txt` (or, when those are absent, `tokenizer.json`) and the
    /// special tokens / max length from `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::not_found("tokenizer folder", dir, ""));
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let tokenizer_json_path = dir.join("tokenizer.json");
        let (vocab, merges, file_added, merges_source) = if vocab_path.is_file() && merges_path.is_file() {
            (read_vocab(&vocab_path)?, read_merges(&merges_path)?, Vec::new(), merges_path)
        } else if tokenizer_json_path.is_file() {
            let (vocab, merges, added) = read_tokenizer_json(&tokenizer_json_path)?;
            (vocab, merges, added, tokenizer_json_path)
        } else {
            let missing = if vocab_path.is_file() { merges_path } else { vocab_path };
            return Err(Error::not_found(
                "CLIP tokenizer file",
                missing,
                "a CLIP tokenizer folder needs vocab.json + merges.txt, or tokenizer.json",
            ));
        };
        let config = SpecialTokenConfig::read(dir, file_added)?;
        Self::build(vocab, &merges, config, dir, &merges_source)
    }

    fn build(
        vocab: HashMap<String, u32>,
        merge_pairs: &[(String, String)],
        config: SpecialTokenConfig,
        dir: &Path,
        merges_source: &Path,
    ) -> Result<Self> {
        let mut merges = HashMap::with_capacity(merge_pairs.len());
        for (rank, (left, right)) in merge_pairs.iter().enumerate() {
            let lookup = |token: &str| {
                vocab.get(token).copied().ok_or_else(|| {
                    Error::config(
                        merges_source,
                        format!(
                            "merge {} (`{left} {right}`) uses `{token}`, absent from the vocabulary",
                            rank + 1
                        ),
                    )
                })
            };
            let key = (lookup(left)?, lookup(right)?);
            let merged = lookup(&format!("{left}{right}"))?;
            // The first occurrence of a pair wins, as in the `tokenizers` library.
            merges.entry(key).or_insert((rank, merged));
        }

        // Added tokens take their vocabulary id when they have one, as in `tokenizers`; a later
        // entry for the same content only updates its `normalized` flag.
        let mut next_id = vocab.values().copied().max().map_or(0, |m| m + 1);
        let mut added_tokens: Vec<AddedToken> = Vec::new();
        for spec in &config.added {
            if let Some(existing) = added_tokens.iter_mut().find(|t| t.content == spec.content) {
                existing.normalized = spec.normalized;
                continue;
            }
            let id = vocab.get(&spec.content).copied().or(spec.id).unwrap_or(next_id);
            next_id = next_id.max(id.saturating_add(1));
            added_tokens.push(AddedToken { content: spec.content.clone(), id, normalized: spec.normalized });
        }
        let special_id = |content: &str| {
            added_tokens
                .iter()
                .find(|t| t.content == content)
                .map(|t| t.id)
                .ok_or_else(|| Error::config(dir, format!("special token `{content}` has no id")))
        };
        let bos_id = special_id(&config.bos)?;
        let eos_id = special_id(&config.eos)?;
        let pad_id = special_id(&config.pad)?;
        let unk_id = special_id(&config.unk)?;

        let mut id_to_token: HashMap<u32, String> = vocab.iter().map(|(t, &i)| (i, t.clone())).collect();
        for token in &added_tokens {
            id_to_token.insert(token.id, token.content.clone());
        }
        let byte_encoder = bytes_to_unicode();
        let byte_decoder = byte_encoder.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let compile = |pattern: &str| {
            Regex::new(pattern).map_err(|e| Error::Unsupported(format!("tokenizer pattern: {e}")))
        };
        Ok(Self {
            vocab,
            id_to_token,
            merges,
            byte_encoder,
            byte_decoder,
            added_tokens,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            max_len: config.max_len,
            whitespace: compile(r"\s+")?,
            clip_pattern: compile(CLIP_PATTERN)?,
            byte_level_pattern: compile(BYTE_LEVEL_PATTERN)?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Token ids of `text`, without bos/eos.
    pub fn encode_ids(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for raw in split_on_added(text, &self.added_tokens, false) {
            let raw = match raw {
                Segment::Added(id) => {
                    ids.push(id);
                    continue;
                }
                Segment::Text(raw) => raw,
            };
            let normalized = self.normalize(raw);
            for segment in split_on_added(&normalized, &self.added_tokens, true) {
                match segment {
                    Segment::Added(id) => ids.push(id),
                    Segment::Text(text) => self.encode_normalized(text, &mut ids),
                }
            }
        }
        ids
    }

    /// What diffusers does: `[bos] + ids[..max_len-2] + [eos]`, padded to `max_len`, and the text
    /// of the removed ids when the prompt was too long.
    pub fn encode_padded(&self, text: &str) -> Result<PaddedTokens> {
        let room = self.max_len.checked_sub(2).ok_or_else(|| {
            Error::arg("tokenizer max length", format!("{} leaves no room for bos and eos", self.max_len))
        })?;
        let mut content = self.encode_ids(text);
        let truncated = (content.len() > room).then(|| self.decode(&content[room..]));
        content.truncate(room);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content);
        ids.push(self.eos_id);
        ids.resize(self.max_len, self.pad_id);
        Ok(PaddedTokens { ids, truncated })
    }

    /// Text of `ids` as transformers' `decode` gives it (special tokens kept, `</w>` -> space,
    /// ends trimmed). Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for id in ids {
            let Some(token) = self.id_to_token.get(id) else { continue };
            let mapped: Option<Vec<u8>> = token.chars().map(|c| self.byte_decoder.get(&c).copied()).collect();
            match mapped {
                Some(b) => bytes.extend(b),
                None => bytes.extend_from_slice(token.as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).replace(END_OF_WORD, " ").trim_matches(is_python_space).to_string()
    }

    /// Padded sequence length (`model_max_length`, 77 for every Stable Diffusion tokenizer).
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }
    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }
    /// Id of a token string (e.g. `"a</w>"`), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab
            .get(token)
            .copied()
            .or_else(|| self.added_tokens.iter().find(|t| t.content == token).map(|t| t.id))
    }

    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().map(|(c, _)| c).collect();
        let spaced = self.whitespace.replace_all(&nfc, " ");
        // Char by char, as `tokenizers` does (no final-sigma rule).
        spaced.chars().flat_map(char::to_lowercase).collect()
    }

    fn encode_normalized(&self, text: &str, ids: &mut Vec<u32>) {
        for piece in self.clip_pattern.find_iter(text) {
            for word in self.byte_level_pattern.find_iter(piece.as_str()) {
                let symbols: String =
                    word.as_str().bytes().map(|b| self.byte_encoder[usize::from(b)]).collect();
                ids.extend(self.bpe_cached(&symbols));
            }
        }
    }

    fn bpe_cached(&self, word: &str) -> Vec<u32> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(word) {
                return ids.clone();
            }
        }
        let ids = self.bpe(word);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() < CACHE_CAPACITY {
                cache.insert(word.to_string(), ids.clone());
            }
        }
        ids
    }

    /// BPE of one byte-mapped word: merges the lowest-ranked adjacent pair everywhere, left to
    /// right, until no pair has a merge.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let count = word.chars().count();
        let mut symbols: Vec<u32> = word
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let mut symbol = c.to_string();
                if i + 1 == count {
                    symbol.push_str(END_OF_WORD);
                }
                self.vocab.get(&symbol).copied().unwrap_or(self.unk_id)
            })
            .collect();
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|pair| {
                    self.merges
                        .get(&(pair[0], pair[1]))
                        .map(|&(rank, merged)| (rank, pair[0], pair[1], merged))
                })
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, left, right, merged)) = best else { break };
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if symbols[i] == left && symbols.get(i + 1) == Some(&right) {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
        }
        symbols
    }
}

enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

/// Splits `text` around the added tokens with the given `normalized` flag, leftmost-longest
/// match first (the `tokenizers` AddedVocabulary rule).
fn split_on_added<'a>(text: &'a str, added: &[AddedToken], normalized: bool) -> Vec<Segment<'a>> {
    let candidates: Vec<&AddedToken> =
        added.iter().filter(|t| t.normalized == normalized && !t.content.is_empty()).collect();
    let mut segments = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let best = candidates
            .iter()
            .filter(|t| rest.starts_with(t.content.as_str()))
            .max_by_key(|t| t.content.len());
        match best {
            Some(token) => {
                if start < pos {
                    segments.push(Segment::Text(&text[start..pos]));
                }
                segments.push(Segment::Added(token.id));
                pos += token.content.len();
                start = pos;
            }
            None => pos += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        segments.push(Segment::Text(&text[start..]));
    }
    segments
}

/// Python's `str.isspace` (used by `str.strip` in transformers' decode): Unicode White_Space
/// plus the ASCII separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// GPT-2/CLIP's reversible byte -> printable unicode symbol table.
fn bytes_to_unicode() -> [char; 256] {
    let printable =
        |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    table
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs_err::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn vocab_from_value(value: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let map = value.as_object().ok_or_else(|| Error::config(path, "vocabulary is not a JSON object"))?;
    map.iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| Error::config(path, format!("token `{token}` has id {id}, not a u32")))?;
            Ok((token.clone(), id))
        })
        .collect()
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    // Straight into a map (not through `Value`, whose ordered map and copies took three times
    // as long): the vocabulary is most of a warm model load's parsing.
    let text = fs_err::read_to_string(path)?;
    let raw: HashMap<String, serde_json::Number> = serde_json::from_str(&text)
        .map_err(|e| Error::config(path, format!("vocabulary is not a JSON object of token ids: {e}")))?;
    raw.into_iter()
        .map(|(token, id)| match id.as_u64().and_then(|i| u32::try_from(i).ok()) {
            Some(id) => Ok((token, id)),
            None => Err(Error::config(path, format!("token `{token}` has id {id}, not a u32"))),
        })
        .collect()
}

fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = fs_err::read_to_string(path)?;
    let mut merges = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() || (number == 0 && line.starts_with("#version")) {
            continue;
        }
        merges.push(parse_merge(line).ok_or_else(|| {
            Error::config(path, format!("line {}: `{line}` is not a pair of tokens", number + 1))
        })?);
    }
    Ok(merges)
}

fn parse_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => Some((a.to_string(), b.to_string())),
        _ => None,
    }
}

/// vocab, merges and added tokens from a `tokenizer.json` (BPE model with `</w>` suffix).
type TokenizerJson = (HashMap<String, u32>, Vec<(String, String)>, Vec<TokenSpec>);

fn read_tokenizer_json(path: &Path) -> Result<TokenizerJson> {
    let json = read_json(path)?;
    let model = json.get("model").ok_or_else(|| Error::config(path, "no `model` section"))?;
    let kind = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
    let suffix = model.get("end_of_word_suffix").and_then(Value::as_str);
    if kind != "BPE" || suffix != Some(END_OF_WORD) {
        return Err(Error::config(
            path,
            format!("expected a CLIP BPE model with end_of_word_suffix `</w>`, found type {kind}, suffix {suffix:?}"),
        ));
    }
    let vocab = vocab_from_value(model.get("vocab").unwrap_or(&Value::Null), path)?;
    let merge_values = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::config(path, "model.merges is not a list"))?;
    let merges = merge_values
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(line) => parse_merge(line),
                Value::Array(parts) => match parts.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| Error::config(path, format!("model.merges[{i}] is not a pair of tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let added = json
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(|t| TokenSpec::from_added_entry(t, None)).collect())
        .unwrap_or_default();
    Ok((vocab, merges, added))
}

/// One added token as the configs describe it.
#[derive(Debug, Clone)]
struct TokenSpec {
    content: String,
    id: Option<u32>,
    normalized: bool,
}

impl TokenSpec {
    /// An `added_tokens_decoder` / `added_tokens` entry: `normalized` defaults to `!special`.
    fn from_added_entry(entry: &Value, id: Option<u32>) -> Option<Self> {
        let content = entry.get("content")?.as_str()?.to_string();
        let special = entry.get("special").and_then(Value::as_bool).unwrap_or(false);
        let normalized = entry.get("normalized").and_then(Value::as_bool).unwrap_or(!special);
        let id = id.or_else(|| entry.get("id").and_then(Value::as_u64).and_then(|i| u32::try_from(i).ok()));
        Some(Self { content, id, normalized })
    }
}

/// Special tokens and max length, resolved as transformers 5 does from the folder's configs.
struct SpecialTokenConfig {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    /// Added tokens in the order transformers adds them; a later entry for the same content
    /// overrides the earlier one's `normalized` flag.
    added: Vec<TokenSpec>,
    max_len: usize,
}

impl SpecialTokenConfig {
    fn read(dir: &Path, file_added: Vec<TokenSpec>) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_json_if_present(&config_path)?.unwrap_or(Value::Null);
        let special_map = read_json_if_present(&map_path)?;

        // With `added_tokens_decoder`, transformers ignores special_tokens_map.json.
        let mut added = file_added;
        let decoder = config.get("added_tokens_decoder").and_then(Value::as_object);
        if let Some(decoder) = decoder {
            added.clear();
            for (id, entry) in decoder {
                let id = id.parse::<u32>().map_err(|_| {
                    Error::config(&config_path, format!("added_tokens_decoder key `{id}` is not a token id"))
                })?;
                let spec = TokenSpec::from_added_entry(entry, Some(id)).ok_or_else(|| {
                    Error::config(&config_path, format!("added_tokens_decoder[{id}] has no `content`"))
                })?;
                added.push(spec);
            }
            added.sort_by_key(|t| t.id);
        }

        // Special tokens named by string take their flags from the listed added tokens only.
        let listed = added.len();
        let mut names = Vec::with_capacity(4);
        for (key, default) in [
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ] {
            let from_map = special_map.as_ref().filter(|_| decoder.is_none()).and_then(|m| m.get(key));
            let (value, path, dict_normalized_default) = match from_map.filter(|v| !v.is_null()) {
                // special_tokens_map.json entries become AddedToken(special=True): normalized=False.
                Some(v) => (v, &map_path, false),
                // tokenizer_config.json's {"__type": "AddedToken"} entries: AddedToken(special=False).
                None => (config.get(key).unwrap_or(&Value::Null), &config_path, true),
            };
            let spec = match value {
                Value::Null => TokenSpec { content: default.to_string(), id: None, normalized: false },
                Value::String(content) => match added[..listed].iter().find(|t| &t.content == content) {
                    Some(existing) => TokenSpec { id: None, ..existing.clone() },
                    None => TokenSpec { content: content.clone(), id: None, normalized: false },
                },
                Value::Object(entry) => {
                    let content = entry
                        .get("content")
                        .and_then(Value::as_str)
                        .ok_or_else(|| Error::config(path, format!("`{key}` has no string `content`")))?;
                    let normalized =
                        entry.get("normalized").and_then(Value::as_bool).unwrap_or(dict_normalized_default);
                    TokenSpec { content: content.to_string(), id: None, normalized }
                }
                other => {
                    return Err(Error::config(
                        path,
                        format!("`{key}` is {other}, expected a string or object"),
                    ))
                }
            };
            names.push(spec.content.clone());
            added.push(spec);
        }
        let [bos, eos, unk, pad]: [String; 4] =
            names.try_into().map_err(|_| Error::config(dir, "special tokens could not be resolved"))?;

        let max_len = match config.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LEN,
            Some(v) => match v.as_u64() {
                Some(n) if n > MAX_SANE_MAX_LEN => DEFAULT_MAX_LEN,
                Some(n) if n >= 2 => n as usize,
                // Numbers too large for u64 (1e30) arrive as floats.
                _ if v.as_f64().is_some_and(|f| f > MAX_SANE_MAX_LEN as f64) => DEFAULT_MAX_LEN,
                _ => {
                    return Err(Error::config(
                        &config_path,
                        format!("model_max_length {v} must be an integer >= 2 (room for bos and eos)"),
                    ))
                }
            },
        };
        Ok(Self { bos, eos, unk, pad, added, max_len })
    }
}
