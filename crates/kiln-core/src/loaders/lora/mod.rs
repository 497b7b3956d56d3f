//! LoRA files: reading them (kohya/sd-scripts, diffusers/PEFT, LyCORIS LoCon), describing them
//! (the kohya `ss_*` / `modelspec.*` metadata: base model, trigger words, training resolution;
//! the family the layers fit) and merging them into a model's weights as it loads.
//!
//! Merging happens in the weight backend ([`merge`]): when a model asks for a tensor that a LoRA
//! patches, it gets `W + Σ weight·scale·(B·A)` instead of `W`, where scale is α/rank. Every
//! transform kiln applies to weights afterwards (fused q/k/v, transposed copies for the gemm,
//! cached Winograd kernels) therefore sees the merged weight, and generating with a LoRA costs
//! nothing extra.

pub mod keys;
pub mod library;
pub mod merge;

pub use keys::Component;
pub use library::{parse_lora_arg, resolve_all, take_prompt_loras, LoraEntry, LoraLibrary};
pub use merge::{merge_without_base, plan, LoraPlan, PlanInput};

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use keys::{KeyProblem, Naming, Part};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The range of a LoRA's weight: wide enough for negative and "overdriven" use (A1111 users go to
/// ±2, some to ±4), narrow enough that a typo (`:80` for `:0.8`) is an error, not a ruined image.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<f64> = -8.0..=8.0;

/// One LoRA asked for: a file and its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRequest {
    /// The name it was asked by (a library name or the path as given).
    pub name: String,
    pub path: PathBuf,
    pub weight: f64,
}

/// A LoRA a model was built with, as metadata, pool keys and replay record it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRecord {
    /// The file's stem (or its library name).
    pub name: String,
    pub sha256: String,
    pub weight: f64,
    /// The file it was read from (replay looks here when the library has no file with the hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// One layer's LoRA: the down (A) and up (B) matrices and its alpha.
#[derive(Debug)]
pub(crate) struct LoraModule {
    pub component: Component,
    pub naming: Naming,
    pub module: String,
    /// The tensor names in the file, for messages.
    pub down_key: String,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }
}

/// A parsed LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    /// The safetensors `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    pub(crate) modules: Vec<LoraModule>,
    /// Tensor names that are no LoRA layer kiln knows.
    pub unknown_keys: Vec<String>,
}

impl LoraFile {
    /// Reads and checks a LoRA file: a readable safetensors file (not truncated), tensors in one
    /// of the known layouts, down/up pairs complete with matching ranks, every value finite.
    pub fn open(path: &Path) -> Result<Self> {
        let header = read_header(path)?;
        let bad = |msg: String| Error::Lora { lora: path.display().to_string(), msg };
        let metadata: BTreeMap<String, String> = header
            .get("__metadata__")
            .and_then(|m| m.as_object())
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read its tensors: {e}")))?;

        // Group the tensors by module.
        type Parts = (Option<(String, Tensor)>, Option<Tensor>, Option<Tensor>);
        let mut groups: BTreeMap<(Component, String), (Naming, Parts)> = BTreeMap::new();
        let mut unknown_keys = Vec::new();
        let mut unsupported: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let tensor = &tensors[name];
            match keys::parse_key(name) {
                Ok(k) => {
                    let entry =
                        groups.entry((k.component, k.module)).or_insert((k.naming, (None, None, None)));
                    match k.part {
                        Part::Down => entry.1 .0 = Some((name.clone(), tensor.clone())),
                        Part::Up => entry.1 .1 = Some(tensor.clone()),
                        Part::Alpha => entry.1 .2 = Some(tensor.clone()),
                    }
                }
                Err(KeyProblem::Unsupported(what)) => unsupported.entry(what).or_default().push(name.clone()),
                Err(KeyProblem::Unknown) => unknown_keys.push(name.clone()),
            }
        }
        if let Some((what, keys)) = unsupported.into_iter().next() {
            return Err(bad(format!(
                "it is a {what} file ({} tensors such as `{}`); kiln merges LoRA and LoCon (down/up pairs) only",
                keys.len(),
                keys[0]
            )));
        }

        let peft = PeftAlphas::from_metadata(&metadata);
        let mut modules = Vec::new();
        for ((component, module), (naming, (down, up, alpha))) in groups {
            let (down_key, down) = down
                .ok_or_else(|| bad(format!("layer `{module}` ({}) has no down matrix", component.label())))?;
            let up = up.ok_or_else(|| bad(format!("`{down_key}` has no matching up matrix")))?;
            check_pair(&down_key, &down, &up).map_err(bad)?;
            check_finite(&down_key, &down).map_err(bad)?;
            check_finite(&down_key.replace("down", "up").replace("lora_A", "lora_B"), &up).map_err(bad)?;
            let alpha = match alpha {
                Some(a) => {
                    let v = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    match v.as_slice() {
                        [x] if x.is_finite() => Some(*x),
                        _ => {
                            return Err(bad(format!(
                                "the alpha of `{module}` is not one finite number ({} values, first {:?})",
                                v.len(),
                                v.first()
                            )))
                        }
                    }
                }
                None => peft.alpha(component, &module, down.dims()[0]),
            };
            modules.push(LoraModule { component, naming, module, down_key, down, up, alpha });
        }
        if modules.is_empty() {
            return Err(bad(format!(
                "no LoRA layers in it ({} tensors, none named like kohya `lora_unet_…`/`lora_te…` or diffusers/PEFT `unet.…lora_A.weight`{})",
                tensors.len(),
                unknown_keys.first().map(|k| format!("; the first is `{k}`")).unwrap_or_default()
            )));
        }
        Ok(Self { path: path.to_path_buf(), metadata, modules, unknown_keys })
    }

    /// What the file says about itself and the family its layers fit.
    pub fn info(&self) -> LoraInfo {
        let m = &self.metadata;
        let get = |k: &str| m.get(k).filter(|v| !v.is_empty() && v.as_str() != "None").cloned();
        let base_model = get("ss_base_model_version")
            .or_else(|| get("modelspec.architecture"))
            .or_else(|| get("ss_sd_model_name"));
        let resolution = get("ss_resolution").or_else(|| get("modelspec.resolution"));
        let mut trigger_words: Vec<String> = get("modelspec.trigger_phrase")
            .map(|t| t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        if let Some(freq) = get("ss_tag_frequency") {
            // {"<repeats>_<folder>": {"tag": count, ...}, ...}: the most frequent tags first.
            let mut counts: HashMap<String, u64> = HashMap::new();
            if let Ok(serde_json::Value::Object(folders)) = serde_json::from_str(&freq) {
                for tags in folders.values().filter_map(|v| v.as_object()) {
                    for (tag, n) in tags {
                        *counts.entry(tag.trim().to_string()).or_default() += n.as_u64().unwrap_or(0);
                    }
                }
            }
            let mut tags: Vec<_> = counts.into_iter().collect();
            tags.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            for (tag, _) in tags.into_iter().take(5) {
                if !trigger_words.contains(&tag) {
                    trigger_words.push(tag);
                }
            }
        }
        let components: Vec<String> = {
            let mut c: Vec<_> = self.modules.iter().map(|m| m.component).collect();
            c.sort();
            c.dedup();
            c.into_iter().map(|c| c.label().to_string()).collect()
        };
        let ranks = {
            let mut r: Vec<usize> = self.modules.iter().map(LoraModule::rank).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        LoraInfo {
            family: self.family_guess(base_model.as_deref()),
            base_model,
            trigger_words,
            resolution,
            layers: self.modules.len(),
            ranks,
            components,
            format: self.format().to_string(),
        }
    }

    /// Every layer: its first tensor's name in the file, rank and alpha (α/rank is its scale at
    /// weight 1; `None` means α = rank).
    pub fn layers(&self) -> Vec<(String, usize, Option<f64>)> {
        self.modules.iter().map(|m| (m.down_key.clone(), m.rank(), m.alpha)).collect()
    }

    /// kohya, LoCon or diffusers/PEFT.
    pub fn format(&self) -> &'static str {
        let flat = self.modules.iter().any(|m| m.naming == Naming::Flat);
        let conv = self.modules.iter().any(|m| m.down.dims().len() == 4 && m.down.dims()[2] > 1);
        match (flat, conv) {
            (true, true) => "kohya LoCon",
            (true, false) => "kohya",
            (false, true) => "diffusers/PEFT (with convolutions)",
            (false, false) => "diffusers/PEFT",
        }
    }

    /// The family the layers fit: from the metadata when it says, else from the layers (a second
    /// text encoder, a FLUX or Z-Image transformer's blocks, the width of the UNet's text
    /// cross-attention).
    fn family_guess(&self, base_model: Option<&str>) -> Option<String> {
        if let Some(b) = base_model.map(str::to_ascii_lowercase) {
            for (needle, family) in [
                ("z_image", "zimage"),
                ("z-image", "zimage"),
                ("zimage", "zimage"),
                ("sdxl", "sdxl"),
                ("flux", "flux"),
                ("sd_v2", "sd2"),
                ("v2", "sd2"),
                ("sd_v1", "sd1"),
                ("v1", "sd1"),
            ] {
                if b.contains(needle) {
                    return Some(family.to_string());
                }
            }
        }
        let names = || self.modules.iter().map(|m| m.module.as_str());
        if names().any(|n| {
            n.contains("double_blocks") || n.contains("single_transformer_blocks") || n.contains("ff_context")
        }) {
            return Some("flux".into());
        }
        // Z-Image's refiners and its feed-forward names (w1/w2/w3) are its own.
        if names().any(|n| {
            n.contains("noise_refiner") || n.contains("context_refiner") || n.contains("feed_forward")
        }) {
            return Some("zimage".into());
        }
        if self.modules.iter().any(|m| m.component == Component::Text2) {
            return Some("sdxl".into());
        }
        let cross = self.modules.iter().find(|m| {
            m.component == Component::Denoiser
                && (m.module.ends_with("attn2_to_k") || m.module.ends_with("attn2.to_k"))
        })?;
        match cross.down.dims().get(1)? {
            768 => Some("sd1".into()),
            1024 => Some("sd2".into()),
            2048 => Some("sdxl".into()),
            _ => None,
        }
    }
}

/// What `kiln loras show` prints about a LoRA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraInfo {
    pub format: String,
    /// sd1, sd2, sdxl, flux or zimage, when the file or its layers say.
    pub family: Option<String>,
    pub base_model: Option<String>,
    pub trigger_words: Vec<String>,
    pub resolution: Option<String>,
    pub layers: usize,
    pub ranks: Vec<usize>,
    pub components: Vec<String>,
}

/// Checks a LoRA weight against [`WEIGHT_RANGE`].
pub fn check_weight(name: &str, weight: f64) -> Result<f64> {
    if !weight.is_finite() || !WEIGHT_RANGE.contains(&weight) {
        return Err(Error::arg(
            "lora",
            format!(
                "the weight of `{name}` is {weight}, outside {}..={}",
                WEIGHT_RANGE.start(),
                WEIGHT_RANGE.end()
            ),
        ));
    }
    Ok(weight)
}

/// Down `[r, in, (kh, kw)]` and up `[out, r, (1, 1)]` must share the rank r.
fn check_pair(down_key: &str, down: &Tensor, up: &Tensor) -> std::result::Result<(), String> {
    let (d, u) = (down.dims(), up.dims());
    let ok = matches!(d.len(), 2 | 4)
        && matches!(u.len(), 2 | 4)
        && u[1] == d[0]
        && u[2..].iter().all(|&k| k == 1);
    if !ok || d[0] == 0 {
        return Err(format!("`{down_key}` has shape {d:?} but its up matrix {u:?}: not a rank-r pair"));
    }
    Ok(())
}

fn check_finite(key: &str, t: &Tensor) -> std::result::Result<(), String> {
    let sum = t
        .to_dtype(DType::F32)
        .and_then(|t| t.abs())
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_scalar::<f32>())
        .map_err(|e| format!("`{key}`: {e}"))?;
    if !sum.is_finite() {
        return Err(format!("`{key}` holds NaN or infinite values"));
    }
    Ok(())
}

/// The safetensors header as JSON, after checking that the file is complete.
fn read_header(path: &Path) -> Result<serde_json::Value> {
    crate::loaders::weights::validate_header(path).map_err(|e| match e {
        Error::Weights { path, msg } => Error::Lora { lora: path.display().to_string(), msg },
        other => other,
    })?;
    let mut file = fs_err::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header)?;
    serde_json::from_slice(&header).map_err(|e| Error::Lora {
        lora: path.display().to_string(),
        msg: format!("header is not valid JSON: {e}"),
    })
}

/// Alphas from diffusers' `lora_adapter_metadata` (PEFT's LoraConfig per component, flattened
/// as `<component>.lora_alpha`, `<component>.alpha_pattern`, `<component>.use_rslora`).
#[derive(Debug, Default)]
struct PeftAlphas {
    per_component: HashMap<Component, PeftConfig>,
}

/// The parts of one component's PEFT LoraConfig that set the scale.
#[derive(Debug)]
struct PeftConfig {
    lora_alpha: f64,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl PeftAlphas {
    fn from_metadata(metadata: &BTreeMap<String, String>) -> Self {
        let mut out = Self::default();
        let Some(json) = metadata.get("lora_adapter_metadata") else { return out };
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(json) else { return out };
        for (prefix, component) in [
            ("unet", Component::Denoiser),
            ("transformer", Component::Denoiser),
            ("text_encoder", Component::Text1),
            ("text_encoder_2", Component::Text2),
        ] {
            let Some(lora_alpha) = map.get(&format!("{prefix}.lora_alpha")).and_then(|v| v.as_f64()) else {
                continue;
            };
            let patterns = map
                .get(&format!("{prefix}.alpha_pattern"))
                .and_then(|v| v.as_object())
                .map(|p| p.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
                .unwrap_or_default();
            let use_rslora =
                map.get(&format!("{prefix}.use_rslora")).and_then(|v| v.as_bool()).unwrap_or(false);
            out.per_component
                .insert(component, PeftConfig { lora_alpha, alpha_pattern: patterns, use_rslora });
        }
        out
    }

    /// The alpha that makes α/rank PEFT's scaling (`lora_alpha / r`, or `/ √r` with rsLoRA);
    /// `None` (= rank, scale 1) without metadata, as diffusers does.
    fn alpha(&self, component: Component, module: &str, rank: usize) -> Option<f64> {
        let cfg = self.per_component.get(&component)?;
        // PEFT matches a pattern against the end of the module path at a dot boundary.
        let pattern =
            cfg.alpha_pattern.iter().find(|(p, _)| module == p || module.ends_with(&format!(".{p}")));
        let a = pattern.map_or(cfg.lora_alpha, |(_, a)| *a);
        Some(if cfg.use_rslora { a * (rank as f64).sqrt() } else { a })
    }
}

impl LoraRecord {
    /// The request that merges this recorded LoRA again, from [`locate_recorded`]'s file.
    pub fn request(&self) -> Result<LoraRequest> {
        Ok(LoraRequest { name: self.name.clone(), path: locate_recorded(self)?, weight: self.weight })
    }
}

/// The file of a recorded LoRA: the library's copy with its sha256, else the recorded path when
/// its content still has that hash. Replay uses it to merge the very same weights.
pub fn locate_recorded(record: &LoraRecord) -> Result<PathBuf> {
    if let Ok(library) = LoraLibrary::open_default() {
        let blob = library.blob_path(&record.sha256);
        if blob.is_file() {
            return Ok(blob);
        }
    }
    if let Some(p) = record.path.as_deref().map(Path::new) {
        if p.is_file() && crate::loaders::weights::sha256_file(p)? == record.sha256 {
            return Ok(p.to_path_buf());
        }
    }
    Err(Error::not_found(
        format!("LoRA `{}` (sha256 {})", record.name, record.sha256),
        record.path.clone().map(PathBuf::from).unwrap_or_default(),
        "import the LoRA file with `kiln loras import FILE` so replay can find it by its hash",
    ))
}

/// What identifies a set of LoRAs for the model pool: each file's sha256 and weight, in order
/// (merging is a sum, but the order of float additions changes the last bit, and replay needs
/// the very weights). Empty for none.
pub fn pool_key(loras: &[LoraRequest]) -> Result<String> {
    let mut parts = Vec::new();
    for l in loras {
        parts.push(format!("{}*{}", crate::loaders::weights::weight_sha256_cached(&l.path)?, l.weight));
    }
    Ok(parts.join("+"))
}
