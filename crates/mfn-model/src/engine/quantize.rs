//! Quantising a product's f32 input rows to u8 with one scale and zero point per channel:
//! `q = clamp(round(x * inv_scale[c] + zero[c]), 0, 255)`, ties to even.
//!
//! The loop is written once and compiled for AVX-512 and for AVX2 besides the baseline,
//! picked at run time: the compiler vectorises it (16 or 8 channels per instruction), and
//! every version rounds the same way.

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
            // NaN becomes 0 through the saturating cast.
            *q = (v.mul_add(s, z).round_ties_even()).clamp(0.0, 255.0) as u8;
        }
        o[k..].fill(0);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn rows_avx512(
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
}
