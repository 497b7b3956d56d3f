//! Tier registry: named model configurations (draft, final, upscale, ...) with their pins,
//! defaults and price, resolved from three TOML layers, later ones overriding single keys:
//!
//! 1. kiln's shipped `models/tiers.toml` (compiled in);
//! 2. the user's `$XDG_CONFIG_HOME/kiln/tiers.toml` (`~/.config/kiln/tiers.toml`);
//! 3. the project's `kiln.toml` (its `[tiers.NAME]` tables).
//!
//! - [`load`]: loading a tier's model and filling a request from its defaults;
//! - [`drift`]: the project lock of weight hashes and the drift guard;
//! - [`presets`]: brand kits (`[presets.NAME]`), from the same user and project layers.

pub mod drift;
pub mod load;
pub mod presets;

use crate::error::{Error, Result};
use crate::pipeline::model::WeightRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The value of `revision`, `vae_revision` or a `weights` entry that leaves it unpinned on
/// purpose (trust on first use), instead of silently absent.
pub const UNPINNED: &str = "unpinned";

/// The registry kiln ships, compiled in so the binary works from any folder.
pub const BUILTIN_TIERS: &str = include_str!("../../../../models/tiers.toml");
/// Where the built-in layer is reported to come from.
pub const BUILTIN_NAME: &str = "<built-in models/tiers.toml>";

/// What a tier runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TierKind {
    /// A diffusers pipeline (txt2img / img2img).
    #[default]
    Diffusion,
    /// A super-resolution model (run by `kiln upscale`).
    Upscale,
}

/// A tier's price. Both parts may be set; a job costs `images × per_image + seconds × per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub credits_per_image: f64,
    /// Per second of device time (GPU-seconds on a GPU; on the CPU the same clock is used).
    #[serde(default)]
    pub credits_per_gpu_second: f64,
}

impl Price {
    /// The credits a job of `images` images taking `device_seconds` costs.
    pub fn cost(&self, images: usize, device_seconds: f64) -> f64 {
        self.credits_per_image * images as f64 + self.credits_per_gpu_second * device_seconds.max(0.0)
    }
}

/// One resolved tier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tier {
    pub name: String,
    pub description: String,
    pub kind: TierKind,
    /// Hub id or (absolute, once resolved) local folder.
    pub model: String,
    /// Hub commit; None = unpinned (the hub's `main`).
    pub revision: Option<String>,
    /// A VAE to use instead of the pipeline's own (hub id or folder).
    pub vae: Option<String>,
    pub vae_revision: Option<String>,
    /// Pinned weight hashes: "component/file" → sha256 (e.g. "unet/diffusion_pytorch_model.safetensors").
    pub weights: BTreeMap<String, String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<String>,
    /// "auto", "f32", "f16" or "bf16".
    pub dtype: Option<String>,
    pub negative_prompt: Option<String>,
    /// Upscale tiers: the model's scale factor.
    pub scale: Option<u32>,
    /// Queue lane and asset kind of its images: "draft" (runs first, counts as a draft) or
    /// "final". Default: "draft" for a tier named draft, "final" otherwise.
    pub lane: Option<String>,
    pub price: Price,
    /// LoRAs merged into the tier's model, `NAME|PATH[:WEIGHT]` each (relative paths resolve
    /// against the layer file's folder); pinned by kiln.lock like the model's own files.
    pub loras: Vec<String>,
    /// Pins the layers set to [`UNPINNED`] on purpose: "revision", "vae_revision" or a weight
    /// key. Trust on first use: the project's kiln.lock records what was loaded the first time.
    pub unpinned: Vec<String>,
    /// The layer that last set `model` (for error messages).
    pub defined_in: String,
}

impl Tier {
    /// Bytes of weight files its model has on this box (a local folder or file; 0 when the
    /// model is a hub id or missing here): what a worker needs free to hold it, for placement.
    pub fn weights_on_disk(&self) -> u64 {
        let path = std::path::Path::new(&self.model);
        let is_weights = |p: &std::path::Path| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("safetensors" | "bin" | "pth" | "ckpt" | "gguf")
            )
        };
        let files = if path.is_file() {
            vec![path.to_path_buf()]
        } else if path.is_dir() {
            crate::files::walk_files(path).unwrap_or_default()
        } else {
            Vec::new()
        };
        files
            .iter()
            .filter(|p| is_weights(p))
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Whether this tier's images are drafts (queue lane and asset kind); see [`Tier::lane`].
    pub fn is_draft(&self) -> bool {
        match self.lane.as_deref() {
            Some(l) => l == "draft",
            None => self.name == "draft",
        }
    }

    /// A tier with no defaults: `--model` without `--tier` (the model's own defaults apply).
    pub fn untiered() -> Self {
        Self {
            name: String::new(),
            description: String::new(),
            kind: TierKind::Diffusion,
            model: String::new(),
            revision: None,
            vae: None,
            vae_revision: None,
            weights: BTreeMap::new(),
            width: None,
            height: None,
            steps: None,
            guidance: None,
            scheduler: None,
            dtype: None,
            negative_prompt: None,
            scale: None,
            lane: None,
            price: Price::default(),
            loras: Vec::new(),
            unpinned: Vec::new(),
            defined_in: String::new(),
        }
    }

    /// Whether the model's revision and weights are pinned.
    pub fn pin_status(&self) -> String {
        let rev = if self.revision.is_some() || !crate::loaders::hub::is_hub_id(&self.model) {
            "revision pinned"
        } else {
            "revision unpinned"
        };
        let weights = if self.weights.is_empty() {
            "weights unpinned".to_string()
        } else {
            format!("{} weight file(s) pinned", self.weights.len())
        };
        let tofu = self.unpinned.iter().filter(|k| !k.contains("revision")).count();
        if tofu > 0 {
            format!("{rev}, {weights}, {tofu} explicitly unpinned (trust on first use)")
        } else {
            format!("{rev}, {weights}")
        }
    }

    /// A warning for a first use of a tier with explicitly unpinned parts (None otherwise).
    pub fn trust_on_first_use_warning(&self) -> Option<String> {
        (!self.unpinned.is_empty()).then(|| {
            format!(
                "tier `{}` is not fully pinned ({} = \"{UNPINNED}\"): trusting the files loaded now; \
                 kiln.lock pins their sha256 from here on. Verify them and pin them in kiln.toml",
                self.name,
                self.unpinned.join(", ")
            )
        })
    }

    /// Pin problems: pinned files whose loaded hash differs ("component/file: pinned X, found
    /// Y"), and pins that match none of the loaded files (pins written for another model).
    pub fn pin_problems(&self, loaded: &[WeightRecord]) -> Vec<String> {
        let mut out = self.weight_mismatches(loaded);
        let keys: Vec<String> = loaded.iter().map(|r| format!("{}/{}", r.component, r.file)).collect();
        if !self.weights.is_empty() && !self.weights.keys().any(|k| keys.contains(k)) {
            out.push(format!(
                "none of the pinned files ({}) was loaded; loaded: {}",
                self.weights.keys().cloned().collect::<Vec<_>>().join(", "),
                keys.join(", ")
            ));
        }
        out
    }

    /// Pinned files whose loaded hash differs: "component/file: pinned X, found Y".
    pub fn weight_mismatches(&self, loaded: &[WeightRecord]) -> Vec<String> {
        let mut out = Vec::new();
        for record in loaded {
            let key = format!("{}/{}", record.component, record.file);
            if let Some(pinned) = self.weights.get(&key) {
                if !pinned.eq_ignore_ascii_case(&record.sha256) {
                    out.push(format!("{key}: pinned {pinned}, found {}", record.sha256));
                }
            }
        }
        out
    }
}

/// One layer's view of a tier: every key optional, unknown keys refused (typos fail loudly).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierLayer {
    description: Option<String>,
    kind: Option<TierKind>,
    model: Option<String>,
    revision: Option<String>,
    vae: Option<String>,
    vae_revision: Option<String>,
    weights: Option<BTreeMap<String, String>>,
    width: Option<usize>,
    height: Option<usize>,
    steps: Option<usize>,
    guidance: Option<f64>,
    scheduler: Option<String>,
    dtype: Option<String>,
    negative_prompt: Option<String>,
    scale: Option<u32>,
    lane: Option<String>,
    price: Option<PriceLayer>,
    loras: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceLayer {
    credits_per_image: Option<f64>,
    credits_per_gpu_second: Option<f64>,
}

/// The `tiers` table of a layer file; other top-level tables (a kiln.toml's budget, ...) are
/// someone else's.
#[derive(Debug, Default, Deserialize)]
struct LayerFile {
    #[serde(default)]
    tiers: BTreeMap<String, TierLayer>,
}

/// The resolved tiers and the layer files they came from.
#[derive(Debug, Clone, Serialize)]
pub struct TierRegistry {
    pub tiers: BTreeMap<String, Tier>,
    /// Layer files read, lowest first.
    pub layers: Vec<String>,
}

/// The user's tier file: $XDG_CONFIG_HOME/kiln/tiers.toml, else ~/.config/kiln/tiers.toml.
pub fn user_tiers_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(crate::env::XDG_CONFIG_HOME).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p).join("kiln").join("tiers.toml"));
    }
    std::env::var_os(crate::env::HOME)
        .map(|h| PathBuf::from(h).join(".config").join("kiln").join("tiers.toml"))
}

impl TierRegistry {
    /// The shipped defaults alone.
    pub fn builtin() -> Result<Self> {
        Self::load(None, None)
    }

    /// The built-in layer, the user's file and the project's kiln.toml (absent files are skipped).
    pub fn discover(project_root: Option<&Path>) -> Result<Self> {
        let user = user_tiers_file();
        let project = project_root.map(|r| r.join("kiln.toml"));
        Self::load(user.as_deref(), project.as_deref())
    }

    /// Resolves the built-in layer, then `user`, then `project` (each skipped when absent).
    pub fn load(user: Option<&Path>, project: Option<&Path>) -> Result<Self> {
        let mut merged: BTreeMap<String, (TierLayer, String)> = BTreeMap::new();
        let mut layers = vec![BUILTIN_NAME.to_string()];
        let builtin = parse_layer(BUILTIN_TIERS, Path::new(BUILTIN_NAME))?;
        merge(&mut merged, builtin, None, BUILTIN_NAME);
        for path in [user, project].into_iter().flatten() {
            if !path.is_file() {
                continue;
            }
            let text = fs_err::read_to_string(path)?;
            let layer = parse_layer(&text, path)?;
            let name = path.display().to_string();
            merge(&mut merged, layer, path.parent(), &name);
            layers.push(name);
        }
        let mut tiers = BTreeMap::new();
        for (name, (layer, defined_in)) in merged {
            tiers.insert(name.clone(), finish(&name, layer, defined_in)?);
        }
        Ok(Self { tiers, layers })
    }

    /// The tier called `name`; an unknown name lists the known ones.
    pub fn get(&self, name: &str) -> Result<&Tier> {
        self.tiers.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
            Error::arg("tier", format!("unknown tier `{name}`; known tiers: {}", known.join(", ")))
        })
    }
}

fn parse_layer(text: &str, path: &Path) -> Result<BTreeMap<String, TierLayer>> {
    let file: LayerFile = toml::from_str(text).map_err(|e| Error::config(path, e.to_string()))?;
    Ok(file.tiers)
}

/// Overlays `upper` on `merged`. Relative model/VAE paths resolve against the layer's folder.
/// Setting `model` drops the lower layers' revision, weight pins and VAE (they were for another
/// model); setting `vae` drops the VAE revision and the `vae/...` pins.
fn merge(
    merged: &mut BTreeMap<String, (TierLayer, String)>,
    upper: BTreeMap<String, TierLayer>,
    dir: Option<&Path>,
    layer_name: &str,
) {
    for (name, mut up) in upper {
        up.model = up.model.map(|m| resolve_relative(&m, dir));
        up.vae = up.vae.map(|m| resolve_relative(&m, dir));
        up.loras = up.loras.map(|list| resolve_lora_paths(list, dir));
        let (base, defined_in) =
            merged.entry(name).or_insert_with(|| (TierLayer::default(), layer_name.into()));
        if up.model.is_some() {
            base.revision = None;
            base.weights = None;
            // The lower layer's VAE was chosen for its model (SDXL's fp16-fix VAE under an SD1
            // model would decode garbage): a new model keeps only a VAE set beside it.
            base.vae = None;
            base.vae_revision = None;
            // LoRAs were chosen for the lower layer's model too.
            base.loras = None;
            *defined_in = layer_name.to_string();
        }
        if up.vae.is_some() {
            base.vae_revision = None;
            if let Some(w) = base.weights.as_mut() {
                w.retain(|k, _| !k.starts_with("vae/"));
            }
        }
        let weights = match (base.weights.take(), up.weights) {
            (Some(mut b), Some(u)) => {
                b.extend(u);
                Some(b)
            }
            (b, u) => u.or(b),
        };
        let price = match (base.price, up.price) {
            (Some(b), Some(u)) => Some(PriceLayer {
                credits_per_image: u.credits_per_image.or(b.credits_per_image),
                credits_per_gpu_second: u.credits_per_gpu_second.or(b.credits_per_gpu_second),
            }),
            (b, u) => u.or(b),
        };
        *base = TierLayer {
            description: up.description.or(base.description.take()),
            kind: up.kind.or(base.kind),
            model: up.model.or(base.model.take()),
            revision: up.revision.or(base.revision.take()),
            vae: up.vae.or(base.vae.take()),
            vae_revision: up.vae_revision.or(base.vae_revision.take()),
            weights,
            width: up.width.or(base.width),
            height: up.height.or(base.height),
            steps: up.steps.or(base.steps),
            guidance: up.guidance.or(base.guidance),
            scheduler: up.scheduler.or(base.scheduler.take()),
            dtype: up.dtype.or(base.dtype.take()),
            negative_prompt: up.negative_prompt.or(base.negative_prompt.take()),
            scale: up.scale.or(base.scale),
            lane: up.lane.or(base.lane.take()),
            price,
            loras: up.loras.or(base.loras.take()),
        };
    }
}

/// A layer's `./x`, `../x`, or a relative path that exists beside the layer file, becomes
/// absolute; hub ids and absolute paths are kept.
/// A layer's LoRA arguments with their file paths resolved against the layer's folder (library
/// names stay names).
pub(crate) fn resolve_lora_paths(list: Vec<String>, dir: Option<&Path>) -> Vec<String> {
    list.into_iter()
        .map(|l| if crate::loaders::lora::library::is_path(&l) { resolve_relative(&l, dir) } else { l })
        .collect()
}

pub(crate) fn resolve_relative(spec: &str, dir: Option<&Path>) -> String {
    let Some(dir) = dir else { return spec.to_string() };
    let path = Path::new(spec);
    if path.is_absolute() {
        return spec.to_string();
    }
    let explicit = spec.starts_with("./") || spec.starts_with("../");
    let beside = dir.join(spec.strip_prefix("./").unwrap_or(spec));
    if explicit || beside.exists() {
        let abs = if dir.is_absolute() {
            beside
        } else {
            std::env::current_dir().map(|cwd| cwd.join(&beside)).unwrap_or(beside)
        };
        return abs.display().to_string();
    }
    spec.to_string()
}

fn finish(name: &str, layer: TierLayer, defined_in: String) -> Result<Tier> {
    let bad = |msg: String| Error::config(&defined_in, format!("tier `{name}`: {msg}"));
    let model = layer.model.ok_or_else(|| bad("no `model` set".into()))?;
    if let Some(s) = &layer.scheduler {
        s.parse::<crate::schedule::SchedulerKind>().map_err(|e| bad(e.to_string()))?;
    }
    if let Some(d) = layer.dtype.as_deref().filter(|d| *d != "auto") {
        crate::device::parse_dtype(d).map_err(|e| bad(e.to_string()))?;
    }
    if let Some(g) = layer.guidance.filter(|g| !g.is_finite() || *g < 0.0) {
        return Err(bad(format!("guidance {g} must be a finite number >= 0")));
    }
    if layer.steps == Some(0) {
        return Err(bad("steps must be at least 1".into()));
    }
    let mut unpinned = Vec::new();
    let mut weights = BTreeMap::new();
    for (key, hash) in layer.weights.unwrap_or_default() {
        if hash == UNPINNED {
            unpinned.push(key);
        } else if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("weights.\"{key}\" is not a sha256 (64 hex digits) or \"{UNPINNED}\"")));
        } else {
            weights.insert(key, hash.to_ascii_lowercase());
        }
    }
    let mut explicit = |what: &str, value: Option<String>| match value {
        Some(v) if v == UNPINNED => {
            unpinned.insert(0, what.to_string());
            None
        }
        other => other,
    };
    let vae_revision = explicit("vae_revision", layer.vae_revision);
    let revision = explicit("revision", layer.revision);
    let price = layer.price.unwrap_or_default();
    let price = Price {
        credits_per_image: price.credits_per_image.unwrap_or(0.0),
        credits_per_gpu_second: price.credits_per_gpu_second.unwrap_or(0.0),
    };
    if ![price.credits_per_image, price.credits_per_gpu_second].iter().all(|p| p.is_finite() && *p >= 0.0) {
        return Err(bad("prices must be finite and >= 0".into()));
    }
    let loras = layer.loras.unwrap_or_default();
    for l in &loras {
        crate::loaders::lora::parse_lora_arg(l).map_err(|e| bad(format!("loras: {e}")))?;
    }
    if let Some(l) = layer.lane.as_deref().filter(|l| !matches!(*l, "draft" | "final")) {
        return Err(bad(format!("lane = \"{l}\": expected \"draft\" or \"final\"")));
    }
    Ok(Tier {
        name: name.to_string(),
        description: layer.description.unwrap_or_default(),
        kind: layer.kind.unwrap_or_default(),
        model,
        revision,
        vae: layer.vae,
        vae_revision,
        weights,
        width: layer.width,
        height: layer.height,
        steps: layer.steps,
        guidance: layer.guidance,
        scheduler: layer.scheduler,
        dtype: layer.dtype,
        negative_prompt: layer.negative_prompt,
        scale: layer.scale,
        lane: layer.lane.clone(),
        price,
        loras,
        unpinned,
        defined_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_defaults() -> Result<()> {
        let reg = TierRegistry::builtin()?;
        let draft = reg.get("draft")?;
        assert_eq!(draft.model, "stabilityai/sd-turbo");
        assert_eq!((draft.width, draft.height, draft.steps), (Some(512), Some(512), Some(1)));
        assert_eq!(draft.scheduler.as_deref(), Some("euler-a"));
        assert_eq!(draft.guidance, Some(0.0));
        let fin = reg.get("final")?;
        assert_eq!(fin.model, "stabilityai/stable-diffusion-xl-base-1.0");
        assert_eq!(fin.vae.as_deref(), Some("madebyollin/sdxl-vae-fp16-fix"));
        assert_eq!((fin.width, fin.steps, fin.guidance), (Some(1024), Some(30), Some(6.0)));
        assert_eq!(fin.scheduler.as_deref(), Some("dpmpp-2m-karras"));
        assert_eq!(reg.get("upscale")?.kind, TierKind::Upscale);
        // Revisions pinned; diffusion weights explicitly unpinned (trust on first use).
        assert_eq!(draft.revision.as_deref(), Some("b261bac6fd2cf515557d5d0707481eafa0485ec2"));
        assert_eq!(
            draft.pin_status(),
            "revision pinned, weights unpinned, 6 explicitly unpinned (trust on first use)"
        );
        assert!(draft
            .trust_on_first_use_warning()
            .is_some_and(|w| w.contains("unet/diffusion_pytorch_model")));
        assert_eq!(fin.revision.as_deref(), Some("462165984030d82259a11f4367a4eed129e94a7b"));
        assert_eq!(fin.vae_revision.as_deref(), Some("207b116dae70ace3637169f1ddd2434b91b3a8cd"));
        let up = reg.get("upscale")?;
        assert_eq!(up.pin_status(), "revision pinned, 1 weight file(s) pinned");
        assert!(up.trust_on_first_use_warning().is_none());
        // Every shipped tier pins its revision and every component's files, or names them
        // "unpinned" explicitly: nothing is left silently absent.
        for t in reg.tiers.values() {
            match t.kind {
                TierKind::Diffusion => {
                    assert!(t.revision.is_some(), "{}", t.name);
                    assert!(t.vae.is_none() || t.vae_revision.is_some(), "{}", t.name);
                    let transformer = t.model.contains("FLUX") || t.model.contains("Z-Image");
                    let denoiser = if transformer { "transformer/" } else { "unet/" };
                    for comp in [denoiser, "text_encoder/", "vae/"] {
                        let named = t.weights.keys().chain(&t.unpinned).any(|k| k.starts_with(comp));
                        assert!(named, "tier {} names no {comp} file", t.name);
                    }
                }
                TierKind::Upscale => assert!(!t.weights.is_empty(), "{}", t.name),
            }
        }
        // The FLUX finals: pinned revisions, explicitly unpinned sharded weights, bf16.
        let schnell = reg.get("flux-schnell")?;
        assert_eq!(schnell.revision.as_deref(), Some("741f7c3ce8b383c54771c7003378a50191e9efe9"));
        assert_eq!((schnell.steps, schnell.guidance), (Some(4), Some(0.0)));
        assert_eq!(schnell.scheduler.as_deref(), Some("flow-euler"));
        let dev = reg.get("flux-dev")?;
        assert_eq!(dev.revision.as_deref(), Some("3de623fc3c33e44ffbe2bad470d0f45bccf2eb21"));
        assert_eq!((dev.steps, dev.guidance, dev.dtype.as_deref()), (Some(28), Some(3.5), Some("bf16")));
        assert!(!dev.is_draft() && !schnell.is_draft());
        // Z-Image-Turbo: 9 steps without classifier-free guidance, as its model card runs it.
        let z = reg.get("z-image-turbo")?;
        assert_eq!(z.revision.as_deref(), Some("f332072aa78be7aecdf3ee76d5c247082da564a6"));
        assert_eq!((z.steps, z.guidance, z.dtype.as_deref()), (Some(9), Some(0.0), Some("bf16")));
        assert!(!z.is_draft());
        let err = reg.get("sketch").map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unknown tier `sketch`") && err.contains("draft, final"), "{err}");
        Ok(())
    }

    #[test]
    fn price_cost() {
        let p = Price { credits_per_image: 0.5, credits_per_gpu_second: 0.25 };
        assert_eq!(p.cost(4, 10.0), 4.5);
    }
}
