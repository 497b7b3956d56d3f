//! Inpainting against diffusers' StableDiffusionInpaintPipeline on tiny random-weight models
//! (tests/fixtures/inpaint/make.py): PSNR ≥ 35 dB inside the mask, the input's own bytes
//! outside it, and no seam at the mask boundary of a flat image.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use kiln_core::image::mask::Mask;
use kiln_core::loaders::hub::ModelSource;
use kiln_core::pipeline::inpaint::{inpaint_quiet, Blend, InpaintRequest, Region, UNetKind};
use kiln_core::pipeline::model::LoadedModel;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug)]
struct Case {
    name: String,
    /// SD cases: the fixture's model folder (`plain4`, `inpaint9`); SDXL cases (`unet` in their
    /// cases.json): the UNet assembled into the sdxl pipeline fixture (`unet9` or `base`).
    #[serde(alias = "unet")]
    model: String,
    scheduler: Option<String>,
    steps: usize,
    guidance: f64,
    seed: u64,
    latents: Option<String>,
    strength: f64,
    prompt: String,
    negative_prompt: String,
    output: String,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/inpaint")
}

fn load_model(name: &str) -> LoadedModel {
    LoadedModel::load(ModelSource::Folder(dir().join(name).join("model")), &Device::Cpu, DType::F32).unwrap()
}

fn request(case: &Case, image: &RgbImage, mask: &Mask) -> InpaintRequest {
    let mut req = InpaintRequest::new(case.prompt.clone(), image.clone(), mask.clone());
    req.negative_prompt = Some(case.negative_prompt.clone());
    req.steps = case.steps;
    req.guidance = case.guidance;
    req.scheduler = case.scheduler.as_deref().map(|s| s.parse().unwrap());
    req.seeds = vec![case.seed];
    req.init_latents = case.latents.as_ref().map(|f| Tensor::read_npy(dir().join(f)).unwrap());
    req.strength = case.strength;
    req.blend = Blend::Diffusers;
    req.region = Region::Whole;
    req.mask_blur = 0.0;
    req
}

/// A reference array's values, flattened.
fn npy_values(path: PathBuf) -> Vec<f32> {
    Tensor::read_npy(path).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// PSNR over the pixels where `select` is true (values in [0, 1]).
fn masked_psnr(got: &RgbImage, want: &[f32], select: impl Fn(usize) -> bool) -> f64 {
    let mut se = 0f64;
    let mut n = 0usize;
    for (i, px) in got.pixels().enumerate() {
        if select(i) {
            for c in 0..3 {
                let d = px.0[c] as f64 / 255.0 - want[i * 3 + c] as f64;
                se += d * d;
                n += 1;
            }
        }
    }
    assert!(n > 0, "empty selection");
    10.0 * (1.0 / (se / n as f64)).log10()
}

fn assert_outside_identical(input: &RgbImage, output: &RgbImage, mask: &Mask, what: &str) {
    let mut kept = 0;
    for (i, (a, b)) in input.pixels().zip(output.pixels()).enumerate() {
        if mask.values()[i] == 0.0 {
            assert_eq!(a, b, "{what}: pixel {i} outside the mask changed");
            kept += 1;
        }
    }
    assert!(kept > 0, "{what}: nothing outside the mask");
}

#[test]
fn matches_diffusers_inside_the_mask_and_keeps_the_rest() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let mask = Mask::load(&dir().join("mask.png")).unwrap();
    let inside = mask.binarized();
    let mut models = std::collections::HashMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        let model = models.entry(case.model.clone()).or_insert_with(|| load_model(&case.model));
        let want = npy_values(dir().join(&case.output));
        let out = inpaint_quiet(model, &request(case, &image, &mask)).unwrap();
        let expected_kind = if case.model == "inpaint9" { UNetKind::Inpaint } else { UNetKind::Plain };
        assert_eq!(out.unet_kind, expected_kind);
        let got = &out.images[0].image;
        let p = masked_psnr(got, &want, |i| inside.values()[i] == 1.0);
        println!("{}: PSNR inside the mask {p:.1} dB", case.name);
        if p < 35.0 {
            failures.push(format!("{}: {p:.1} dB", case.name));
        }
        assert_outside_identical(&image, got, &out.composite_mask, &case.name);
    }
    assert!(failures.is_empty(), "below 35 dB: {failures:?}");
}

/// An SDXL folder assembled from the sdxl pipeline fixture's components and `unet`
/// (tests/fixtures/inpaint-sdxl/make.py keeps only what is new).
fn sdxl_model(unet: &str, tmp: &Path) -> LoadedModel {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sdxl/model");
    let folder = tmp.join(unet);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(base.join("model_index.json"), folder.join("model_index.json")).unwrap();
    for part in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"] {
        std::os::unix::fs::symlink(base.join(part), folder.join(part)).unwrap();
    }
    let unet_dir = if unet == "base" { base.join("unet") } else { sdxl_dir().join(unet) };
    std::os::unix::fs::symlink(unet_dir, folder.join("unet")).unwrap();
    LoadedModel::load(ModelSource::Folder(folder), &Device::Cpu, DType::F32).unwrap()
}

fn sdxl_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/inpaint-sdxl")
}

/// StableDiffusionXLInpaintPipeline: a 9-channel SDXL UNet (text_time, two text encoders) and
/// the 4-channel SDXL UNet, same image and mask as the SD cases.
#[test]
fn matches_diffusers_sdxl_inpaint() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(sdxl_dir().join("cases.json")).unwrap()).unwrap();
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let mask = Mask::load(&dir().join("mask.png")).unwrap();
    let inside = mask.binarized();
    let tmp = tempfile::tempdir().unwrap();
    let mut models = std::collections::HashMap::new();
    let mut failures = Vec::new();
    let mut outputs: Vec<(String, RgbImage)> = Vec::new();
    for case in &cases {
        let model = models.entry(case.model.clone()).or_insert_with(|| sdxl_model(&case.model, tmp.path()));
        assert!(model.unet().unwrap().config().addition_embed_type.as_deref() == Some("text_time"));
        let want = npy_values(sdxl_dir().join(&case.output));
        let out = inpaint_quiet(model, &request(case, &image, &mask)).unwrap();
        let expected_kind = if case.model == "unet9" { UNetKind::Inpaint } else { UNetKind::Plain };
        assert_eq!(out.unet_kind, expected_kind);
        let got = &out.images[0].image;
        let p = masked_psnr(got, &want, |i| inside.values()[i] == 1.0);
        println!("{}: PSNR inside the mask {p:.1} dB", case.name);
        if p < 35.0 {
            failures.push(format!("{}: {p:.1} dB", case.name));
        }
        assert_outside_identical(&image, got, &out.composite_mask, &case.name);
        outputs.push((case.name.clone(), got.clone()));
    }
    assert!(failures.is_empty(), "below 35 dB: {failures:?}");
    // The cases differ from each other by far more than the tolerance: the test can fail.
    let first = npy_values(sdxl_dir().join(&cases[0].output));
    for (name, got) in &outputs[1..] {
        let p = masked_psnr(got, &first, |i| inside.values()[i] == 1.0);
        println!("{name} vs the {} reference: {p:.1} dB", cases[0].name);
        assert!(p < 30.0, "{name}: {p}");
    }
}

/// A different case's reference must not pass: the parity test can fail.
#[test]
fn parity_test_tells_cases_apart() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let mask = Mask::load(&dir().join("mask.png")).unwrap();
    let inside = mask.binarized();
    let model = load_model("plain4");
    let case = cases.iter().find(|c| c.name == "plain4_pndm").unwrap();
    let other = cases.iter().find(|c| c.name == "plain4_euler_a").unwrap();
    let want = npy_values(dir().join(&other.output));
    let out = inpaint_quiet(&model, &request(case, &image, &mask)).unwrap();
    let p = masked_psnr(&out.images[0].image, &want, |i| inside.values()[i] == 1.0);
    println!("plain4_pndm vs the euler-a reference: {p:.1} dB");
    assert!(p < 30.0, "{p}");
}

fn step(a: &image::Rgb<u8>, b: &image::Rgb<u8>) -> f64 {
    (0..3).map(|c| (a.0[c] as f64 - b.0[c] as f64).abs()).fold(0f64, f64::max)
}

/// Seam metric on a flat image with a rectangular mask [x0, x1) × [y0, y1): the mean step
/// across the mask's edge (each edge pixel against its outside neighbour) over the mean step
/// between neighbours 4..8 px inside the mask. A seam (repainted pixels meeting kept ones
/// with a jump) gives a ratio well above 1; a seamless fill about 1 or less.
fn seam_ratio(img: &RgbImage, (x0, y0, x1, y1): (u32, u32, u32, u32)) -> f64 {
    let (mut across, mut n_across) = (0f64, 0usize);
    for x in x0..x1 {
        across += step(img.get_pixel(x, y0), img.get_pixel(x, y0 - 1));
        across += step(img.get_pixel(x, y1 - 1), img.get_pixel(x, y1));
        n_across += 2;
    }
    for y in y0..y1 {
        across += step(img.get_pixel(x0, y), img.get_pixel(x0 - 1, y));
        across += step(img.get_pixel(x1 - 1, y), img.get_pixel(x1, y));
        n_across += 2;
    }
    let (mut inner, mut n_inner) = (0f64, 0usize);
    for y in y0 + 4..y1 - 8 {
        for x in x0 + 4..x1 - 8 {
            let d = (x - x0).min(x1 - 1 - x).min(y - y0).min(y1 - 1 - y);
            if (4..8).contains(&d) {
                inner += step(img.get_pixel(x, y), img.get_pixel(x + 1, y));
                inner += step(img.get_pixel(x, y), img.get_pixel(x, y + 1));
                n_inner += 2;
            }
        }
    }
    (across / n_across as f64) / (inner / n_inner as f64)
}

/// The seam tests' scene: a flat 96x64 image with a hard rectangular mask `FLAT_RECT`
/// (x0, y0, x1, y1), its edges on the 8 px latent grid.
const FLAT_RECT: (u32, u32, u32, u32) = (24, 16, 72, 48);

fn flat_scene() -> (RgbImage, Mask) {
    let (x0, y0, x1, y1) = FLAT_RECT;
    let flat = RgbImage::from_pixel(96, 64, image::Rgb([150, 120, 90]));
    let mask =
        Mask::from_fn(96, 64, |x, y| if (x0..x1).contains(&x) && (y0..y1).contains(&y) { 1.0 } else { 0.0 });
    (flat, mask)
}

/// A whole-image inpaint request with 8 steps, one seed, a solver and the x0 re-imposition set.
fn whole_request(
    image: &RgbImage,
    mask: &Mask,
    sched: &str,
    seed: u64,
    x0: bool,
    blur: f64,
) -> InpaintRequest {
    let mut req = InpaintRequest::new("a red fox sitting in the snow", image.clone(), mask.clone());
    req.steps = 8;
    req.seeds = vec![seed];
    req.region = Region::Whole;
    req.scheduler = Some(sched.parse().unwrap());
    req.reimpose_denoised = Some(x0);
    req.mask_blur = blur;
    req
}

#[test]
fn flat_image_has_no_seam_and_keeps_unmasked_pixels() {
    let model = load_model("plain4");
    let (flat, mask) = flat_scene();
    let rect = FLAT_RECT;
    let mut req = InpaintRequest::new("a red fox sitting in the snow", flat.clone(), mask);
    req.steps = 8;
    req.seeds = vec![11];
    req.region = Region::Whole;
    let kiln = inpaint_quiet(&model, &req).unwrap();
    let kiln_ratio = seam_ratio(&kiln.images[0].image, rect);
    req.mask_blur = 0.0;
    let unfeathered = inpaint_quiet(&model, &req).unwrap();
    let unfeathered_ratio = seam_ratio(&unfeathered.images[0].image, rect);
    req.blend = Blend::Diffusers;
    req.mask_blur = 0.0;
    let diffusers = inpaint_quiet(&model, &req).unwrap();
    let diffusers_ratio = seam_ratio(&diffusers.images[0].image, rect);
    println!(
        "seam ratio: kiln blend {kiln_ratio:.3} (no feathering {unfeathered_ratio:.3}), diffusers blend {diffusers_ratio:.3}"
    );
    assert_outside_identical(&flat, &kiln.images[0].image, &kiln.composite_mask, "kiln blend");
    assert_outside_identical(&flat, &diffusers.images[0].image, &diffusers.composite_mask, "diffusers blend");
    // The feathered mask reaches 3 sigma = 12 px beyond the rectangle; everything farther is kept.
    assert_eq!(kiln.composite_mask.bbox().map(|b| (b.x, b.y, b.width, b.height)), Some((12, 4, 72, 56)));
    assert!(kiln_ratio < 1.2, "kiln blend seam ratio {kiln_ratio}");
    // The metric does see seams: a hard mask edge over a (random) VAE's round trip shows one.
    assert!(diffusers_ratio > 1.5 && unfeathered_ratio > 1.5, "{diffusers_ratio} {unfeathered_ratio}");
}

#[test]
fn only_masked_mode_crops_processes_at_native_size_and_pastes_back() {
    let model = load_model("plain4");
    // A 320x256 canvas (native 64x64) with a 20x12 spot: auto picks only-masked mode.
    let image = RgbImage::from_fn(320, 256, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mask =
        Mask::from_fn(
            320,
            256,
            |x, y| if (200..220).contains(&x) && (100..112).contains(&y) { 1.0 } else { 0.0 },
        );
    let mut req = InpaintRequest::new("a red fox", image.clone(), mask.clone());
    req.steps = 4;
    req.seeds = vec![5];
    let out = inpaint_quiet(&model, &req).unwrap();
    let plan = out.plan;
    println!("plan: {plan:?}");
    assert!(plan.only_masked);
    assert_eq!((plan.process_width, plan.process_height), (64, 64));
    // Mask box 20x12, blurred by 3 sigma = 12 px (44x36), padded by 32 (108x100), made square.
    assert_eq!((plan.crop.width, plan.crop.height), (108, 108));
    let bbox = out.composite_mask.bbox().unwrap();
    assert!(plan.crop.x <= bbox.x && plan.crop.x + plan.crop.width >= bbox.x + bbox.width);
    assert!(plan.crop.y <= bbox.y && plan.crop.y + plan.crop.height >= bbox.y + bbox.height);
    let got = &out.images[0].image;
    assert_outside_identical(&image, got, &out.composite_mask, "only-masked");
    // Inside the spot the model's output replaced the input.
    let changed = (200..220)
        .flat_map(|x| (100..112).map(move |y| (x, y)))
        .filter(|&(x, y)| got.get_pixel(x, y) != image.get_pixel(x, y))
        .count();
    assert!(changed > 200, "only {changed} of 240 pixels changed");

    // Forced whole-image mode processes the full canvas.
    req.region = Region::Whole;
    let whole = kiln_core::pipeline::inpaint::plan(&model, &req, &out.composite_mask).unwrap();
    assert_eq!((whole.process_width, whole.process_height, whole.only_masked), (320, 256, false));
}

#[test]
fn outpaint_grows_the_canvas_and_keeps_the_original_beyond_the_overlap() {
    use kiln_core::pipeline::outpaint::{extend_canvas, Extension, Prefill};
    let model = load_model("inpaint9");
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let ext = Extension::to_aspect(96, 64, 16, 9).unwrap();
    assert_eq!(ext, Extension { left: 9, right: 9, top: 0, bottom: 0 });
    let canvas = extend_canvas(&image, ext, Prefill::Edge, 8, 0).unwrap();
    assert_eq!(canvas.image.dimensions(), (114, 64));
    let mut req = InpaintRequest::new("a red fox", canvas.image.clone(), canvas.mask.clone());
    req.steps = 4;
    req.seeds = vec![2];
    req.mask_blur = 0.0;
    let out = inpaint_quiet(&model, &req).unwrap();
    let got = &out.images[0].image;
    assert_eq!(got.dimensions(), (114, 64));
    assert_eq!((out.plan.process_width, out.plan.process_height), (120, 64));
    // The original beyond the 8 px overlap is untouched, byte for byte.
    for y in 0..64 {
        for x in 8..88 {
            assert_eq!(got.get_pixel(9 + x, y), image.get_pixel(x, y), "({x}, {y})");
        }
    }
    // The new area was painted (not left as the edge fill).
    let changed = (0..64).filter(|&y| got.get_pixel(0, y) != canvas.image.get_pixel(0, y)).count();
    assert!(changed > 48, "{changed}");
}

/// Mean absolute step (8-bit levels) between the output and the input over the composite
/// mask's soft band (0 < m < 1): how well the repainted part agrees with the kept part where the
/// two are blended. Lower = a more consistent transition.
fn band_mismatch(input: &RgbImage, output: &RgbImage, mask: &Mask) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for (i, (a, b)) in input.pixels().zip(output.pixels()).enumerate() {
        let m = mask.values()[i];
        if m > 0.0 && m < 1.0 {
            sum += step(a, b);
            n += 1;
        }
    }
    assert!(n > 0, "no soft band");
    sum / n as f64
}

/// Re-imposing the known latents on the solvers' x0 estimate (kiln's default with its blend;
/// for PNDM the x0 its eps implies)
/// changes only latent cells whose mask is soft: a hard, grid-aligned mask gives the same bytes
/// with and without it, a feathered one does not. Prints the seam ratio and the soft band's
/// mismatch with and without, per solver (the numbers in benches/RESULTS.md).
#[test]
fn x0_reimposition_acts_on_soft_cells_only() {
    let model = load_model("plain4");
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let mask = Mask::load(&dir().join("mask.png")).unwrap();
    let (flat, flat_mask) = flat_scene();
    let rect = FLAT_RECT;
    let run = |img: &RgbImage, m: &Mask, sched: &str, seed: u64, x0: bool, blur: f64| {
        inpaint_quiet(&model, &whole_request(img, m, sched, seed, x0, blur)).unwrap()
    };
    let (mut seam_better, mut runs) = (0, 0);
    for sched in ["ddim", "euler", "euler-a", "dpmpp-2m", "lcm", "pndm"] {
        // Hard mask on the 8 px grid, no inflation needed to see it: every latent cell is 0 or 1.
        let mut req = InpaintRequest::new("a red fox", flat.clone(), flat_mask.clone());
        req.steps = 4;
        req.region = Region::Whole;
        req.scheduler = Some(sched.parse().unwrap());
        req.mask_blur = 0.0;
        req.reimpose_denoised = Some(false);
        let off = inpaint_quiet(&model, &req).unwrap();
        req.reimpose_denoised = Some(true);
        let on = inpaint_quiet(&model, &req).unwrap();
        assert_eq!(off.images[0].image, on.images[0].image, "{sched}: hard mask, x0 hook changed the image");
        for seed in [3u64, 11] {
            let mut line = format!("{sched:9} seed {seed:2}:");
            let mut seams = [0f64; 2];
            let mut images = Vec::new();
            for (k, x0) in [false, true].into_iter().enumerate() {
                let out = run(&image, &mask, sched, seed, x0, 4.0);
                let band = band_mismatch(&image, &out.images[0].image, &out.composite_mask);
                let fout = run(&flat, &flat_mask, sched, seed, x0, 4.0);
                let fband = band_mismatch(&flat, &fout.images[0].image, &fout.composite_mask);
                seams[k] = seam_ratio(&fout.images[0].image, rect);
                assert_outside_identical(&image, &out.images[0].image, &out.composite_mask, sched);
                line += &format!("  x0 {x0:5}: band {band:.2}, flat band {fband:.2}, seam {:.3}", seams[k]);
                images.push(out.images[0].image.clone());
            }
            println!("{line}");
            assert_ne!(images[0], images[1], "{sched}: feathered mask, x0 hook had no effect");
            assert!(seams[1] < 1.2, "{sched}: seam ratio {}", seams[1]);
            seam_better += usize::from(seams[1] <= seams[0]);
            runs += 1;
        }
    }
    println!("seam ratio no worse with the x0 hook in {seam_better} of {runs} runs");
}

/// Measurement behind benches/RESULTS.md (not a pass/fail test): the flat-image seam ratio and
/// the soft band's mismatch with and without the x0 re-imposition, over 8 seeds per solver and
/// two feather widths. Run: `cargo test -p kiln-core --test inpaint -- --ignored --nocapture x0_stats`.
#[test]
#[ignore]
fn x0_stats() {
    let model = load_model("plain4");
    let (flat, flat_mask) = flat_scene();
    let rect = FLAT_RECT;
    println!("| solver | blur px | seam ratio off | seam ratio on | runs on <= off | band mismatch off | band mismatch on |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for blur in [4.0, 8.0] {
        for sched in ["ddim", "euler", "euler-a", "dpmpp-2m", "lcm", "pndm"] {
            let (mut seam, mut band, mut better) = ([0f64; 2], [0f64; 2], 0);
            let seeds = 0u64..8;
            for seed in seeds.clone() {
                let mut s = [0f64; 2];
                for (k, x0) in [false, true].into_iter().enumerate() {
                    let req = whole_request(&flat, &flat_mask, sched, seed, x0, blur);
                    let out = inpaint_quiet(&model, &req).unwrap();
                    s[k] = seam_ratio(&out.images[0].image, rect);
                    seam[k] += s[k];
                    band[k] += band_mismatch(&flat, &out.images[0].image, &out.composite_mask);
                }
                better += usize::from(s[1] <= s[0]);
            }
            let n = seeds.count() as f64;
            println!(
                "| {sched} | {blur} | {:.3} | {:.3} | {better}/{n} | {:.2} | {:.2} |",
                seam[0] / n,
                seam[1] / n,
                band[0] / n,
                band[1] / n
            );
        }
    }
}

/// FLUX.1-dev (the tiny fixture) against diffusers' FluxInpaintPipeline on this folder's image and
/// mask, with and without true CFG (tests/fixtures/flux/make_dev_extras.py made the references).
#[test]
fn flux_matches_diffusers_flux_inpaint_inside_the_mask() {
    #[derive(Deserialize)]
    struct FluxCase {
        name: String,
        prompt: String,
        negative_prompt: Option<String>,
        true_cfg_scale: Option<f64>,
        steps: usize,
        guidance: f64,
        strength: f64,
        seed: u64,
        output: String,
    }
    let flux = dir().join("../flux/dev");
    let cases: Vec<FluxCase> =
        serde_json::from_str(&std::fs::read_to_string(flux.join("inpaint_cases.json")).unwrap()).unwrap();
    let model = LoadedModel::load(ModelSource::Folder(flux.join("model")), &Device::Cpu, DType::F32).unwrap();
    let image = kiln_core::image::load_rgb(&dir().join("image.png")).unwrap();
    let mask = Mask::load(&dir().join("mask.png")).unwrap();
    let inside = mask.binarized();
    for case in &cases {
        let mut req = InpaintRequest::new(case.prompt.clone(), image.clone(), mask.clone());
        req.negative_prompt = case.negative_prompt.clone();
        req.true_cfg = case.true_cfg_scale;
        req.steps = case.steps;
        req.guidance = case.guidance;
        req.strength = case.strength;
        req.seeds = vec![case.seed];
        req.blend = Blend::Diffusers;
        req.region = Region::Whole;
        req.mask_blur = 0.0;
        let out = inpaint_quiet(&model, &req).unwrap();
        let got = &out.images[0].image;
        let want = npy_values(flux.join(&case.output));
        let p = masked_psnr(got, &want, |i| inside.values()[i] == 1.0);
        println!("FLUX.1-dev {}: PSNR inside the mask {p:.1} dB", case.name);
        assert!(p >= 35.0, "{}: {p:.1} dB", case.name);
        assert_outside_identical(&image, got, &out.composite_mask, &case.name);
    }
    // True CFG on a family that guides classifier-free already is refused by name.
    let sd = load_model("plain4");
    let mut req = InpaintRequest::new("a fox", image.clone(), mask.clone());
    req.negative_prompt = Some("blurry".into());
    req.true_cfg = Some(4.0);
    let err = inpaint_quiet(&sd, &req).unwrap_err().to_string();
    assert!(err.contains("true-cfg"), "{err}");
}
