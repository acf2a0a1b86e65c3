#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod acos;
mod error;
mod head;
pub mod margin;

use candle_core::Tensor;

pub use error::{Error, Result};
pub use head::MarginHead;
pub use margin::{
    CombinedMargin, Fallback, CLAMP_EPS, DEFAULT_ARCFACE_MARGIN, DEFAULT_COSFACE_MARGIN,
    DEFAULT_SCALE,
};

/// Mean (over the batch) softmax cross-entropy of `logits` `[N, C]` against `labels` `[N]`
/// (u32), a scalar tensor; checks shapes and label range first.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, classes) = match logits.dims() {
        &[n, c] => (n, c),
        dims => {
            return Err(Error::Shape(format!(
                "logits must have rank 2, got shape {dims:?}"
            )))
        }
    };
    margin::check_labels(labels, n, classes)?;
    if n == 0 {
        return Err(Error::Shape("empty batch".into()));
    }
    Ok(candle_nn::loss::cross_entropy(logits, labels)?)
}
