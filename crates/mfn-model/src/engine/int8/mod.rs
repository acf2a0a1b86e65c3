//! The engine's int8 kernels: pointwise products of u8 activations (quantised by
//! [`super::quantize`]) by i8 weights (symmetric, one scale per output channel), accumulated
//! in i32 and dequantised in the epilogue. AVX-512 VNNI, AVX-VNNI or AVX2 is chosen at run
//! time, with a portable fallback; every path gives the same integers.

/// The row-block and panel loops the x86 int8 kernels share. Rows go in blocks of up to
/// the kernel's `MR`, whose activations `a_block` yields as a pointer (given the block's
/// first row and row count, named by the caller); columns go in the kernel's `PANEL`-wide
/// panels of packed weights (`ks x stride` each, `stride` the panel's columns rounded up
/// to `lanes`). Each block and panel is one call of the kernel's
/// `tile::<[T,] R, V>(a, ks, b, stride, out, n, cols, &ep, row0, col0, residual)` (named
/// `tile [tile]` or `tile [tile<T>]`), its row
/// count `R` and vector count `V` made constants by matching them against `rows` and
/// `vectors`.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_loops {
    (
        $out:ident, $rows:ident, $ks:ident, $n:ident, $w:ident, $ep:ident;
        lanes $lanes:literal, rows [$($r:literal)*], vectors $vs:tt;
        a_block |$r0:ident, $rb:ident| $a_block:expr;
        tile $tile:tt
    ) => {{
        let mut $r0 = 0;
        while $r0 < $rows {
            let $rb = MR.min($rows - $r0);
            let ap = $a_block;
            let o = $out[$r0 * $n..].as_mut_ptr();
            let res = $ep.residual.map(|res| res[$r0 * $n..].as_ptr());
            let mut at = 0;
            for (c0, cols) in panels($n, PANEL) {
                let stride = cols.next_multiple_of($lanes);
                debug_assert!($w.len() >= at + $ks * stride);
                let b = $w[at..].as_ptr();
                let (o, res) = (o.wrapping_add(c0), res.map(|p| p.wrapping_add(c0)));
                match $rb {
                    $($r => tile_loops!(
                        @vectors $r $vs, $lanes, stride, $tile,
                        (ap, $ks, b, stride, o, $n, cols, &$ep, $r0, c0, res)
                    ),)*
                    _ => unreachable!(),
                }
                at += $ks * stride;
            }
            $r0 += $rb;
        }
    }};
    (
        @vectors $r:literal [$($v:literal)*], $lanes:literal, $stride:ident,
        $tile:tt, $args:tt
    ) => {
        match $stride / $lanes {
            $($v => tile_loops!(@call $tile $r $v $args),)*
            _ => unreachable!(),
        }
    };
    (@call [$tile:ident $(<$gen:ty>)?] $r:literal $v:literal $args:tt) => {
        // SAFETY: the extents are as `tile` requires: `r` rows of `a_block`, this panel's
        // `ks x stride` weights, and `cols` columns of `out` (and of the residual) from
        // the panel's first.
        unsafe { $tile::<$($gen,)? $r, $v> $args }
    };
}

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
