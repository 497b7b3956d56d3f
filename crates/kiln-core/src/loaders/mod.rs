//! Loaders: where weights and configs come from (diffusers folders, the Hugging Face hub cache,
//! safetensors files, BFL/ComfyUI single-file transformers, ONNX graphs for matting models, LoRA
//! files merged into weights as they load, a warm model's weights reused when its LoRA set
//! changes, pre-laid-out weights mapped in place from the layout cache).
//! Architectures live in `models`; this module only finds and opens files.

pub mod bfl_names;
pub mod diffusers;
pub mod hub;
pub mod layout_cache;
pub mod lora;
pub mod matting;
pub mod ncnn;
pub mod npy;
pub mod onnx;
pub mod pth;
pub mod reuse;
pub mod single_file;
pub mod store;
pub mod weights;
pub mod zimage_names;

/// One model's identity for the import name check: name, sha256, architecture.
pub(crate) type NamedModel<'a> = (&'a str, &'a str, &'a str);

/// Refuses an import batch that would re-point a name: a model whose name (case-insensitive)
/// is already `stored`, or earlier in the batch, with other weights. Same weights again are fine.
pub(crate) fn check_import_names(stored: &[NamedModel], incoming: &[NamedModel]) -> crate::Result<()> {
    for (i, &(name, sha, arch)) in incoming.iter().enumerate() {
        for &(old_name, old_sha, old_arch) in stored.iter().chain(&incoming[..i]) {
            if old_name.eq_ignore_ascii_case(name) && old_sha != sha {
                return Err(name_taken(old_name, old_arch, old_sha, arch, sha));
            }
        }
    }
    Ok(())
}

/// The error for an import whose name already points at other weights: both models named, and
/// the two ways forward.
fn name_taken(name: &str, old_arch: &str, old_sha: &str, new_arch: &str, new_sha: &str) -> crate::Error {
    let short = |s: &str| s.get(..12).unwrap_or(s).to_string();
    crate::Error::arg(
        "name",
        format!(
            "a model named `{name}` is already imported ({old_arch}, sha256 {}…); this one is {new_arch} (sha256 {}…). \
             Pass --replace to point the name at the new weights, or rename the file to import it under another name",
            short(old_sha),
            short(new_sha)
        ),
    )
}
