//! diffusers pipeline folders: `model_index.json` plus one sub-folder per component, each with
//! its config and safetensors weights (optionally `*.fp16.safetensors` variants or shards).

use crate::error::{Error, Result};
use crate::models::family::Family;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A diffusers pipeline folder on disk.
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    root: PathBuf,
    class_name: String,
    /// component name → (library, class), e.g. "unet" → ("diffusers", "UNet2DConditionModel").
    components: BTreeMap<String, (String, String)>,
    index: Value,
}

impl DiffusersFolder {
    /// Opens a folder holding `model_index.json`.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::not_found(
                "model folder",
                root,
                "pass a diffusers folder (with model_index.json) or a hub id such as stabilityai/sd-turbo",
            ));
        }
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::not_found(
                "model_index.json",
                &index_path,
                "the folder is not a diffusers pipeline (a single-file FLUX.1 checkpoint goes as \
                 --model FILE.safetensors with --base naming a diffusers folder)",
            ));
        }
        let index = read_json(&index_path)?;
        let obj = index.as_object().ok_or_else(|| Error::config(&index_path, "not a JSON object"))?;
        let class_name = obj
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(&index_path, "missing `_class_name`"))?
            .to_string();
        let mut components = BTreeMap::new();
        for (name, value) in obj {
            if name.starts_with('_') {
                continue;
            }
            // Components are ["library", "Class"]; null entries (e.g. safety_checker) are absent.
            if let Some([lib, class]) = value.as_array().map(Vec::as_slice) {
                if let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) {
                    components.insert(name.clone(), (lib.to_string(), class.to_string()));
                }
            }
        }
        Ok(Self { root: root.to_path_buf(), class_name, components, index })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pipeline class from model_index.json, e.g. `StableDiffusionXLPipeline`.
    pub fn class_name(&self) -> &str {
        &self.class_name
    }

    /// The pipeline family ([`Family::detect`]).
    pub fn family(&self) -> Family {
        Family::detect(self)
    }

    /// Whether model_index.json lists the component.
    pub fn has(&self, component: &str) -> bool {
        self.components.contains_key(component)
    }

    /// The component's class name, e.g. `EulerDiscreteScheduler`.
    pub fn component_class(&self, component: &str) -> Option<&str> {
        self.components.get(component).map(|(_, c)| c.as_str())
    }

    /// A boolean pipeline option stored in model_index.json (e.g. force_zeros_for_empty_prompt).
    pub fn index_flag(&self, key: &str) -> Option<bool> {
        self.index.get(key).and_then(Value::as_bool)
    }

    /// The component's folder; an error names it when model_index.json lists it but it is absent.
    pub fn component_dir(&self, component: &str) -> Result<PathBuf> {
        if !self.has(component) {
            return Err(Error::config(
                self.root.join("model_index.json"),
                format!("pipeline has no `{component}` component"),
            ));
        }
        let dir = self.root.join(component);
        if !dir.is_dir() {
            return Err(Error::not_found(
                format!("`{component}` folder"),
                dir,
                "the model folder is incomplete",
            ));
        }
        Ok(dir)
    }

    /// Reads the component's config (`config.json`, or `scheduler_config.json` for schedulers).
    pub fn config(&self, component: &str) -> Result<(PathBuf, Value)> {
        let dir = self.component_dir(component)?;
        let path = ["config.json", "scheduler_config.json"]
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::not_found(format!("`{component}` config"), dir.join("config.json"), ""))?;
        let value = read_json(&path)?;
        Ok((path, value))
    }

    /// Parses the component's config into `T`, naming the file on error.
    pub fn parse_config<T: serde::de::DeserializeOwned>(&self, component: &str) -> Result<(PathBuf, T)> {
        let (path, value) = self.config(component)?;
        let parsed = serde_json::from_value(value).map_err(|e| Error::config(&path, e.to_string()))?;
        Ok((path, parsed))
    }

    /// The component's safetensors file(s). `prefer_fp16` picks `*.fp16.safetensors` variants when
    /// present; otherwise the full-precision file is preferred and fp16-only folders still load.
    pub fn weight_files(&self, component: &str, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
        let dir = self.component_dir(component)?;
        weight_files_in(&dir, prefer_fp16)
    }
}

/// Finds the safetensors weights in a component folder (single file or sharded with an index).
pub fn weight_files_in(dir: &Path, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    let stems = ["diffusion_pytorch_model", "model"];
    let variants: [&str; 2] = if prefer_fp16 { [".fp16", ""] } else { ["", ".fp16"] };
    for variant in variants {
        for stem in stems {
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}.safetensors.index{variant}.json"));
            let index_alt = dir.join(format!("{stem}{variant}.safetensors.index.json"));
            for idx in [index, index_alt] {
                if idx.is_file() {
                    return shards_from_index(&idx);
                }
            }
        }
    }
    let has_bin = ["diffusion_pytorch_model.bin", "pytorch_model.bin"].iter().any(|n| dir.join(n).is_file());
    let hint = if has_bin {
        "only PyTorch .bin weights found; kiln reads safetensors only (convert with diffusers' save_pretrained(safe_serialization=True))"
    } else {
        "expected diffusion_pytorch_model.safetensors or model.safetensors (or a .fp16 variant)"
    };
    Err(Error::not_found("safetensors weights", dir, hint))
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let value = read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config(index, "missing `weight_map`"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> =
        map.values().filter_map(Value::as_str).map(|f| dir.join(f)).collect::<Vec<_>>();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(Error::not_found("weight shard", f, format!("listed in {}", index.display())));
        }
    }
    Ok(files)
}

/// Reads and parses a JSON file, naming it on error.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = fs_err::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}
