//! LoRA tensor names: which layer of which model component a LoRA tensor belongs to.
//!
//! Two layouts are read:
//! - kohya/sd-scripts (also LyCORIS LoCon): `lora_unet_<module>`, `lora_te_` / `lora_te1_` /
//!   `lora_te2_<module>` with `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`.
//!   The module path has its dots flattened to underscores, which is not reversible (`to_out_0`
//!   vs `to_out.0`), so names are matched against the base model's own tensor names flattened
//!   the same way ([`ModuleIndex`]) instead of being un-flattened by rules.
//! - diffusers/PEFT: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>`,
//!   `transformer.<module>` with `.lora_A.weight` / `.lora_B.weight` (or the older
//!   `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight`) and an optional
//!   per-module `.alpha`; otherwise alpha comes from the file's PEFT metadata or equals the rank.
//!   `diffusion_model.<module>` (ComfyUI, BFL, AI-Toolkit) is read the same way, with kohya's
//!   suffixes too.
//!
//! Transformer LoRAs trained on a family's reference code name its layers as that code does
//! (FLUX.1 as BFL, Z-Image as Tongyi-MAI); [`native_targets`] maps those to diffusers' modules.

use crate::loaders::bfl_names::bfl_module;
use crate::loaders::zimage_names::zimage_targets;
use std::collections::HashMap;

/// The model component a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The UNet or transformer.
    Denoiser,
    /// The first text encoder (`text_encoder/`).
    Text1,
    /// The second text encoder (`text_encoder_2/`).
    Text2,
}

impl Component {
    /// kohya's prefix / diffusers' component name, for messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::Denoiser => "denoiser",
            Self::Text1 => "text_encoder",
            Self::Text2 => "text_encoder_2",
        }
    }
}

/// How a module's name is written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// kohya: dots flattened to underscores.
    Flat,
    /// diffusers/PEFT: the module path as is.
    Dotted,
}

/// Which part of a module a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Down,
    Up,
    Alpha,
}

/// One tensor name taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub component: Component,
    pub naming: Naming,
    /// The module as named in the file, without component prefix or suffix.
    pub module: String,
    pub part: Part,
}

/// Why a tensor name is not a LoRA layer kiln can merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// A LyCORIS algorithm or LoRA variant whose tensors are not a plain down/up pair.
    Unsupported(&'static str),
    /// Nothing kiln recognises.
    Unknown,
}

const KOHYA_PREFIXES: &[(&str, Component)] = &[
    ("lora_unet_", Component::Denoiser),
    ("lora_te1_", Component::Text1),
    ("lora_te2_", Component::Text2),
    ("lora_te_", Component::Text1),
    // kohya's FLUX trainer names the transformer `lora_unet_` too; `lora_transformer_` appears
    // in some converters.
    ("lora_transformer_", Component::Denoiser),
];

const DOTTED_PREFIXES: &[(&str, Component)] = &[
    ("unet.", Component::Denoiser),
    // BFL's own FLUX LoRAs.
    ("diffusion_model.", Component::Denoiser),
    ("transformer.", Component::Denoiser),
    ("text_encoder_2.", Component::Text2),
    ("text_encoder.", Component::Text1),
];

const KOHYA_SUFFIXES: &[(&str, Part)] =
    &[(".lora_down.weight", Part::Down), (".lora_up.weight", Part::Up), (".alpha", Part::Alpha)];

const DOTTED_SUFFIXES: &[(&str, Part)] = &[
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    // kohya's suffixes on dotted names (ComfyUI-style `diffusion_model.` LoRAs).
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// Variants whose tensors are not a down/up pair: named so the error says what the file is.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("hada_w1_a", "LyCORIS LoHa"),
    ("hada_w2_a", "LyCORIS LoHa"),
    ("lokr_w1", "LyCORIS LoKr"),
    ("lokr_w2", "LyCORIS LoKr"),
    ("lora_mid", "LyCORIS LoCon with Tucker decomposition (lora_mid)"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".diff", "LyCORIS full weight difference"),
    ("oft_", "OFT"),
    ("glora_", "LyCORIS GLoRA"),
];

/// Takes a tensor name apart, or says why it cannot be merged.
pub fn parse_key(key: &str) -> Result<ParsedKey, KeyProblem> {
    if let Some((_, what)) = UNSUPPORTED.iter().find(|(needle, _)| key.contains(needle)) {
        return Err(KeyProblem::Unsupported(what));
    }
    for &(prefix, component) in KOHYA_PREFIXES {
        if let Some(rest) = key.strip_prefix(prefix) {
            // musubi-tuner's Z-Image LoRAs flatten an empty root module name: `lora_unet__layers_0_…`.
            return split_suffix(rest.trim_start_matches('_'), KOHYA_SUFFIXES)
                .map(|(module, part)| ParsedKey { component, naming: Naming::Flat, module, part })
                .ok_or(KeyProblem::Unknown);
        }
    }
    for &(prefix, component) in DOTTED_PREFIXES {
        if let Some(rest) = key.strip_prefix(prefix) {
            return split_suffix(rest, DOTTED_SUFFIXES)
                .map(|(module, part)| ParsedKey { component, naming: Naming::Dotted, module, part })
                .ok_or(KeyProblem::Unknown);
        }
    }
    Err(KeyProblem::Unknown)
}

fn split_suffix(rest: &str, suffixes: &[(&str, Part)]) -> Option<(String, Part)> {
    suffixes.iter().find_map(|&(suffix, part)| {
        rest.strip_suffix(suffix).filter(|m| !m.is_empty()).map(|m| (m.to_string(), part))
    })
}

/// The diffusers modules a layer named as a transformer's reference code names it feeds, in the
/// order of its output rows: one candidate list per family whose reference names differ from
/// diffusers' (FLUX.1 as BFL names it, [`bfl_module`]; Z-Image as Tongyi-MAI names it,
/// [`zimage_targets`]). The plan takes the first candidate whose modules all exist in the model.
/// Reference code fuses layers diffusers keeps apart (q/k/v, and in FLUX's single blocks the MLP
/// input too), so such a layer patches several modules, each with its slice of the up matrix's
/// rows. FLUX's final adaLN modulation is left out: diffusers stores its shift and scale halves
/// swapped, which a LoRA's rows cannot follow without a copy of its own.
pub fn native_targets(module: &str) -> Vec<Vec<String>> {
    let flux = bfl_module(module).filter(|m| !m.swap_halves).map(|m| m.targets);
    flux.into_iter().chain(zimage_targets(module)).collect()
}

/// The base model's weight-bearing modules of one component, findable under every name a LoRA
/// may use for them: the dotted path, the kohya-flattened path and, for text encoders, both
/// with and without transformers' `text_model.` prefix (transformers 4 writes it, 5 does not
/// for `CLIPTextModel`, and kohya always names it).
#[derive(Debug, Default)]
pub struct ModuleIndex {
    dotted: HashMap<String, Option<String>>,
    flat: HashMap<String, Option<String>>,
}

impl ModuleIndex {
    /// Indexes the `<module>.weight` tensors among `names`.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>, text_encoder: bool) -> Self {
        let mut index = Self::default();
        let modules: Vec<&str> = names.into_iter().filter_map(|n| n.strip_suffix(".weight")).collect();
        let sgm = if text_encoder { HashMap::new() } else { sgm_names(&modules) };
        for module in modules {
            let mut aliases = vec![module.to_string()];
            // kohya trains SDXL on SGM's UNet and names its layers so.
            if let Some(name) = sgm.get(module) {
                insert(&mut index.flat, name.replace('.', "_"), module);
            }
            if text_encoder {
                match module.strip_prefix("text_model.") {
                    Some(bare) => aliases.push(bare.to_string()),
                    None => aliases.push(format!("text_model.{module}")),
                }
            }
            for alias in aliases {
                insert(&mut index.flat, alias.replace('.', "_"), module);
                insert(&mut index.dotted, alias, module);
            }
        }
        index
    }

    /// The base module (its weight is `<module>.weight`) that a LoRA module names; `None` when
    /// nothing, or more than one module, answers to the name.
    pub fn find(&self, naming: Naming, module: &str) -> Option<&str> {
        let map = match naming {
            Naming::Flat => &self.flat,
            Naming::Dotted => &self.dotted,
        };
        map.get(module).and_then(|m| m.as_deref())
    }
}

/// The SGM (Stability's generative-models) name of each diffusers UNet module, as kohya's SDXL
/// LoRAs use them, derived from the blocks the model actually has: SGM numbers `input_blocks` /
/// `output_blocks` consecutively over every block's layers (one entry per resnet, with its
/// attention as `.1`, and one per down/upsampler), so the numbering follows from the counts of
/// `down_blocks.B.resnets.L` / `up_blocks.B.resnets.L` in the base tensor names.
fn sgm_names(modules: &[&str]) -> HashMap<String, String> {
    let mut prefixes: Vec<(String, String)> = vec![
        ("conv_in".into(), "input_blocks.0.0".into()),
        ("conv_out".into(), "out.2".into()),
        ("time_embedding.linear_1".into(), "time_embed.0".into()),
        ("time_embedding.linear_2".into(), "time_embed.2".into()),
        ("add_embedding.linear_1".into(), "label_emb.0.0".into()),
        ("add_embedding.linear_2".into(), "label_emb.0.2".into()),
        ("mid_block.resnets.0".into(), "middle_block.0".into()),
        ("mid_block.attentions.0".into(), "middle_block.1".into()),
        ("mid_block.resnets.1".into(), "middle_block.2".into()),
    ];
    // Per block: number of resnets, and whether it has attentions / a resampler.
    let count = |kind: &str, b: usize| {
        let prefix = format!("{kind}.{b}.resnets.");
        modules
            .iter()
            .filter_map(|m| m.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |l| l + 1)
    };
    let has = |kind: &str, b: usize, what: &str| {
        modules.iter().any(|m| m.starts_with(&format!("{kind}.{b}.{what}.")))
    };
    let mut n = 1;
    for b in 0.. {
        let layers = count("down_blocks", b);
        if layers == 0 {
            break;
        }
        for l in 0..layers {
            prefixes.push((format!("down_blocks.{b}.resnets.{l}"), format!("input_blocks.{n}.0")));
            prefixes.push((format!("down_blocks.{b}.attentions.{l}"), format!("input_blocks.{n}.1")));
            n += 1;
        }
        if has("down_blocks", b, "downsamplers") {
            prefixes.push((format!("down_blocks.{b}.downsamplers.0.conv"), format!("input_blocks.{n}.0.op")));
            n += 1;
        }
    }
    let mut n = 0;
    for b in 0.. {
        let layers = count("up_blocks", b);
        if layers == 0 {
            break;
        }
        let attn = has("up_blocks", b, "attentions");
        for l in 0..layers {
            prefixes.push((format!("up_blocks.{b}.resnets.{l}"), format!("output_blocks.{n}.0")));
            prefixes.push((format!("up_blocks.{b}.attentions.{l}"), format!("output_blocks.{n}.1")));
            if l + 1 == layers && has("up_blocks", b, "upsamplers") {
                let slot = if attn { 2 } else { 1 };
                prefixes.push((
                    format!("up_blocks.{b}.upsamplers.0.conv"),
                    format!("output_blocks.{n}.{slot}.conv"),
                ));
            }
            n += 1;
        }
    }
    // Inside a resnet SGM names the layers after its Sequential positions.
    const RESNET: &[(&str, &str)] = &[
        ("conv1", "in_layers.2"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ];
    let mut out = HashMap::new();
    for &module in modules {
        for (diffusers, sgm) in &prefixes {
            let Some(rest) = module.strip_prefix(diffusers.as_str()) else { continue };
            if !(rest.is_empty() || rest.starts_with('.')) {
                continue;
            }
            let rest = match rest.strip_prefix('.') {
                Some(inner) if diffusers.contains(".resnets.") => RESNET
                    .iter()
                    .find(|(d, _)| *d == inner)
                    .map_or(rest.to_string(), |(_, s)| format!(".{s}")),
                _ => rest.to_string(),
            };
            out.insert(module.to_string(), format!("{sgm}{rest}"));
            break;
        }
    }
    out
}

/// Records `alias -> module`, marking an alias that two different modules flatten to as
/// ambiguous (`None`) rather than letting the second silently win.
fn insert(map: &mut HashMap<String, Option<String>>, alias: String, module: &str) {
    match map.get(&alias) {
        Some(Some(existing)) if existing != module => {
            map.insert(alias, None);
        }
        Some(_) => {}
        None => {
            map.insert(alias, Some(module.to_string()));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_layouts() {
        let k = parse_key("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").unwrap();
        assert_eq!((k.component, k.naming, k.part), (Component::Denoiser, Naming::Flat, Part::Down));
        assert_eq!(k.module, "down_blocks_0_attentions_0_proj_in");
        let k = parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!((k.component, k.part), (Component::Text2, Part::Alpha));
        let k =
            parse_key("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight").unwrap();
        assert_eq!((k.component, k.naming, k.part), (Component::Text2, Naming::Dotted, Part::Up));
        assert_eq!(k.module, "text_model.encoder.layers.0.self_attn.q_proj");
        assert_eq!(parse_key("lora_unet_x.hada_w1_a"), Err(KeyProblem::Unsupported("LyCORIS LoHa")));
        // musubi-tuner's doubled underscore; kohya suffixes on ComfyUI-style dotted names.
        let k = parse_key("lora_unet__layers_0_attention_to_q.lora_up.weight").unwrap();
        assert_eq!((k.module.as_str(), k.part), ("layers_0_attention_to_q", Part::Up));
        let k = parse_key("diffusion_model.layers.1.attention.qkv.lora_down.weight").unwrap();
        assert_eq!(
            (k.naming, k.module.as_str(), k.part),
            (Naming::Dotted, "layers.1.attention.qkv", Part::Down)
        );
        assert_eq!(parse_key("something.else"), Err(KeyProblem::Unknown));
    }

    #[test]
    fn index_answers_flat_dotted_and_text_model_aliases() {
        let names = ["encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.bias"];
        let idx = ModuleIndex::new(names, true);
        let want = Some("encoder.layers.0.self_attn.q_proj");
        assert_eq!(idx.find(Naming::Flat, "text_model_encoder_layers_0_self_attn_q_proj"), want);
        assert_eq!(idx.find(Naming::Dotted, "text_model.encoder.layers.0.self_attn.q_proj"), want);
        assert_eq!(idx.find(Naming::Dotted, "encoder.layers.0.self_attn.q_proj"), want);
        // Two modules that flatten alike are ambiguous, not first-wins.
        let idx = ModuleIndex::new(["a.b_c.weight", "a_b.c.weight"], false);
        assert_eq!(idx.find(Naming::Flat, "a_b_c"), None);
        assert_eq!(idx.find(Naming::Dotted, "a.b_c"), Some("a.b_c"));
    }

    #[test]
    fn sgm_names_follow_the_blocks_the_unet_has() {
        // SDXL's layout: 2 layers per down block, 3 per up block, no downsampler in the last
        // down block, no upsampler in the last up block.
        let mut names = vec!["conv_in.weight".to_string(), "mid_block.resnets.1.conv2.weight".into()];
        for b in 0..3 {
            for l in 0..2 {
                names.push(format!("down_blocks.{b}.resnets.{l}.conv1.weight"));
                if b > 0 {
                    names.push(format!("down_blocks.{b}.attentions.{l}.proj_in.weight"));
                }
            }
            if b < 2 {
                names.push(format!("down_blocks.{b}.downsamplers.0.conv.weight"));
            }
            for l in 0..3 {
                names.push(format!("up_blocks.{b}.resnets.{l}.time_emb_proj.weight"));
                if b < 2 {
                    names
                        .push(format!("up_blocks.{b}.attentions.{l}.transformer_blocks.0.attn1.to_q.weight"));
                    names.push(format!("up_blocks.{b}.upsamplers.0.conv.weight"));
                }
            }
        }
        let idx = ModuleIndex::new(names.iter().map(String::as_str), false);
        let find = |k: &str| idx.find(Naming::Flat, k);
        assert_eq!(find("input_blocks_4_1_proj_in"), Some("down_blocks.1.attentions.0.proj_in"));
        assert_eq!(find("input_blocks_3_0_op"), Some("down_blocks.0.downsamplers.0.conv"));
        assert_eq!(find("input_blocks_8_0_in_layers_2"), Some("down_blocks.2.resnets.1.conv1"));
        assert_eq!(find("output_blocks_2_2_conv"), Some("up_blocks.0.upsamplers.0.conv"));
        assert_eq!(
            find("output_blocks_4_1_transformer_blocks_0_attn1_to_q"),
            Some("up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(find("output_blocks_8_0_emb_layers_1"), Some("up_blocks.2.resnets.2.time_emb_proj"));
        assert_eq!(find("middle_block_2_out_layers_3"), Some("mid_block.resnets.1.conv2"));
        assert_eq!(find("input_blocks_0_0"), Some("conv_in"));
    }

    #[test]
    fn bfl_flux_names_map_to_diffusers_modules() {
        assert_eq!(
            native_targets("double_blocks_3_txt_attn_qkv")[0],
            [
                "transformer_blocks.3.attn.add_q_proj",
                "transformer_blocks.3.attn.add_k_proj",
                "transformer_blocks.3.attn.add_v_proj"
            ]
        );
        assert_eq!(native_targets("single_blocks.0.linear1")[0].len(), 4);
        // FLUX's and Z-Image's final layers share a reference name: both are candidates.
        assert_eq!(native_targets("final_layer_linear"), [["proj_out"], ["all_final_layer.2-1.linear"]]);
        assert_eq!(
            native_targets("final_layer_adaLN_modulation_1"),
            [["all_final_layer.2-1.adaLN_modulation.1"]]
        );
        assert!(native_targets("layers_0_feed_forward_w1").is_empty());
    }
}
