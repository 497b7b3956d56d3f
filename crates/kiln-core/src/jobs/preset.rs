//! Applying a preset (brand kit) to a job: its choices fill what the spec leaves unset (what
//! the user set wins), its prompt template wraps the prompt, and every image the job makes
//! records the preset's name and hash and gets its colour grade. A preset that changed since
//! the last asset made with it is reported, as drifted weights are.

use super::spec::JobSpec;
use crate::error::{Error, Result};
use crate::image::lut::{Interpolation, Lut3d};
use crate::pipeline::metadata::{FileRef, GradeRecord, ImageRecord, PresetRecord};
use crate::tiers::presets::Preset;
use crate::workflow::Workspace;
use image::RgbImage;

/// A preset in force for one job: what its images record, and its grade (LUT read once).
#[derive(Debug, Clone)]
pub struct AppliedPreset {
    pub record: PresetRecord,
    grade: Option<(Lut3d, GradeRecord)>,
}

impl AppliedPreset {
    /// Stamps an image the job made: the preset in its record, and the grade applied to its
    /// pixels (and recorded, so replay grades again).
    pub fn finish(&self, record: &mut ImageRecord, rgb: RgbImage) -> Result<RgbImage> {
        record.preset = Some(self.record.clone());
        Ok(match &self.grade {
            Some((lut, g)) => {
                record.grade = Some(g.clone());
                lut.apply(&rgb, g.interp.parse()?, g.strength)
            }
            None => rgb,
        })
    }
}

/// Applies a recorded grade again (replay): the LUT must still hash to what was recorded.
pub fn regrade(lut_path: &std::path::Path, g: &GradeRecord, rgb: &RgbImage) -> Result<RgbImage> {
    let lut = Lut3d::read(lut_path)?;
    if lut.sha256.as_deref() != Some(g.lut.sha256.as_str()) {
        return Err(Error::config(
            lut_path,
            format!("LUT changed since the image was graded (recorded sha256 {})", g.lut.sha256),
        ));
    }
    Ok(lut.apply(rgb, g.interp.parse()?, g.strength))
}

/// The tier a spec runs on once its preset is applied (the server's lane and budget estimate
/// need it before the job runs).
pub fn effective_tier(project: &crate::library::Project, spec: &JobSpec) -> Result<Option<String>> {
    if let Some(t) = spec.tier() {
        return Ok(Some(t.to_string()));
    }
    let (name, has_model) = match spec {
        JobSpec::Generate(s) => (s.preset.as_deref(), s.model.is_some()),
        JobSpec::Inpaint(s) => (s.preset.as_deref(), s.model.is_some()),
        _ => (None, false),
    };
    match name {
        Some(n) if !has_model => Ok(project.presets()?.get(n)?.tier.clone()),
        _ => Ok(None),
    }
}

/// Fills `spec` from the preset it names (if any): the prompt through its template, and the
/// negative prompt, tier, LoRAs, size, sampler settings and seed where the spec has none.
/// Returns the spec to run, the preset in force, and warnings (a changed preset).
pub fn apply(ws: &Workspace, spec: &JobSpec) -> Result<(JobSpec, Option<AppliedPreset>, Vec<String>)> {
    let name = match spec {
        JobSpec::Generate(s) => s.preset.as_deref(),
        JobSpec::Draft(s) => s.preset.as_deref(),
        JobSpec::Inpaint(s) => s.preset.as_deref(),
        JobSpec::Promote(s) if s.preset.is_none() => return inherit_draft_grade(ws, spec, s),
        JobSpec::Promote(s) => s.preset.as_deref(),
        _ => None,
    };
    let Some(name) = name else { return Ok((spec.clone(), None, Vec::new())) };
    let presets = ws.project.presets()?;
    let p = presets.get(name)?;
    let mut spec = spec.clone();
    let size_of = |tier: Option<&str>| -> Result<(usize, usize)> {
        let t = match tier {
            Some(t) => Some(ws.tiers.get(t)?),
            None => None,
        };
        Ok((t.and_then(|t| t.width).unwrap_or(512), t.and_then(|t| t.height).unwrap_or(512)))
    };
    match &mut spec {
        JobSpec::Generate(s) => {
            s.prompt = p.prompt_for(&s.prompt);
            s.negative = s.negative.take().or_else(|| p.negative_prompt.clone());
            if s.model.is_none() {
                s.tier = s.tier.take().or_else(|| p.tier.clone());
            }
            s.loras = p.loras.iter().cloned().chain(s.loras.drain(..)).collect();
            if s.width.is_none() && s.height.is_none() && s.init_image.is_none() {
                (s.width, s.height) = p.size(size_of(s.tier.as_deref())?, 16);
            }
            s.steps = s.steps.or(p.steps);
            s.guidance = s.guidance.or(p.guidance);
            s.scheduler = s.scheduler.take().or_else(|| p.scheduler.clone());
            s.seed = s.seed.or_else(|| p.seed());
        }
        JobSpec::Draft(s) => {
            // A draft stays on its draft tier; the preset's look applies to it.
            s.prompt = p.prompt_for(&s.prompt);
            s.negative = s.negative.take().or_else(|| p.negative_prompt.clone());
            s.loras = p.loras.iter().cloned().chain(s.loras.drain(..)).collect();
            if s.width.is_none() && s.height.is_none() {
                (s.width, s.height) = p.size(size_of(Some(s.tier.as_deref().unwrap_or("draft")))?, 16);
            }
            s.steps = s.steps.or(p.steps);
            s.seed = s.seed.or_else(|| p.seed());
        }
        JobSpec::Inpaint(s) => {
            s.prompt = p.prompt_for(&s.prompt);
            s.negative = s.negative.take().or_else(|| p.negative_prompt.clone());
            s.loras = p.loras.iter().cloned().chain(s.loras.drain(..)).collect();
            if s.model.is_none() {
                s.tier = s.tier.take().or_else(|| p.tier.clone());
            }
            s.steps = s.steps.or(p.steps);
            s.guidance = s.guidance.or(p.guidance);
            s.scheduler = s.scheduler.take().or_else(|| p.scheduler.clone());
            s.seed = s.seed.or_else(|| p.seed());
        }
        JobSpec::Promote(s) => {
            // The final keeps the draft's prompt, size and seed: the preset adds its look.
            s.loras = p.loras.iter().cloned().chain(s.loras.drain(..)).collect();
            s.steps = s.steps.or(p.steps);
        }
        _ => {}
    }
    spec.validate()?;
    let warnings = changed_since_last_use(ws, p)?.into_iter().collect();
    Ok((spec, Some(applied(p)?), warnings))
}

/// A promotion without a preset of its own: the final gets the grade of the preset the draft
/// was made with (as that preset stands now), so a campaign's finals look like its drafts. The
/// preset's LoRAs are not carried over: they were chosen for the draft's model, and the final
/// tier may be another family (name the preset to apply them).
fn inherit_draft_grade(
    ws: &Workspace,
    spec: &JobSpec,
    s: &super::spec::PromoteSpec,
) -> Result<(JobSpec, Option<AppliedPreset>, Vec<String>)> {
    let unchanged = || Ok((spec.clone(), None, Vec::new()));
    let draft = match &s.draft {
        super::spec::ImageRef::Asset(id) => crate::workflow::AssetRef::Id(*id),
        other => match super::engine::image_path(ws, other, "draft") {
            Ok(path) => crate::workflow::AssetRef::File(path),
            Err(_) => return unchanged(),
        },
    };
    let Ok(input) = crate::workflow::resolve_input(&ws.library, &ws.project.root, &draft, "draft") else {
        // The promotion itself reports a draft it cannot read.
        return unchanged();
    };
    let Some(recorded) = input.record.preset else { return unchanged() };
    let presets = ws.project.presets()?;
    let Ok(p) = presets.get(&recorded.name) else {
        let w = format!(
            "the draft was made with preset `{}`, which is no longer defined: the final is not graded",
            recorded.name
        );
        return Ok((spec.clone(), None, vec![w]));
    };
    if p.grade.is_none() {
        return unchanged();
    }
    let mut warnings = Vec::new();
    if p.sha256 != recorded.sha256 {
        warnings.push(format!(
            "preset `{}` changed since the draft was made (sha256 {} → {}): the final gets its grade as it is now",
            p.name,
            &recorded.sha256[..recorded.sha256.len().min(12)],
            &p.sha256[..12]
        ));
    }
    Ok((spec.clone(), Some(applied(p)?), warnings))
}

fn applied(p: &Preset) -> Result<AppliedPreset> {
    let grade = match &p.grade {
        Some(g) => {
            let lut = Lut3d::read(&g.lut)?;
            let interp = g.interp.clone().unwrap_or_else(|| "tetrahedral".into());
            interp.parse::<Interpolation>()?;
            let record = GradeRecord {
                lut: FileRef {
                    path: g.lut.display().to_string(),
                    sha256: lut.sha256.clone().unwrap_or_default(),
                },
                strength: g.strength,
                interp,
            };
            Some((lut, record))
        }
        None => None,
    };
    Ok(AppliedPreset { record: PresetRecord { name: p.name.clone(), sha256: p.sha256.clone() }, grade })
}

/// A warning when the last asset made with this preset recorded another hash: the campaign's
/// look changed since (settings, LoRAs or LUT).
fn changed_since_last_use(ws: &Workspace, p: &Preset) -> Result<Option<String>> {
    let Some((asset, sha)) = ws.library.last_preset_use(&p.name)? else { return Ok(None) };
    Ok((sha != p.sha256).then(|| {
        format!(
            "preset `{}` changed since asset {asset} was made with it (sha256 {} → {}): new images will not match the campaign's earlier ones",
            p.name,
            &sha[..sha.len().min(12)],
            &p.sha256[..12]
        )
    }))
}
