//! The engine's f32 kernels, each compiled for the best instruction set the CPU offers
//! and chosen at run time, with a portable fallback: [`window`] for the convs that slide
//! a window (depthwise, grouped and dense), [`gemm`] for the pointwise products.

mod gemm;
mod window;
#[cfg(target_arch = "x86_64")]
mod window512;

pub(crate) use gemm::{matmul, Epilogue, Weights, MR};
pub(crate) use window::{add_bias, bias_prelu, dense_row, depthwise_row, grouped2_row, Act, Isa};
