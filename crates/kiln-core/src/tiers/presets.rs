//! Presets (brand kits): named house styles — a prompt template, a negative prompt, a tier,
//! LoRAs, size or aspect, sampler overrides, a seed policy and a colour grade — resolved from
//! the same layers as tiers (`[presets.NAME]` in the user's `tiers.toml`, then in the project's
//! `kiln.toml`; later layers override single keys). Every resolved preset has a content hash
//! (its settings and its LUT file's bytes), recorded on each asset made with it, so a preset
//! that changed since a campaign's last asset is noticed like drifted weights.

use super::{resolve_lora_paths, resolve_relative, user_tiers_file};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The placeholder a prompt template replaces with the user's prompt.
pub const PROMPT_SLOT: &str = "{prompt}";

/// The colour grade a preset applies to every image it makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetGrade {
    /// A `.cube` 3D LUT (relative paths resolve against the file that defines the preset).
    pub lut: PathBuf,
    /// 0..=1: how much of the graded colour replaces the original (default 1).
    #[serde(default = "full_strength")]
    pub strength: f32,
    /// trilinear | tetrahedral (default).
    #[serde(default)]
    pub interp: Option<String>,
}

fn full_strength() -> f32 {
    1.0
}

/// A preset's seed policy: a new random seed per job (default), or one fixed seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeedPolicy {
    Random,
    Fixed(u64),
}

/// One resolved preset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preset {
    pub name: String,
    pub description: String,
    /// The prompt template: contains [`PROMPT_SLOT`] once (default: the prompt alone).
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub tier: Option<String>,
    /// `NAME|PATH[:WEIGHT]` each, as `--lora` takes them.
    pub loras: Vec<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// `W:H` (e.g. 16:9): the tier's pixel area in that shape, when no size is given.
    pub aspect: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<String>,
    pub seed: SeedPolicy,
    pub grade: Option<PresetGrade>,
    /// The layer that last set a key of it.
    pub defined_in: String,
    /// sha256 of its settings and its LUT's bytes: what assets record.
    pub sha256: String,
}

/// One layer's `[presets.NAME]` table; every key optional (set keys override lower layers).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetLayer {
    description: Option<String>,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    tier: Option<String>,
    loras: Option<Vec<String>>,
    width: Option<usize>,
    height: Option<usize>,
    aspect: Option<String>,
    steps: Option<usize>,
    guidance: Option<f64>,
    scheduler: Option<String>,
    /// "random" or a number.
    seed: Option<toml::Value>,
    grade: Option<PresetGrade>,
}

/// The `presets` table of a layer file (its other tables are someone else's).
#[derive(Debug, Default, Deserialize)]
struct LayerFile {
    #[serde(default)]
    presets: BTreeMap<String, PresetLayer>,
}

/// The resolved presets and the layer files they came from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PresetRegistry {
    pub presets: BTreeMap<String, Preset>,
    pub layers: Vec<String>,
}

impl PresetRegistry {
    /// The user's file, then the project's kiln.toml (absent files are skipped).
    pub fn discover(project_root: Option<&Path>) -> Result<Self> {
        let user = user_tiers_file();
        let project = project_root.map(|r| r.join("kiln.toml"));
        Self::load(user.as_deref(), project.as_deref())
    }

    /// Resolves `user`, then `project` (each skipped when absent).
    pub fn load(user: Option<&Path>, project: Option<&Path>) -> Result<Self> {
        let mut merged: BTreeMap<String, (PresetLayer, String)> = BTreeMap::new();
        let mut layers = Vec::new();
        for path in [user, project].into_iter().flatten() {
            if !path.is_file() {
                continue;
            }
            let text = fs_err::read_to_string(path)?;
            let file: LayerFile = toml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
            let name = path.display().to_string();
            for (preset, mut up) in file.presets {
                let dir = path.parent();
                if let Some(g) = &mut up.grade {
                    g.lut = PathBuf::from(resolve_relative(&g.lut.to_string_lossy(), dir));
                }
                up.loras = up.loras.map(|list| resolve_lora_paths(list, dir));
                let (base, defined_in) =
                    merged.entry(preset).or_insert_with(|| (PresetLayer::default(), name.clone()));
                overlay(base, up);
                *defined_in = name.clone();
            }
            layers.push(name);
        }
        let mut presets = BTreeMap::new();
        for (name, (layer, defined_in)) in merged {
            presets.insert(name.clone(), finish(&name, layer, defined_in)?);
        }
        Ok(Self { presets, layers })
    }

    /// The preset called `name`; an unknown name lists the known ones.
    pub fn get(&self, name: &str) -> Result<&Preset> {
        self.presets.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.presets.keys().map(String::as_str).collect();
            let known = if known.is_empty() {
                "none (add [presets.NAME] to kiln.toml)".into()
            } else {
                known.join(", ")
            };
            Error::arg("preset", format!("unknown preset `{name}`; known presets: {known}"))
        })
    }
}

fn overlay(base: &mut PresetLayer, up: PresetLayer) {
    macro_rules! take {
        ($($f:ident),*) => { $( if up.$f.is_some() { base.$f = up.$f; } )* };
    }
    take!(
        description,
        prompt,
        negative_prompt,
        tier,
        loras,
        width,
        height,
        aspect,
        steps,
        guidance,
        scheduler,
        seed,
        grade
    );
}

/// Checks a merged preset and computes its hash.
fn finish(name: &str, l: PresetLayer, defined_in: String) -> Result<Preset> {
    let bad = |msg: String| Error::config(Path::new(&defined_in), format!("preset `{name}`: {msg}"));
    let prompt = l.prompt.unwrap_or_else(|| PROMPT_SLOT.to_string());
    if prompt.matches(PROMPT_SLOT).count() != 1 {
        return Err(bad(format!(
            "prompt `{prompt}` must contain {PROMPT_SLOT} exactly once (where the user's prompt goes)"
        )));
    }
    let seed = match l.seed {
        None => SeedPolicy::Random,
        Some(toml::Value::String(s)) if s == "random" => SeedPolicy::Random,
        Some(toml::Value::Integer(n)) if n >= 0 => SeedPolicy::Fixed(n as u64),
        Some(other) => return Err(bad(format!("seed = {other}: expected \"random\" or a number >= 0"))),
    };
    if let Some(a) = &l.aspect {
        parse_aspect(a).ok_or_else(|| bad(format!("aspect `{a}`: expected W:H such as 16:9")))?;
        if l.width.is_some() || l.height.is_some() {
            return Err(bad("give a size (width, height) or an aspect, not both".into()));
        }
    }
    crate::bounds::GENERATE_SIDE.check_opt(l.width).map_err(|e| bad(e.to_string()))?;
    crate::bounds::GENERATE_SIDE.check_opt(l.height).map_err(|e| bad(e.to_string()))?;
    crate::bounds::STEPS.check_opt(l.steps).map_err(|e| bad(e.to_string()))?;
    if let Some(g) = l.guidance.filter(|g| !(g.is_finite() && *g >= 0.0)) {
        return Err(bad(format!("guidance {g}: expected a number >= 0")));
    }
    let lut_sha256 = match &l.grade {
        Some(g) => {
            if !(0.0..=1.0).contains(&g.strength) {
                return Err(bad(format!("grade strength {}: expected 0..=1", g.strength)));
            }
            if let Some(i) = &g.interp {
                i.parse::<crate::image::lut::Interpolation>().map_err(|e| bad(e.to_string()))?;
            }
            if !g.lut.is_file() {
                return Err(bad(format!("grade LUT {} not found", g.lut.display())));
            }
            Some(crate::loaders::weights::sha256_file(&g.lut)?)
        }
        None => None,
    };
    let mut preset = Preset {
        name: name.to_string(),
        description: l.description.unwrap_or_default(),
        prompt,
        negative_prompt: l.negative_prompt,
        tier: l.tier,
        loras: l.loras.unwrap_or_default(),
        width: l.width,
        height: l.height,
        aspect: l.aspect,
        steps: l.steps,
        guidance: l.guidance,
        scheduler: l.scheduler,
        seed,
        grade: l.grade,
        defined_in,
        sha256: String::new(),
    };
    preset.sha256 = content_hash(&preset, lut_sha256.as_deref());
    Ok(preset)
}

/// sha256 over what changes an image: the settings (not the description or where the preset
/// is defined; the LUT by its bytes, not its path).
fn content_hash(p: &Preset, lut_sha256: Option<&str>) -> String {
    let content = serde_json::json!({
        "prompt": p.prompt,
        "negative_prompt": p.negative_prompt,
        "tier": p.tier,
        "loras": p.loras,
        "width": p.width,
        "height": p.height,
        "aspect": p.aspect,
        "steps": p.steps,
        "guidance": p.guidance,
        "scheduler": p.scheduler,
        "seed": p.seed,
        "grade": p.grade.as_ref().map(|g| serde_json::json!({
            "lut_sha256": lut_sha256, "strength": g.strength, "interp": g.interp,
        })),
    });
    hex::encode(Sha256::digest(content.to_string().as_bytes()))
}

/// `W:H` → (W, H), both > 0.
pub fn parse_aspect(s: &str) -> Option<(usize, usize)> {
    let (w, h) = s.split_once(':')?;
    let (w, h) = (w.trim().parse::<usize>().ok()?, h.trim().parse::<usize>().ok()?);
    (w > 0 && h > 0 && w <= 100 && h <= 100).then_some((w, h))
}

impl Preset {
    /// The user's prompt in the preset's template.
    pub fn prompt_for(&self, prompt: &str) -> String {
        self.prompt.replacen(PROMPT_SLOT, prompt, 1)
    }

    /// The size a job gets from the preset, given the tier's own size: the preset's width and
    /// height, or the tier's pixel area in the preset's aspect (sides multiples of `multiple`).
    pub fn size(&self, tier_size: (usize, usize), multiple: usize) -> (Option<usize>, Option<usize>) {
        let Some((aw, ah)) = self.aspect.as_deref().and_then(parse_aspect) else {
            return (self.width, self.height);
        };
        let area = (tier_size.0 * tier_size.1) as f64;
        let h = (area * ah as f64 / aw as f64).sqrt();
        let w = h * aw as f64 / ah as f64;
        let snap = |v: f64| ((v / multiple as f64).round() as usize).max(1) * multiple;
        (Some(snap(w)), Some(snap(h)))
    }

    /// The seed a job without one of its own gets: the fixed one, if the policy has one.
    pub fn seed(&self) -> Option<u64> {
        match self.seed {
            SeedPolicy::Fixed(s) => Some(s),
            SeedPolicy::Random => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
        p
    }

    #[test]
    fn layers_override_keys_and_the_hash_follows_the_content() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let lut = write(
            dir.path(),
            "warm.cube",
            "LUT_3D_SIZE 2\n0 0 0\n1 0 0\n0 1 0\n1 1 0\n0 0 1\n1 0 1\n0 1 1\n1 1 1\n",
        );
        let user = write(
            dir.path(),
            "tiers.toml",
            "[presets.brand]\nprompt = \"{prompt}, studio light\"\nnegative_prompt = \"blur\"\nsteps = 20\n",
        );
        let project = write(
            dir.path(),
            "kiln.toml",
            "[presets.brand]\nsteps = 4\naspect = \"16:9\"\nseed = 7\n[presets.brand.grade]\nlut = \"warm.cube\"\nstrength = 0.5\n",
        );
        let reg = PresetRegistry::load(Some(&user), Some(&project)).unwrap_or_else(|e| panic!("{e}"));
        let p = reg.get("brand").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.prompt_for("a chair"), "a chair, studio light");
        assert_eq!(p.negative_prompt.as_deref(), Some("blur"), "kept from the user layer");
        assert_eq!(p.steps, Some(4), "the project overrides the user layer");
        assert_eq!(p.seed(), Some(7));
        assert_eq!(p.grade.as_ref().map(|g| g.lut.clone()), Some(lut.clone()));
        assert_eq!(p.size((512, 512), 8), (Some(680), Some(384)));
        let before = p.sha256.clone();
        // The same settings hash the same; a changed key or LUT byte changes the hash.
        let again = PresetRegistry::load(Some(&user), Some(&project)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.get("brand").map(|p| p.sha256.clone()).ok(), Some(before.clone()));
        write(
            dir.path(),
            "warm.cube",
            "LUT_3D_SIZE 2\n0 0 0\n1 0 0\n0 1 0\n1 1 0\n0 0 1\n1 0 1\n0 1 1\n1 1 0.9\n",
        );
        let lut_changed = PresetRegistry::load(Some(&user), Some(&project)).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(lut_changed.get("brand").map(|p| p.sha256.clone()).ok(), Some(before.clone()));
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (text, needle) in [
            ("[presets.a]\nprompt = \"no slot\"\n", "{prompt}"),
            ("[presets.a]\nsteps = 0\n", "steps"),
            ("[presets.a]\naspect = \"wide\"\n", "aspect"),
            ("[presets.a]\naspect = \"16:9\"\nwidth = 512\n", "not both"),
            ("[presets.a]\nseed = \"lucky\"\n", "seed"),
            ("[presets.a]\ncolour = \"red\"\n", "colour"),
            ("[presets.a.grade]\nlut = \"missing.cube\"\n", "not found"),
            ("[presets.a.grade]\nlut = \"missing.cube\"\nstrength = 2.0\n", "strength"),
        ] {
            let project = write(dir.path(), "kiln.toml", text);
            let err =
                PresetRegistry::load(None, Some(&project)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let reg = PresetRegistry::default();
        let err = reg.get("brand").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unknown preset `brand`"), "{err}");
    }
}
