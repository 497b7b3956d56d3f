//! CLIP tokenizer against transformers 5.23's CLIPTokenizer on the small tokenizer and variant
//! folders (tests/fixtures/clip/make.py).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use kiln_core::models::clip_tokenizer::ClipTokenizer;
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn folder(name: &str) -> PathBuf {
    if name == "small" {
        Path::new(FIXTURES).join("clip-tokenizer-small")
    } else {
        Path::new(FIXTURES).join("clip/tokenizers").join(name)
    }
}

fn reference() -> Value {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("clip/tokenizer_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_folder(name: &str) {
    let reference = reference();
    let expected = &reference[name];
    let tok = ClipTokenizer::from_dir(&folder(name)).unwrap();
    assert_eq!(tok.max_len() as u64, expected["max_len"].as_u64().unwrap(), "{name}: max_len");
    assert_eq!(tok.bos_id() as u64, expected["bos_id"].as_u64().unwrap(), "{name}: bos");
    assert_eq!(tok.eos_id() as u64, expected["eos_id"].as_u64().unwrap(), "{name}: eos");
    assert_eq!(tok.pad_id() as u64, expected["pad_id"].as_u64().unwrap(), "{name}: pad");
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let got = tok.encode_ids(prompt);
        if got != ids(&case["ids"]) {
            failures.push(format!("{prompt:?}: ids {got:?} != {:?}", ids(&case["ids"])));
            continue;
        }
        let padded = tok.encode_padded(prompt).unwrap();
        if padded.ids != ids(&case["padded"]) {
            failures.push(format!("{prompt:?}: padded {:?} != {:?}", padded.ids, ids(&case["padded"])));
        }
        let truncated = case["truncated"].as_str().map(str::to_string);
        if padded.truncated != truncated {
            failures.push(format!("{prompt:?}: truncated {:?} != {truncated:?}", padded.truncated));
        }
        let decoded = tok.decode(&got);
        if decoded != case["decoded"].as_str().unwrap() {
            failures.push(format!("{prompt:?}: decoded {decoded:?} != {:?}", case["decoded"]));
        }
    }
    assert!(failures.is_empty(), "{name}: {} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn small_tokenizer_matches_transformers() {
    check_folder("small");
}

#[test]
fn sd1_style_configs_match_transformers() {
    check_folder("sd1-style");
}

#[test]
fn sd2_style_pad_bang_matches_transformers() {
    check_folder("pad-bang");
    let tok = ClipTokenizer::from_dir(&folder("pad-bang")).unwrap();
    assert_eq!(tok.pad_id(), 0, "SD 2.x pads with `!` (id 0)");
    assert_ne!(tok.pad_id(), tok.eos_id());
}

#[test]
fn added_tokens_decoder_config_matches_transformers() {
    check_folder("added-tokens-decoder");
}

#[test]
fn tokenizer_json_fallback_matches_transformers() {
    check_folder("tokenizer-json-only");
}

#[test]
fn long_prompt_is_truncated_like_diffusers() {
    let tok = ClipTokenizer::from_dir(&folder("small")).unwrap();
    let padded = tok.encode_padded(&"a ".repeat(80)).unwrap();
    assert_eq!(padded.ids.len(), 77);
    assert_eq!(padded.ids[0], tok.bos_id());
    assert_eq!(padded.ids[76], tok.eos_id());
    assert_eq!(padded.truncated.as_deref(), Some("a a a a a"));
    let empty = tok.encode_padded("").unwrap();
    assert_eq!(&empty.ids[..2], &[tok.bos_id(), tok.eos_id()]);
    assert!(empty.ids[2..].iter().all(|&id| id == tok.pad_id()));
    assert_eq!(empty.truncated, None);
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::copy(folder("small").join("vocab.json"), dir.path().join("vocab.json")).unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("merges.txt"), "{err}");
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\ni n\nnot-a-pair\n").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("merges.txt") && err.contains("line 3"), "{err}");
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nqq zz\n").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("merges.txt") && err.contains("qq"), "{err}");
    std::fs::write(dir.path().join("vocab.json"), "{not json").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    let err = ClipTokenizer::from_dir(&dir.path().join("absent")).unwrap_err().to_string();
    assert!(err.contains("absent"), "{err}");
}
