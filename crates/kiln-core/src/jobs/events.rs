//! One event stream for every job kind, and the sink that receives it. The sink is also how a
//! job is stopped: [`EventSink::cancelled`] is asked after every denoising step and every
//! upscale tile row, and a cancelled job writes nothing and records nothing.
//!
//! [`EventSink::yield_point`] is called at every step boundary: a queue worker uses it to run a
//! waiting draft while a final is paused (the final's state stays untouched in memory, so it
//! resumes to the same bits).

use crate::pipeline::generate::Progress;
use candle_core::{DType, Tensor};
use serde::Serialize;

/// Something that happened to a job.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// Waiting; `position` jobs run before it (0 = next).
    Queued { position: usize },
    /// Still waiting, and why (e.g. memory cannot hold its model beside a running one).
    Waiting { reason: String },
    /// A worker took the job.
    Started,
    /// A stage began: load, text_encode, denoise, vae_decode, write, record, upscale.
    Stage { stage: String },
    /// Denoising step `step` of `steps` of images `first_image..first_image + images`
    /// finished in `seconds`.
    Step { step: usize, steps: usize, seconds: f64, first_image: usize, images: usize },
    /// Upscale tiles done.
    Tiles { done: usize, total: usize },
    /// A preview of the first image after step `step`: a PNG, base64.
    Preview { step: usize, width: u32, height: u32, png_base64: String },
    /// The job paused at a step boundary to let a draft run (job id of the draft).
    Yielded { to: i64 },
    /// The job resumed after a yield.
    Resumed,
    /// Finished; the result (assets, files, seconds, credits).
    Done { result: serde_json::Value },
    /// Failed with this message.
    Failed { error: String },
    /// Cancelled before it finished; nothing was written.
    Cancelled,
}

/// Receives a job's events and may stop it.
pub trait EventSink {
    fn emit(&mut self, event: JobEvent);

    /// Whether the job must stop now.
    fn cancelled(&mut self) -> bool {
        false
    }

    /// Send a preview every this many steps (0 = never).
    fn preview_every(&self) -> usize {
        0
    }

    /// A step boundary: the job's state is consistent and may wait here.
    fn yield_point(&mut self) {}
}

/// A sink that drops everything.
pub struct NullSink;
impl EventSink for NullSink {
    fn emit(&mut self, _: JobEvent) {}
}

/// Adapts an [`EventSink`] to the pipelines' [`Progress`].
pub struct SinkProgress<'a> {
    sink: &'a mut dyn EventSink,
    batch: (usize, usize),
}

impl<'a> SinkProgress<'a> {
    pub fn new(sink: &'a mut dyn EventSink) -> Self {
        Self { sink, batch: (0, 1) }
    }
}

impl Progress for SinkProgress<'_> {
    fn step(&mut self, done: usize, total: usize, seconds: f64) {
        let (first_image, images) = self.batch;
        self.sink.emit(JobEvent::Step { step: done, steps: total, seconds, first_image, images });
        self.sink.yield_point();
    }

    fn stage(&mut self, stage: &str) {
        self.sink.emit(JobEvent::Stage { stage: stage.to_string() });
    }

    fn batch(&mut self, first: usize, count: usize) {
        self.batch = (first, count);
    }

    fn cancelled(&mut self) -> bool {
        self.sink.cancelled()
    }

    fn wants_preview(&mut self, done: usize, total: usize) -> bool {
        let every = self.sink.preview_every();
        every > 0 && done < total && done % every == 0
    }

    fn preview(&mut self, done: usize, latents: &Tensor) {
        // A preview that cannot be made is not worth failing the job over.
        if let Ok(rgb) = latent_preview(latents) {
            let mut png = Vec::new();
            let encoder = image::codecs::png::PngEncoder::new(&mut png);
            if image::ImageEncoder::write_image(
                encoder,
                rgb.as_raw(),
                rgb.width(),
                rgb.height(),
                image::ExtendedColorType::Rgb8,
            )
            .is_ok()
            {
                self.sink.emit(JobEvent::Preview {
                    step: done,
                    width: rgb.width(),
                    height: rgb.height(),
                    png_base64: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png),
                });
            }
        }
    }
}

/// A cheap RGB view of 4-channel SD latents (a fixed linear map per latent channel, the
/// "approximate" preview A1111 and ComfyUI use), at latent resolution. Other channel counts get
/// the mean of their channels as gray.
pub fn latent_preview(latents: &Tensor) -> crate::Result<image::RgbImage> {
    // Rows: latent channel; columns: R, G, B.
    const SD: [[f32; 3]; 4] =
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]];
    let first =
        latents.narrow(0, 0, 1)?.squeeze(0)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    let (c, h, w) = first.dims3()?;
    let data: Vec<f32> = first.flatten_all()?.to_vec1()?;
    let mut rgb = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let mut px = [0f32; 3];
            for ch in 0..c {
                let v = data[ch * h * w + y * w + x];
                if c == 4 {
                    for (k, p) in px.iter_mut().enumerate() {
                        *p += v * SD[ch][k];
                    }
                } else {
                    for p in px.iter_mut() {
                        *p += v / c as f32;
                    }
                }
            }
            let to8 = |v: f32| (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
            rgb.put_pixel(x as u32, y as u32, image::Rgb([to8(px[0]), to8(px[1]), to8(px[2])]));
        }
    }
    Ok(rgb)
}
