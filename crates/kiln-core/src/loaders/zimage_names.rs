//! Z-Image transformer names as Tongyi-MAI's reference code writes them (its own checkpoints,
//! ComfyUI's, and the LoRAs trained on them with DiffSynth-Studio, AI-Toolkit or musubi-tuner)
//! and the diffusers modules each one feeds, for LoRA merging
//! ([`super::lora::keys::native_targets`]).
//!
//! The reference code differs from diffusers' `ZImageTransformer2DModel` in four places:
//! - q/k/v are one `attention.qkv` linear layer; diffusers keeps `to_q`/`to_k`/`to_v`, each as
//!   wide as the model, so the fused layer's output rows split into three equal slices;
//! - the attention output is `attention.out` (diffusers: `attention.to_out.0`);
//! - the final layer and the patch embedder are single modules, where diffusers keeps one per
//!   patch size under `all_final_layer.2-1` / `all_x_embedder.2-1` (2×2 patches, 1 frame).
//!
//! Everything else (`feed_forward.w1/w2/w3`, `adaLN_modulation.0`, the refiners, the caption and
//! timestep embedders) has the same names in both.

/// The diffusers modules a Z-Image reference module feeds, in the order of its output rows
/// (`module` dotted or kohya-flattened, without its parameter name); None for names that are
/// spelled the same in diffusers or are no Z-Image module.
pub fn zimage_targets(module: &str) -> Option<Vec<String>> {
    let flat = module.replace('.', "_");
    for blocks in ["layers", "noise_refiner", "context_refiner"] {
        let Some(rest) = flat.strip_prefix(blocks).and_then(|r| r.strip_prefix('_')) else { continue };
        let Some((n, rest)) = rest.split_once('_') else { continue };
        let Ok(i) = n.parse::<usize>() else { continue };
        let b = format!("{blocks}.{i}.attention");
        return match rest {
            "attention_qkv" => Some(vec![format!("{b}.to_q"), format!("{b}.to_k"), format!("{b}.to_v")]),
            "attention_out" => Some(vec![format!("{b}.to_out.0")]),
            _ => None,
        };
    }
    let one = |m: &str| Some(vec![m.to_string()]);
    match flat.as_str() {
        "final_layer_linear" => one("all_final_layer.2-1.linear"),
        "final_layer_adaLN_modulation_1" => one("all_final_layer.2-1.adaLN_modulation.1"),
        "x_embedder" => one("all_x_embedder.2-1"),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reference_names_map_to_diffusers_modules() {
        assert_eq!(
            zimage_targets("layers.3.attention.qkv").unwrap(),
            ["layers.3.attention.to_q", "layers.3.attention.to_k", "layers.3.attention.to_v"]
        );
        assert_eq!(
            zimage_targets("context_refiner_1_attention_out").unwrap(),
            ["context_refiner.1.attention.to_out.0"]
        );
        assert_eq!(zimage_targets("noise_refiner.0.attention.qkv").unwrap().len(), 3);
        assert_eq!(zimage_targets("final_layer.linear").unwrap(), ["all_final_layer.2-1.linear"]);
        assert_eq!(zimage_targets("x_embedder").unwrap(), ["all_x_embedder.2-1"]);
        // Same name in diffusers, or not Z-Image at all.
        assert_eq!(zimage_targets("layers.0.feed_forward.w1"), None);
        assert_eq!(zimage_targets("double_blocks_0_img_attn_qkv"), None);
    }
}
