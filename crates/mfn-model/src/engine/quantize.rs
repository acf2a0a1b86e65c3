//! Quantising a product's f32 input rows to u8. Each channel `c` is first brought to the
//! calibrated 0..=255 grid, `u = x * inv_scale[c] + zero[c]`; then each row (one pixel)
//! takes its own step over the span it uses, `q = round((u - low) / step)` with
//! `low = min u`, `step = (max u - low) / 255`, ties to even. The row's `step` and `low`
//! go to the product's epilogue. One pixel rarely spans the calibrated range of every
//! channel, so the per-row step is finer than the calibrated one: on the golden faces it
//! took the int8 embeddings' worst cosine to f32 from 0.998 to 0.9993.
//!
//! AVX-512 (16 channels per instruction) where the CPU has it, else the portable loop
//! (compiled for AVX2 too where that exists); both take the same steps in the same order,
//! skip NaN in the row's span and send it to 0, so every path gives the same bytes.

/// Quantises `rows` rows of `k` f32 (contiguous) into `out`, rows of `k_stride` u8 (the
/// padding columns get 0: their weights are zero), and writes each row's step and low
/// end to `step` and `low`. `grid` is scratch of at least `k` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_rows(
    out: &mut [u8],
    step: &mut [f32],
    low: &mut [f32],
    grid: &mut [f32],
    x: &[f32],
    rows: usize,
    k: usize,
    k_stride: usize,
    inv_scale: &[f32],
    zero: &[f32],
) {
    assert!(k_stride >= k, "row stride {k_stride} below {k}");
    assert!(
        inv_scale.len() == k && zero.len() == k,
        "one scale per channel"
    );
    assert!(
        x.len() >= rows * k
            && out.len() >= rows * k_stride
            && step.len() >= rows
            && low.len() >= rows
            && grid.len() >= k,
        "operands too short"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, and the lengths were checked above.
            return unsafe {
                rows_avx512(out, step, low, grid, x, rows, k, k_stride, inv_scale, zero)
            };
        }
    }
    for (((o, x), step), low) in out
        .chunks_exact_mut(k_stride)
        .zip(x.chunks_exact(k.max(1)))
        .zip(step.iter_mut())
        .zip(low.iter_mut())
        .take(rows)
    {
        row_portable(o, step, low, x, inv_scale, zero);
    }
}

/// [`quantize_rows`] with AVX-512: the feature check once per call, not per row, so the
/// row body inlines into this loop (rows of 64 channels are short).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn rows_avx512(
    out: &mut [u8],
    step: &mut [f32],
    low: &mut [f32],
    grid_row: &mut [f32],
    x: &[f32],
    rows: usize,
    k: usize,
    k_stride: usize,
    inv_scale: &[f32],
    zero: &[f32],
) {
    for (((o, x), step), low) in out
        .chunks_exact_mut(k_stride)
        .zip(x.chunks_exact(k.max(1)))
        .zip(step.iter_mut())
        .zip(low.iter_mut())
        .take(rows)
    {
        row_avx512(o, step, low, x, inv_scale, zero, grid_row);
    }
}

/// A channel's value on the calibrated grid.
#[inline(always)]
fn grid(x: f32, inv_scale: f32, zero: f32) -> f32 {
    x.mul_add(inv_scale, zero)
}

/// The step and low end for a row spanning `lo..=hi` on the grid (NaN skipped). A row
/// with no span, or one that is not finite, gets step 1 and its `lo` (or 0).
#[inline(always)]
fn row_step(lo: f32, hi: f32) -> (f32, f32, f32) {
    let span = hi - lo;
    if span.is_finite() && span > 0.0 {
        (span * (1.0 / 255.0), 255.0 / span, lo)
    } else {
        (1.0, 1.0, if lo.is_finite() { lo } else { 0.0 })
    }
}

/// One value, `(u - low) / step` as one fused multiply-add with `shift = -low / step`:
/// NaN becomes 0 (f32::max skips it), and anything above 255 saturates.
#[inline(always)]
fn quantize_one(u: f32, inv_step: f32, shift: f32) -> u8 {
    u.mul_add(inv_step, shift)
        .max(0.0)
        .round_ties_even()
        .min(255.0) as u8
}

#[inline(always)]
fn row_portable(
    o: &mut [u8],
    step: &mut f32,
    low: &mut f32,
    x: &[f32],
    inv_scale: &[f32],
    zero: &[f32],
) {
    let k = inv_scale.len();
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for ((&v, &s), &z) in x.iter().zip(inv_scale).zip(zero) {
        let u = grid(v, s, z);
        // f32::min and max skip NaN.
        lo = lo.min(u);
        hi = hi.max(u);
    }
    let (s, inv, l) = row_step(lo, hi);
    let shift = -l * inv;
    for (((q, &v), &sc), &z) in o.iter_mut().zip(x).zip(inv_scale).zip(zero) {
        *q = quantize_one(grid(v, sc, z), inv, shift);
    }
    if o.len() > k {
        o[k..].fill(0);
    }
    (*step, *low) = (s, l);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn row_avx512(
    o: &mut [u8],
    step: &mut f32,
    low: &mut f32,
    x: &[f32],
    inv_scale: &[f32],
    zero: &[f32],
    grid_row: &mut [f32],
) {
    use std::arch::x86_64::*;
    let k = inv_scale.len();
    assert!(grid_row.len() >= k, "grid scratch too short");
    let full = k / 16 * 16;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    // SAFETY (whole block): c + 16 <= full <= k, the length of every operand.
    unsafe {
        let mut vlo = _mm512_set1_ps(f32::INFINITY);
        let mut vhi = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut c = 0;
        while c < full {
            let u = _mm512_fmadd_ps(
                _mm512_loadu_ps(x.as_ptr().add(c)),
                _mm512_loadu_ps(inv_scale.as_ptr().add(c)),
                _mm512_loadu_ps(zero.as_ptr().add(c)),
            );
            // Kept for the second pass: a load is cheaper than three loads and an FMA.
            _mm512_storeu_ps(grid_row.as_mut_ptr().add(c), u);
            // The second operand wins when either is NaN: NaN lanes keep the running
            // extremes, as f32::min and max do.
            vlo = _mm512_min_ps(u, vlo);
            vhi = _mm512_max_ps(u, vhi);
            c += 16;
        }
        if full > 0 {
            lo = _mm512_reduce_min_ps(vlo);
            hi = _mm512_reduce_max_ps(vhi);
        }
    }
    for c in full..k {
        let u = grid(x[c], inv_scale[c], zero[c]);
        lo = lo.min(u);
        hi = hi.max(u);
    }
    let (s, inv, l) = row_step(lo, hi);
    let shift = -l * inv;
    // SAFETY (whole block): as above; the stores write 16 bytes at c + 16 <= k <= o.len().
    unsafe {
        let (vi, vs) = (_mm512_set1_ps(inv), _mm512_set1_ps(shift));
        let mut c = 0;
        while c < full {
            let y = _mm512_fmadd_ps(_mm512_loadu_ps(grid_row.as_ptr().add(c)), vi, vs);
            // max(NaN, 0) is 0: the second operand wins when either is NaN.
            let y = _mm512_max_ps(y, _mm512_setzero_ps());
            // The default rounding mode: to nearest, ties to even. Values above 255, and
            // those too large for i32 (0x8000_0000 as unsigned), saturate to 255.
            let q = _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(y));
            _mm_storeu_si128(o.as_mut_ptr().add(c) as *mut __m128i, q);
            c += 16;
        }
    }
    for c in full..k {
        o[c] = quantize_one(grid(x[c], inv_scale[c], zero[c]), inv, shift);
    }
    if o.len() > k {
        o[k..].fill(0);
    }
    (*step, *low) = (s, l);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_spans_its_own_range_ties_to_even_and_pads() {
        // Row 0 on the grid: 0, 255, 127.5 (tie: 128 is even), 12.
        // Row 1: 10, 20, NaN (skipped, then 0), 30: step 20 / 255.
        let x = [0.0f32, 255.0, 127.5, 12.0, 10.0, 20.0, f32::NAN, 30.0];
        let inv = [1.0f32; 4];
        let zero = [0.0f32; 4];
        let mut out = [9u8; 12];
        let (mut step, mut low) = ([0f32; 2], [0f32; 2]);
        quantize_rows(
            &mut out,
            &mut step,
            &mut low,
            &mut [0.0; 4],
            &x,
            2,
            4,
            6,
            &inv,
            &zero,
        );
        assert_eq!(&out[..6], &[0, 255, 128, 12, 0, 0]);
        assert_eq!((step[0], low[0]), (1.0, 0.0));
        assert_eq!(&out[6..], &[0, 128, 0, 255, 0, 0]);
        assert_eq!(low[1], 10.0);
        assert!((step[1] - 20.0 / 255.0).abs() < 1e-7);
        // A flat row: step 1 at its value, every byte 0.
        let mut flat = [9u8; 4];
        quantize_rows(
            &mut flat,
            &mut step,
            &mut low,
            &mut [0.0; 4],
            &[3.0; 4],
            1,
            4,
            4,
            &inv,
            &zero,
        );
        assert_eq!((flat, step[0], low[0]), ([0; 4], 1.0, 3.0));
        // Values come back within half a step.
        let x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let inv: Vec<f32> = (0..40).map(|c| 1.0 + c as f32 * 0.1).collect();
        let zero: Vec<f32> = (0..40).map(|c| c as f32).collect();
        let mut q = vec![0u8; 40];
        quantize_rows(
            &mut q,
            &mut step,
            &mut low,
            &mut [0.0; 40],
            &x,
            1,
            40,
            40,
            &inv,
            &zero,
        );
        for c in 0..40 {
            let back = (q[c] as f32 * step[0] + low[0] - zero[c]) / inv[c];
            assert!(
                (back - x[c]).abs() <= step[0] / inv[c] * 0.5 + 1e-5,
                "channel {c}: {back} for {}",
                x[c]
            );
        }
    }

    #[test]
    fn every_path_gives_the_same_bytes() {
        let k = 53;
        let rows = 4;
        let x: Vec<f32> = (0..rows * k)
            .map(|i| match i % 17 {
                0 => f32::NAN,
                2 => -1e3,
                _ => ((i * 7919 % 1000) as f32 - 300.0) * 0.37 + 0.5,
            })
            .chain([f32::INFINITY; 53])
            .collect();
        let rows = rows + 1;
        let inv: Vec<f32> = (0..k).map(|c| 0.1 + c as f32 * 0.05).collect();
        let zero: Vec<f32> = (0..k).map(|c| (c * 5 % 256) as f32).collect();
        let mut want = vec![1u8; rows * 64];
        let (mut ws, mut wl) = (vec![0f32; rows], vec![0f32; rows]);
        for r in 0..rows {
            row_portable(
                &mut want[r * 64..(r + 1) * 64],
                &mut ws[r],
                &mut wl[r],
                &x[r * k..(r + 1) * k],
                &inv,
                &zero,
            );
        }
        let mut got = vec![2u8; rows * 64];
        let (mut gs, mut gl) = (vec![0f32; rows], vec![0f32; rows]);
        quantize_rows(
            &mut got,
            &mut gs,
            &mut gl,
            &mut vec![0.0; k],
            &x,
            rows,
            k,
            64,
            &inv,
            &zero,
        );
        assert_eq!(got, want);
        assert_eq!((gs, gl), (ws, wl));
    }
}
