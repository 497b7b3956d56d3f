//! Derived layer weights reused across model builds.
//!
//! Building a layer derives data from its weights: [`crate::Linear`] keeps a transposed
//! (and, for fused q/k/v, concatenated) copy for the gemm, [`crate::Conv2d`] keeps Winograd
//! transforms once it has run. When a loaded model is rebuilt with a few weights changed (a
//! LoRA set switched on a warm model), every layer whose weights did not change can take the
//! derived data of the model already loaded instead of deriving it again.
//!
//! The layer constructors ask the memo installed on the building thread ([`with_memo`]) by the
//! [`TensorId`]s of their source tensors; the memo (the model loader's) knows which tensor
//! names those ids stand for and whether the names' weights are unchanged. Without a memo,
//! or on a miss, a layer derives its data as always, so a memo can only save work, never
//! change a number: a hit returns a layer built from the very same weights.

use candle_core::{Result, Tensor, TensorId};
use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;

/// A derived layer, shared between the models built from the same weights.
pub type Derived = Arc<dyn Any + Send + Sync>;

/// What a model loader offers the layer constructors while a model is built.
pub trait DeriveMemo {
    /// A layer of `kind` built earlier from the tensors that `sources` stand for now, when
    /// those tensors' values are unchanged.
    fn lookup(&self, kind: &str, sources: &[TensorId]) -> Option<Derived>;

    /// Keeps the layer built from `sources`. `views` gives, for source tensors the layer no
    /// longer holds as they came, views into the layer's own derived data with the same values
    /// and shape (a Linear's weight as a view of its transposed copy), so the loader can keep
    /// those instead of the originals.
    fn store(&self, kind: &str, sources: &[TensorId], layer: Derived, views: Vec<(TensorId, Tensor)>);
}

thread_local! {
    static MEMO: RefCell<Option<Arc<dyn DeriveMemo>>> = const { RefCell::new(None) };
}

/// Runs `build` with `memo` offered to every layer constructed on this thread.
pub fn with_memo<R>(memo: Arc<dyn DeriveMemo>, build: impl FnOnce() -> R) -> R {
    /// Restores the previous memo even when `build` unwinds.
    struct Restore(Option<Arc<dyn DeriveMemo>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            MEMO.with(|m| *m.borrow_mut() = previous);
        }
    }
    let previous = MEMO.with(|m| m.borrow_mut().replace(memo));
    let _restore = Restore(previous);
    build()
}

/// The layer of `kind` from `sources`: the memo's when it has one, else `make`'s (which also
/// returns the views described in [`DeriveMemo::store`]), kept in the memo.
pub(crate) fn derive<T: Clone + Send + Sync + 'static>(
    kind: &str,
    sources: &[&Tensor],
    make: impl FnOnce() -> Result<(T, Vec<(TensorId, Tensor)>)>,
) -> Result<T> {
    let memo = MEMO.with(|m| m.borrow().clone());
    let Some(memo) = memo else { return make().map(|(layer, _)| layer) };
    let ids: Vec<TensorId> = sources.iter().map(|t| t.id()).collect();
    if let Some(layer) = memo.lookup(kind, &ids).and_then(|d| d.downcast_ref::<T>().cloned()) {
        return Ok(layer);
    }
    let (layer, views) = make()?;
    memo.store(kind, &ids, Arc::new(layer.clone()), views);
    Ok(layer)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Module;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A memo that answers by tensor id and counts its hits.
    #[derive(Default)]
    struct ById {
        layers: Mutex<HashMap<String, Derived>>,
        hits: Mutex<usize>,
    }

    fn key(kind: &str, ids: &[TensorId]) -> String {
        format!("{kind}{ids:?}")
    }

    impl DeriveMemo for ById {
        fn lookup(&self, kind: &str, sources: &[TensorId]) -> Option<Derived> {
            let hit = self.layers.lock().unwrap().get(&key(kind, sources)).cloned();
            if hit.is_some() {
                *self.hits.lock().unwrap() += 1;
            }
            hit
        }
        fn store(&self, kind: &str, sources: &[TensorId], layer: Derived, _: Vec<(TensorId, Tensor)>) {
            self.layers.lock().unwrap().insert(key(kind, sources), layer);
        }
    }

    #[test]
    fn a_layer_built_twice_from_the_same_tensors_is_derived_once() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::arange(0f32, 12., &dev)?.reshape((3, 4))?;
        let b = Tensor::new(&[1f32, 2., 3.], &dev)?;
        let x = Tensor::arange(0f32, 8., &dev)?.reshape((2, 4))?;
        let memo = Arc::new(ById::default());
        let (first, second) = with_memo(memo.clone(), || -> Result<_> {
            Ok((
                crate::Linear::new(w.clone(), Some(b.clone()))?,
                crate::Linear::new(w.clone(), Some(b.clone()))?,
            ))
        })?;
        assert_eq!(*memo.hits.lock().unwrap(), 1);
        let plain = crate::Linear::new(w, Some(b))?;
        let want = plain.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(first.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, want);
        assert_eq!(second.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, want);
        // Outside `with_memo` nothing is asked.
        let _ = crate::Linear::new(Tensor::zeros((3, 4), candle_core::DType::F32, &dev)?, None)?;
        assert_eq!(*memo.hits.lock().unwrap(), 1);
        Ok(())
    }
}
