//! The AVX-512 VNNI kernel: `vpdpbusd` multiplies 4 u8 activations (one broadcast
//! dword) by 4 i8 weights of each of 16 columns and adds the 4 products to that column's
//! i32, 64 multiply-adds per instruction with no intermediate that can saturate.

use std::arch::x86_64::*;

use super::gemm::{panels, QEpilogue};

/// Output columns per packed panel: four 16-lane accumulators per row.
pub(super) const PANEL: usize = 64;

/// Rows per microkernel call: `MR x 4` accumulators plus four weight registers and a
/// broadcast use 21 of the 32 registers. Four rows measured as fast as six or eight on
/// the large products and up to 10% faster on the `k = 64` ones, whose time goes
/// largely to the epilogue.
pub(super) const MR: usize = 4;

/// Lane mask of the first `cols` of 16 lanes.
#[inline(always)]
fn lanes(cols: usize) -> __mmask16 {
    if cols >= 16 {
        0xffff
    } else {
        (1u16 << cols) - 1
    }
}

/// One `R x (V * 16)` tile: `R` rows of `a` (row stride `ks`, `ks / 4` groups of 4)
/// times a panel `b` (`ks / 4` groups of `stride x 4` bytes), the epilogue, and the store
/// of the first `cols` columns into `out` (row stride `n`, already offset to the panel's
/// first column `col0`; `residual` likewise).
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `a` holds `R` rows of `ks`; `b` holds the panel, with
/// `stride >= V * 16` (best 64-byte aligned, which the loads do not need); `out` and
/// `residual` hold `R` rows of `n` from which `cols <= V * 16` columns are in bounds,
/// `ep`'s per-column vectors `col0 + cols` and its per-row ones `row0 + R`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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
    // SAFETY (whole body): every pointer offset stays within the extents the caller
    // guarantees; loads and stores past `cols` are masked off.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); V]; R];
        for g in 0..ks / 4 {
            let bp = b.add(g * stride * 4);
            let mut bv = [_mm512_setzero_si512(); V];
            for (v, w) in bv.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(bp.add(v * 64).cast());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(a.add(r * ks + g * 4).cast::<i32>().read_unaligned());
                for (c, w) in row.iter_mut().zip(&bv) {
                    *c = _mm512_dpbusd_epi32(*c, x, *w);
                }
            }
        }
        let zero = _mm512_setzero_ps();
        // The per-column operands once per tile, then the rows in output order: storing
        // each row's `V * 16` columns together measured 5-11% faster than column-major.
        let mut mask = [0; V];
        let mut scale = [zero; V];
        let mut offset = [zero; V];
        let mut low_weight = [zero; V];
        let mut slope = [zero; V];
        for v in 0..V {
            let c = col0 + v * 16;
            mask[v] = lanes(cols - v * 16);
            scale[v] = _mm512_maskz_loadu_ps(mask[v], ep.scale.as_ptr().add(c));
            offset[v] = _mm512_maskz_loadu_ps(mask[v], ep.offset.as_ptr().add(c));
            low_weight[v] = _mm512_maskz_loadu_ps(mask[v], ep.low_weight.as_ptr().add(c));
            if let Some(s) = ep.slope {
                slope[v] = _mm512_maskz_loadu_ps(mask[v], s.as_ptr().add(c));
            }
        }
        for (r, row) in acc.iter().enumerate() {
            // The same operations, in the same order, as `QEpilogue::dequantise`.
            let step = _mm512_set1_ps(ep.row_step[row0 + r]);
            let low = _mm512_set1_ps(ep.row_low[row0 + r]);
            for v in 0..V {
                let (c, m) = (r * n + v * 16, mask[v]);
                let shift = _mm512_fmadd_ps(low, low_weight[v], offset[v]);
                let s = _mm512_mul_ps(scale[v], step);
                let mut y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(row[v]), s, shift);
                if ep.slope.is_some() {
                    y = _mm512_fmadd_ps(slope[v], _mm512_min_ps(y, zero), _mm512_max_ps(y, zero));
                }
                if let Some(cap) = ep.cap {
                    y = _mm512_min_ps(y, _mm512_set1_ps(cap));
                }
                if let Some(res) = residual {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, res.add(c)));
                }
                _mm512_mask_storeu_ps(out.add(c), m, y);
            }
        }
    }
}

/// [`super::matmul`] on VNNI-packed weights.
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `out` holds `rows x n`, `a` `rows x ks` with `ks` a
/// multiple of 4, `w` the packed panels of a `ks x n` matrix,
/// `ep`'s vectors `n` values and its residual `rows x n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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
        lanes 16, rows [1 2 3 4], vectors [1 2 3 4];
        a_block |r0, r| a[r0 * ks..].as_ptr();
        tile [tile]
    );
}
