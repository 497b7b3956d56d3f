//! Model references: a local folder, or a Hugging Face hub id resolved through the standard
//! hub cache (shared with diffusers/transformers). Offline (HF_HUB_OFFLINE, or no network) only
//! the cache is used, with a clear error when the model is not there — never a hang.

use crate::env;
use crate::error::{Error, Result};
use crate::loaders::diffusers::{weight_files_in, DiffusersFolder};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

const HUB_HOST: &str = "huggingface.co:443";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a model came from, as recorded in metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local diffusers folder.
    Folder(PathBuf),
    /// A hub repo (and revision), resolved to its snapshot folder in the cache.
    Hub { repo: String, revision: String, snapshot: PathBuf },
}

impl ModelSource {
    /// The folder the files are read from.
    pub fn dir(&self) -> &Path {
        match self {
            ModelSource::Folder(p) => p,
            ModelSource::Hub { snapshot, .. } => snapshot,
        }
    }

    /// A short display name: the hub id or the folder's name.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Folder(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            ModelSource::Hub { repo, .. } => repo.clone(),
        }
    }
}

/// True when `spec` looks like a hub id (`owner/name`) rather than a path.
pub fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with('.')
        })
}

/// The hub cache folder: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env::HF_HUB_CACHE) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os(env::HF_HOME) {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os(env::HOME).map(|h| PathBuf::from(h).join(".cache").join("huggingface").join("hub"))
}

/// What a hub repo is expected to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// A diffusers pipeline (model_index.json + component folders).
    Pipeline,
    /// A bare VAE (config.json + diffusion_pytorch_model[.fp16].safetensors at its root, as
    /// madebyollin/sdxl-vae-fp16-fix).
    BareVae,
}

impl Layout {
    /// What the user named, for errors.
    fn what(self) -> &'static str {
        match self {
            Layout::Pipeline => "model",
            Layout::BareVae => "VAE",
        }
    }

    /// How to pass one instead.
    fn folder_hint(self) -> &'static str {
        match self {
            Layout::Pipeline => {
                "pass a diffusers folder (with model_index.json) or a hub id such as stabilityai/sd-turbo"
            }
            Layout::BareVae => "pass a VAE folder (config.json + safetensors) or a hub id",
        }
    }

    /// Where a local folder goes instead.
    fn local_flag(self) -> &'static str {
        match self {
            Layout::Pipeline => "--model DIR",
            Layout::BareVae => "a tier's `vae = \"DIR\"`",
        }
    }

    /// The snapshot folder when the cache holds everything this layout needs.
    fn cached(self, cache: &Cache, repo: &Repo, prefer_fp16: bool) -> Option<PathBuf> {
        match self {
            Layout::Pipeline => cached_snapshot(cache, repo, prefer_fp16),
            Layout::BareVae => {
                let config = cache.repo(repo.clone()).get("config.json")?;
                let snapshot = config.parent()?.to_path_buf();
                weight_files_in(&snapshot, prefer_fp16).is_ok().then_some(snapshot)
            }
        }
    }
}

/// Resolves `--model`: an existing folder, or a hub id (cache first, then download).
pub fn resolve(spec: &str, revision: Option<&str>, prefer_fp16: bool, progress: bool) -> Result<ModelSource> {
    resolve_as(Layout::Pipeline, spec, revision, prefer_fp16, progress)
}

/// Resolves a VAE override: an existing folder, or a hub repo holding a bare VAE.
pub fn resolve_vae(
    spec: &str,
    revision: Option<&str>,
    prefer_fp16: bool,
    progress: bool,
) -> Result<ModelSource> {
    resolve_as(Layout::BareVae, spec, revision, prefer_fp16, progress)
}

fn resolve_as(
    layout: Layout,
    spec: &str,
    revision: Option<&str>,
    prefer_fp16: bool,
    progress: bool,
) -> Result<ModelSource> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelSource::Folder(path.to_path_buf()));
    }
    if !is_hub_id(spec) || path.exists() {
        return Err(Error::not_found(format!("{} folder", layout.what()), path, layout.folder_hint()));
    }
    let revision = revision.unwrap_or("main").to_string();
    let repo = Repo::with_revision(spec.to_string(), RepoType::Model, revision.clone());
    let cache_root = cache_dir().ok_or_else(|| Error::Hub {
        repo: spec.into(),
        msg: "no hub cache folder (set HF_HOME or HOME)".into(),
    })?;
    let cache = Cache::new(cache_root.clone());
    if let Some(snapshot) = layout.cached(&cache, &repo, prefer_fp16) {
        return Ok(ModelSource::Hub { repo: spec.into(), revision, snapshot });
    }
    let local_hint = format!(
        "download it where the hub is reachable (`huggingface-cli download {spec}`) into {}, or pass a local folder with {}",
        cache_root.display(),
        layout.local_flag()
    );
    let what = layout.what();
    if env::flag(env::HF_HUB_OFFLINE) {
        return Err(Error::Hub {
            repo: spec.into(),
            msg: format!("{what} not in the local hub cache and HF_HUB_OFFLINE is set; {local_hint}"),
        });
    }
    if !hub_reachable() {
        return Err(Error::Hub {
            repo: spec.into(),
            msg: format!("{what} not in the local hub cache and huggingface.co is unreachable; {local_hint}"),
        });
    }
    let hub_err = |msg: String| Error::Hub { repo: spec.into(), msg };
    let api = ApiBuilder::from_cache(cache)
        .with_progress(progress)
        .with_token(std::env::var(env::HF_TOKEN).ok())
        .build()
        .map_err(|e| hub_err(e.to_string()))?;
    let api_repo = api.repo(repo);
    let info = api_repo.info().map_err(|e| hub_err(format!("cannot list files: {e}")))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let (wanted, anchor) = match layout {
        Layout::Pipeline => (select_files(&files, prefer_fp16), "model_index.json"),
        Layout::BareVae => (select_vae_files(&files, prefer_fp16), "config.json"),
    };
    if !wanted.iter().any(|f| f == anchor) {
        return Err(hub_err(match layout {
            Layout::Pipeline => "no model_index.json: not a diffusers pipeline repo".into(),
            Layout::BareVae => {
                "no config.json and diffusion_pytorch_model safetensors at the repo root".into()
            }
        }));
    }
    let mut snapshot = None;
    for file in &wanted {
        let local = api_repo.get(file).map_err(|e| hub_err(format!("downloading {file}: {e}")))?;
        if file == anchor {
            snapshot = local.parent().map(Path::to_path_buf);
        }
    }
    let snapshot = snapshot.ok_or_else(|| hub_err("download produced no snapshot folder".into()))?;
    Ok(ModelSource::Hub { repo: spec.into(), revision, snapshot })
}

/// The files of a bare-VAE repo: config.json and one weight variant at the root (fp16 when
/// preferred and present); empty when either is missing.
fn select_vae_files(files: &[String], prefer_fp16: bool) -> Vec<String> {
    let variants = if prefer_fp16 { [".fp16", ""] } else { ["", ".fp16"] };
    let weights = variants
        .iter()
        .map(|v| format!("diffusion_pytorch_model{v}.safetensors"))
        .find(|n| files.contains(n));
    match weights {
        Some(w) if files.iter().any(|f| f == "config.json") => vec!["config.json".to_string(), w],
        _ => Vec::new(),
    }
}

/// The cached snapshot folder when it holds a complete pipeline.
fn cached_snapshot(cache: &Cache, repo: &Repo, prefer_fp16: bool) -> Option<PathBuf> {
    let index = cache.repo(repo.clone()).get("model_index.json")?;
    let snapshot = index.parent()?.to_path_buf();
    let folder = DiffusersFolder::open(&snapshot).ok()?;
    complete(&folder, prefer_fp16).then_some(snapshot)
}

/// Whether every model component has its config and weights.
fn complete(folder: &DiffusersFolder, prefer_fp16: bool) -> bool {
    ["unet", "transformer", "vae", "text_encoder", "text_encoder_2"]
        .iter()
        .filter(|c| folder.has(c))
        .all(|c| folder.config(c).is_ok() && folder.weight_files(c, prefer_fp16).is_ok())
}

/// A bounded connectivity check, so a machine without network fails in seconds, not minutes.
fn hub_reachable() -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ok = HUB_HOST
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .is_some_and(|addr| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok());
        let _ = tx.send(ok);
    });
    rx.recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(5)).unwrap_or(false)
}

/// Picks the files of a pipeline repo kiln needs: model_index.json, component configs and
/// tokenizer files, and per component one safetensors variant (fp16 when preferred and present).
pub fn select_files(files: &[String], prefer_fp16: bool) -> Vec<String> {
    const SMALL: [&str; 7] = [
        "config.json",
        "scheduler_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
    ];
    let mut out: Vec<String> = Vec::new();
    let mut by_dir: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for f in files {
        let (dir, name) = f.rsplit_once('/').unwrap_or(("", f.as_str()));
        if dir.contains('/') {
            continue; // nested folders are not pipeline components
        }
        let top_level_index = dir.is_empty() && name == "model_index.json";
        let component_small = !dir.is_empty() && SMALL.contains(&name);
        if top_level_index || component_small {
            out.push(f.clone());
        } else if !dir.is_empty()
            && (name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json"))
        {
            by_dir.entry(dir).or_default().push(name);
        }
    }
    for (dir, names) in by_dir {
        let is_fp16 = |n: &&str| n.contains(".fp16.") || n.contains(".index.fp16.");
        let fp16: Vec<&str> = names.iter().copied().filter(is_fp16).collect();
        let full: Vec<&str> = names.iter().copied().filter(|n| !is_fp16(n)).collect();
        let chosen = match (prefer_fp16 && !fp16.is_empty(), full.is_empty()) {
            (true, _) | (false, true) => fp16,
            _ => full,
        };
        out.extend(chosen.into_iter().map(|n| format!("{dir}/{n}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths() {
        assert!(is_hub_id("stabilityai/sd-turbo"));
        assert!(is_hub_id("madebyollin/sdxl-vae-fp16-fix"));
        assert!(!is_hub_id("./models/x"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("plain"));
    }

    #[test]
    fn selects_one_weight_variant_per_component() {
        let files: Vec<String> = [
            "model_index.json",
            "README.md",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let fp16 = select_files(&files, true);
        assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!fp16.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(fp16.contains(&"text_encoder/model.safetensors".to_string()));
        let full = select_files(&files, false);
        assert!(full.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        // fp16-only components still get their fp16 file.
        assert!(full.contains(&"vae/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!full.iter().any(|f| f.ends_with(".bin") || f == "README.md"));
        assert!(full.contains(&"model_index.json".to_string()));
        assert!(full.contains(&"tokenizer/merges.txt".to_string()));
    }
}
