//! The engine's int8 kernels: pointwise products of u8 activations (per-tensor scale and
//! zero point) by i8 weights (symmetric, one scale per output channel), accumulated in
//! i32 and dequantised in the epilogue. AVX-512 VNNI or AVX2 is chosen at run time, with
//! a portable fallback; every path gives the same integers.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod gemm;
// The per-tensor quantiser; the engine may quantise per input channel instead.
#[allow(dead_code)]
mod quantize;
#[cfg(target_arch = "x86_64")]
mod vnni;

// `kernel_name` is for benchmarks and diagnostics, and `quantize_rows` for callers with
// one scale and zero point per tensor.
#[allow(unused_imports)]
pub(crate) use gemm::{kernel_name, matmul, Isa, QEpilogue, QWeights};
#[allow(unused_imports)]
pub(crate) use quantize::quantize_rows;
