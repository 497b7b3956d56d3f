//! The LoRA library: imported LoRA files in a content-addressed store under the user's data dir,
//! and how a LoRA is named on the command line, in specs and in prompts.
//!
//! Layout: `<data>/loras/blobs/<sha256>.safetensors` (the file as imported, byte for byte) and
//! `<data>/loras/index.json` (name -> sha256, source file name, what the file says about itself).
//! A name is the file's stem unless given; a LoRA is used by name or by path.

use super::{check_weight, LoraFile, LoraInfo, LoraRequest};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One imported LoRA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraEntry {
    pub name: String,
    pub sha256: String,
    /// The file name it was imported from.
    pub source: String,
    pub bytes: u64,
    pub info: LoraInfo,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    loras: BTreeMap<String, LoraEntry>,
}

/// The LoRA store rooted at a data dir.
#[derive(Debug, Clone)]
pub struct LoraLibrary {
    root: PathBuf,
}

impl LoraLibrary {
    /// The store under kiln's data dir.
    pub fn open_default() -> Result<Self> {
        Ok(Self::at(crate::loaders::store::data_dir()?))
    }

    pub fn at(data_dir: impl Into<PathBuf>) -> Self {
        Self { root: data_dir.into().join("loras") }
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{sha256}.safetensors"))
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.index_path();
        if !path.is_file() {
            return Ok(Index::default());
        }
        let text = fs_err::read_to_string(&path)?;
        serde_json::from_str(&text).map_err(|e| Error::config(&path, e.to_string()))
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let text = serde_json::to_string_pretty(index)
            .map_err(|e| Error::config(self.index_path(), e.to_string()))?;
        crate::files::write_atomic(&self.index_path(), text.as_bytes())
    }

    pub fn list(&self) -> Result<Vec<LoraEntry>> {
        Ok(self.read_index()?.loras.into_values().collect())
    }

    /// The entry named `name` (case-insensitive).
    pub fn find(&self, name: &str) -> Result<Option<LoraEntry>> {
        Ok(self.read_index()?.loras.into_values().find(|e| e.name.eq_ignore_ascii_case(name)))
    }

    /// Imports LoRA files: each is read and checked in full first (a bad file is refused by
    /// name and nothing of the batch is written), then copied into the store under its sha256.
    /// A name already taken by other weights is refused unless `replace`.
    pub fn import(&self, paths: &[PathBuf], replace: bool) -> Result<Vec<LoraEntry>> {
        let mut incoming = Vec::new();
        for path in paths {
            let file = LoraFile::open(path)?;
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let sha256 = crate::loaders::weights::sha256_file(path)?;
            let bytes = fs_err::metadata(path)?.len();
            let source = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            incoming.push((path, LoraEntry { name, sha256, source, bytes, info: file.info() }));
        }
        let mut index = self.read_index()?;
        if !replace {
            let stored: Vec<_> =
                index.loras.values().map(|e| (e.name.as_str(), e.sha256.as_str(), "LoRA")).collect();
            let new: Vec<_> =
                incoming.iter().map(|(_, e)| (e.name.as_str(), e.sha256.as_str(), "LoRA")).collect();
            crate::loaders::check_import_names(&stored, &new)?;
        }
        for (path, entry) in &incoming {
            let blob = self.blob_path(&entry.sha256);
            if !blob.is_file() {
                crate::files::write_atomic(&blob, &fs_err::read(path)?)?;
            }
            index.loras.retain(|_, e| !e.name.eq_ignore_ascii_case(&entry.name));
            index.loras.insert(entry.name.clone(), entry.clone());
        }
        self.write_index(&index)?;
        Ok(incoming.into_iter().map(|(_, e)| e).collect())
    }

    /// A LoRA by library name, or by path to a file (see [`is_path`]).
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf> {
        if is_path(name_or_path) {
            return existing_file(name_or_path);
        }
        match self.find(name_or_path)? {
            Some(entry) => Ok(self.blob_path(&entry.sha256)),
            None => Err(Error::arg(
                "lora",
                format!("`{name_or_path}` is neither a file nor an imported LoRA (see `kiln loras list`; import with `kiln loras import FILE`)"),
            )),
        }
    }
}

/// A LoRA given by path: the file, which must exist.
fn existing_file(path: &str) -> Result<PathBuf> {
    let path = Path::new(path);
    if !path.is_file() {
        return Err(Error::not_found("LoRA file", path, "pass a .safetensors LoRA or an imported name"));
    }
    Ok(path.to_path_buf())
}

/// Whether a LoRA argument names a file (it has a path separator or a `.safetensors` ending)
/// rather than a library entry. Names never touch the filesystem outside the store, so a
/// request from the network can be limited to names.
pub fn is_path(arg: &str) -> bool {
    arg.contains(['/', '\\']) || arg.to_ascii_lowercase().ends_with(".safetensors")
}

/// `NAME|PATH[:WEIGHT]` taken apart: the weight is the part after the last `:` when it is a
/// number (so `C:\loras\a.safetensors` stays a path), 1 otherwise.
pub fn parse_lora_arg(arg: &str) -> Result<(String, f64)> {
    let (name, weight) = match arg.rsplit_once(':') {
        Some((name, w)) if !name.is_empty() && w.trim().parse::<f64>().is_ok() => {
            (name.to_string(), w.trim().parse::<f64>().unwrap_or(1.0))
        }
        _ => (arg.to_string(), 1.0),
    };
    if name.trim().is_empty() {
        return Err(Error::arg("lora", format!("`{arg}` names no LoRA (NAME|PATH[:WEIGHT])")));
    }
    Ok((name.clone(), check_weight(&name, weight)?))
}

/// A1111's `<lora:NAME:WEIGHT>` tags (and `<lyco:…>`, the LyCORIS extension's spelling, which
/// A1111 reads the same way) taken out of a prompt: the prompt without them, and each
/// tag as `NAME:WEIGHT`. A1111's separate text-encoder/UNet weights (`<lora:NAME:0.8:0.5>`)
/// are refused rather than half-honoured.
pub fn take_prompt_loras(prompt: &str) -> Result<(String, Vec<String>)> {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    let next_tag = |s: &str| [s.find("<lora:"), s.find("<lyco:")].into_iter().flatten().min();
    while let Some(start) = next_tag(rest) {
        let Some(len) = rest[start..].find('>') else { break };
        out.push_str(&rest[..start]);
        // Both spellings are 6 bytes before the name.
        let body = &rest[start + "<lora:".len()..start + len];
        let parts: Vec<&str> = body.split(':').collect();
        let tag = match parts.as_slice() {
            [name] => format!("{}:1", name.trim()),
            [name, w] if w.trim().parse::<f64>().is_ok() => format!("{}:{}", name.trim(), w.trim()),
            _ => {
                return Err(Error::arg(
                    "prompt",
                    format!("`<lora:{body}>`: kiln takes <lora:NAME> or <lora:NAME:WEIGHT> (one weight for all of the model)"),
                ))
            }
        };
        parse_lora_arg(&tag)?;
        tags.push(tag);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    // Tags removed from "a, <lora:x:1> b" leave doubled spaces; diffusers would see them as is,
    // A1111 too, so only the ends are trimmed.
    Ok((out.trim().to_string(), tags))
}

/// Resolves `NAME|PATH[:WEIGHT]` arguments against the library (opened only when a name needs it).
pub fn resolve_all(args: &[String]) -> Result<Vec<LoraRequest>> {
    let mut library = None;
    let mut out = Vec::new();
    for arg in args {
        let (name, weight) = parse_lora_arg(arg)?;
        let path = if is_path(&name) {
            existing_file(&name)?
        } else {
            if library.is_none() {
                library = Some(LoraLibrary::open_default()?);
            }
            library.as_ref().map(|l| l.resolve(&name)).transpose()?.unwrap_or_default()
        };
        out.push(LoraRequest { name, path, weight });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lora_args_and_prompt_tags() {
        assert_eq!(parse_lora_arg("style").unwrap(), ("style".into(), 1.0));
        assert_eq!(parse_lora_arg("style:0.6").unwrap(), ("style".into(), 0.6));
        assert_eq!(parse_lora_arg("C:\\l\\a.safetensors").unwrap().0, "C:\\l\\a.safetensors");
        assert!(parse_lora_arg("style:80").is_err());
        let (p, tags) = take_prompt_loras("a fox <lora:ink:0.7>, snow <lora:grain>").unwrap();
        assert_eq!(p, "a fox , snow");
        assert_eq!(tags, ["ink:0.7", "grain:1"]);
        let (p, tags) = take_prompt_loras("<lyco:paper:0.3> a fox <lora:ink>").unwrap();
        assert_eq!((p.as_str(), tags), ("a fox", vec!["paper:0.3".to_string(), "ink:1".to_string()]));
        assert!(take_prompt_loras("<lora:ink:0.7:0.2>").is_err());
    }
}
