use crate::error::{check_same_len, Error, Result};

/// Returns `v` scaled to unit L2 norm.
///
/// The norm is accumulated in `f64` so long embeddings lose no precision. A
/// zero vector is returned unchanged (still zero) instead of becoming NaN; NaN
/// components propagate.
pub fn normalize(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|&x| (f64::from(x) / norm) as f32).collect()
}

/// The cosine of each pair `[a, b]` of rows of `embeddings`.
///
/// # Errors
/// [`Error::IndexOutOfRange`] when a pair names a row that does not exist, and
/// [`Error::Pair`], which names the pair and its two rows, around whatever [`cosine`]
/// returns for them.
pub fn pair_cosines(embeddings: &[Vec<f32>], pairs: &[[usize; 2]]) -> Result<Vec<f64>> {
    pairs
        .iter()
        .enumerate()
        .map(|(pair, &[a, b])| {
            let row = |i: usize| {
                embeddings.get(i).ok_or(Error::IndexOutOfRange {
                    pair,
                    index: i,
                    len: embeddings.len(),
                })
            };
            cosine(row(a)?, row(b)?).map_err(|cause| Error::Pair {
                pair,
                embeddings: [a, b],
                cause: Box::new(cause),
            })
        })
        .collect()
}

/// Cosine similarity of two embeddings, computed in `f64`.
///
/// The inputs need not be normalised. The result is clamped to `[-1, 1]`.
///
/// # Errors
/// [`Error::Empty`] for zero-length vectors, [`Error::LengthMismatch`] when the
/// lengths differ, [`Error::ZeroNorm`] when either vector is all zeros and
/// [`Error::NonFinite`] when a component is NaN or infinite.
pub fn cosine(a: &[f32], b: &[f32]) -> Result<f64> {
    check_same_len("a", a.len(), "b", b.len())?;
    if a.is_empty() {
        return Err(Error::Empty { what: "embedding" });
    }
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    for (what, v) in [("a", a), ("b", b)] {
        if let Some(index) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what,
                index,
                value: f64::from(v[index]),
            });
        }
    }
    if aa == 0.0 {
        return Err(Error::ZeroNorm { what: "a" });
    }
    if bb == 0.0 {
        return Err(Error::ZeroNorm { what: "b" });
    }
    // Rounding can push parallel vectors to 1.0000000000000002; downstream
    // code converts to a distance 2 - 2cos and expects it to stay >= 0.
    Ok((dot / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_unit_and_zero() {
        let n = normalize(&[3.0, 4.0]);
        assert_eq!(n, vec![0.6, 0.8]);
        assert_eq!(normalize(&[0.0, 0.0, 0.0]), vec![0.0, 0.0, 0.0]);
        assert!(normalize(&[]).is_empty());
        let big = normalize(&[1e30, 1e30]);
        assert!((big[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7);
    }

    #[test]
    fn cosine_values() {
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]).unwrap(), 0.0);
        assert_eq!(cosine(&[1.0, 1.0], &[-3.0, -3.0]).unwrap(), -1.0);
        let c = cosine(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        let expected = 32.0 / (14.0f64.sqrt() * 77.0f64.sqrt());
        assert!((c - expected).abs() < 1e-15);
        let same = [0.1f32, 0.7, -0.3, 0.2];
        assert!(cosine(&same, &same).unwrap() <= 1.0);
    }

    #[test]
    fn pair_cosines_index_rows_and_refuse_missing_ones() {
        let e = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![1.0, 1.0]];
        let c = pair_cosines(&e, &[[0, 1], [0, 2], [2, 2]]).unwrap();
        assert!(
            c[0].abs() < 1e-12
                && (c[1] - 0.5f64.sqrt()).abs() < 1e-12
                && (c[2] - 1.0).abs() < 1e-12
        );
        assert!(matches!(
            pair_cosines(&e, &[[0, 1], [0, 3]]),
            Err(Error::IndexOutOfRange {
                pair: 1,
                index: 3,
                len: 3
            })
        ));
    }

    #[test]
    fn pair_cosines_errors_name_the_pair_and_embeddings() {
        let e = vec![vec![1.0, 0.0], vec![0.0, 0.0], vec![f32::NAN, 1.0]];
        let err = pair_cosines(&e, &[[0, 0], [0, 1]]).unwrap_err();
        assert!(matches!(
            &err,
            Error::Pair { pair: 1, embeddings: [0, 1], cause } if matches!(**cause, Error::ZeroNorm { what: "b" })
        ));
        assert_eq!(
            err.to_string(),
            "pair 1 (a = embedding 0, b = embedding 1): b has zero L2 norm, so its cosine \
             similarity is undefined"
        );
        let err = pair_cosines(&e, &[[2, 0]]).unwrap_err().to_string();
        assert_eq!(
            err,
            "pair 0 (a = embedding 2, b = embedding 0): a[0] is not finite (NaN)"
        );
    }

    #[test]
    fn cosine_errors() {
        assert!(matches!(
            cosine(&[1.0], &[1.0, 2.0]),
            Err(Error::LengthMismatch {
                left: 1,
                right: 2,
                ..
            })
        ));
        assert!(matches!(cosine(&[], &[]), Err(Error::Empty { .. })));
        assert!(matches!(
            cosine(&[0.0, 0.0], &[1.0, 0.0]),
            Err(Error::ZeroNorm { what: "a" })
        ));
        assert!(matches!(
            cosine(&[1.0, 0.0], &[0.0, 0.0]),
            Err(Error::ZeroNorm { what: "b" })
        ));
        assert!(matches!(
            cosine(&[1.0, f32::NAN], &[1.0, 0.0]),
            Err(Error::NonFinite { index: 1, .. })
        ));
    }
}
