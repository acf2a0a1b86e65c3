//! Quantising a product's f32 input rows to u8 with one scale and zero point per channel:
//! `q = clamp(round(x * inv_scale[c] + zero[c]), 0, 255)`, ties to even.
//!
//! AVX-512 (16 channels per instruction) where the CPU has it, else the portable loop
//! (compiled for AVX2 too where that exists); both round ties to even and send NaN to 0,
//! so every path gives the same bytes.

/// Quantises `rows` rows of `k` f32 (contiguous) into `out`, rows of `k_stride` u8; the
/// padding columns get 0 (their weights are zero).
pub(crate) fn quantize_rows(
    out: &mut [u8],
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
        x.len() >= rows * k && out.len() >= rows * k_stride,
        "operands too short"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, and the lengths were checked above.
            return unsafe { rows_avx512(out, x, rows, k, k_stride, inv_scale, zero) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, and the lengths were checked above.
            return unsafe { rows_avx2(out, x, rows, k, k_stride, inv_scale, zero) };
        }
    }
    rows_portable(out, x, rows, k, k_stride, inv_scale, zero)
}

/// One value: NaN becomes 0 through the saturating cast.
#[inline(always)]
fn quantize_one(x: f32, inv_scale: f32, zero: f32) -> u8 {
    (x.mul_add(inv_scale, zero).round_ties_even()).clamp(0.0, 255.0) as u8
}

#[inline(always)]
fn rows_portable(
    out: &mut [u8],
    x: &[f32],
    rows: usize,
    k: usize,
    k_stride: usize,
    inv_scale: &[f32],
    zero: &[f32],
) {
    for (o, x) in out
        .chunks_exact_mut(k_stride)
        .zip(x.chunks_exact(k.max(1)))
        .take(rows)
    {
        for (((q, &v), &s), &z) in o.iter_mut().zip(x).zip(inv_scale).zip(zero) {
            *q = quantize_one(v, s, z);
        }
        o[k..].fill(0);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn rows_avx512(
    out: &mut [u8],
    x: &[f32],
    rows: usize,
    k: usize,
    k_stride: usize,
    inv_scale: &[f32],
    zero: &[f32],
) {
    use std::arch::x86_64::*;
    let full = k / 16 * 16;
    for (o, x) in out
        .chunks_exact_mut(k_stride)
        .zip(x.chunks_exact(k.max(1)))
        .take(rows)
    {
        let mut c = 0;
        while c < full {
            // SAFETY: c + 16 <= k <= the lengths of x, inv_scale, zero and o.
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(c));
                let s = _mm512_loadu_ps(inv_scale.as_ptr().add(c));
                let z = _mm512_loadu_ps(zero.as_ptr().add(c));
                // max(NaN, 0) is 0: the second operand wins when either is NaN.
                let y = _mm512_max_ps(_mm512_fmadd_ps(v, s, z), _mm512_setzero_ps());
                let y = _mm512_min_ps(y, _mm512_set1_ps(255.0));
                // The default rounding mode: to nearest, ties to even.
                let q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(y));
                _mm_storeu_si128(o.as_mut_ptr().add(c) as *mut __m128i, q);
            }
            c += 16;
        }
        for c in full..k {
            o[c] = quantize_one(x[c], inv_scale[c], zero[c]);
        }
        o[k..].fill(0);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_avx2(
    out: &mut [u8],
    x: &[f32],
    rows: usize,
    k: usize,
    k_stride: usize,
    inv_scale: &[f32],
    zero: &[f32],
) {
    rows_portable(out, x, rows, k, k_stride, inv_scale, zero)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_ties_to_even_clamps_and_pads() {
        let x = [0.5f32, 1.5, 2.5, -3.0, 1000.0, f32::NAN, -0.49, 7.0];
        let inv = [1.0f32; 4];
        let zero = [0.0f32, 0.0, 10.0, 2.0];
        let mut out = [9u8; 12];
        quantize_rows(&mut out, &x, 2, 4, 6, &inv, &zero);
        // Row 0: 0.5 -> 0, 1.5 -> 2, 2.5 + 10 = 12.5 -> 12, -3 + 2 = -1 -> 0; padding 0.
        // Row 1: 1000 -> 255, NaN -> 0, -0.49 + 10 -> 10, 7 + 2 = 9.
        assert_eq!(out, [0, 2, 12, 0, 0, 0, 255, 0, 10, 9, 0, 0]);
        let mut portable = [9u8; 12];
        rows_portable(&mut portable, &x, 2, 4, 6, &inv, &zero);
        assert_eq!(out, portable);
    }

    #[test]
    fn every_path_gives_the_same_bytes() {
        let k = 53;
        let x: Vec<f32> = (0..3 * k)
            .map(|i| match i % 17 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -1e9,
                _ => ((i * 7919 % 1000) as f32 - 300.0) * 0.37 + 0.5,
            })
            .collect();
        let inv: Vec<f32> = (0..k).map(|c| 0.1 + c as f32 * 0.05).collect();
        let zero: Vec<f32> = (0..k).map(|c| (c * 5 % 256) as f32).collect();
        let mut want = vec![1u8; 3 * 64];
        rows_portable(&mut want, &x, 3, k, 64, &inv, &zero);
        let mut got = vec![2u8; 3 * 64];
        quantize_rows(&mut got, &x, 3, k, 64, &inv, &zero);
        assert_eq!(got, want);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let mut avx2 = vec![3u8; 3 * 64];
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { rows_avx2(&mut avx2, &x, 3, k, 64, &inv, &zero) };
            assert_eq!(avx2, want);
        }
    }
}
