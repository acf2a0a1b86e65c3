#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod fingerprint;
mod gallery;
pub mod index;
pub mod open_set;
mod sqlite;
pub mod store;

pub use error::{Error, Result};
pub use fingerprint::Fingerprint;
pub use gallery::{embed_crop, Gallery, Hit, Identity, Stats, DEFAULT_MEMORY_LIMIT};
pub use index::{ExactIndex, Index, IndexKind, Scored};
pub use open_set::OpenSetSplit;
pub use sqlite::SqliteStore;
pub use store::{Enrollment, Face, Location, Meta, Store, FORMAT_VERSION};
