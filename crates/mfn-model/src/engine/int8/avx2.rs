//! The AVX2 kernel: activations zero-extended and weights sign-extended to i16, then
//! `vpmaddwd` multiplies 2 consecutive `k` of 8 columns and adds each pair into i32.
//! A pair sums to at most `2 * 255 * 127`, which i32 holds exactly; `vpmaddubsw` would
//! save the widening but saturates that pair sum at `i16::MAX`.
//!
//! The weights are widened once, when packed, unless they are too big to stay in cache
//! (see [`NARROW_ABOVE`]); the activations of each block of rows are widened into a
//! scratch buffer before its products, so the inner loop is one broadcast per row and one
//! multiply-add and one add per accumulator.

use std::arch::x86_64::*;

use super::gemm::{panels, QEpilogue};

/// Output columns per packed panel: two 8-lane accumulators per row.
pub(super) const PANEL: usize = 16;

/// Weights with more elements than this stay i8 and are sign-extended as they are
/// loaded: widened, they would not fit in L2 (the embedding layer's 25,088 x 512 would
/// take 25 MB), and streaming half the bytes from memory outweighs the extra instruction
/// per weight vector. Measured on the embedding layer with 4 rows: 94-98 GMAC/s against
/// 55; on 512 x 1024 (1 MB widened) widening once is still 7% faster.
pub(super) const NARROW_ABOVE: usize = 1 << 20;

/// Rows per microkernel call: `MR x V` accumulators, the weights, a broadcast and a
/// product fill the 16 registers.
pub(super) const MR: usize = 6;

/// The accumulators of one `R x (V * 8)` tile, for [`tile`].
///
/// `T` is the packed weights' type: i16, or i8 to sign-extend on load.
///
/// Not inlined: with 16 registers, the epilogue's operands would push the allocator to
/// spill accumulators, and it places those spills inside the loop, one store per
/// multiply-add. Returning through memory stores each accumulator once.
///
/// # Safety
/// As for [`tile`].
#[target_feature(enable = "avx2")]
#[inline(never)]
unsafe fn dot<T, const R: usize, const V: usize>(
    a: *const i16,
    ks: usize,
    b: *const T,
    stride: usize,
) -> [[__m256i; V]; R] {
    // SAFETY: the caller guarantees the extents.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); V]; R];
        for p in 0..ks / 2 {
            let bp = b.add(p * stride * 2);
            let mut bv = [_mm256_setzero_si256(); V];
            for (v, w) in bv.iter_mut().enumerate() {
                *w = if size_of::<T>() == 1 {
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(v * 16).cast()))
                } else {
                    _mm256_loadu_si256(bp.add(v * 16).cast())
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(a.add(r * ks + p * 2).cast::<i32>().read_unaligned());
                for (c, w) in row.iter_mut().zip(&bv) {
                    *c = _mm256_add_epi32(*c, _mm256_madd_epi16(x, *w));
                }
            }
        }
        acc
    }
}

/// One `R x (V * 8)` tile: `R` rows of widened activations `a` (row stride `ks`, `ks / 2`
/// pairs) times a panel `b` (`ks / 2` pairs of `stride x 2` `T`), the epilogue, and the
/// store of the first `cols` columns into `out` (row stride `n`, already offset to the
/// panel's first column `col0`; `residual` likewise).
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` holds `R` rows of `ks`; `b` holds the panel, with
/// `stride >= V * 8` (best aligned to 16 times the size of `T`, which the loads do not
/// need); `out` and `residual` hold `R` rows of `n` from which `cols <= V * 8` columns are
/// in bounds, `ep`'s per-column vectors `col0 + cols` and its per-row ones `row0 + R`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<T, const R: usize, const V: usize>(
    a: *const i16,
    ks: usize,
    b: *const T,
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
        let acc = dot::<T, R, V>(a, ks, b, stride);
        finish::<R, V>(&acc, out, n, cols, ep, row0, col0, residual);
    }
}

/// The epilogue of one `R x (V * 8)` tile of i32 accumulators `acc` and the store of its
/// first `cols` columns into `out` (row stride `n`, already offset to the tile's first
/// column `col0`; `residual` likewise). Shared with the AVX-VNNI kernel.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` and `residual` hold `R` rows of `n` from which
/// `cols <= V * 8` columns are in bounds, `ep`'s per-column vectors `col0 + cols` and its
/// per-row ones `row0 + R`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn finish<const R: usize, const V: usize>(
    acc: &[[__m256i; V]; R],
    out: *mut f32,
    n: usize,
    cols: usize,
    ep: &QEpilogue,
    row0: usize,
    col0: usize,
    residual: Option<*const f32>,
) {
    // SAFETY (whole body): every pointer offset stays within the extents the caller
    // guarantees; the ragged last vector goes through a buffer.
    unsafe {
        let zero = _mm256_setzero_ps();
        // Whole vectors first; the columns are a multiple of 8 but in the last panel.
        for v in 0..V {
            let c = v * 8;
            if cols < c + 8 {
                break;
            }
            let scale = _mm256_loadu_ps(ep.scale.as_ptr().add(col0 + c));
            let offset = _mm256_loadu_ps(ep.offset.as_ptr().add(col0 + c));
            let low_weight = _mm256_loadu_ps(ep.low_weight.as_ptr().add(col0 + c));
            let slope = ep.slope.map(|s| _mm256_loadu_ps(s.as_ptr().add(col0 + c)));
            for (r, row) in acc.iter().enumerate() {
                // The same operations, in the same order, as `QEpilogue::dequantise`.
                let low = _mm256_set1_ps(ep.row_low[row0 + r]);
                let shift = _mm256_fmadd_ps(low, low_weight, offset);
                let s = _mm256_mul_ps(scale, _mm256_set1_ps(ep.row_step[row0 + r]));
                let mut y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(row[v]), s, shift);
                if let Some(s) = slope {
                    y = _mm256_fmadd_ps(s, _mm256_min_ps(y, zero), _mm256_max_ps(y, zero));
                }
                if let Some(cap) = ep.cap {
                    y = _mm256_min_ps(y, _mm256_set1_ps(cap));
                }
                if let Some(res) = residual {
                    y = _mm256_add_ps(y, _mm256_loadu_ps(res.add(r * n + c)));
                }
                _mm256_storeu_ps(out.add(r * n + c), y);
            }
        }
        // A ragged last vector (always the tile's last, as `stride` is `cols` rounded up
        // to 8) goes through a buffer. Indexing `acc` only by constants keeps it in
        // registers through the loop above.
        if !cols.is_multiple_of(8) {
            let c = (V - 1) * 8;
            let mut lanes = [[0i32; 8]; R];
            for (l, row) in lanes.iter_mut().zip(acc) {
                _mm256_storeu_si256(l.as_mut_ptr().cast(), row[V - 1]);
            }
            for (r, l) in lanes.iter().enumerate() {
                for (j, &s) in l.iter().enumerate().take(cols - c) {
                    let col = col0 + c + j;
                    let mut y = ep.dequantise(s, row0 + r, col);
                    if let Some(sl) = ep.slope {
                        y = y.max(0.0) + sl[col] * y.min(0.0);
                    }
                    if let Some(cap) = ep.cap {
                        y = y.min(cap);
                    }
                    if let Some(res) = residual {
                        y += *res.add(r * n + c + j);
                    }
                    *out.add(r * n + c + j) = y;
                }
            }
        }
    }
}

/// Zero-extends `src` into `dst` (same length).
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
unsafe fn widen(dst: &mut [i16], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (d, s) in (&mut d).zip(&mut s) {
        // SAFETY: both chunks hold 16 elements.
        unsafe {
            let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(s.as_ptr().cast()));
            _mm256_storeu_si256(d.as_mut_ptr().cast(), v);
        }
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = i16::from(s);
    }
}

/// [`super::matmul`] on AVX2-packed weights.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` holds `rows x n`, `a` `rows x ks` with `ks` even, `w`
/// the packed panels of a `ks x n` matrix, `ep`'s vectors `n` values and its residual
/// `rows x n`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matmul<T>(
    out: &mut [f32],
    a: &[u8],
    rows: usize,
    ks: usize,
    n: usize,
    w: &[T],
    ep: QEpilogue,
) {
    debug_assert!(ks.is_multiple_of(2) && a.len() >= rows * ks && out.len() >= rows * n);
    let mut wide = vec![0i16; MR * ks];
    tile_loops!(
        out, rows, ks, n, w, ep;
        lanes 8, rows [1 2 3 4 5 6], vectors [1 2];
        a_block |r0, r| {
            // SAFETY: the CPU has AVX2.
            unsafe { widen(&mut wide[..r * ks], &a[r0 * ks..(r0 + r) * ks]) };
            wide.as_ptr()
        };
        tile [tile<T>]
    );
}
