#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod checkpoint;
pub mod config;
mod error;
pub mod import;
pub mod layers;
mod model;
pub mod ops;

pub use checkpoint::{Checkpoint, CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION};
pub use config::{Bottleneck, Complexity, Config, ConvSpec, Head, InputNorm, Plan};
pub use error::{Error, Result};
pub use layers::l2_normalize;
pub use model::{hflip, MobileFaceNet};
