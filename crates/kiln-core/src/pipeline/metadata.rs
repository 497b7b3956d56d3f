//! What output PNGs carry: an A1111-style `parameters` chunk (read by Civitai and most tools)
//! and a `kiln` JSON chunk with everything needed to replay the image.

use crate::image::png_meta::TextChunk;
use crate::loaders::hub::ModelSource;
use crate::pipeline::generate::GenerateRequest;
use crate::pipeline::model::{LoadedModel, WeightRecord};
use crate::schedule::SchedulerKind;
use serde::{Deserialize, Serialize};

/// The replay record stored in the `kiln` chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    pub kiln_version: String,
    pub mode: String,
    pub model: ModelRecord,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// FLUX's true-CFG scale when the request set one (absent = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_cfg: Option<f64>,
    pub scheduler: String,
    pub scheduler_class: String,
    pub scheduler_config: serde_json::Value,
    pub seed: u64,
    /// Position of this image in its `--count` batch.
    pub batch_index: usize,
    pub init_latents: Option<FileRef>,
    pub init_image: Option<FileRef>,
    pub strength: Option<f64>,
    pub dtype: String,
    pub device: String,
    /// The single-file denoiser checkpoint used instead of the pipeline's own (path and
    /// sha256); `model` is then the base folder of the other components.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub single_file: Option<FileRef>,
    /// The VAE used instead of the pipeline's own, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<ModelRecord>,
    /// The tier the image was made with (`kiln draft`, `promote`, `generate --tier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Inpainting, outpainting and erasing: the mask and how it was used (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inpaint: Option<InpaintRecord>,
    /// `--max-sequence-length` when set (absent = the family's default token budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<usize>,
    /// Where the text encoders ran when not on the model's device (`cpu`: in f32 there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoders: Option<crate::pipeline::model::TextPlacement>,
    /// The LoRAs merged into the model, in order, by name, sha256 and weight (absent = none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<crate::loaders::lora::LoraRecord>,
    /// The preset (brand kit) the image was made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<PresetRecord>,
    /// The colour grade applied after decoding (a preset's); replay applies it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<GradeRecord>,
}

/// A preset's name and content hash, as an image records them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PresetRecord {
    pub name: String,
    pub sha256: String,
}

/// A colour grade as an image records it: the LUT file (path and sha256), strength and
/// interpolation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradeRecord {
    pub lut: FileRef,
    pub strength: f32,
    pub interp: String,
}

/// What an inpainting-family job adds to the replay record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InpaintRecord {
    /// The mask file (absent for outpainting, whose mask comes from the extension).
    pub mask: Option<FileRef>,
    pub mask_blur: f64,
    /// "kiln" or "diffusers".
    pub blend: String,
    /// Padding around the mask box in only-masked mode.
    pub padding: u32,
    pub only_masked: bool,
    /// The region sampled, [x, y, width, height] in input pixels.
    pub crop: [u32; 4],
    /// The canvas the UNet saw.
    pub process_width: u32,
    pub process_height: u32,
    /// Outpainting: pixels added on each side [left, right, top, bottom], the pre-fill and overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extend: Option<[u32; 4]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<u32>,
    /// Erasing: pixels the mask was grown by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grow: Option<u32>,
    /// Re-imposition of the known region forced on or off (absent = the UNet kind's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reimpose: Option<bool>,
    /// The native size only-masked mode planned with [width, height] (absent in older records:
    /// the model's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<[u32; 2]>,
}

impl ImageRecord {
    /// The record of image `batch_index` (seed `seed`) of `req` generated by `model`.
    pub fn build(
        model: &LoadedModel,
        req: &GenerateRequest,
        scheduler: SchedulerKind,
        seed: u64,
        batch_index: usize,
        init_latents: Option<FileRef>,
        init_image: Option<FileRef>,
    ) -> Self {
        let vae = model.vae_source.as_ref().map(|src| {
            let mut r = model_record(src, Vec::new());
            r.files = model.weights.iter().filter(|w| w.component == "vae").cloned().collect();
            r
        });
        Self {
            kiln_version: crate::VERSION.to_string(),
            mode: if req.init_image.is_some() { "img2img" } else { "txt2img" }.to_string(),
            model: model_record(&model.source, model.weights.clone()),
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            width: req.width,
            height: req.height,
            steps: req.steps,
            guidance: req.guidance,
            true_cfg: req.true_cfg,
            scheduler: scheduler.name().to_string(),
            scheduler_class: model.scheduler_class.clone(),
            scheduler_config: model.scheduler_config_json.clone(),
            seed,
            batch_index,
            init_latents,
            init_image,
            strength: req.init_image.as_ref().map(|_| req.strength),
            dtype: crate::device::dtype_name(model.dtype).to_string(),
            device: crate::device::name(&model.device),
            single_file: single_file_ref(model),
            vae,
            tier: None,
            inpaint: None,
            max_sequence_length: req.max_sequence_length,
            text_encoders: text_placement_record(model),
            preset: None,
            grade: None,
            loras: model.loras.clone(),
        }
    }
}

/// The record's `text_encoders`: absent for the default placement, so records stay as they were.
pub(crate) fn text_placement_record(model: &LoadedModel) -> Option<crate::pipeline::model::TextPlacement> {
    (model.text_placement != Default::default()).then_some(model.text_placement)
}

/// The single-file denoiser a model was built with: its absolute path and recorded sha256.
fn single_file_ref(model: &LoadedModel) -> Option<FileRef> {
    let file = model.denoiser_file.as_ref()?;
    let name = file.file_name()?.to_string_lossy();
    let sha256 = model
        .weights
        .iter()
        .find(|w| w.component == model.spec.denoiser && w.file == name)
        .map(|w| w.sha256.clone())?;
    let path = std::path::absolute(file).unwrap_or_else(|_| file.clone());
    Some(FileRef { path: path.display().to_string(), sha256 })
}

/// The record of a model source: hub id + revision, or the folder path as given.
pub fn model_record(source: &ModelSource, files: Vec<WeightRecord>) -> ModelRecord {
    match source {
        ModelSource::Hub { repo, revision, .. } => {
            ModelRecord { id: repo.clone(), revision: Some(revision.clone()), files }
        }
        ModelSource::Folder(p) => ModelRecord { id: p.display().to_string(), revision: None, files },
    }
}

/// The model an image came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    /// Hub id or folder path as given.
    pub id: String,
    pub revision: Option<String>,
    pub files: Vec<WeightRecord>,
}

/// An input file by path and content hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub path: String,
    pub sha256: String,
}

/// The sampler name A1111 writes for a scheduler.
pub fn a1111_sampler(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "DDIM",
        SchedulerKind::Euler => "Euler",
        SchedulerKind::EulerAncestral => "Euler a",
        SchedulerKind::DpmPp2m => "DPM++ 2M",
        SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        SchedulerKind::Lcm => "LCM",
        SchedulerKind::Pndm => "PLMS",
        SchedulerKind::FlowEuler => "Euler",
    }
}

/// The A1111 `parameters` text.
pub fn a1111_parameters(record: &ImageRecord, kind: SchedulerKind, model: &LoadedModel) -> String {
    let mut s = record.prompt.clone();
    // A1111 keeps LoRAs as tags in the prompt; writing them back lets A1111 (and kiln's A1111
    // prompt syntax) read the image's parameters as they were used.
    for l in &record.loras {
        s.push_str(&format!(" <lora:{}:{}>", l.name, l.weight));
    }
    if let Some(neg) = record.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        s.push_str(&format!("\nNegative prompt: {neg}"));
    }
    let hash: String = model.denoiser_sha256().chars().take(10).collect();
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
        record.steps,
        a1111_sampler(kind),
        record.guidance,
        record.seed,
        record.width,
        record.height,
        hash,
        model.source.display_name().replace(',', " "),
    ));
    if let (Some(strength), true) = (record.strength, record.init_image.is_some()) {
        s.push_str(&format!(", Denoising strength: {strength}"));
    }
    if !record.loras.is_empty() {
        // A1111's `Lora hashes`: name and the first 12 hex digits of the file's sha256.
        let hashes: Vec<String> = record
            .loras
            .iter()
            .map(|l| {
                format!(
                    "{}: {}",
                    l.name.replace([',', ':', '"'], " "),
                    l.sha256.get(..12).unwrap_or(&l.sha256)
                )
            })
            .collect();
        s.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
    }
    if let Some(inpaint) = &record.inpaint {
        s.push_str(&format!(", Mask blur: {}", inpaint.mask_blur));
        if inpaint.only_masked {
            s.push_str(&format!(", Inpaint area: Only masked, Masked area padding: {}", inpaint.padding));
        }
    }
    s.push_str(&format!(", Version: kiln {}", record.kiln_version));
    s
}

/// Both chunks for one image.
pub fn png_chunks(record: &ImageRecord, kind: SchedulerKind, model: &LoadedModel) -> Vec<TextChunk> {
    let json = serde_json::to_string(record).unwrap_or_default();
    vec![TextChunk::new("parameters", a1111_parameters(record, kind, model)), TextChunk::new("kiln", json)]
}

/// Reads the `kiln` record back from PNG text chunks.
pub fn record_from_chunks(chunks: &[TextChunk]) -> Option<ImageRecord> {
    chunks.iter().find(|c| c.keyword == "kiln").and_then(|c| serde_json::from_str(&c.text).ok())
}
