//! Where the tiled VAE keeps each tile's activation between its statistics passes.
//!
//! A statistics pass for norm layer k stops every tile at norm k; the next pass needs each tile
//! again from there. Rerunning every tile from its input (what a pass without kept activations
//! does) costs one forward pass per norm layer, most of it at full resolution. Keeping each tile's
//! input to the stage it stopped in makes the whole run cost about 1.5 forward passes instead.
//!
//! At 4K and beyond those activations are larger than memory (a 4096² SDXL decode holds 256
//! channels at full size), so they are kept in memory up to a byte budget and beyond it in
//! unnamed scratch files under the data folder's `scratch/` (removed by the OS when closed, so
//! nothing is left behind after a crash). Both hold exact values (f32 on disk, the tensor itself
//! in memory), so where an activation was kept never changes a pixel. When the disk has no room
//! either, the tile is not kept: its next pass starts from its input again — slower, same pixels.

use super::with_f32_values;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Free disk space a spill leaves untouched, for everything else on the machine.
const KEEP_FREE_BYTES: u64 = 2 << 30;

/// One tile's activations at the input of stage `stage`, with `norms_before` norm layers before it.
pub(crate) struct Kept {
    pub stage: usize,
    pub norms_before: usize,
    value: Value,
}

enum Value {
    Memory(Vec<Tensor>),
    /// The tensors one after the other, f32 in this machine's byte order (the same process
    /// writes and reads them).
    Disk {
        file: std::fs::File,
        shapes: Vec<(Vec<usize>, DType)>,
    },
}

/// What the store did over a run, for [`super::TiledRun`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeptFigures {
    /// Most bytes held in memory at once.
    pub peak_memory_bytes: u64,
    /// Bytes written to scratch files, over the run.
    pub spilled_bytes: u64,
    /// Activations not kept for want of memory and disk (each such tile restarted from its input).
    pub dropped: usize,
}

pub(crate) struct KeptStore {
    budget: u64,
    in_memory: u64,
    /// Where spills go; created on the first spill.
    scratch: PathBuf,
    scratch_made: bool,
    pub figures: KeptFigures,
}

impl KeptStore {
    /// Keeps up to `budget` bytes in memory; spills the rest to `scratch` (None: the data folder's
    /// `scratch/`, else the system's temporary folder).
    pub fn new(budget: u64, scratch: Option<PathBuf>) -> Self {
        let scratch = scratch
            .or_else(|| crate::env::data_dir().map(|d| d.join("scratch")))
            .unwrap_or_else(std::env::temp_dir);
        Self { budget, in_memory: 0, scratch, scratch_made: false, figures: KeptFigures::default() }
    }

    /// Keeps `acts` as the input of `stage`. None when they could be kept neither in memory nor
    /// on disk.
    pub fn keep(&mut self, stage: usize, norms_before: usize, acts: &[Tensor]) -> Result<Option<Kept>> {
        let bytes = memory_bytes(acts);
        if self.in_memory + bytes <= self.budget {
            self.in_memory += bytes;
            self.figures.peak_memory_bytes = self.figures.peak_memory_bytes.max(self.in_memory);
            return Ok(Some(Kept { stage, norms_before, value: Value::Memory(acts.to_vec()) }));
        }
        let disk_bytes: u64 = acts.iter().map(|t| t.elem_count() as u64 * 4).sum();
        let Some(mut file) = self.scratch_file(disk_bytes) else {
            self.figures.dropped += 1;
            return Ok(None);
        };
        for xs in acts {
            // Written from the tensor's own memory: a copy would add the activation's size (up to
            // hundreds of megabytes) to the peak.
            let written = with_f32_values(xs, |values| file.write_all(crate::files::f32_bytes(values)))?;
            // A full disk mid-write is not an error of the decode: the tile just is not kept.
            if written.is_err() {
                self.figures.dropped += 1;
                return Ok(None);
            }
        }
        self.figures.spilled_bytes += disk_bytes;
        let shapes = acts.iter().map(|t| (t.dims().to_vec(), t.dtype())).collect();
        Ok(Some(Kept { stage, norms_before, value: Value::Disk { file, shapes } }))
    }

    /// The kept activations, on `device`.
    pub fn load(&self, kept: &mut Kept, device: &Device) -> Result<Vec<Tensor>> {
        match &mut kept.value {
            Value::Memory(acts) => Ok(acts.clone()),
            Value::Disk { file, shapes } => {
                file.seek(SeekFrom::Start(0))?;
                let mut acts = Vec::with_capacity(shapes.len());
                for (dims, dtype) in shapes.iter() {
                    let mut values = vec![0f32; dims.iter().product()];
                    file.read_exact(crate::files::f32_bytes_mut(&mut values))?;
                    acts.push(Tensor::from_vec(values, dims.as_slice(), device)?.to_dtype(*dtype)?);
                }
                Ok(acts)
            }
        }
    }

    /// Asks the OS to start reading a spilled activation into its cache now, so that a later
    /// [`Self::load`] does not wait on the disk: the tiled pass calls it for the next tile
    /// before running the current one. Only a hint: nothing happens where it is not supported.
    pub fn prefetch(&self, kept: &Kept) {
        #[cfg(target_os = "linux")]
        if let Value::Disk { file, .. } = &kept.value {
            use std::os::fd::AsRawFd;
            #[allow(unsafe_code)]
            // SAFETY: posix_fadvise only reads its arguments; the descriptor is open (owned by
            // `file`, alive for the call) and length 0 means "to the end of the file".
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = kept;
    }

    /// Frees what `kept` holds.
    pub fn release(&mut self, kept: Kept) {
        if let Value::Memory(acts) = &kept.value {
            self.in_memory = self.in_memory.saturating_sub(memory_bytes(acts));
        }
    }

    /// An unnamed file in the scratch folder with room for `bytes` (leaving [`KEEP_FREE_BYTES`]).
    fn scratch_file(&mut self, bytes: u64) -> Option<std::fs::File> {
        if !self.scratch_made {
            fs_err::create_dir_all(&self.scratch).ok()?;
            self.scratch_made = true;
        }
        if let Some(free) = crate::files::free_disk_bytes(&self.scratch) {
            if free < bytes.saturating_add(KEEP_FREE_BYTES) {
                return None;
            }
        }
        tempfile::tempfile_in(&self.scratch).ok()
    }
}

fn memory_bytes(acts: &[Tensor]) -> u64 {
    acts.iter().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_disk_give_back_the_same_values() -> Result<()> {
        let dev = Device::Cpu;
        // Two activations of different shapes, as inside a resnet.
        let acts =
            [Tensor::randn(0f32, 3.0, (1, 4, 5, 6), &dev)?, Tensor::randn(0f32, 1.0, (1, 2, 5, 6), &dev)?];
        let dir = tempfile::tempdir()?;
        // Budget for exactly one pair: the second spills.
        let bytes = memory_bytes(&acts);
        let mut store = KeptStore::new(bytes, Some(dir.path().to_path_buf()));
        let mut a = store.keep(3, 5, &acts)?.expect("kept in memory");
        let mut b = store.keep(3, 5, &acts)?.expect("kept on disk");
        assert!(matches!(a.value, Value::Memory(_)) && matches!(b.value, Value::Disk { .. }));
        assert_eq!(store.figures.spilled_bytes, bytes);
        assert_eq!(store.figures.peak_memory_bytes, bytes);
        for kept in [&mut a, &mut b] {
            let got = store.load(kept, &dev)?;
            assert_eq!(got.len(), 2);
            for (got, want) in got.iter().zip(&acts) {
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        // Releasing the memory one makes room again.
        store.release(a);
        let c = store.keep(4, 6, &acts)?.expect("kept");
        assert!(matches!(c.value, Value::Memory(_)));
        Ok(())
    }
}
