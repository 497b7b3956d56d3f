//! What output PNGs carry: an A1111-style `parameters` chunk (read by Civitai and most tools)
//! and a `kiln` JSON chunk with everything needed to replay the image.

use crate::image::png_meta::TextChunk;
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
    /// Inpainting, outpainting and erasing: the mask and how it was used (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inpaint: Option<InpaintRecord>,
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
    }
}

/// The A1111 `parameters` text.
pub fn a1111_parameters(record: &ImageRecord, kind: SchedulerKind, model: &LoadedModel) -> String {
    let mut s = record.prompt.clone();
    if let Some(neg) = record.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        s.push_str(&format!("\nNegative prompt: {neg}"));
    }
    let hash: String = model.unet_sha256().chars().take(10).collect();
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
