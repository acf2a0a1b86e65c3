//! Importers from other frameworks' checkpoints into a [`crate::Config`] and named tensors.

pub mod mxnet;
pub mod onnx;
pub mod torch;
