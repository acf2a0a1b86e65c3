//! Quantisation of f32 activations to u8 with a per-tensor scale and zero point, the step
//! before every int8 product; it touches each input once, so it runs at memory speed only
//! when vectorised.
//!
//! `q = clamp(round(x * inv_scale) + zero, 0, 255)`, rounding half to even (the default
//! rounding of `cvtps2dq`, and `f32::round_ties_even` in the portable loop). The scaled
//! value is clamped to `±256` before the conversion so that huge values saturate instead
//! of wrapping to the conversion's `i32::MIN`; NaN maps to 0 on every path.

use super::Isa;

/// Quantises `rows` rows of `k` f32 (contiguous) into `out`, `rows` rows of `k_stride`
/// u8; the `k_stride - k` padding columns get `zero`, so they dequantise to 0.
pub(crate) fn quantize_rows(
    out: &mut [u8],
    x: &[f32],
    rows: usize,
    k: usize,
    k_stride: usize,
    inv_scale: f32,
    zero: u8,
) {
    quantize_with(Isa::detect(), out, x, rows, k, k_stride, inv_scale, zero);
}

/// [`quantize_rows`] with the vector code of `isa`, which the CPU must run.
#[allow(clippy::too_many_arguments)]
pub(super) fn quantize_with(
    isa: Isa,
    out: &mut [u8],
    x: &[f32],
    rows: usize,
    k: usize,
    k_stride: usize,
    inv_scale: f32,
    zero: u8,
) {
    assert!(k_stride >= k, "row stride {k_stride} below {k}");
    assert!(
        x.len() >= rows * k && out.len() >= rows * k_stride,
        "operands too short"
    );
    assert!(isa.supported(), "this CPU has no {} kernel", isa.name());
    for r in 0..rows {
        let (o, pad) = out[r * k_stride..(r + 1) * k_stride].split_at_mut(k);
        let x = &x[r * k..(r + 1) * k];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has the features (checked above); the slices are `k` long.
            Isa::Avx512Vnni => unsafe { x86::row_avx512(o, x, inv_scale, zero) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::row_avx2(o, x, inv_scale, zero) },
            _ => row_portable(o, x, inv_scale, zero),
        }
        pad.fill(zero);
    }
}

/// One value; the reference for the vector code, and its tails.
#[inline]
fn quantize_one(x: f32, inv_scale: f32, zero: u8) -> u8 {
    // Not `clamp`, which keeps NaN: `f32::max` drops it, so NaN becomes -256 and then 0,
    // as in the vector code.
    #[allow(clippy::manual_clamp)]
    let t = (x * inv_scale).max(-256.0).min(256.0);
    // Adding and removing 1.5 * 2^23 leaves no fraction bits, so the sum rounds to an
    // integer half to even, as `round_ties_even` does, but in two additions that the
    // baseline target vectorises, where `round_ties_even` is a library call per value.
    const MAGIC: f32 = 12_582_912.0;
    let t = ((t + MAGIC) - MAGIC) as i32;
    (t + i32::from(zero)).clamp(0, 255) as u8
}

fn row_portable(out: &mut [u8], x: &[f32], inv_scale: f32, zero: u8) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantize_one(v, inv_scale, zero);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::quantize_one;

    /// 64 values per step: four conversions packed with signed then unsigned saturation
    /// (which is the clamp to `0..=255`), then one permute to undo the packs' lane order.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW; `out` and `x` have the same length.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn row_avx512(out: &mut [u8], x: &[f32], inv_scale: f32, zero: u8) {
        debug_assert_eq!(out.len(), x.len());
        let inv = _mm512_set1_ps(inv_scale);
        let (lo, hi) = (_mm512_set1_ps(-256.0), _mm512_set1_ps(256.0));
        let z = _mm512_set1_epi32(i32::from(zero));
        let q = |p: *const f32| {
            // SAFETY: the callers pass pointers to 16 readable f32. `max(t, lo)` returns
            // `lo` for a NaN `t`.
            unsafe {
                let t = _mm512_mul_ps(_mm512_loadu_ps(p), inv);
                let t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
                _mm512_add_epi32(_mm512_cvtps_epi32(t), z)
            }
        };
        // The packs interleave 128-bit lanes: after both, dword `4l + i` of the result
        // holds lane `l` of input `i`.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let mut o = out.chunks_exact_mut(64);
        let mut s = x.chunks_exact(64);
        for (o, s) in (&mut o).zip(&mut s) {
            let p = s.as_ptr();
            // SAFETY: each chunk holds 64 values.
            unsafe {
                let ab = _mm512_packs_epi32(q(p), q(p.add(16)));
                let cd = _mm512_packs_epi32(q(p.add(32)), q(p.add(48)));
                let v = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(ab, cd));
                _mm512_storeu_si512(o.as_mut_ptr().cast(), v);
            }
        }
        let (o, s) = (o.into_remainder(), s.remainder());
        let mut o16 = o.chunks_exact_mut(16);
        let mut s16 = s.chunks_exact(16);
        for (o, s) in (&mut o16).zip(&mut s16) {
            // SAFETY: each chunk holds 16 values; negative values are raised to 0 and
            // the narrowing saturates at 255.
            unsafe {
                let v = _mm512_max_epi32(q(s.as_ptr()), _mm512_setzero_si512());
                _mm_storeu_si128(o.as_mut_ptr().cast(), _mm512_cvtusepi32_epi8(v));
            }
        }
        for (o, &v) in o16.into_remainder().iter_mut().zip(s16.remainder()) {
            *o = quantize_one(v, inv_scale, zero);
        }
    }

    /// 32 values per step, packed as in [`row_avx512`].
    ///
    /// # Safety
    /// The CPU has AVX2; `out` and `x` have the same length.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_avx2(out: &mut [u8], x: &[f32], inv_scale: f32, zero: u8) {
        debug_assert_eq!(out.len(), x.len());
        let inv = _mm256_set1_ps(inv_scale);
        let (lo, hi) = (_mm256_set1_ps(-256.0), _mm256_set1_ps(256.0));
        let z = _mm256_set1_epi32(i32::from(zero));
        let q = |p: *const f32| {
            // SAFETY: the callers pass pointers to 8 readable f32; NaN becomes `lo`.
            unsafe {
                let t = _mm256_mul_ps(_mm256_loadu_ps(p), inv);
                let t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
                _mm256_add_epi32(_mm256_cvtps_epi32(t), z)
            }
        };
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut o = out.chunks_exact_mut(32);
        let mut s = x.chunks_exact(32);
        for (o, s) in (&mut o).zip(&mut s) {
            let p = s.as_ptr();
            // SAFETY: each chunk holds 32 values.
            unsafe {
                let ab = _mm256_packs_epi32(q(p), q(p.add(8)));
                let cd = _mm256_packs_epi32(q(p.add(16)), q(p.add(24)));
                let v = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
                _mm256_storeu_si256(o.as_mut_ptr().cast(), v);
            }
        }
        for (o, &v) in o.into_remainder().iter_mut().zip(s.remainder()) {
            *o = quantize_one(v, inv_scale, zero);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// Ties, clamping at both ends, huge values, infinities, NaN and padding, for odd
    /// row lengths around every vector width.
    #[test]
    fn matches_the_scalar_rule() {
        let inv = 4.0;
        let special = [
            0.125,
            0.375,
            -0.125,
            -0.375,
            0.625,
            1.0 / 8.0 + 1e-6,
            40.0,
            -40.0,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            63.875,
            -32.125,
            0.0,
            -0.0,
        ];
        for isa in supported() {
            for zero in [0u8, 3, 128, 255] {
                for (rows, k, ks) in [
                    (1, 1, 4),
                    (3, 15, 16),
                    (2, 70, 72),
                    (5, 129, 132),
                    (1, 1155, 1156),
                    (2, 0, 4),
                ] {
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i| {
                            if i % 3 == 0 {
                                special[(i / 3) % special.len()]
                            } else {
                                ((i * 7919) % 2001) as f32 / 16.0 - 62.5
                            }
                        })
                        .collect();
                    let mut out = vec![7u8; rows * ks + 1];
                    quantize_with(isa, &mut out, &x, rows, k, ks, inv, zero);
                    for r in 0..rows {
                        for c in 0..ks {
                            let want = if c < k {
                                let t = (x[r * k + c] * inv).round_ties_even();
                                (t + zero as f32).clamp(0.0, 255.0) as u8
                            } else {
                                zero
                            };
                            assert_eq!(
                                out[r * ks + c],
                                want,
                                "{isa:?} zero {zero} k {k} ({r}, {c}): x {}",
                                x.get(r * k + c).copied().unwrap_or(0.0)
                            );
                        }
                    }
                    assert_eq!(out[rows * ks], 7, "wrote past the end");
                }
            }
        }
    }

    /// The two ties either side of every even and odd integer round to the even one.
    #[test]
    fn rounds_half_to_even() {
        for isa in supported() {
            let x: Vec<f32> = (0..40).map(|i| i as f32 * 0.5 - 10.0).collect();
            let mut out = vec![0u8; 40];
            quantize_with(isa, &mut out, &x, 1, 40, 40, 1.0, 20);
            for (i, &q) in out.iter().enumerate() {
                let want = (x[i].round_ties_even() + 20.0) as u8;
                assert_eq!(q, want, "{isa:?} {}", x[i]);
            }
        }
    }

    #[test]
    fn nan_does_not_panic() {
        for isa in supported() {
            let x = vec![f32::NAN; 100];
            let mut out = vec![1u8; 100];
            quantize_with(isa, &mut out, &x, 1, 100, 100, 2.0, 9);
            assert!(out.iter().all(|&q| q == 0), "{isa:?}: {out:?}");
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Prints the rate of each quantiser in values per nanosecond on the inputs of
    /// w600k_mbf's pointwise layers: run with the GEMM speed test,
    /// `cargo test --release -p mfn-model int8 -- --ignored --nocapture --test-threads=1`.
    #[test]
    #[ignore]
    fn int8_quantize_speed() {
        for (rows, k) in [
            (3136usize, 64usize),
            (784, 128),
            (196, 256),
            (49, 512),
            (1, 25_088),
        ] {
            let ks = k.next_multiple_of(4);
            let x: Vec<f32> = (0..rows * k).map(|i| (i % 97) as f32 * 0.1 - 4.0).collect();
            let mut out = vec![0u8; rows * ks];
            let reps = (4_000_000 / (rows * k)).max(1);
            let mut line = format!("quantize {rows:>5}x{k:>5}");
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let mut best = f64::MAX;
                for _ in 0..40 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        quantize_with(isa, &mut out, &x, rows, k, ks, 12.5, 128);
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                let rate = (rows * k) as f64 / best / 1e9;
                line += &format!("  {} {rate:5.1}", isa.name());
            }
            println!("{line}  values/ns");
        }
    }
}
