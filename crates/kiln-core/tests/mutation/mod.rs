//! Mutation fuzzing shared by the parser and request-body fuzz targets: byte-level mutations of
//! valid inputs (bit flips, boundary integers, truncation, insertion, removal, duplication) as
//! proptest strategies, so a failure shrinks to a short mutation list, and a driver that feeds
//! them to a target for `KILN_FUZZ_SECONDS` (2 s by default) on stream `KILN_FUZZ_SEED`.
#![allow(clippy::unwrap_used, dead_code)]

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::time::{Duration, Instant};

/// One byte-level edit of an input.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    /// Overwrites 1, 2, 4 or 8 bytes with a boundary value (0, -1, 2^31, 2^63, ...).
    Boundary(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, u8),
    /// Copies a slice of the input elsewhere (repeated structure: chunks, layers, dict keys).
    Duplicate(Index, Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, k)| Mutation::Boundary(i, k)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), 1u8..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => (any::<Index>(), any::<Index>(), 1u8..64).prop_map(|(a, b, n)| Mutation::Duplicate(a, b, n)),
    ]
}

fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for m in mutations {
        if v.is_empty() {
            v.push(0);
        }
        let n = v.len();
        match m {
            Mutation::FlipBit(i, b) => v[i.index(n)] ^= 1 << b,
            Mutation::SetByte(i, x) => v[i.index(n)] = *x,
            Mutation::Boundary(i, k) => {
                const VALUES: [u64; 8] =
                    [0, u64::MAX, 1 << 31, 1 << 63, 0x7fff_ffff, 0xffff, 0x8000, 1 << 40];
                let value = VALUES[(*k % 8) as usize].to_le_bytes();
                let width = [1usize, 2, 4, 8][(*k / 8 % 4) as usize];
                let at = i.index(n);
                for (j, b) in value.iter().take(width).enumerate() {
                    if at + j < n {
                        v[at + j] = *b;
                    }
                }
            }
            Mutation::Truncate(i) => v.truncate(i.index(n)),
            Mutation::Insert(i, bytes) => {
                let at = i.index(n + 1);
                v.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(i, len) => {
                let at = i.index(n);
                v.drain(at..(at + *len as usize).min(n));
            }
            Mutation::Duplicate(from, to, len) => {
                let a = from.index(n);
                let slice: Vec<u8> = v[a..(a + *len as usize).min(n)].to_vec();
                let at = to.index(n + 1);
                v.splice(at..at, slice);
            }
        }
    }
    v
}

pub fn budget() -> Duration {
    let secs = std::env::var("KILN_FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// Feeds mutations of `seeds` to `target` until the time budget is spent. `target` may return
/// anything (errors are the expected answer to most inputs); a panic fails the test with the
/// shrunk input's mutation list.
pub fn fuzz(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    fuzz_indexed(name, seeds, |_, input| target(input));
}

/// [`fuzz`], telling `target` which seed each input was mutated from (e.g. to send it to the
/// route that seed belongs to).
pub fn fuzz_indexed(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(usize, &[u8])) {
    // Valid inputs must be handled too (a seed that does not parse is a broken harness).
    for (which, s) in seeds.iter().enumerate() {
        target(which, s);
    }
    let stream: u64 = std::env::var("KILN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let start = Instant::now();
    let (mut tried, mut batch) = (0u64, 0u64);
    let strategy = (0..seeds.len(), prop::collection::vec(mutation(), 1..8));
    while start.elapsed() < budget() || batch == 0 {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&stream.to_le_bytes());
        key[8..16].copy_from_slice(&batch.to_le_bytes());
        key[16..16 + name.len().min(16)].copy_from_slice(&name.as_bytes()[..name.len().min(16)]);
        let config = Config { cases: 200, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        let result = runner.run(&strategy, |(which, mutations)| {
            let input = apply(&seeds[which], &mutations);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(which, &input))).map_err(|_| {
                TestCaseError::fail(format!("{name} panicked on seed {which} with {mutations:?}"))
            })
        });
        if let Err(e) = result {
            panic!("{name} (stream {stream}, batch {batch}): {e}");
        }
        tried += 200;
        batch += 1;
    }
    eprintln!("fuzz {name}: {tried} inputs in {:.1} s, no panic", start.elapsed().as_secs_f64());
}
