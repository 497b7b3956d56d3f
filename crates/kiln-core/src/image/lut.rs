//! 3D LUT colour grading: the `.cube` format (Adobe/Resolve: `LUT_3D_SIZE` 2–65, optional
//! `TITLE`, `DOMAIN_MIN`/`DOMAIN_MAX`, rows with red changing fastest) read with every field
//! checked, and applied to 8-bit RGB with trilinear or tetrahedral interpolation and a
//! strength that blends with the original.

use crate::error::{Error, Result};
use image::RgbImage;
use std::path::Path;

/// Largest `LUT_3D_SIZE` kiln reads (the largest in common use; 65³ rows is 275 k lines).
pub const MAX_SIZE: usize = 65;
/// Largest `.cube` file kiln reads, in bytes (a 65³ LUT with long decimals is about 10 MB).
const MAX_BYTES: u64 = 64 << 20;

/// How a colour between lattice points is interpolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// The 8 surrounding lattice points (Pillow's `Color3DLUT`, most LUT tools).
    Trilinear,
    /// The 4 points of the enclosing tetrahedron (Resolve, OpenColorIO's best): smoother
    /// along the grey axis.
    Tetrahedral,
}

impl std::str::FromStr for Interpolation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "trilinear" => Ok(Self::Trilinear),
            "tetrahedral" => Ok(Self::Tetrahedral),
            other => Err(Error::arg("interp", format!("`{other}`: expected trilinear or tetrahedral"))),
        }
    }
}

/// A parsed 3D LUT.
#[derive(Debug, Clone)]
pub struct Lut3d {
    pub title: Option<String>,
    pub size: usize,
    pub domain_min: [f32; 3],
    pub domain_max: [f32; 3],
    /// `size³` output colours, red index fastest, then green, then blue.
    table: Vec<[f32; 3]>,
    /// sha256 of the file it was read from (recorded with every grade); None when parsed from text.
    pub sha256: Option<String>,
}

impl Lut3d {
    pub fn read(path: &Path) -> Result<Self> {
        let len = fs_err::metadata(path)?.len();
        if len > MAX_BYTES {
            return Err(Error::config(
                path,
                format!("{len} bytes is larger than any .cube LUT kiln reads ({MAX_BYTES})"),
            ));
        }
        let bytes = fs_err::read(path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Error::config(path, "not a .cube LUT: the file is not text"))?;
        let mut lut = Self::parse(text, path)?;
        // Hashed once here from the bytes just read, not again for every graded image.
        lut.sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)));
        Ok(lut)
    }

    /// Parses `.cube` text; `path` names the source in errors (with the line number).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |line: usize, msg: String| Error::config(path, format!("line {line}: {msg}"));
        let (mut title, mut size) = (None, None);
        let (mut domain_min, mut domain_max) = ([0f32; 3], [1f32; 3]);
        let mut table: Vec<[f32; 3]> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let key = words.next().unwrap_or_default();
            let triple = |words: std::str::SplitWhitespace| -> Result<[f32; 3]> {
                let v: Vec<f32> = words
                    .map(|w| w.parse::<f32>().map_err(|_| bad(n, format!("`{w}` is not a number"))))
                    .collect::<Result<_>>()?;
                match v.as_slice() {
                    [a, b, c] if v.iter().all(|x| x.is_finite()) => Ok([*a, *b, *c]),
                    [_, _, _] => Err(bad(n, "values must be finite".into())),
                    _ => Err(bad(n, format!("expected 3 values, found {}", v.len()))),
                }
            };
            match key {
                "TITLE" => title = Some(line["TITLE".len()..].trim().trim_matches('"').to_string()),
                "LUT_3D_SIZE" => {
                    let v = words.next().and_then(|w| w.parse::<usize>().ok());
                    match v {
                        Some(s) if (2..=MAX_SIZE).contains(&s) => size = Some(s),
                        _ => return Err(bad(n, format!("LUT_3D_SIZE must be 2..={MAX_SIZE}"))),
                    }
                    if !table.is_empty() {
                        return Err(bad(n, "LUT_3D_SIZE after the table rows".into()));
                    }
                }
                "LUT_1D_SIZE" => {
                    return Err(bad(n, "a 1D LUT; kiln grades with 3D LUTs (LUT_3D_SIZE)".into()))
                }
                "DOMAIN_MIN" => domain_min = triple(words)?,
                "DOMAIN_MAX" => domain_max = triple(words)?,
                "LUT_3D_INPUT_RANGE" => {
                    let v: Vec<f32> =
                        words.filter_map(|w| w.parse::<f32>().ok()).filter(|x| x.is_finite()).collect();
                    let [lo, hi] = v[..] else {
                        return Err(bad(n, "LUT_3D_INPUT_RANGE takes 2 numbers".into()));
                    };
                    domain_min = [lo; 3];
                    domain_max = [hi; 3];
                }
                k if k.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.' || c == '+') => {
                    let Some(s) = size else { return Err(bad(n, "a table row before LUT_3D_SIZE".into())) };
                    if table.len() == s * s * s {
                        return Err(bad(n, format!("more than {s}³ = {} rows", s * s * s)));
                    }
                    table.push(triple(line.split_whitespace())?);
                }
                other => return Err(bad(n, format!("unknown keyword `{other}`"))),
            }
        }
        let size = size.ok_or_else(|| Error::config(path, "no LUT_3D_SIZE line: not a 3D .cube LUT"))?;
        if table.len() != size * size * size {
            return Err(Error::config(
                path,
                format!("LUT_3D_SIZE {size} needs {} rows, the file has {}", size * size * size, table.len()),
            ));
        }
        for c in 0..3 {
            if domain_max[c] <= domain_min[c] {
                return Err(Error::config(path, "DOMAIN_MAX must exceed DOMAIN_MIN in every channel"));
            }
        }
        // Outputs are colours in the LUT's domain; anything beyond it is a broken or HDR LUT.
        let tolerance = 1e-3;
        if let Some((i, v)) = table.iter().enumerate().find(|(_, v)| {
            (0..3).any(|c| v[c] < domain_min[c] - tolerance || v[c] > domain_max[c] + tolerance)
        }) {
            return Err(Error::config(
                path,
                format!(
                    "table row {} ({} {} {}) is outside the domain {domain_min:?}..{domain_max:?}",
                    i + 1,
                    v[0],
                    v[1],
                    v[2]
                ),
            ));
        }
        Ok(Self { title, size, domain_min, domain_max, table, sha256: None })
    }

    fn at(&self, r: usize, g: usize, b: usize) -> [f32; 3] {
        self.table[(b * self.size + g) * self.size + r]
    }

    /// The LUT's colour for `rgb` in [0, 1].
    pub fn lookup(&self, rgb: [f32; 3], interp: Interpolation) -> [f32; 3] {
        let n = self.size - 1;
        let mut idx = [0usize; 3];
        let mut frac = [0f32; 3];
        for c in 0..3 {
            let x = (rgb[c] - self.domain_min[c]) / (self.domain_max[c] - self.domain_min[c]);
            let x = x.clamp(0.0, 1.0) * n as f32;
            let i = (x.floor() as usize).min(n - 1);
            idx[c] = i;
            frac[c] = x - i as f32;
        }
        let [r, g, b] = idx;
        let [fr, fg, fb] = frac;
        let p = |dr: usize, dg: usize, db: usize| self.at(r + dr, g + dg, b + db);
        let mix = |terms: &[(f32, [f32; 3])]| -> [f32; 3] {
            let mut out = [0f32; 3];
            for (w, v) in terms {
                for c in 0..3 {
                    out[c] += w * v[c];
                }
            }
            out
        };
        match interp {
            Interpolation::Trilinear => mix(&[
                ((1.0 - fr) * (1.0 - fg) * (1.0 - fb), p(0, 0, 0)),
                (fr * (1.0 - fg) * (1.0 - fb), p(1, 0, 0)),
                ((1.0 - fr) * fg * (1.0 - fb), p(0, 1, 0)),
                (fr * fg * (1.0 - fb), p(1, 1, 0)),
                ((1.0 - fr) * (1.0 - fg) * fb, p(0, 0, 1)),
                (fr * (1.0 - fg) * fb, p(1, 0, 1)),
                ((1.0 - fr) * fg * fb, p(0, 1, 1)),
                (fr * fg * fb, p(1, 1, 1)),
            ]),
            // The cube is split into six tetrahedra along its grey diagonal; the ordering of the
            // fractions picks one, and the colour is a blend of its four corners.
            Interpolation::Tetrahedral => {
                let (c000, c111) = (p(0, 0, 0), p(1, 1, 1));
                if fr > fg {
                    if fg > fb {
                        mix(&[(1.0 - fr, c000), (fr - fg, p(1, 0, 0)), (fg - fb, p(1, 1, 0)), (fb, c111)])
                    } else if fr > fb {
                        mix(&[(1.0 - fr, c000), (fr - fb, p(1, 0, 0)), (fb - fg, p(1, 0, 1)), (fg, c111)])
                    } else {
                        mix(&[(1.0 - fb, c000), (fb - fr, p(0, 0, 1)), (fr - fg, p(1, 0, 1)), (fg, c111)])
                    }
                } else if fb > fg {
                    mix(&[(1.0 - fb, c000), (fb - fg, p(0, 0, 1)), (fg - fr, p(0, 1, 1)), (fr, c111)])
                } else if fb > fr {
                    mix(&[(1.0 - fg, c000), (fg - fb, p(0, 1, 0)), (fb - fr, p(0, 1, 1)), (fr, c111)])
                } else {
                    mix(&[(1.0 - fg, c000), (fg - fr, p(0, 1, 0)), (fr - fb, p(1, 1, 0)), (fb, c111)])
                }
            }
        }
    }

    /// Grades an 8-bit image: `strength` 1 is the LUT's colour, 0 the original, between a blend.
    pub fn apply(&self, img: &RgbImage, interp: Interpolation, strength: f32) -> RgbImage {
        let mut out = img.clone();
        for p in out.pixels_mut() {
            let src = [p[0], p[1], p[2]].map(|v| f32::from(v) / 255.0);
            let graded = self.lookup(src, interp);
            for c in 0..3 {
                let v = src[c] + strength * (graded[c] - src[c]);
                p[c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }
}

/// PNG text key of the grade record (a JSON object) in a graded file.
pub const META_KEY: &str = "kiln.grade";

/// What [`grade_file`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GradeReport {
    pub input: std::path::PathBuf,
    pub output: std::path::PathBuf,
    pub lut: String,
    pub lut_sha256: String,
    pub lut_title: Option<String>,
    pub lut_size: usize,
    pub interpolation: Interpolation,
    pub strength: f32,
    pub size: [u32; 2],
}

/// Grades the image at `input` and writes `output` as an 8-bit RGB PNG, atomically, keeping
/// the input's PNG text chunks (its generation record) and adding [`META_KEY`] with the LUT's
/// path and sha256, so the grade is as traceable as the generation.
pub fn grade_file(
    lut: &Lut3d,
    lut_path: &Path,
    input: &Path,
    output: &Path,
    interp: Interpolation,
    strength: f32,
) -> Result<GradeReport> {
    use crate::image::png_meta::{read_png_text, write_png_atomic, TextChunk};
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::arg("strength", format!("{strength} must be in 0..=1")));
    }
    crate::files::guard_target(output)?;
    let img = crate::image::load_rgb(input)?;
    let graded = lut.apply(&img, interp, strength);
    let report = GradeReport {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        lut: lut_path.display().to_string(),
        lut_sha256: match &lut.sha256 {
            Some(sha) => sha.clone(),
            None => crate::loaders::weights::sha256_file(lut_path)?,
        },
        lut_title: lut.title.clone(),
        lut_size: lut.size,
        interpolation: interp,
        strength,
        size: [graded.width(), graded.height()],
    };
    let mut chunks: Vec<TextChunk> =
        read_png_text(input).unwrap_or_default().into_iter().filter(|c| c.keyword != META_KEY).collect();
    chunks.push(TextChunk::new(META_KEY, serde_json::to_string(&report).unwrap_or_default()));
    write_png_atomic(output, &graded, &chunks)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(size: usize, f: impl Fn([f32; 3]) -> [f32; 3]) -> String {
        let mut s = format!("LUT_3D_SIZE {size}\n");
        let n = (size - 1) as f32;
        for b in 0..size {
            for g in 0..size {
                for r in 0..size {
                    let v = f([r as f32 / n, g as f32 / n, b as f32 / n]);
                    s.push_str(&format!("{} {} {}\n", v[0], v[1], v[2]));
                }
            }
        }
        s
    }

    #[test]
    fn identity_is_exact_and_mistakes_are_named() -> Result<()> {
        let lut = Lut3d::parse(&cube(5, |v| v), Path::new("id.cube"))?;
        let img = RgbImage::from_fn(16, 16, |x, y| {
            image::Rgb([(x * 16) as u8, (y * 16) as u8, ((x * y) % 256) as u8])
        });
        for interp in [Interpolation::Trilinear, Interpolation::Tetrahedral] {
            assert_eq!(lut.apply(&img, interp, 1.0), img);
        }
        let p = Path::new("bad.cube");
        let err = |t: &str| Lut3d::parse(t, p).expect_err("refused").to_string();
        assert!(err("LUT_3D_SIZE 2\n0 0 0\n").contains("needs 8 rows, the file has 1"));
        assert!(err("LUT_3D_SIZE 99\n").contains("2..=65"));
        assert!(err("LUT_1D_SIZE 16\n").contains("1D LUT"));
        assert!(err("0 0 0\n").contains("before LUT_3D_SIZE"));
        assert!(err(&cube(2, |v| [v[0] * 3.0, v[1], v[2]])).contains("outside the domain"));
        assert!(err("LUT_3D_SIZE 2\n0 0 x\n").contains("line 2: `x` is not a number"));
        assert!(err("LUT_3D_SIZE 2\nFOO 1\n").contains("unknown keyword `FOO`"));
        assert!(err("LUT_3D_SIZE 2\n0 0 nan\n").contains("finite"));
        Ok(())
    }
}
