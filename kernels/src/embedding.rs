//! Token embedding lookup whose table may be host values (a mapped file's range): text encoders'
//! tables are large (T5-XXL 0.5 GB, Qwen3-4B 1.6 GB in f32) and a prompt reads a few rows.

use candle_core::{DType, Module, Result, Tensor};

use crate::host::{HostF32, LayerValues};

#[derive(Debug, Clone)]
enum Table {
    /// Any device or dtype: candle's lookup.
    Tensor(candle_nn::Embedding),
    /// CPU f32 rows, read in place.
    Host(HostF32),
}

/// `ids` → rows of a `[vocab, dim]` table, like `candle_nn::Embedding`.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    vocab: usize,
    dim: usize,
}

impl Embedding {
    /// `weight`: `[vocab, dim]`.
    pub fn new(weight: Tensor, dim: usize) -> Result<Self> {
        let (vocab, d) = weight.dims2()?;
        if d != dim {
            candle_core::bail!("embedding table {:?} for width {dim}", weight.dims());
        }
        crate::reuse::derive("embedding", &[&weight], || {
            let layer =
                Self { table: Table::Tensor(candle_nn::Embedding::new(weight.clone(), dim)), vocab, dim };
            Ok((layer, Vec::new()))
        })
    }

    /// A CPU f32 table of `vocab` rows of `dim` values, read in place.
    pub fn from_host(values: HostF32, vocab: usize, dim: usize) -> Result<Self> {
        if values.len() != vocab * dim {
            candle_core::bail!("embedding from host values: {} values for {vocab}x{dim}", values.len());
        }
        Ok(Self { table: Table::Host(values), vocab, dim })
    }

    /// What [`Embedding::cpu_values`] gives, without copying (`None` off the CPU or not f32).
    pub fn cpu_shape(&self) -> Option<(Vec<usize>, bool)> {
        match &self.table {
            Table::Tensor(e)
                if !(e.embeddings().device().is_cpu() && e.embeddings().dtype() == DType::F32) =>
            {
                None
            }
            _ => Some((vec![self.vocab, self.dim], false)),
        }
    }

    /// The table's values (CPU f32 only).
    pub fn cpu_values(&self) -> Result<Option<LayerValues>> {
        let Some((dims, _)) = self.cpu_shape() else { return Ok(None) };
        let weight = match &self.table {
            Table::Tensor(e) => e.embeddings().flatten_all()?.to_vec1::<f32>()?,
            Table::Host(v) => v.values().to_vec(),
        };
        Ok(Some(LayerValues { weight, dims, bias: None }))
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let values = match &self.table {
            Table::Tensor(e) => return e.forward(ids),
            Table::Host(values) => values,
        };
        let flat: Vec<i64> = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        let table = values.values();
        let mut out = Vec::with_capacity(flat.len() * self.dim);
        for &id in &flat {
            let row = usize::try_from(id).ok().filter(|&r| r < self.vocab).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "token id {id} outside the embedding table of {}",
                    self.vocab
                ))
            })?;
            out.extend_from_slice(&table[row * self.dim..(row + 1) * self.dim]);
        }
        let mut dims = ids.dims().to_vec();
        dims.push(self.dim);
        Tensor::from_vec(out, dims, ids.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn host_table_looks_up_the_same_rows() -> Result<()> {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (11, 6), &dev)?;
        let plain = Embedding::new(table.clone(), 6)?;
        let Some(v) = plain.cpu_values()? else { panic!("a CPU f32 table has values") };
        let host = Embedding::from_host(v.weight.into(), 11, 6)?;
        let ids = Tensor::new(&[[3u32, 0, 10], [1, 1, 7]], &dev)?;
        let (a, b) = (host.forward(&ids)?, candle_nn::Embedding::new(table, 6).forward(&ids)?);
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        assert!(host.forward(&Tensor::new(&[11u32], &dev)?).is_err());
        Ok(())
    }
}
