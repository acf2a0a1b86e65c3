#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod align;
pub mod assets;
pub mod detect;
mod error;
pub mod face;
pub mod image;
pub mod loader;
pub mod pairs;

pub use error::{Error, Result};
pub use image::{decode_rgb, load_batch, missing_files};
pub use loader::{embed_images, Batch, BatchLoader};
pub use pairs::{ImageRef, Pair, Pairs};
