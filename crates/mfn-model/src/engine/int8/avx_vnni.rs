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
    let mut r0 = 0;
    while r0 < rows {
        let r = MR.min(rows - r0);
        let ap = a[r0 * ks..].as_ptr();
        let o = out[r0 * n..].as_mut_ptr();
        let res = ep.residual.map(|res| res[r0 * n..].as_ptr());
        let mut at = 0;
        for (c0, cols) in panels(n, PANEL) {
            let stride = cols.next_multiple_of(8);
            debug_assert!(w.len() >= at + ks * stride);
            let b = w[at..].as_ptr();
            let (o, res) = (o.wrapping_add(c0), res.map(|p| p.wrapping_add(c0)));
            macro_rules! run {
                ($($r:literal)*; $($v:literal)*) => {
                    run!(@rows [$($r)*] [$($v)*])
                };
                (@rows [$($r:literal)*] $vs:tt) => {
                    match r {
                        $($r => run!(@cols $r $vs),)*
                        _ => unreachable!(),
                    }
                };
                (@cols $r:literal [$($v:literal)*]) => {
                    match stride / 8 {
                        // SAFETY: the extents are as `dot` and `finish` require: `r` rows
                        // from `r0`, this panel's `ks x stride` weights and `cols` columns
                        // from `c0`.
                        $($v => unsafe {
                            let acc = dot::<$r, $v>(ap, ks, b, stride);
                            avx2::finish::<$r, $v>(&acc, o, n, cols, &ep, r0, c0, res)
                        },)*
                        _ => unreachable!(),
                    }
                };
            }
            run!(1 2 3 4 5 6; 1 2);
            at += ks * stride;
        }
        r0 += r;
    }
}
