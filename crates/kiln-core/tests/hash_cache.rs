//! The weight-hash cache is not fooled by an edit that restores the file's size and mtime.
//! (Its own test binary: it sets KILN_DATA_DIR for the process.)
#![allow(clippy::unwrap_used)]

use kiln_core::loaders::weights::weight_sha256_cached;

#[test]
fn an_edit_with_size_and_mtime_restored_is_hashed_again() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var(kiln_core::env::KILN_DATA_DIR, dir.path().join("data"));
    let file = dir.path().join("unet.safetensors");
    std::fs::write(&file, vec![1u8; 4096]).unwrap();
    let before = weight_sha256_cached(&file).unwrap();
    assert_eq!(weight_sha256_cached(&file).unwrap(), before, "cached");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    assert_ne!(weight_sha256_cached(&file).unwrap(), before, "the edit went unnoticed");
}
