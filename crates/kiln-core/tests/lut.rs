//! 3D LUT grading against independent implementations (tests/fixtures/lut/make.py): Pillow's
//! `Color3DLUT` for trilinear and colour-science's tetrahedral interpolation, on LUTs of sizes
//! 2, 17 and 33 — PSNR ≥ 50 dB; an identity LUT leaves every pixel as it was.
#![allow(clippy::unwrap_used)]

use kiln_core::image::lut::{Interpolation, Lut3d};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lut")
}

fn psnr(a: &[f64], b: &[f64]) -> f64 {
    let mse = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / a.len() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

fn unit(img: &image::RgbImage) -> Vec<f64> {
    img.as_raw().iter().map(|&v| f64::from(v) / 255.0).collect()
}

#[test]
fn matches_pillow_trilinear_and_colour_science_tetrahedral() {
    let img = image::open(dir().join("image.png")).unwrap().to_rgb8();
    for n in [2, 17, 33] {
        let lut = Lut3d::read(&dir().join(format!("grade{n}.cube"))).unwrap();
        assert_eq!(lut.size, n);
        let tri = lut.apply(&img, Interpolation::Trilinear, 1.0);
        let pillow = image::open(dir().join(format!("pillow_trilinear_{n}.png"))).unwrap().to_rgb8();
        let p_tri = psnr(&unit(&tri), &unit(&pillow));
        let tet = lut.apply(&img, Interpolation::Tetrahedral, 1.0);
        let reference = kiln_core::loaders::npy::read(&dir().join(format!("tetrahedral_{n}.npy"))).unwrap();
        let reference: Vec<f64> = reference
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let p_tet = psnr(&unit(&tet), &reference);
        println!("LUT {n}: trilinear vs Pillow {p_tri:.1} dB, tetrahedral vs colour-science {p_tet:.1} dB");
        assert!(p_tri >= 50.0 && p_tet >= 50.0, "LUT {n}: {p_tri:.1} / {p_tet:.1} dB");
        assert_ne!(tri, img, "the grade changes the image");
    }
}

#[test]
fn identity_lut_is_bit_identical_and_strength_blends() {
    let img = image::open(dir().join("image.png")).unwrap().to_rgb8();
    let mut text = String::from("TITLE \"identity\"\nLUT_3D_SIZE 33\n");
    for b in 0..33 {
        for g in 0..33 {
            for r in 0..33 {
                text.push_str(&format!("{} {} {}\n", r as f32 / 32.0, g as f32 / 32.0, b as f32 / 32.0));
            }
        }
    }
    let identity = Lut3d::parse(&text, Path::new("identity.cube")).unwrap();
    assert_eq!(identity.title.as_deref(), Some("identity"));
    for interp in [Interpolation::Trilinear, Interpolation::Tetrahedral] {
        assert_eq!(identity.apply(&img, interp, 1.0), img);
    }
    let grade = Lut3d::read(&dir().join("grade17.cube")).unwrap();
    assert_eq!(grade.apply(&img, Interpolation::Tetrahedral, 0.0), img);
    let full = unit(&grade.apply(&img, Interpolation::Tetrahedral, 1.0));
    let half = unit(&grade.apply(&img, Interpolation::Tetrahedral, 0.5));
    let orig = unit(&img);
    let mid: Vec<f64> = orig.iter().zip(&full).map(|(a, b)| (a + b) / 2.0).collect();
    assert!(psnr(&half, &mid) > 45.0, "strength 0.5 is the halfway blend");
}
