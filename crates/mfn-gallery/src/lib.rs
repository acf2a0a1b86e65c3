#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod fingerprint;
mod gallery;
pub mod hnsw;
pub mod index;
pub mod open_set;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;
pub mod storage;
pub mod store;

pub use error::{Error, Result};
pub use fingerprint::Fingerprint;
pub use gallery::{embed_crop, Gallery, Hit, Identity, Stats, DEFAULT_MEMORY_LIMIT};
pub use hnsw::HnswIndex;
pub use index::{ExactIndex, Index, IndexKind, Scored};
pub use open_set::OpenSetSplit;
#[cfg(feature = "postgres")]
pub use postgres::{PgStore, MAX_EF_SEARCH, MAX_HNSW_DIM};
pub use sqlite::SqliteStore;
pub use storage::Storage;
pub use store::{Enrollment, Face, Location, Meta, ServerSearch, Store, FORMAT_VERSION};
