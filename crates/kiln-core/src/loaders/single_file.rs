//! Single-file FLUX.1 transformer checkpoints: BFL's release (`flux1-dev.safetensors`, names as
//! BFL's reference code writes them) and ComfyUI's (the same names under
//! `model.diffusion_model.`, often next to VAE and text-encoder tensors, which are ignored).
//!
//! The architecture comes from a diffusers folder's `transformer/config.json`, as diffusers'
//! `FluxTransformer2DModel.from_single_file(file, config=folder, subfolder="transformer")`
//! does: the file is checked against it up front (block counts, guidance embedding, every tensor
//! present and none unknown), then read through [`SingleFileBackend`], which hands kiln's
//! diffusers-named model each tensor it asks for as a slice of the fused BFL tensor
//! ([`super::bfl_names`]), with the final modulation's halves put in diffusers' order. LoRAs
//! are matched against those diffusers names ([`SingleFileFlux::shapes`]) and merged into each
//! slice as it is read, as for a diffusers folder.

use super::bfl_names::{bfl_module, bfl_parameter_names};
use super::lora::merge::{apply_patches, Patch};
use crate::error::{Error, Result};
use crate::models::flux::FluxConfig;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Prefixes a FLUX transformer's tensors are found under: ComfyUI's full checkpoints, the
/// shorter form some tools write, and BFL's bare names.
const PREFIXES: &[&str] = &["model.diffusion_model.", "diffusion_model.", ""];

/// Where one diffusers tensor comes from in the file.
#[derive(Debug, Clone)]
struct Source {
    /// The tensor's full name in the file.
    name: String,
    /// Its slice of the fused rows: `slot` of `slots` (see [`super::bfl_names`]).
    slot: usize,
    slots: usize,
    swap_halves: bool,
}

impl Source {
    /// The rows `start..start + len` of the fused tensor (of `rows` rows) this slot takes: every
    /// slot but the last is `inner_dim` rows, the last takes the rest.
    fn rows(&self, rows: usize, inner_dim: usize) -> (usize, usize) {
        let start = self.slot * inner_dim;
        let len = if self.slot + 1 == self.slots { rows.saturating_sub(start) } else { inner_dim };
        (start, len)
    }
}

/// A single-file FLUX.1 transformer, checked against a diffusers config and ready to build.
pub struct SingleFileFlux {
    path: PathBuf,
    st: MmapedSafetensors,
    sources: HashMap<String, Source>,
    inner_dim: usize,
}

impl SingleFileFlux {
    /// Opens `path` and checks it against `config` (read from `config_path`): errors name the
    /// first unknown or missing tensor, or the block counts that differ.
    pub fn open(path: &Path, config: &FluxConfig, config_path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::not_found("single-file checkpoint", path, "pass a .safetensors file"));
        }
        super::weights::validate_header(path)?;
        // SAFETY: a read-only map, as `weights::open_safetensors` makes.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::new(path) };
        let bad = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
        let st = st.map_err(|e| bad(e.to_string()))?;
        let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();

        let prefix = PREFIXES
            .iter()
            .find(|p| names.iter().any(|n| n.starts_with(&format!("{p}double_blocks."))))
            .ok_or_else(|| {
                bad(format!(
                    "not a FLUX.1 transformer checkpoint: no `double_blocks.*` tensors (bare or under \
                     `model.diffusion_model.`); its first tensor is `{}`{}",
                    names.first().map(String::as_str).unwrap_or("(none)"),
                    diffusers_hint(&names)
                ))
            })?;
        // Tensors under the prefix belong to the transformer; others (a ComfyUI file's VAE and
        // text encoders) are not this loader's business.
        let own: BTreeSet<&str> = names.iter().filter_map(|n| n.strip_prefix(prefix)).collect();

        let count = |kind: &str| {
            own.iter()
                .filter_map(|n| n.strip_prefix(kind)?.split('.').next()?.parse::<usize>().ok())
                .max()
                .map_or(0, |i| i + 1)
        };
        let (double, single) = (count("double_blocks."), count("single_blocks."));
        if (double, single) != (config.num_layers, config.num_single_layers) {
            return Err(bad(format!(
                "it has {double} double-stream and {single} single-stream blocks; the base folder's \
                 transformer config {} says num_layers {} and num_single_layers {} (a checkpoint of \
                 another FLUX model, or the wrong base folder)",
                config_path.display(),
                config.num_layers,
                config.num_single_layers
            )));
        }
        let has_guidance = own.iter().any(|n| n.starts_with("guidance_in."));
        if has_guidance != config.guidance_embeds {
            let (file, folder) = if has_guidance { ("has a", "has none") } else { ("has no", "has one") };
            return Err(bad(format!(
                "it {file} guidance embedding (`guidance_in`, FLUX.1-dev style) but the base folder's \
                 transformer {folder} (guidance_embeds in {}): pair a dev checkpoint with a dev folder, \
                 schnell with schnell",
                config_path.display()
            )));
        }

        let expected =
            bfl_parameter_names(config.num_layers, config.num_single_layers, config.guidance_embeds);
        let expected_set: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        let unknown: Vec<&&str> = own.iter().filter(|n| !expected_set.contains(**n)).collect();
        if let Some(first) = unknown.first() {
            return Err(bad(format!(
                "not a FLUX.1 transformer checkpoint kiln can read: unexpected tensor `{prefix}{first}` \
                 ({} unknown in all{})",
                unknown.len(),
                diffusers_hint(&names)
            )));
        }
        let missing: Vec<&String> = expected.iter().filter(|n| !own.contains(n.as_str())).collect();
        if let Some(first) = missing.first() {
            return Err(bad(format!(
                "tensor `{prefix}{first}` is missing: the base config's {} double and {} single blocks \
                 need {} transformer tensors, the file has {} of them (truncated or partial checkpoint?)",
                config.num_layers,
                config.num_single_layers,
                expected.len(),
                expected.len() - missing.len()
            )));
        }

        let mut sources = HashMap::new();
        for name in &expected {
            let Some((module, param)) = name.rsplit_once('.') else { continue };
            let Some(m) = bfl_module(module) else { continue };
            // BFL's RMS norms keep their gain as `scale`, diffusers' as `weight`.
            let param = if param == "scale" { "weight" } else { param };
            let slots = m.targets.len();
            for (slot, target) in m.targets.iter().enumerate() {
                let source =
                    Source { name: format!("{prefix}{name}"), slot, slots, swap_halves: m.swap_halves };
                sources.insert(format!("{target}.{param}"), source);
            }
        }
        Ok(Self { path: path.to_path_buf(), st, sources, inner_dim: config.inner_dim() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The transformer's weights under diffusers' names, for [`crate::models::flux::FluxTransformer::new`],
    /// with `patches` (LoRAs, by diffusers tensor name) merged into the tensors they touch.
    pub(crate) fn var_builder(
        self,
        patches: Option<HashMap<String, Vec<Patch>>>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = SingleFileBackend { file: self, patches: patches.unwrap_or_default() };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Every diffusers tensor's name and shape (fused BFL tensors cut into their projections'
    /// slices), for matching LoRAs against the checkpoint before it is read.
    pub fn shapes(&self) -> Result<HashMap<String, Vec<usize>>> {
        let mut out = HashMap::new();
        for (name, src) in &self.sources {
            let view = self
                .st
                .get(&src.name)
                .map_err(|e| Error::Weights { path: self.path.clone(), msg: e.to_string() })?;
            let mut shape = view.shape().to_vec();
            if src.slots > 1 {
                if let Some(rows) = shape.first_mut() {
                    *rows = src.rows(*rows, self.inner_dim).1;
                }
            }
            out.insert(name.clone(), shape);
        }
        Ok(out)
    }

    /// The diffusers tensor `name`, cut from its BFL source; the error names the source.
    fn tensor(&self, name: &str, shape: Option<&Shape>) -> candle_core::Result<Tensor> {
        let src = self
            .sources
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        // Cut on the CPU, so a fused tensor is not copied to the device once per projection.
        let full = self.st.load(&src.name, &Device::Cpu)?;
        let rows = full.dims().first().copied().unwrap_or(0);
        let mut what = format!("{} (as diffusers `{name}`)", src.name);
        let mut t = full;
        if src.slots > 1 {
            let (start, len) = src.rows(rows, self.inner_dim);
            what = format!("{} rows {start}..{} (as diffusers `{name}`)", src.name, start + len);
            if rows <= (src.slots - 1) * self.inner_dim {
                let what = format!(
                    "{} (fused: {} projections, all but the last {} rows wide; as diffusers `{name}`)",
                    src.name, src.slots, self.inner_dim
                );
                return Err(shape_error(&what, shape, t.dims()));
            }
            t = t.narrow(0, start, len)?;
        }
        if src.swap_halves {
            let half = rows / 2;
            t = Tensor::cat(&[t.narrow(0, half, rows - half)?, t.narrow(0, 0, half)?], 0)?;
        }
        if let Some(shape) = shape {
            if t.shape() != shape {
                return Err(shape_error(&what, Some(shape), t.dims()));
            }
        }
        t.contiguous()
    }
}

fn shape_error(what: &str, expected: Option<&Shape>, found: &[usize]) -> candle_core::Error {
    candle_core::Error::UnexpectedShape {
        msg: format!("shape mismatch for {what}"),
        expected: expected.cloned().unwrap_or_else(|| Shape::from(())),
        got: Shape::from(found.to_vec()),
    }
}

/// A hint for a file that holds a diffusers-named transformer instead.
fn diffusers_hint(names: &[String]) -> &'static str {
    // A diffusers FLUX transformer's own names (an SD UNet has nested `transformer_blocks` too).
    if names
        .iter()
        .any(|n| n.starts_with("transformer_blocks.") || n.starts_with("single_transformer_blocks."))
    {
        "; it looks diffusers-named: put it in a diffusers folder's transformer/ instead"
    } else {
        ""
    }
}

/// [`SingleFileFlux`] as a candle weight backend, with LoRA patches merged as tensors are read
/// (on the target device, as the folder loader's backend merges them).
struct SingleFileBackend {
    file: SingleFileFlux,
    patches: HashMap<String, Vec<Patch>>,
}

impl SingleFileBackend {
    fn load(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let base = self.file.tensor(name, shape)?;
        match self.patches.get(name) {
            Some(patches) => apply_patches(&base.to_device(dev)?, patches, dtype, dev),
            None => base.to_dtype(dtype)?.to_device(dev),
        }
    }
}

impl SimpleBackend for SingleFileBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file.sources.contains_key(name)
    }
}
