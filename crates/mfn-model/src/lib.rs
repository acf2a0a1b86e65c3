#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod engine;
mod error;
pub mod import;
pub mod layers;
mod model;
pub mod ops;
pub mod quant;

/// The training depthwise conv, now in [`ops`]; kept so that older paths still resolve.
#[doc(hidden)]
pub mod grad {
    pub use crate::ops::depthwise_conv2d;
}

/// The training BatchNorm and activation ops, now in [`ops`]; kept so that older paths
/// still resolve.
#[doc(hidden)]
pub mod train_ops {
    pub use crate::ops::{batch_norm_train, prelu, BatchStats};
}

pub use checkpoint::{Checkpoint, CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION};
pub use config::{
    Activation, Bottleneck, Complexity, Config, ConvSpec, Head, InputNorm, Plan, PoolSpec, Pooling,
    StemKind,
};
pub use engine::{LayerKind, LayerTimes};
pub use error::{Error, Result};
pub use layers::l2_normalize;
pub use model::{hflip, MobileFaceNet};
pub use ops::depthwise_conv2d;
pub use quant::{Calibrator, Int8, Precision};

/// Whether this crate's native kernels run on `device`: the CPU always, CUDA devices when
/// built with the `cuda` feature. Elsewhere the ops fall back to candle's.
pub(crate) fn native_device(device: &candle_core::Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}

/// Sets how many threads candle's matrix products and this crate's kernels use, process
/// wide. Call it once, before any model runs; later calls only affect candle.
///
/// Both run on rayon's global pool, so one pool of `n` threads serves both and neither
/// oversubscribes the other.
pub fn set_num_threads(n: usize) {
    let n = n.max(1);
    // candle sizes its gemm calls from this variable on every call.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // Fails only if the pool already exists, in which case its size stays as it was.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}
