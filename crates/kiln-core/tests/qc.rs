//! Hallucination QC on committed images (tests/fixtures/qc/make.py): a clean Lanczos enlargement
//! passes; invented texture and a pasted blob are flagged where they are, and nowhere else; the
//! report lands on the asset in the library.
// Tests fail by panicking: unwrap is the point here.
#![allow(clippy::unwrap_used)]

use kiln_core::image::load_rgb;
use kiln_core::image::qc::{check, QcOptions, QcReport};
use kiln_core::library::assets::{JobTimings, NewAsset, NewJob};
use kiln_core::library::qc::run_qc;
use kiln_core::library::Project;
use std::path::PathBuf;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/qc");

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(FIXTURES).join(name)
}

fn options() -> QcOptions {
    QcOptions { tile_px: 32, ..QcOptions::default() }
}

fn qc(output: &str) -> QcReport {
    check(&load_rgb(&fixture("source.png")).unwrap(), &load_rgb(&fixture(output)).unwrap(), &options())
        .unwrap()
}

fn region(name: &str) -> [u32; 4] {
    let text = std::fs::read_to_string(fixture("regions.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let r: Vec<u32> = v[name].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    [r[0], r[1], r[2], r[3]]
}

/// Share of the damaged pixels (`inside(x, y)`) that flagged tiles cover, and whether every
/// flagged tile touches the damage's box grown by `slack` pixels.
fn coverage(report: &QcReport, inside: impl Fn(u32, u32) -> bool, bx: [u32; 4], slack: u32) -> (f64, bool) {
    let (w, h) = report.output_size;
    let flagged_at = |x: u32, y: u32| {
        let t = &report.tiles[((y / 32) * report.columns + x / 32) as usize];
        t.flagged
    };
    let (mut hit, mut total) = (0usize, 0usize);
    for y in 0..h {
        for x in 0..w {
            if inside(x, y) {
                total += 1;
                hit += usize::from(flagged_at(x, y));
            }
        }
    }
    let [x0, y0, x1, y1] = bx;
    let near = report.tiles.iter().filter(|t| t.flagged).all(|t| {
        t.x < x1 + slack && t.x + t.width + slack > x0 && t.y < y1 + slack && t.y + t.height + slack > y0
    });
    (hit as f64 / total as f64, near)
}

#[test]
fn a_clean_lanczos_upscale_passes() {
    let r = qc("clean_x4.png");
    let worst_bp = r.tiles.iter().map(|t| t.bp).fold(0.0, f64::max);
    let worst_hf = r.tiles.iter().map(|t| t.hf).fold(f64::MIN, f64::max);
    assert_eq!(r.verdict, "pass", "worst bp {worst_bp:.2} hf {worst_hf:.2}");
    assert_eq!(r.tiles.len(), 8 * 6);
}

#[test]
fn invented_texture_is_flagged_where_it_is() {
    let r = qc("texture_x4.png");
    let [x0, y0, x1, y1] = region("texture");
    let (covered, near) =
        coverage(&r, |x, y| (x0..x1).contains(&x) && (y0..y1).contains(&y), [x0, y0, x1, y1], 16);
    assert_eq!(r.verdict, "flag");
    assert!(covered >= 0.99 && near, "covered {covered}, only near: {near}: {:?}", r.tiles);
}

#[test]
fn a_pasted_blob_is_flagged_where_it_is() {
    let r = qc("blob_x4.png");
    let [x0, y0, x1, y1] = region("blob");
    let (cx, cy, rx, ry) =
        ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0, (x1 - x0) as f64 / 2.0, (y1 - y0) as f64 / 2.0);
    let inside =
        |x: u32, y: u32| ((x as f64 + 0.5 - cx) / rx).powi(2) + ((y as f64 + 0.5 - cy) / ry).powi(2) < 1.0;
    let (covered, near) = coverage(&r, inside, [x0, y0, x1, y1], 16);
    assert!(covered >= 0.9 && near, "covered {covered}, only near: {near}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let not_image = dir.path().join("notes.png");
    std::fs::write(&not_image, b"not a picture").unwrap();
    let err = run_qc(&not_image, Some(&fixture("source.png")), None, &options(), Some(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("notes.png"), "{err}");
    // Source and output swapped.
    let err =
        run_qc(&fixture("source.png"), Some(&fixture("clean_x4.png")), None, &options(), Some(dir.path()))
            .unwrap_err()
            .to_string();
    assert!(err.contains("smaller"), "{err}");
    let wide = dir.path().join("wide.png");
    image::RgbImage::new(256, 100).save(&wide).unwrap();
    let err = run_qc(&wide, Some(&fixture("source.png")), None, &options(), Some(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the source"), "{err}");
    let err =
        run_qc(&fixture("clean_x4.png"), None, None, &options(), Some(dir.path())).unwrap_err().to_string();
    assert!(err.contains("--source"), "{err}");
}

#[test]
fn the_report_is_stored_on_the_asset_and_the_source_is_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let project = Project::open(dir.path()).unwrap();
    let mut library = project.library().unwrap();
    let assets = dir.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    let (src, up) = (assets.join("source.png"), assets.join("up.png"));
    std::fs::copy(fixture("source.png"), &src).unwrap();
    std::fs::copy(fixture("blob_x4.png"), &up).unwrap();
    let job = NewJob {
        kind: kiln_core::library::assets::RecordKind::Upscale,
        tier: None,
        device: "cpu".into(),
        dtype: "f32".into(),
        model_id: "test".into(),
        images: 1,
        timings: JobTimings::default(),
        credits: 0.0,
    };
    let asset = |path: &PathBuf, parent_id, width, height| NewAsset {
        kind: kiln_core::library::assets::AssetKind::Final,
        tier: None,
        path: path.clone(),
        parent_id,
        width,
        height,
        seed: None,
        prompt: None,
        record: None,
        model_hashes: vec![],
        credits: 0.0,
    };
    let (_, ids) = library.record_job(&job, &[asset(&src, None, 64, 48)]).unwrap();
    let (_, up_ids) = library.record_job(&job, &[asset(&up, Some(ids[0]), 256, 192)]).unwrap();
    let run = run_qc(&up, None, Some(&mut library), &options(), None).unwrap();
    assert_eq!(run.asset_id, Some(up_ids[0]));
    assert_eq!(run.source.canonicalize().unwrap(), src.canonicalize().unwrap());
    assert!(run.heatmap.is_file() && run.sheet.is_file());
    let heat = load_rgb(&run.heatmap).unwrap();
    assert_eq!(heat.dimensions(), (64, 48));
    let stored = library.asset(up_ids[0]).unwrap().qc.unwrap();
    assert_eq!(stored["verdict"], "flag");
    assert_eq!(stored["source"], "assets/source.png");
    assert!(library.asset(ids[0]).unwrap().qc.is_none());
}
