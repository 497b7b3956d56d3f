//! LoRA tensor names: which layer of which model component a LoRA tensor belongs to.
//!
//! Three layouts are read:
//! - kohya/sd-scripts (also LyCORIS LoCon): `lora_unet_<module>`, `lora_te_` / `lora_te1_` /
//!   `lora_te2_<module>` with `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`.
//!   The module path has its dots flattened to underscores, which is not reversible (`to_out_0`
//!   vs `to_out.0`), so names are matched against the base model's own tensor names flattened
//!   the same way ([`ModuleIndex`]) instead of being un-flattened by rules.
//! - diffusers/PEFT: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>`,
//!   `transformer.<module>` with `.lora_A.weight` / `.lora_B.weight` (or the older
//!   `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight`) and an optional
//!   per-module `.alpha`; otherwise alpha comes from the file's PEFT metadata or equals the rank.

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
            return split_suffix(rest, KOHYA_SUFFIXES)
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
        for name in names {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            let mut aliases = vec![module.to_string()];
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
}
