//! candle custom ops, each with its CPU kernel and, with the `cuda` feature, its CUDA half
//! (the kernels and their launch glue live in [`crate::cuda`]).
//!
//! - [`depthwise`](DepthwiseConv2d): the inference depthwise conv with bias and PReLU fused,
//!   and the training [`depthwise_conv2d`] with its native backward;
//! - [`batch_norm_train`]: BatchNorm with batch statistics and its backward;
//! - activations: the inference [`BiasPrelu`] and the training [`prelu`] (PReLU, ReLU,
//!   ReLU6) with its backward.
//!
//! Inference ops expect BatchNorm already folded into their weights and have no backward.
//! Every op falls back to candle's own ops on other devices and dtypes, so results are the
//! same everywhere.

mod activation;
mod batch_norm;
mod depthwise;

pub use activation::{prelu, BiasPrelu};
pub use batch_norm::{batch_norm_train, BatchStats};
pub(crate) use depthwise::GraphConv;
pub use depthwise::{depthwise_conv2d, DepthwiseConv2d};

use candle_core::{bail, CpuStorage, Layout, Result, Shape};

/// The contiguous `f32` data behind a custom op's argument.
pub(crate) fn host_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((a, b))) => Ok(&data[a..b]),
        (CpuStorage::F32(_), None) => bail!("{op}: inputs must be contiguous"),
        _ => bail!("{op}: only f32 is supported"),
    }
}

/// `(N, C, plane)` of an NCHW (or NC) shape.
pub(crate) fn nc_plane(shape: &Shape, what: &str) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        bail!("{what}: expected at least [N, C], got {d:?}");
    }
    Ok((d[0], d[1], d[2..].iter().product::<usize>().max(1)))
}

/// The inputs of a backward op: `x` and `dy` of one NCHW shape, and one value per
/// channel (gamma, or the slopes), checked against each other.
pub(crate) struct GradInputs<'a> {
    pub n: usize,
    pub c: usize,
    pub plane: usize,
    pub x: &'a [f32],
    pub dy: &'a [f32],
    pub per_channel: &'a [f32],
}

impl<'a> GradInputs<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn read(
        what: &str,
        xs: &'a CpuStorage,
        xl: &Layout,
        ds: &'a CpuStorage,
        dl: &Layout,
        ps: &'a CpuStorage,
        pl: &Layout,
    ) -> Result<Self> {
        let (n, c, plane) = nc_plane(xl.shape(), what)?;
        let x = host_f32(xs, xl, what)?;
        let dy = host_f32(ds, dl, what)?;
        let per_channel = host_f32(ps, pl, what)?;
        if dy.len() != x.len() || per_channel.len() != c {
            bail!("{what}: shapes disagree");
        }
        Ok(Self {
            n,
            c,
            plane,
            x,
            dy,
            per_channel,
        })
    }
}
