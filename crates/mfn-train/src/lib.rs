#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod atomic;
pub mod data;
mod error;
pub mod eval;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use data::{BatchPlan, TrainBatch, TrainBatches};
pub use error::{Error, Result};
pub use eval::{EvalResult, EvalSet};
pub use optim::{Optimizer, OptimizerKind, ParamGroup, WeightDecay};
pub use schedule::{Decay, LrSchedule};
pub use trainer::{Budget, DataSettings, Event, SavedRun, StepMetrics, TrainConfig, Trainer};
