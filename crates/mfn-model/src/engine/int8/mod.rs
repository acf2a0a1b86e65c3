//! The engine's int8 kernels: pointwise products of u8 activations (quantised by
//! [`super::quantize`]) by i8 weights (symmetric, one scale per output channel), accumulated
//! in i32 and dequantised in the epilogue. AVX-512 VNNI, AVX-VNNI or AVX2 is chosen at run
//! time, with a portable fallback; every path gives the same integers.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx_vnni;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod vnni;

// `kernel_name` is for benchmarks and diagnostics.
#[allow(unused_imports)]
pub(crate) use gemm::{kernel_name, matmul, Isa, QEpilogue, QWeights};
