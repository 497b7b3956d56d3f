//! kiln's schedulers against diffusers 0.42.1 (tests/fixtures/schedulers/make.py): timesteps,
//! sigmas and init_noise_sigma over many configs, and short denoising runs with a fake model,
//! txt2img and img2img, including the ancestral/LCM noise drawn from per-item torch generators.

use candle_core::{DType, Device, Tensor};
use kiln_core::rng::BatchRng;
use kiln_core::schedule::{self, SchedulerConfig, SchedulerKind};
use serde::Deserialize;
use std::collections::HashMap;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/schedulers");
/// Relative tolerance of the denoising runs (max |kiln - diffusers| / max |diffusers|).
const RUN_TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Schedules {
    configs: HashMap<String, String>,
    cases: Vec<ScheduleCase>,
    alphas_cumprod: HashMap<String, Vec<f32>>,
}

#[derive(Deserialize)]
struct ScheduleCase {
    config: String,
    kind: String,
    steps: usize,
    timesteps: Option<Vec<f64>>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: Option<f64>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Runs {
    configs: HashMap<String, String>,
    shape: Vec<usize>,
    runs: Vec<Run>,
}

#[derive(Deserialize)]
struct Run {
    key: String,
    kind: String,
    config: String,
    steps: usize,
    strength: Option<f64>,
    t_start: usize,
    seeds: Vec<u64>,
}

fn config(configs: &HashMap<String, String>, name: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&configs[name], None).expect("config parses")
}

fn read_json<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let text = std::fs::read_to_string(format!("{DIR}/{name}")).expect("read fixture");
    serde_json::from_str(&text).expect("parse fixture")
}

fn rel_close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1e-12)
}

#[test]
fn alphas_cumprod_bit_equal_to_torch() {
    let s: Schedules = read_json("schedules.json");
    for (name, want) in &s.alphas_cumprod {
        let cfg = config(&s.configs, name);
        let got = schedule::alphas_cumprod(SchedulerKind::Ddim, &cfg).expect("alphas");
        assert_eq!(got.len(), want.len());
        if cfg.rescale_betas_zero_snr == Some(true) {
            // The zero-SNR rescale takes square roots, and torch's float32 sqrt on x86 (MKL VML)
            // is not correctly rounded: about 1 in 150 values differ by an ulp.
            for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(rel_close(g as f64, w as f64, 1e-5), "{name}: alphas_cumprod[{k}] {g} vs {w}");
            }
        } else {
            let diffs = got.iter().zip(want).filter(|(g, w)| g != w).count();
            assert_eq!(diffs, 0, "{name}: {diffs} alphas_cumprod differ from torch's float32 values");
        }
    }
}

#[test]
fn timesteps_sigmas_and_init_sigma_match_diffusers() {
    let s: Schedules = read_json("schedules.json");
    let mut checked = 0;
    for case in &s.cases {
        let what = format!("{} / {} / {} steps", case.config, case.kind, case.steps);
        let kind: SchedulerKind = case.kind.parse().expect("kind");
        let built = schedule::build(kind, &config(&s.configs, &case.config), case.steps);
        if let Some(err) = &case.error {
            assert!(built.is_err(), "{what}: diffusers refused ({err}) but kiln accepted");
            continue;
        }
        let sched = built.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(sched.kind(), kind);
        let want_t = case.timesteps.as_ref().expect("timesteps");
        assert_eq!(sched.timesteps().len(), want_t.len(), "{what}: timestep count");
        for (k, (&g, &w)) in sched.timesteps().iter().zip(want_t).enumerate() {
            // Karras/exponential timesteps come from float32 logs, where numpy's vectorised log
            // may differ from libm's by an ulp.
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "{what}: timestep {k}: {g} vs {w}");
        }
        if let Some(want_s) = &case.sigmas {
            assert_eq!(sched.sigmas().len(), want_s.len(), "{what}: sigma count");
            for (k, (&g, &w)) in sched.sigmas().iter().zip(want_s).enumerate() {
                assert!(rel_close(g, w, 1e-6) || (g - w).abs() < 1e-9, "{what}: sigma {k}: {g} vs {w}");
            }
        }
        let want_init = case.init_noise_sigma.expect("init_noise_sigma");
        assert!(rel_close(sched.init_noise_sigma(), want_init, 1e-6), "{what}: init_noise_sigma");
        checked += 1;
    }
    assert!(checked > 300, "only {checked} cases checked");
}

/// max |a - b| / max |b|.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let diff =
        (got - want).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>());
    let scale = want.abs().and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>());
    diff.expect("diff") as f64 / (scale.expect("scale") as f64).max(1e-6)
}

#[test]
fn denoising_runs_match_diffusers() {
    let runs: Runs = read_json("runs.json");
    let tensors =
        candle_core::safetensors::load(format!("{DIR}/runs.safetensors"), &Device::Cpu).expect("tensors");
    let (f, g, image) = (&tensors["F"], &tensors["G"], &tensors["image"]);
    let item_shape = &runs.shape[1..];
    let mut worst = 0f64;
    for run in &runs.runs {
        let what = format!(
            "{} ({} / {} / {} steps / strength {:?})",
            run.key, run.kind, run.config, run.steps, run.strength
        );
        let want = &tensors[&run.key];
        let kind: SchedulerKind = run.kind.parse().expect("kind");
        let mut sched = schedule::build(kind, &config(&runs.configs, &run.config), run.steps).expect("build");
        let mut rng = BatchRng::new(&run.seeds);
        let (start, mut x) = match run.strength {
            None => {
                let noise = rng.randn(item_shape, &Device::Cpu, DType::F32).expect("noise");
                (0, noise.affine(sched.init_noise_sigma(), 0.0).expect("scale"))
            }
            Some(strength) => {
                let start = schedule::strength_start(run.steps, strength);
                assert_eq!(start, run.t_start, "{what}: t_start");
                let noise = rng.randn(item_shape, &Device::Cpu, DType::F32).expect("noise");
                (start, sched.add_noise(image, &noise, start).expect("add_noise"))
            }
        };
        let n_steps = sched.timesteps().len() - start;
        assert_eq!(want.dim(0).expect("dim"), n_steps + 1, "{what}: step count");
        let e = rel_err(&x, &want.get(0).expect("get"));
        assert!(e < RUN_TOL, "{what}: initial latents off by {e:.2e}");
        for (k, i) in (start..sched.timesteps().len()).enumerate() {
            let t = sched.timesteps()[i];
            let x_in = sched.scale_model_input(&x, i).expect("scale_model_input");
            let m = ((x_in.affine(0.1, 0.0).expect("mul") + f).expect("add")
                + g.affine((t as f32 / 1000.0) as f64, 0.0).expect("mul"))
            .expect("model");
            x = sched.step(&m, i, &x, &mut rng).expect("step");
            let e = rel_err(&x, &want.get(k + 1).expect("get"));
            worst = worst.max(e);
            assert!(e < RUN_TOL, "{what}: step {k} (index {i}, t {t}) off by {e:.2e}");
        }
    }
    eprintln!("{} runs, worst relative error {worst:.2e}", runs.runs.len());
}

#[test]
fn kinds_parse_and_map_classes() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.name().parse::<SchedulerKind>().expect("parse"), kind);
    }
    let err = "dpm".parse::<SchedulerKind>().expect_err("unknown name");
    assert!(err.to_string().contains("dpmpp-2m-karras"), "{err}");

    let mut cfg = SchedulerConfig::default();
    assert_eq!(SchedulerKind::from_class("PNDMScheduler", &cfg).expect("pndm"), SchedulerKind::Pndm);
    assert_eq!(
        SchedulerKind::from_class("DPMSolverMultistepScheduler", &cfg).expect("dpm"),
        SchedulerKind::DpmPp2m
    );
    cfg.use_karras_sigmas = Some(true);
    assert_eq!(
        SchedulerKind::from_class("DPMSolverMultistepScheduler", &cfg).expect("dpm"),
        SchedulerKind::DpmPp2mKarras
    );
    cfg.algorithm_type = Some("sde-dpmsolver++".into());
    assert!(SchedulerKind::from_class("DPMSolverMultistepScheduler", &cfg).is_err());
    let err = SchedulerKind::from_class("UniPCMultistepScheduler", &cfg).expect_err("unsupported");
    assert!(err.to_string().contains("scheduler"), "{err}");
}

#[test]
fn unsupported_or_invalid_settings_are_errors() {
    let parse = |text: &str| SchedulerConfig::from_json_str(text, None).expect("parse");
    let base = parse(r#"{"_class_name": "DDIMScheduler"}"#);
    assert!(schedule::build(SchedulerKind::Ddim, &base, 0).is_err());
    assert!(schedule::build(SchedulerKind::Ddim, &base, 1001).is_err());
    assert!(
        schedule::build(SchedulerKind::Lcm, &base, 51).is_err(),
        "LCM allows at most original_inference_steps"
    );
    let thresholding = parse(r#"{"thresholding": true}"#);
    assert!(schedule::build(SchedulerKind::Ddim, &thresholding, 10).is_err());
    let sde = parse(r#"{"use_beta_sigmas": true}"#);
    assert!(schedule::build(SchedulerKind::Euler, &sde, 10).is_err());
    let bad_schedule = parse(r#"{"beta_schedule": "sigmoid"}"#);
    assert!(schedule::build(SchedulerKind::Euler, &bad_schedule, 10).is_err());
    let bad_prediction = parse(r#"{"prediction_type": "flow_prediction"}"#);
    assert!(schedule::build(SchedulerKind::DpmPp2m, &bad_prediction, 10).is_err());
    // PNDM has no rescale_betas_zero_snr argument, so diffusers (and kiln) ignore the key there.
    let zsnr = parse(r#"{"rescale_betas_zero_snr": true}"#);
    let plain = schedule::alphas_cumprod(SchedulerKind::Pndm, &base).expect("plain");
    assert_eq!(schedule::alphas_cumprod(SchedulerKind::Pndm, &zsnr).expect("pndm"), plain);
    assert_ne!(schedule::alphas_cumprod(SchedulerKind::Ddim, &zsnr).expect("ddim"), plain);
    // Past the end of the schedule is an error, not a panic.
    let mut sched = schedule::build(SchedulerKind::Euler, &base, 4).expect("euler");
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).expect("zeros");
    assert!(sched.step(&x, 4, &x, &mut BatchRng::new(&[0])).is_err());
}

#[test]
fn strength_start_follows_diffusers() {
    assert_eq!(schedule::strength_start(50, 0.75), 13);
    assert_eq!(schedule::strength_start(6, 0.5), 3);
    assert_eq!(schedule::strength_start(10, 1.0), 0);
    assert_eq!(schedule::strength_start(10, 0.0), 10);
    assert_eq!(schedule::strength_start(10, 1.5), 0);
}
