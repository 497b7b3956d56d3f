//! Tiled VAE decode/encode with whole-image GroupNorm statistics against the untiled VAE, side by
//! side with diffusers' `enable_tiling()` on the same latents (tests/fixtures/vae_tiled/make.py).
// Tests fail by panicking: unwrap is the point here.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_core::models::vae::{AutoencoderKl, TileSpec, VaeConfig};
use kiln_core::pipeline::vae_tiling::{VaeTiling, VaeTilingMode};
use std::path::PathBuf;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(FIXTURES).join(path)
}

fn model(variant: &str) -> AutoencoderKl {
    let dir = fixture(&format!("vae/{variant}"));
    let weights =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu)
            .unwrap();
    let cfg = VaeConfig::from_file(dir.join("config.json")).unwrap();
    AutoencoderKl::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap()
}

/// [1, 3, H, W] in [-1, 1] → planar [0, 1] values and (H, W).
fn unit(t: &Tensor) -> (Vec<f64>, usize, usize) {
    let (_, _, h, w) = t.dims4().unwrap();
    let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (v.iter().map(|&x| ((x as f64 + 1.0) / 2.0).clamp(0.0, 1.0)).collect(), h, w)
}

/// The figures of make.py's `figures`: PSNR (dB), the largest |mean difference| of a
/// `cell`-pixel square (1/255), and the seam ratio of `tiled` over `untiled` (mean |gradient| across
/// the boundaries over the mean elsewhere).
#[derive(Debug)]
struct Figures {
    psnr_db: f64,
    tone_255: f64,
    seam: f64,
}

fn figures(tiled: &Tensor, untiled: &Tensor, cell: usize, seams_x: &[usize], seams_y: &[usize]) -> Figures {
    let ((a, h, w), (b, _, _)) = (unit(tiled), unit(untiled));
    let mse = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64;
    let mut tone = 0f64;
    for y0 in (0..h).step_by(cell) {
        for x0 in (0..w).step_by(cell) {
            let (mut d, mut n) = (0f64, 0usize);
            for c in 0..3 {
                for y in y0..(y0 + cell).min(h) {
                    for x in x0..(x0 + cell).min(w) {
                        let i = (c * h + y) * w + x;
                        d += a[i] - b[i];
                        n += 1;
                    }
                }
            }
            tone = tone.max((d / n as f64 * 255.0).abs());
        }
    }
    let seam = |img: &[f64]| {
        let (mut at, mut na, mut off, mut no) = (0f64, 0usize, 0f64, 0usize);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let i = (c * h + y) * w + x;
                    if x > 0 {
                        let g = (img[i] - img[i - 1]).abs();
                        if seams_x.contains(&x) {
                            (at, na) = (at + g, na + 1);
                        } else {
                            (off, no) = (off + g, no + 1);
                        }
                    }
                    if y > 0 {
                        let g = (img[i] - img[i - w]).abs();
                        if seams_y.contains(&y) {
                            (at, na) = (at + g, na + 1);
                        } else {
                            (off, no) = (off + g, no + 1);
                        }
                    }
                }
            }
        }
        (at / na as f64) / (off / no as f64)
    };
    Figures { psnr_db: 10.0 * (1.0 / mse).log10(), tone_255: tone, seam: seam(&a) / seam(&b) }
}

/// kiln's tile boundaries in output pixels: where neighbouring cores meet.
fn kiln_seams(len_latent: usize, spec: &TileSpec, factor: usize) -> Vec<usize> {
    let cores = kiln_core::tiling::even_split(len_latent, spec.tile_px / factor, 1);
    cores.iter().skip(1).map(|r| r.start * factor).collect()
}

fn json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("vae_tiled/figures.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn spec(tile_px: usize) -> TileSpec {
    // The fixture's latents are 12x16: a halo of 4 latent pixels (half the default) keeps several
    // tiles; 2 would be inside the decoder's receptive field (about 26 dB).
    TileSpec { tile_px, halo: 4, feather: 4, ..TileSpec::default() }
}

#[test]
fn tiled_decode_matches_untiled_and_beats_diffusers_enable_tiling() {
    let vae = model("lpb2");
    let latents = Tensor::read_npy(fixture("vae_tiled/latents.npy")).unwrap();
    let untiled = vae.decode(&latents).unwrap();
    let fig = json();
    let tile_px = fig["tile_px"].as_u64().unwrap() as usize;
    let spec = spec(tile_px);
    let (tiled, run) = vae.decode_tiled(&latents, &spec, &mut || false).unwrap();
    assert_eq!(tiled.dims(), untiled.dims());
    let (_, _, lh, lw) = latents.dims4().unwrap();
    let ours = figures(&tiled, &untiled, tile_px, &kiln_seams(lw, &spec, 8), &kiln_seams(lh, &spec, 8));
    let seams = |k: &str| -> Vec<usize> {
        fig[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
    };
    let diffusers_tiled = Tensor::read_npy(fixture("vae_tiled/diffusers_tiled.npy")).unwrap();
    let theirs = figures(&diffusers_tiled, &untiled, tile_px, &seams("seams_x"), &seams("seams_y"));
    eprintln!("kiln {ours:?} ({run:?})\ndiffusers enable_tiling {theirs:?}");
    // Our figures of diffusers' output agree with the ones make.py recorded.
    let recorded = &fig["diffusers_enable_tiling"];
    assert!((theirs.psnr_db - recorded["psnr_db"].as_f64().unwrap()).abs() < 0.1, "{theirs:?}");
    assert!((theirs.tone_255 - recorded["tone_255"].as_f64().unwrap()).abs() < 0.1, "{theirs:?}");
    assert!(run.tiles > 1 && run.passes >= 2 && run.attention_windows == 1, "{run:?}");
    assert!(ours.psnr_db >= 40.0, "{ours:?}");
    assert!(ours.tone_255 <= 0.5, "{ours:?}");
    assert!((ours.seam - 1.0).abs() <= 0.05, "{ours:?}");
    assert!(ours.tone_255 < theirs.tone_255 && ours.psnr_db > theirs.psnr_db);
    assert!((ours.seam - 1.0).abs() < (theirs.seam - 1.0).abs(), "{ours:?} vs {theirs:?}");
}

#[test]
fn tiled_encode_matches_untiled() {
    let vae = model("lpb2");
    // 96x128 pixels: the first image of the VAE fixture, twice over side by side (a multiple of 8).
    let image = Tensor::read_npy(fixture("vae/image.npy")).unwrap().narrow(0, 0, 1).unwrap();
    let flipped = image.flip(&[3]).unwrap();
    let image = Tensor::cat(&[&image, &flipped], 2).unwrap();
    let whole = vae.encode(&image).unwrap();
    // The encoder sees further than the decoder (about 8 latent pixels): the default halo.
    let (tiled, run) =
        vae.encode_tiled(&image, &TileSpec { tile_px: 32, ..TileSpec::default() }, &mut || false).unwrap();
    assert!(run.tiles > 1, "{run:?}");
    let err =
        (tiled.mean - &whole.mean).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = whole.mean.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err <= 1e-2 * scale, "max |tiled - untiled| {err} against max |mean| {scale}");
}

#[test]
fn the_request_level_choice_tiles_only_when_asked_or_too_big() {
    let vae = model("lpb1");
    let latents = Tensor::read_npy(fixture("vae_tiled/latents.npy")).unwrap();
    let untiled = vae.decode(&latents).unwrap();
    let off = VaeTiling { mode: VaeTilingMode::Off, ..VaeTiling::default() };
    let diff =
        |t: &Tensor| (t - &untiled).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff(&off.decode(&vae, &latents, &mut || false).unwrap()), 0.0);
    // auto with the default budget: a 96x128 decode fits.
    assert_eq!(diff(&VaeTiling::default().decode(&vae, &latents, &mut || false).unwrap()), 0.0);
    // auto with a tiny budget tiles; so does on.
    let tiny = VaeTiling { budget_bytes: Some(1024), tile_px: Some(48), ..VaeTiling::default() };
    assert!(tiny.tiles(&vae, 96, 128));
    let on = VaeTiling { mode: VaeTilingMode::On, tile_px: Some(48), ..VaeTiling::default() };
    assert!(diff(&on.decode(&vae, &latents, &mut || false).unwrap()) > 0.0);
    let err =
        VaeTiling { tile_px: Some(4), ..on }.decode(&vae, &latents, &mut || false).unwrap_err().to_string();
    assert!(err.contains("vae-tile"), "{err}");
}

#[test]
fn kept_activations_change_cost_not_pixels_in_memory_on_disk_or_dropped() {
    let vae = model("lpb2");
    let latents = Tensor::read_npy(fixture("vae_tiled/latents.npy")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    // A file where the scratch folder should be: nothing can be spilled, so every tile reruns
    // from its input on every pass (what the tiled pass cost before it kept activations).
    let blocked = scratch.path().join("not-a-folder");
    std::fs::write(&blocked, b"x").unwrap();
    let with = |keep_bytes: u64, dir: &std::path::Path| TileSpec {
        keep_bytes,
        scratch_dir: Some(dir.to_path_buf()),
        ..spec(48)
    };
    let (memory, in_memory) =
        vae.decode_tiled(&latents, &with(u64::MAX, scratch.path()), &mut || false).unwrap();
    let (disk, on_disk) = vae.decode_tiled(&latents, &with(0, scratch.path()), &mut || false).unwrap();
    let (rerun, dropped) = vae.decode_tiled(&latents, &with(0, &blocked), &mut || false).unwrap();
    eprintln!("memory {in_memory:?}\ndisk {on_disk:?}\ndropped {dropped:?}");
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(values(&memory), values(&disk));
    assert_eq!(values(&memory), values(&rerun));
    assert!(in_memory.tiles > 1 && in_memory.passes > 2, "{in_memory:?}");
    assert!(in_memory.kept.spilled_bytes == 0 && in_memory.kept.peak_memory_bytes > 0, "{in_memory:?}");
    assert!(on_disk.kept.spilled_bytes > 0 && on_disk.kept.peak_memory_bytes == 0, "{on_disk:?}");
    assert!(dropped.kept.dropped > 0 && dropped.kept.spilled_bytes == 0, "{dropped:?}");
    assert_eq!(in_memory.stage_runs, on_disk.stage_runs);
    // Resuming from kept activations does well under half the stage runs of rerunning.
    assert!(2 * in_memory.stage_runs < dropped.stage_runs, "{in_memory:?} vs {dropped:?}");
    // Nothing is left in the scratch folder: spill files are unnamed and gone with the run.
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("not-a-folder")]);

    // The encoder's tiles resume the same way.
    let image = Tensor::read_npy(fixture("vae/image.npy")).unwrap().narrow(0, 0, 1).unwrap();
    let enc = |s: &TileSpec| {
        vae.encode_tiled(&image, &TileSpec { tile_px: 32, ..s.clone() }, &mut || false).unwrap()
    };
    let (a, kept) = enc(&with(0, scratch.path()));
    let (b, rerun) = enc(&with(0, &blocked));
    assert_eq!(values(&a.mean), values(&b.mean));
    assert!(kept.kept.spilled_bytes > 0 && kept.stage_runs < rerun.stage_runs, "{kept:?} vs {rerun:?}");
}

#[test]
fn a_cancelled_tiled_pass_stops_between_tiles() {
    let vae = model("lpb2");
    let latents = Tensor::read_npy(fixture("vae_tiled/latents.npy")).unwrap();
    let mut asked = 0;
    let mut cancel_on_third = || {
        asked += 1;
        asked >= 3
    };
    let err = vae.decode_tiled(&latents, &spec(48), &mut cancel_on_third).unwrap_err();
    assert!(matches!(err, kiln_core::error::Error::Cancelled), "{err}");
    assert_eq!(asked, 3, "asked once per tile, stopped at the first yes");
    let image = Tensor::read_npy(fixture("vae/image.npy")).unwrap().narrow(0, 0, 1).unwrap();
    let tiling = VaeTiling { mode: VaeTilingMode::On, tile_px: Some(32), ..VaeTiling::default() };
    let err = tiling.encode(&vae, &image, &mut || true).unwrap_err();
    assert!(matches!(err, kiln_core::error::Error::Cancelled), "{err}");
}
