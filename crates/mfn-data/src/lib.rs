#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod align;
pub mod assets;
pub mod bin_set;
pub mod calibration;
pub mod dataset;
mod error;
pub mod image;
pub mod loader;
pub mod pairs;
pub mod recordio;
mod text;
pub mod verification;

pub use bin_set::BinSet;
pub use dataset::{Dataset, ImageFolder, RecordDataset};
pub use error::{Error, Result};
pub use image::decode_rgb_bytes;
pub use image::{decode_rgb, decode_rgb_sized, images_to_tensor, load_batch, missing_files};
pub use loader::{embed_batches, embed_encoded};
pub use loader::{embed_images, Batch, BatchLoader};
pub use pairs::{ImageRef, Pair, Pairs};
pub use verification::VerificationSet;
