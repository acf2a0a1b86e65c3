#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod embedding;
mod error;
mod kfold;
pub mod open_set;
mod pairs;
#[cfg(feature = "plot")]
mod plot;
mod report;
mod roc;

pub use embedding::{cosine, normalize, pair_cosines};
pub use error::{Error, Result};
pub use kfold::{kfold_accuracy, FoldResult, KFoldReport, Protocol, INSIGHTFACE_THRESHOLDS};
pub use open_set::{DirAtFar, OpenSetReport, Probe};
pub use pairs::PairScores;
#[cfg(feature = "plot")]
pub use plot::{plot_cmc, plot_roc, FONT_ENV};
pub use report::{evaluate, Report};
pub use roc::{roc, tar_at_far, Roc, RocPoint, TarAtFar};

#[cfg(test)]
mod testutil;
