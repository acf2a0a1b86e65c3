//! The AVX-VNNI kernel: the VEX-encoded, 256-bit `vpdpbusd` of CPUs with VNNI but no
//! AVX-512 (Intel's client cores from Alder Lake on, Sierra Forest; AMD Zen 5 has both).
//! It multiplies 4 u8 activations (one broadcast dword) by 4 i8 weights of each of 8
//! columns and adds the 4 products to that column's i32: 32 multiply-adds per
//! instruction, exact, where the AVX2 kernel needs a widening and two instructions for 16.
//! The epilogue is the AVX2 kernel's.

use std::arch::x86_64::*;

use super::avx2;
use super::gemm::{panels, QEpilogue};

/// Output columns per packed panel: two 8-lane accumulators per row.
pub(super) const PANEL: usize = 16;

/// Rows per microkernel call: `MR x 2` accumulators, two weight vectors and a broadcast
/// use 15 of the 16 registers.
pub(super) const MR: usize = 6;

/// The accumulators of one `R x (V * 8)` tile: `R` rows of `a` (row stride `ks`, `ks / 4`
/// groups of 4) times a panel `b` (`ks / 4` groups of `stride x 4` bytes).
///
/// Not inlined, as in the AVX2 kernel: returning through memory keeps the epilogue's
/// operands from pushing accumulator spills into the loop.
///
/// # Safety
/// The CPU has AVX2 and AVX-VNNI; `a` holds `R` rows of `ks`, `b` the panel with
/// `stride >= V * 8`.
#[target_feature(enable = "avx2,avxvnni")]
#[inline(never)]
unsafe fn dot<const R: usize, const V: usize>(
    a: *const u8,
    ks: usize,
    b: *const i8,
    stride: usize,
) -> [[__m256i; V]; R] {
    // SAFETY: the caller guarantees the extents.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); V]; R];
        for g in 0..ks / 4 {
            let bp = b.add(g * stride * 4);
            let mut bv = [_mm256_setzero_si256(); V];
            for (v, w) in bv.iter_mut().enumerate() {
                *w = _mm256_loadu_si256(bp.add(v * 32).cast());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(a.add(r * ks + g * 4).cast::<i32>().read_unaligned());
                for (c, w) in row.iter_mut().zip(&bv) {
                    *c = _mm256_dpbusd_avx_epi32(*c, x, *w);
                }
            }
        }
        acc
    }
}

/// One `R x (V * 8)` tile: [`dot`], then the AVX2 kernel's epilogue and store
/// ([`avx2::finish`]).
///
/// # Safety
/// As for [`dot`] and [`avx2::finish`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,avxvnni")]
#[inline]
unsafe fn tile<const R: usize, const V: usize>(
    a: *const u8,
    ks: usize,
    b: *const i8,
    stride: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
    ep: &QEpilogue,
    row0: usize,
    col0: usize,
    residual: Option<*const f32>,
) {
    // SAFETY: the caller guarantees what `dot` and `finish` need.
    unsafe {
        let acc = dot::<R, V>(a, ks, b, stride);
        avx2::finish::<R, V>(&acc, out, n, cols, ep, row0, col0, residual);
    }
}

/// [`super::matmul`] on AVX-VNNI-packed weights.
///
/// # Safety
/// The CPU has AVX2, FMA and AVX-VNNI; `out` holds `rows x n`, `a` `rows x ks` with `ks`
/// a multiple of 4, `w` the packed panels of a `ks x n` matrix, `ep`'s vectors `n` values
/// and its residual `rows x n`.
#[target_feature(enable = "avx2,fma,avxvnni")]
pub(super) unsafe fn matmul(
    out: &mut [f32],
    a: &[u8],
    rows: usize,
    ks: usize,
    n: usize,
    w: &[i8],
    ep: QEpilogue,
) {
    debug_assert!(ks.is_multiple_of(4) && a.len() >= rows * ks && out.len() >= rows * n);
    tile_loops!(
        out, rows, ks, n, w, ep;
        lanes 8, rows [1 2 3 4 5 6], vectors [1 2];
        a_block |r0, r| a[r0 * ks..].as_ptr();
        tile [tile]
    );
}
