//! The margin head: class (sub-)centres plus a [`CombinedMargin`].

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};
use crate::margin::{margin_logits, CombinedMargin};

/// Class centres `W` of shape `[classes · k, dim]` (row `c·k + j` is sub-centre `j` of class
/// `c`) and a margin. `forward` gives margin logits `[N, classes]`.
#[derive(Debug, Clone)]
pub struct MarginHead {
    weight: Tensor,
    classes: usize,
    sub_centers: usize,
    dim: usize,
    margin: CombinedMargin,
    filter_threshold: Option<f64>,
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

impl MarginHead {
    /// Creates (or loads) the centres as `"weight"` from `vb`, initialised `N(0, 0.01²)`
    /// when `vb` is backed by a `VarMap`. `sub_centers` is k (1 for plain margins).
    pub fn new(
        vb: VarBuilder,
        classes: usize,
        dim: usize,
        sub_centers: usize,
        margin: CombinedMargin,
    ) -> Result<Self> {
        margin.validate()?;
        if sub_centers == 0 {
            return Err(Error::ZeroSubCenters);
        }
        if classes == 0 || dim == 0 {
            return Err(Error::EmptyHead);
        }
        let weight = vb.get_with_hints(
            (classes * sub_centers, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        Self::from_weight(weight, sub_centers, margin)
    }

    /// Wraps an existing `[classes · k, dim]` weight (e.g. `Var::as_tensor`).
    pub fn from_weight(weight: Tensor, sub_centers: usize, margin: CombinedMargin) -> Result<Self> {
        margin.validate()?;
        if sub_centers == 0 {
            return Err(Error::ZeroSubCenters);
        }
        let (rows, dim) = match weight.dims() {
            &[r, d] => (r, d),
            dims => {
                return Err(Error::Shape(format!(
                    "weight must have rank 2, got shape {dims:?}"
                )))
            }
        };
        if rows == 0 || dim == 0 {
            return Err(Error::EmptyHead);
        }
        if rows % sub_centers != 0 {
            return Err(Error::WeightRows {
                rows,
                k: sub_centers,
            });
        }
        Ok(Self {
            weight,
            classes: rows / sub_centers,
            sub_centers,
            dim,
            margin,
            filter_threshold: None,
        })
    }

    /// Sets inter-class filtering: in `forward`, a *non-target* class whose cosine (after the
    /// sub-centre max) is strictly above `threshold` gets logit `−∞`, i.e. it is dropped from
    /// the softmax (no loss, no gradient) — for classes that are likely the same identity
    /// under another label, as in sub-centre ArcFace's noisy-data setting. `None` disables it.
    pub fn with_filter_threshold(mut self, threshold: Option<f64>) -> Result<Self> {
        if let Some(t) = threshold {
            if !(t.is_finite() && (-1.0..=1.0).contains(&t)) {
                return Err(Error::InvalidFilterThreshold(t));
            }
        }
        self.filter_threshold = threshold;
        Ok(self)
    }

    /// The centres `[classes · k, dim]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }
    /// Sub-centres per class (k).
    pub fn sub_centers(&self) -> usize {
        self.sub_centers
    }
    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// The margin.
    pub fn margin(&self) -> &CombinedMargin {
        &self.margin
    }
    /// The inter-class filter threshold.
    pub fn filter_threshold(&self) -> Option<f64> {
        self.filter_threshold
    }

    /// Cosines `[N, classes]` between L2-normalised embeddings `[N, dim]` and centres, the
    /// max over each class's k sub-centres.
    pub fn cosine(&self, embeddings: &Tensor) -> Result<Tensor> {
        let (n, d) = match embeddings.dims() {
            &[n, d] => (n, d),
            dims => {
                return Err(Error::Shape(format!(
                    "embeddings must have rank 2, got shape {dims:?}"
                )))
            }
        };
        if d != self.dim {
            return Err(Error::DimMismatch {
                expected: self.dim,
                got: d,
            });
        }
        let e = l2_normalize(embeddings)?;
        let w = l2_normalize(&self.weight.to_dtype(embeddings.dtype())?)?;
        let cos = e.matmul(&w.t()?)?; // [n, classes * k]
        if self.sub_centers == 1 {
            Ok(cos)
        } else {
            Ok(cos
                .reshape((n, self.classes, self.sub_centers))?
                .max(D::Minus1)?)
        }
    }

    /// Margin logits `[N, classes]` from embeddings `[N, dim]` and labels `[N]` (u32).
    pub fn forward(&self, embeddings: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let cos = self.cosine(embeddings)?;
        margin_logits(&self.margin, &cos, labels, self.filter_threshold)
    }

    /// Mean cross-entropy of [`forward`](Self::forward)'s logits.
    pub fn loss(&self, embeddings: &Tensor, labels: &Tensor) -> Result<Tensor> {
        crate::cross_entropy(&self.forward(embeddings, labels)?, labels)
    }
}
