//! Merging LoRAs into a model's weights as they load.
//!
//! [`plan`] matches every LoRA layer to a base tensor of the model (by the base files' own
//! tensor names, see [`super::keys::ModuleIndex`]) and checks shapes before anything is built, so
//! a LoRA for another model is refused up front naming its layers. The weight backend
//! (`loaders::reuse`) then hands out `W + Σ s·(B·A)` ([`apply_patches`]) for the patched tensors
//! and the plain mmapped tensor for the rest.

use super::keys::{Component, ModuleIndex};
use super::LoraFile;
use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use kiln_kernels::lowrank::{
    merge_low_rank_reference, merge_low_rank_transposed, merge_low_rank_transposed_values, LowRank,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// One LoRA layer's contribution to one base tensor: `scale · up · down`.
#[derive(Debug, Clone)]
pub(crate) struct Patch {
    down: Tensor,
    up: Tensor,
    /// weight · α / rank.
    scale: f64,
    /// The rows of `up` this base tensor takes (a fused BFL q/k/v layer split over diffusers'
    /// separate projections); all of them when `None`.
    rows: Option<(usize, usize)>,
}

impl Patch {
    /// The update's factors as 2-D f32 matrices on `device`: up `[out, rank]` (this base
    /// tensor's rows of it), down `[rank, in·kh·kw]`, and the scale.
    fn factors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor, f64)> {
        let rank = self.down.dims()[0];
        let up = match self.rows {
            Some((start, len)) => self.up.narrow(0, start, len)?,
            None => self.up.clone(),
        };
        let out = up.dims()[0];
        let up = up.to_device(device)?.to_dtype(DType::F32)?.reshape((out, rank))?;
        let down = self.down.to_device(device)?.to_dtype(DType::F32)?.reshape((rank, ()))?;
        Ok((up, down, self.scale))
    }
}

/// A component's tensors, by the names the model will ask the weight backend for.
pub struct PlanInput {
    pub component: Component,
    /// Tensor names and shapes.
    pub shapes: HashMap<String, Vec<usize>>,
    /// Text encoders also answer to names with/without transformers' `text_model.` prefix.
    pub text_encoder: bool,
}

impl PlanInput {
    /// A component loaded from safetensors `files`: names and shapes from their headers.
    pub fn from_files(component: Component, files: &[PathBuf], text_encoder: bool) -> Result<Self> {
        let st = mmap(files)?;
        let shapes = st.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
        Ok(Self { component, shapes, text_encoder })
    }
}

/// Which base tensors each LoRA patches, per component, and what did not match.
#[derive(Debug, Default)]
pub struct LoraPlan {
    patches: HashMap<Component, HashMap<String, Vec<Patch>>>,
    /// Per LoRA file: the layers that matched no tensor of the model (warnings, not errors, as
    /// long as some layers matched: trainers add layers some models lack).
    pub unmatched: Vec<(PathBuf, Vec<String>)>,
    /// Layers merged, in all.
    pub merged_layers: usize,
}

/// Matches `loras` (each with its weight) against the model's components. Errors when a LoRA
/// matches none of the model's layers or when a matched layer has another shape than the base
/// tensor; both name the LoRA file and the layers.
pub fn plan(loras: &[(Arc<LoraFile>, f64)], inputs: &[PlanInput]) -> Result<LoraPlan> {
    let mut out = LoraPlan::default();
    if loras.is_empty() {
        return Ok(out);
    }
    // Base tensor names and shapes, per component.
    let mut bases: HashMap<Component, (ModuleIndex, &HashMap<String, Vec<usize>>)> = HashMap::new();
    for input in inputs {
        let index = ModuleIndex::new(input.shapes.keys().map(String::as_str), input.text_encoder);
        bases.insert(input.component, (index, &input.shapes));
    }
    for (lora, weight) in loras {
        let mut unmatched = Vec::new();
        let mut mismatched = Vec::new();
        let mut matched = 0usize;
        for m in &lora.modules {
            let Some((index, shapes)) = bases.get(&m.component) else {
                unmatched.push(format!("{} (this model has no {})", m.down_key, m.component.label()));
                continue;
            };
            let Some(module) = index.find(m.naming, &m.module) else {
                // Transformer layers in their reference code's naming, possibly fused: one patch
                // per diffusers module, from the first family whose modules this model has.
                let candidates = match m.component {
                    Component::Denoiser => super::keys::native_targets(&m.module),
                    _ => Vec::new(),
                };
                let targets = candidates
                    .into_iter()
                    .find(|t| t.iter().all(|t| shapes.contains_key(&format!("{t}.weight"))));
                let Some(targets) = targets else {
                    unmatched.push(m.down_key.clone());
                    continue;
                };
                let shape_of = |t: &String| shapes[&format!("{t}.weight")].clone();
                let rows: Vec<usize> = targets.iter().map(|t| shape_of(t)[0]).collect();
                let lora_in: usize = m.down.dims()[1..].iter().product();
                let fits = rows.iter().sum::<usize>() == m.up.dims()[0]
                    && targets.iter().all(|t| shape_of(t)[1..].iter().product::<usize>() == lora_in);
                if !fits {
                    let want: Vec<_> = targets.iter().map(shape_of).collect();
                    mismatched.push(format!(
                        "`{}` makes [{}, {lora_in}] for {} ({want:?} together)",
                        m.down_key,
                        m.up.dims()[0],
                        targets.join(" + ")
                    ));
                    continue;
                }
                let rank = m.rank() as f64;
                let scale = weight * m.alpha.unwrap_or(rank) / rank;
                let mut start = 0;
                for (t, len) in targets.iter().zip(rows) {
                    let patch =
                        Patch { down: m.down.clone(), up: m.up.clone(), scale, rows: Some((start, len)) };
                    out.patches
                        .entry(m.component)
                        .or_default()
                        .entry(format!("{t}.weight"))
                        .or_default()
                        .push(patch);
                    start += len;
                }
                matched += 1;
                continue;
            };
            let base_name = format!("{module}.weight");
            let base_shape = &shapes[&base_name];
            let (d, u) = (m.down.dims(), m.up.dims());
            let lora_in: usize = d[1..].iter().product();
            let base_in: usize = base_shape[1..].iter().product();
            // A conv LoRA must have the base kernel's size; a linear LoRA on a 1×1 conv is fine.
            let kernel_ok = d.len() == 2 || base_shape.len() != 4 || d[2..] == base_shape[2..];
            if base_shape.is_empty() || u[0] != base_shape[0] || lora_in != base_in || !kernel_ok {
                let mut found = vec![u[0]];
                found.extend_from_slice(&d[1..]);
                mismatched.push(format!("`{}` makes {found:?} for `{base_name}` {base_shape:?}", m.down_key));
                continue;
            }
            let rank = m.rank() as f64;
            let scale = weight * m.alpha.unwrap_or(rank) / rank;
            let patch = Patch { down: m.down.clone(), up: m.up.clone(), scale, rows: None };
            out.patches.entry(m.component).or_default().entry(base_name).or_default().push(patch);
            matched += 1;
        }
        let path = lora.path.clone();
        if !mismatched.is_empty() {
            return Err(Error::Lora {
                lora: path.display().to_string(),
                msg: format!(
                    "it does not fit this model: {} of its layers have other shapes than the model's ({}{}); \
                     it was made for another model{}",
                    mismatched.len(),
                    mismatched.iter().take(4).cloned().collect::<Vec<_>>().join("; "),
                    if mismatched.len() > 4 { "; …" } else { "" },
                    family_hint(lora)
                ),
            });
        }
        if matched == 0 {
            return Err(Error::Lora {
                lora: path.display().to_string(),
                msg: format!(
                    "it does not fit this model: none of its {} layers names a layer of the model (e.g. `{}`){}",
                    lora.modules.len(),
                    unmatched.first().cloned().unwrap_or_default(),
                    family_hint(lora)
                ),
            });
        }
        let mut report = unmatched;
        report.extend(lora.unknown_keys.iter().cloned());
        if !report.is_empty() {
            out.unmatched.push((path, report));
        }
        out.merged_layers += matched;
    }
    Ok(out)
}

/// Computes every layer's delta `weight·(α/r)·B·A` of `lora` on `device` and adds it to a zero
/// tensor of the shape it implies, as a load would add it to the base weight: the merge's
/// arithmetic without a base model (benchmarks time it on shapes of models not at hand).
/// Returns the number of weights written.
pub fn merge_without_base(lora: &LoraFile, weight: f64, device: &Device) -> Result<usize> {
    let mut written = 0;
    for m in &lora.modules {
        let mut shape = vec![m.up.dims()[0]];
        shape.extend_from_slice(&m.down.dims()[1..]);
        let shape = Shape::from(shape);
        let rank = m.rank() as f64;
        let scale = weight * m.alpha.unwrap_or(rank) / rank;
        let patch = Patch { down: m.down.clone(), up: m.up.clone(), scale, rows: None };
        let base = Tensor::zeros(&shape, DType::F32, device)?;
        let merged = apply_patches(&base, &[patch], DType::F32, device)?;
        written += merged.elem_count();
    }
    Ok(written)
}

fn family_hint(lora: &LoraFile) -> String {
    match lora.info().family {
        Some(f) => format!(" (its metadata/layers say {f})"),
        None => String::new(),
    }
}

fn mmap(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    // SAFETY: read-only maps of weight files, as `weights::open_safetensors` makes.
    #[allow(unsafe_code)]
    let st = unsafe { MmapedSafetensors::multi(files) };
    st.map_err(|e| Error::Weights { path: files.first().cloned().unwrap_or_default(), msg: e.to_string() })
}

impl LoraPlan {
    /// The patches of `component`'s tensors, by tensor name (None when no LoRA touches it).
    pub(crate) fn patches(&self, component: Component) -> Option<HashMap<String, Vec<Patch>>> {
        self.patches.get(&component).filter(|p| !p.is_empty()).cloned()
    }

    /// The names of `component`'s tensors a LoRA patches.
    pub(crate) fn patched_names(&self, component: Component) -> impl Iterator<Item = &String> {
        self.patches.get(&component).into_iter().flat_map(|p| p.keys())
    }
}

/// `base` with `patches` merged, in `dtype`. Sums in f32 whatever the model's dtype, as
/// diffusers' fuse_lora does on an f32 model; an f16 model rounds once, after the merge.
/// Linear weights on the CPU in f32 are merged by one gemm per LoRA straight into the
/// transposed layout kiln's Linear keeps (a view it takes without copying); anything else
/// (convolutions, other devices and dtypes) by candle's ops, on the base reshaped to 2-D.
pub(crate) fn apply_patches(
    base: &Tensor,
    patches: &[Patch],
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let factors = patches.iter().map(|p| p.factors(dev)).collect::<candle_core::Result<Vec<_>>>()?;
    let updates = low_ranks(&factors);
    let base32 = base.to_dtype(DType::F32)?;
    if dev.is_cpu() && dtype == DType::F32 && base.rank() == 2 {
        return merge_low_rank_transposed(&base32, &updates);
    }
    let flat = base32.reshape((base.dims()[0], ()))?;
    merge_low_rank_reference(&flat, &updates)?.reshape(base.shape())?.to_dtype(dtype)
}

type Factors = (Tensor, Tensor, f64);

fn low_ranks(factors: &[Factors]) -> Vec<LowRank<'_>> {
    factors.iter().map(|(up, down, scale)| LowRank { up, down, scale: *scale }).collect()
}

/// [`apply_patches`] for the tensor `name` of the mapped `files`, merged straight from the
/// mapping when the base is a 2-D f32 tensor and the model CPU f32 (the common case: a LoRA on
/// an f32 layout): the base is transposed as it is read, never first copied whole. `None`
/// where that does not apply; the caller then loads the tensor and calls [`apply_patches`].
/// Both give the same bits.
pub(crate) fn apply_patches_mapped(
    files: &MmapedSafetensors,
    name: &str,
    patches: &[Patch],
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if !dev.is_cpu() || dtype != DType::F32 || cfg!(target_endian = "big") {
        return Ok(None);
    }
    let view = files.get(name)?;
    let &[out_dim, in_dim] = view.shape() else { return Ok(None) };
    if view.dtype() != safetensors::Dtype::F32 {
        return Ok(None);
    }
    #[allow(unsafe_code)]
    // SAFETY: every bit pattern is a valid f32; `align_to` puts any bytes that are not on an
    // f32 boundary in the head or tail, and then this path is not taken.
    let (head, values, tail) = unsafe { view.data().align_to::<f32>() };
    if !head.is_empty() || !tail.is_empty() {
        return Ok(None);
    }
    let factors = patches.iter().map(|p| p.factors(dev)).collect::<candle_core::Result<Vec<_>>>()?;
    merge_low_rank_transposed_values(values, (out_dim, in_dim), &low_ranks(&factors)).map(Some)
}
