//! The checks on job specs: what can be validated before any work (counts, ranges, LoRA
//! arguments, option combinations), what a remote client may not ask for (anything naming a
//! filesystem path), and the input images a spec names.

use super::spec::*;
use crate::error::{Error, Result};

/// Most LoRAs one job merges.
pub const MAX_LORAS: usize = 16;

impl GenerateSpec {
    /// The prompt without its `<lora:…>` tags, and every LoRA asked for (`loras`, then the tags
    /// in prompt order), each checked for syntax and weight range.
    pub fn lora_args(&self) -> Result<(String, Vec<String>)> {
        lora_args(&self.prompt, &self.loras)
    }
}

impl InpaintSpec {
    /// As [`GenerateSpec::lora_args`].
    pub fn lora_args(&self) -> Result<(String, Vec<String>)> {
        lora_args(&self.prompt, &self.loras)
    }
}

impl DraftSpec {
    /// As [`GenerateSpec::lora_args`].
    pub fn lora_args(&self) -> Result<(String, Vec<String>)> {
        lora_args(&self.prompt, &self.loras)
    }
}

impl RedetailSpec {
    /// Every LoRA asked for, each checked for syntax and weight range (the prompt carries no
    /// tags: it defaults to the asset's own).
    pub fn lora_args(&self) -> Result<Vec<String>> {
        Ok(lora_args("", &self.loras)?.1)
    }
}

impl PromoteSpec {
    /// Every LoRA asked for, each checked for syntax and weight range (the prompt is the
    /// draft's, which carries no tags).
    pub fn lora_args(&self) -> Result<Vec<String>> {
        Ok(lora_args("", &self.loras)?.1)
    }
}

/// A prompt without its `<lora:…>` tags, and `loras` followed by the tags, each checked.
fn lora_args(prompt: &str, loras: &[String]) -> Result<(String, Vec<String>)> {
    let (prompt, tags) = crate::loaders::lora::take_prompt_loras(prompt)?;
    let all: Vec<String> = loras.iter().cloned().chain(tags).collect();
    if all.len() > MAX_LORAS {
        return Err(Error::arg("loras", format!("{} LoRAs; at most {MAX_LORAS} per job", all.len())));
    }
    for arg in &all {
        crate::loaders::lora::parse_lora_arg(arg)?;
    }
    Ok((prompt, all))
}

impl JobSpec {
    /// Checks what can be checked without the project (counts, ranges): the whole job is
    /// validated before any work, so nothing is rendered and then refused.
    pub fn validate(&self) -> Result<()> {
        let n = self.images();
        if n == 0 || n > MAX_IMAGES {
            return Err(Error::arg("count", format!("{n} is outside 1..={MAX_IMAGES}")));
        }
        let strength = match self {
            JobSpec::Generate(s) => s.strength,
            JobSpec::Promote(s) => s.strength,
            JobSpec::Inpaint(s) => s.strength,
            _ => None,
        };
        if let Some(v) = strength {
            if !(v > 0.0 && v <= 1.0) {
                return Err(Error::arg("strength", format!("{v} must be in (0, 1]")));
            }
        }
        let (batch, steps, tile) = match self {
            JobSpec::Generate(s) => (s.batch, s.steps, None),
            JobSpec::Draft(s) => (s.batch, s.steps, None),
            JobSpec::Promote(s) => (None, s.steps, s.tile),
            JobSpec::Inpaint(s) => (None, s.steps, None),
            JobSpec::Upscale(s) => (None, None, s.tile),
            JobSpec::Replay(_) | JobSpec::Cutout(_) | JobSpec::Grade(_) => (None, None, None),
        };
        crate::bounds::BATCH.check_opt(batch)?;
        crate::bounds::STEPS.check_opt(steps)?;
        crate::bounds::TILE.check_opt(tile)?;
        self.vae()?;
        if let JobSpec::Generate(s) = self {
            match (&s.tier, &s.model) {
                (None, None) => return Err(Error::arg("tier", "name a tier (or, locally, a model)")),
                (Some(_), Some(_)) => return Err(Error::arg("model", "give a tier or a model, not both")),
                _ => {}
            }
            if s.base.is_some() && s.model.is_none() {
                return Err(Error::arg(
                    "base",
                    "names the folder a single-file checkpoint builds on; give the checkpoint as the model \
                     (--model FILE.safetensors --base DIR|HUB_ID)",
                ));
            }
            if let Some(v) = s.true_cfg.filter(|v| !v.is_finite() || *v < 0.0) {
                return Err(Error::arg("true_cfg", format!("{v} must be a finite number >= 0")));
            }
            if s.prompt.len() > MAX_PROMPT_BYTES {
                return Err(Error::arg("prompt", format!("longer than {MAX_PROMPT_BYTES} bytes")));
            }
            s.lora_args()?;
        }
        if let JobSpec::Draft(s) = self {
            s.lora_args()?;
        }
        if let JobSpec::Inpaint(s) = self {
            if let Some(v) = s.true_cfg.filter(|v| !v.is_finite() || *v < 0.0) {
                return Err(Error::arg("true_cfg", format!("{v} must be a finite number >= 0")));
            }
            s.lora_args()?;
        }
        if let JobSpec::Promote(s) = self {
            s.lora_args()?;
        }
        if let JobSpec::Grade(s) = self {
            if let Some(v) = s.strength.filter(|v| !(0.0..=1.0).contains(v)) {
                return Err(Error::arg("strength", format!("{v} must be in 0..=1")));
            }
            if let Some(i) = &s.interp {
                i.parse::<crate::image::lut::Interpolation>()?;
            }
        }
        if let JobSpec::Cutout(s) = self {
            if s.background.is_some() && s.background_image.is_some() {
                return Err(Error::arg(
                    "background",
                    "give a colour or an image to composite onto, not both",
                ));
            }
            if let Some(c) =
                s.background.as_deref().filter(|c| crate::pipeline::cutout::parse_color(c).is_none())
            {
                return Err(Error::arg(
                    "background",
                    format!("`{c}` is not a colour (#rrggbb, #rgb, white, black, gray, red, green, blue)"),
                ));
            }
            if s.fit_background && s.background_image.is_none() {
                return Err(Error::arg("fit_background", "needs a background_image to fit"));
            }
        }
        if let JobSpec::Inpaint(s) = self {
            if s.tier.is_none() && s.model.is_none() {
                return Err(Error::arg("tier", "name a tier (or, locally, a model)"));
            }
            match (s.mode, &s.mask, &s.extend) {
                (EditMode::Outpaint, _, None) => {
                    return Err(Error::arg("extend", "outpainting needs the sides to extend or an aspect"))
                }
                (EditMode::Inpaint | EditMode::Erase, None, _) => {
                    return Err(Error::arg("mask", "inpainting and erasing need a mask (white = repaint)"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Refuses what a remote client may not ask for: anything naming a filesystem path.
    pub fn check_remote(&self) -> Result<()> {
        let refuse_lora_paths = |args: &[String]| -> Result<()> {
            for arg in args {
                if crate::loaders::lora::library::is_path(&crate::loaders::lora::parse_lora_arg(arg)?.0) {
                    return Err(Error::arg(
                        "loras",
                        "names a filesystem path; over HTTP name LoRAs of the library",
                    ));
                }
            }
            Ok(())
        };
        let path_field = |field: &str| {
            Err(Error::arg(field, "names a filesystem path; over HTTP use asset ids and uploads instead"))
        };
        let image = |field: &str, r: &ImageRef| match r {
            ImageRef::File(_) => path_field(field),
            _ => Ok(()),
        };
        match self {
            JobSpec::Generate(s) => {
                if s.model.is_some() {
                    return path_field("model");
                }
                if s.base.is_some() {
                    return path_field("base");
                }
                if s.out.is_some() {
                    return path_field("out");
                }
                if s.init_latents.is_some() {
                    return path_field("init_latents");
                }
                if let Some(r) = &s.init_image {
                    image("init_image", r)?;
                }
                refuse_lora_paths(&s.lora_args()?.1)?;
            }
            JobSpec::Draft(s) => refuse_lora_paths(&s.lora_args()?.1)?,
            JobSpec::Promote(s) => {
                image("draft", &s.draft)?;
                refuse_lora_paths(&s.lora_args()?)?;
                if let Some(r) = &s.redetail {
                    refuse_lora_paths(&r.lora_args()?)?;
                }
            }
            JobSpec::Inpaint(s) => {
                if s.model.is_some() {
                    return path_field("model");
                }
                if s.out.is_some() {
                    return path_field("out");
                }
                if s.init_latents.is_some() {
                    return path_field("init_latents");
                }
                image("image", &s.image)?;
                if let Some(m) = &s.mask {
                    image("mask", m)?;
                }
                refuse_lora_paths(&s.lora_args()?.1)?;
            }
            JobSpec::Upscale(s) => {
                image("image", &s.image)?;
                if let Some(r) = &s.redetail {
                    refuse_lora_paths(&r.lora_args()?)?;
                }
            }
            JobSpec::Cutout(s) => {
                image("image", &s.image)?;
                if let Some(b) = &s.background_image {
                    image("background_image", b)?;
                }
                // A model is an imported name; a path (an .onnx file) is for the CLI only.
                if s.model.as_deref().is_some_and(|m| m.contains(['/', '\\']) || m.ends_with(".onnx")) {
                    return path_field("model");
                }
            }
            JobSpec::Grade(_) => return path_field("lut"),
            JobSpec::Replay(s) => {
                image("asset", &s.asset)?;
                if s.out.is_some() {
                    return path_field("out");
                }
            }
        }
        self.validate()
    }

    /// Every input image the spec names, with its field (so a bad id can be refused before
    /// the job is queued).
    pub fn image_refs(&self) -> Vec<(&'static str, &ImageRef)> {
        match self {
            JobSpec::Generate(g) => g.init_image.iter().map(|r| ("init_image", r)).collect(),
            JobSpec::Promote(p) => vec![("draft", &p.draft)],
            JobSpec::Inpaint(i) => {
                let mut v = vec![("image", &i.image)];
                v.extend(i.mask.iter().map(|m| ("mask", m)));
                v
            }
            JobSpec::Upscale(u) => vec![("image", &u.image)],
            JobSpec::Replay(r) => vec![("asset", &r.asset)],
            JobSpec::Cutout(c) => {
                let mut v = vec![("image", &c.image)];
                v.extend(c.background_image.iter().map(|b| ("background_image", b)));
                v
            }
            JobSpec::Grade(g) => vec![("image", &g.image)],
            JobSpec::Draft(_) => Vec::new(),
        }
    }
}

/// Longest prompt accepted (CLIP truncates at 77 tokens anyway; this bounds stored specs).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_as_tagged_json() {
        let spec = JobSpec::Generate(GenerateSpec {
            tier: Some("draft".into()),
            prompt: "a kiln".into(),
            seed: Some(3),
            ..Default::default()
        });
        let json = serde_json::to_string(&spec).unwrap_or_default();
        assert!(json.contains("\"kind\":\"generate\""), "{json}");
        let back: JobSpec = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(back, spec);
    }

    #[test]
    fn unknown_fields_and_paths_are_refused() {
        let bad = serde_json::from_str::<JobSpec>(r#"{"kind":"draft","prompt":"x","cout":3}"#);
        assert!(bad.is_err());
        let spec: JobSpec =
            serde_json::from_str(r#"{"kind":"generate","tier":"draft","prompt":"x","out":"/etc/x.png"}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        let err = spec.check_remote().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("out") && err.contains("path"), "{err}");
        let spec: JobSpec = serde_json::from_str(r#"{"kind":"upscale","image":{"file":"../../etc/passwd"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(spec.check_remote().is_err());
    }

    #[test]
    fn counts_are_bounded() {
        let spec = JobSpec::Draft(DraftSpec { prompt: "x".into(), count: Some(0), ..Default::default() });
        assert!(spec.validate().is_err());
        let spec =
            JobSpec::Draft(DraftSpec { prompt: "x".into(), count: Some(100_000), ..Default::default() });
        assert!(spec.validate().is_err());
    }
}
