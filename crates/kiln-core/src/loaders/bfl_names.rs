//! FLUX.1 tensor names as Black Forest Labs' reference code writes them (the `flux1-dev.safetensors`
//! release, ComfyUI's checkpoints under `model.diffusion_model.`, kohya's and BFL's LoRAs) and
//! the diffusers modules each one feeds. One mapping for both users: the single-file loader
//! ([`super::single_file`]) and LoRA merging ([`super::lora::keys::native_targets`]).
//!
//! BFL fuses layers diffusers keeps apart: a double block's q/k/v is one `qkv` linear layer, and
//! a single block's `linear1` is q, k, v and the MLP input stacked by rows. Such a module feeds
//! several diffusers modules, each taking the next slice of its output rows: every target but
//! the last takes `inner_dim` rows (q, k and v are each as wide as the model), the last takes
//! what remains (v, or the MLP input of a single block).

/// The diffusers side of one BFL module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BflModule {
    /// The diffusers modules fed by the module's output rows, in row order.
    pub targets: Vec<String>,
    /// diffusers stores the two halves of the output rows in the other order (the final
    /// layer's adaLN modulation: BFL writes shift then scale, diffusers' `norm_out` scale
    /// then shift).
    pub swap_halves: bool,
}

/// The diffusers modules a BFL module feeds (`module` dotted or kohya-flattened, without its
/// parameter name); None for names that are no FLUX.1 transformer module.
pub fn bfl_module(module: &str) -> Option<BflModule> {
    let flat = module.replace('.', "_");
    let block = |prefix: &str| -> Option<(usize, String)> {
        let rest = flat.strip_prefix(prefix)?;
        let (n, rest) = rest.split_once('_')?;
        Some((n.parse().ok()?, rest.to_string()))
    };
    let plain = |targets: Vec<String>| Some(BflModule { targets, swap_halves: false });
    if let Some((i, rest)) = block("double_blocks_") {
        let b = format!("transformer_blocks.{i}");
        let names: &[&str] = match rest.as_str() {
            "img_attn_qkv" => &["attn.to_q", "attn.to_k", "attn.to_v"],
            "img_attn_proj" => &["attn.to_out.0"],
            "img_attn_norm_query_norm" => &["attn.norm_q"],
            "img_attn_norm_key_norm" => &["attn.norm_k"],
            "img_mlp_0" => &["ff.net.0.proj"],
            "img_mlp_2" => &["ff.net.2"],
            "img_mod_lin" => &["norm1.linear"],
            "txt_attn_qkv" => &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "txt_attn_proj" => &["attn.to_add_out"],
            "txt_attn_norm_query_norm" => &["attn.norm_added_q"],
            "txt_attn_norm_key_norm" => &["attn.norm_added_k"],
            "txt_mlp_0" => &["ff_context.net.0.proj"],
            "txt_mlp_2" => &["ff_context.net.2"],
            "txt_mod_lin" => &["norm1_context.linear"],
            _ => return None,
        };
        return plain(names.iter().map(|n| format!("{b}.{n}")).collect());
    }
    if let Some((i, rest)) = block("single_blocks_") {
        let b = format!("single_transformer_blocks.{i}");
        let names: &[&str] = match rest.as_str() {
            "linear1" => &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
            "linear2" => &["proj_out"],
            "norm_query_norm" => &["attn.norm_q"],
            "norm_key_norm" => &["attn.norm_k"],
            "modulation_lin" => &["norm.linear"],
            _ => return None,
        };
        return plain(names.iter().map(|n| format!("{b}.{n}")).collect());
    }
    let one = |m: &str| plain(vec![m.to_string()]);
    match flat.as_str() {
        "img_in" => one("x_embedder"),
        "txt_in" => one("context_embedder"),
        "time_in_in_layer" => one("time_text_embed.timestep_embedder.linear_1"),
        "time_in_out_layer" => one("time_text_embed.timestep_embedder.linear_2"),
        "vector_in_in_layer" => one("time_text_embed.text_embedder.linear_1"),
        "vector_in_out_layer" => one("time_text_embed.text_embedder.linear_2"),
        "guidance_in_in_layer" => one("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in_out_layer" => one("time_text_embed.guidance_embedder.linear_2"),
        "final_layer_linear" => one("proj_out"),
        "final_layer_adaLN_modulation_1" => {
            Some(BflModule { targets: vec!["norm_out.linear".into()], swap_halves: true })
        }
        _ => None,
    }
}

/// Every BFL parameter name (without a checkpoint prefix) of a FLUX.1 transformer with
/// `double` double-stream and `single` single-stream blocks, with or without the guidance
/// embedding: what a complete checkpoint of that shape holds.
pub fn bfl_parameter_names(double: usize, single: usize, guidance: bool) -> Vec<String> {
    let linear = |m: &str| vec![format!("{m}.weight"), format!("{m}.bias")];
    let mut out = Vec::new();
    let mut embedders = vec!["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer"];
    embedders.extend(["vector_in.in_layer", "vector_in.out_layer"]);
    if guidance {
        embedders.extend(["guidance_in.in_layer", "guidance_in.out_layer"]);
    }
    for m in embedders {
        out.extend(linear(m));
    }
    for i in 0..double {
        for stream in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{stream}");
            for m in ["mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2"] {
                out.extend(linear(&format!("{p}_{m}")));
            }
            out.push(format!("{p}_attn.norm.query_norm.scale"));
            out.push(format!("{p}_attn.norm.key_norm.scale"));
        }
    }
    for i in 0..single {
        let p = format!("single_blocks.{i}");
        for m in ["linear1", "linear2", "modulation.lin"] {
            out.extend(linear(&format!("{p}.{m}")));
        }
        out.push(format!("{p}.norm.query_norm.scale"));
        out.push(format!("{p}.norm.key_norm.scale"));
    }
    out.extend(linear("final_layer.linear"));
    out.extend(linear("final_layer.adaLN_modulation.1"));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fused_layers_feed_diffusers_projections_in_row_order() {
        let m = bfl_module("single_blocks.0.linear1").unwrap();
        assert_eq!(m.targets.len(), 4);
        assert_eq!(m.targets[3], "single_transformer_blocks.0.proj_mlp");
        assert_eq!(
            bfl_module("double_blocks_3_txt_attn_norm_key_norm").unwrap().targets,
            ["transformer_blocks.3.attn.norm_added_k"]
        );
        assert!(bfl_module("final_layer.adaLN_modulation.1").unwrap().swap_halves);
        assert_eq!(bfl_module("input_blocks.0.0"), None);
    }

    #[test]
    fn every_parameter_of_a_checkpoint_maps() {
        let names = bfl_parameter_names(2, 3, true);
        assert_eq!(names.len(), 8 * 2 + 2 * 2 * (5 * 2 + 2) + 3 * (3 * 2 + 2) + 4);
        for name in &names {
            let module = name.rsplit_once('.').unwrap().0;
            assert!(bfl_module(module).is_some(), "{name}");
        }
    }
}
