//! The pointwise products `out = epilogue(x @ w)` of 1x1 convs and linear layers.
//!
//! Where the CPU has AVX-512 the weights are packed once, when the engine is built, into
//! panels of [`PANEL`] output channels (`k x PANEL`, row-major, 64-byte aligned), and a
//! register-blocked microkernel computes [`MR`] rows by one panel at a time: the rows'
//! activations stay in L1 while the panels stream from L2, and the bias, PReLU, cap and
//! residual add are applied to the accumulators before the one store. Elsewhere the plain
//! `[k][n]` weights go to the `gemm` crate (AVX2/FMA or portable, chosen at run time) and
//! the epilogue runs over the finished rows.

/// Output channels per packed panel: four AVX-512 registers per row.
const PANEL: usize = 64;

/// Rows per microkernel call: `MR x 4` accumulators plus four weight registers and a
/// broadcast fill 29 of the 32 AVX-512 registers.
pub(crate) const MR: usize = 6;

/// What follows the product, per output row `y`: `y += bias`, then either the residual
/// (`y += residual`) or the activation (PReLU with one slope per channel, then the cap).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue<'a> {
    pub bias: &'a [f32],
    pub slope: Option<&'a [f32]>,
    pub cap: Option<f32>,
    /// `rows x n`, laid out as the output.
    pub residual: Option<&'a [f32]>,
}

/// `k x n` weights in the layout the running CPU's kernel wants.
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    k: usize,
    n: usize,
    layout: Layout,
}

#[derive(Clone, Debug)]
enum Layout {
    /// `[k][n]`, row-major.
    Plain(Vec<f32>),
    /// Panels of [`PANEL`] columns, each `k x width` with `width` the panel's columns
    /// rounded up to 16 (zero-padded); the first starts at `data[offset]`, 64-byte aligned.
    Packed { data: Vec<f32>, offset: usize },
}

/// Whether the AVX-512 kernel runs on this CPU.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Weights {
    /// Takes `[k][n]` row-major weights, packing them when the AVX-512 kernel will run.
    pub fn new(w: Vec<f32>, k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weights are not {k} x {n}");
        if !has_avx512() {
            return Self {
                k,
                n,
                layout: Layout::Plain(w),
            };
        }
        let padded: usize = panels(n).map(|(_, width)| width.next_multiple_of(16)).sum();
        let mut data = vec![0f32; k * padded + 15];
        let offset = data.as_ptr().align_offset(64).min(15);
        let mut at = offset;
        for (c0, width) in panels(n) {
            let stride = width.next_multiple_of(16);
            for kk in 0..k {
                data[at + kk * stride..at + kk * stride + width]
                    .copy_from_slice(&w[kk * n + c0..kk * n + c0 + width]);
            }
            at += k * stride;
        }
        Self {
            k,
            n,
            layout: Layout::Packed { data, offset },
        }
    }

    /// Rows of the weights (input features).
    pub fn k(&self) -> usize {
        self.k
    }
}

/// `(first column, columns)` of each panel of an `n`-column matrix.
fn panels(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(PANEL)).map(move |p| (p * PANEL, PANEL.min(n - p * PANEL)))
}

/// `out (rows x n) = epilogue(x (rows x k) @ w)`, on the calling thread.
pub(crate) fn matmul(out: &mut [f32], x: &[f32], rows: usize, w: &Weights, ep: Epilogue) {
    let (k, n) = (w.k, w.n);
    assert!(
        out.len() >= rows * n && x.len() >= rows * k,
        "operands too short"
    );
    assert!(ep.bias.len() == n && ep.slope.is_none_or(|s| s.len() == n));
    assert!(ep.residual.is_none_or(|r| r.len() >= rows * n));
    match &w.layout {
        #[cfg(target_arch = "x86_64")]
        Layout::Packed { data, offset } => {
            // SAFETY: packed weights exist only where the CPU has AVX-512 (`Weights::new`),
            // and the operand sizes were checked above.
            unsafe { avx512::matmul(out, x, rows, k, n, &data[*offset..], ep) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Layout::Packed { .. } => unreachable!("packed weights are only made on x86-64"),
        Layout::Plain(wt) => plain(out, x, rows, k, n, wt, ep),
    }
}

/// The fallback: the `gemm` crate's product, then the epilogue over the rows.
fn plain(out: &mut [f32], x: &[f32], rows: usize, k: usize, n: usize, w: &[f32], ep: Epilogue) {
    let out = &mut out[..rows * n];
    if let Some(res) = ep.residual {
        super::add_bias(out, &res[..rows * n], ep.bias);
    }
    // SAFETY: `out` is `rows x n`, `x` is at least `rows x k` and `w` is `k x n`, all
    // row-major and in bounds.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            ep.residual.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    if ep.residual.is_none() {
        super::bias_prelu(out, ep.bias, ep.slope);
        if let Some(cap) = ep.cap {
            out.iter_mut().for_each(|v| *v = v.min(cap));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{panels, Epilogue, MR};

    /// Lane mask of the first `cols` of 16 lanes.
    #[inline(always)]
    fn lanes(cols: usize) -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            (1u16 << cols) - 1
        }
    }

    /// One `R x (V * 16)` tile: `R` rows of `a` (row stride `k`) times a panel `b`
    /// (`k x stride`), the epilogue, and the store of the first `cols` columns into `out`
    /// (row stride `n`, already offset to the panel's first column; `bias`, `slope` and
    /// `residual` likewise).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `a` holds `R` rows of `k`, `b` holds `k` rows of `stride >=
    /// V * 16`, `out` and `residual` hold `R` rows of `n` from which `cols <= V * 16`
    /// columns are in bounds, and `bias`/`slope` hold `cols` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const R: usize, const V: usize>(
        a: *const f32,
        k: usize,
        b: *const f32,
        stride: usize,
        out: *mut f32,
        n: usize,
        cols: usize,
        ep: &Epilogue,
        col0: usize,
        residual: Option<*const f32>,
    ) {
        // SAFETY (whole body): every pointer offset stays within the extents the caller
        // guarantees; loads and stores past `cols` are masked off.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for kk in 0..k {
                let bp = b.add(kk * stride);
                let mut bv = [_mm512_setzero_ps(); V];
                for (v, w) in bv.iter_mut().enumerate() {
                    *w = _mm512_load_ps(bp.add(v * 16));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.add(r * k + kk));
                    for (c, w) in row.iter_mut().zip(&bv) {
                        *c = _mm512_fmadd_ps(x, *w, *c);
                    }
                }
            }
            let zero = _mm512_setzero_ps();
            for v in 0..V {
                let c = v * 16;
                let m = lanes(cols - c);
                let bias = _mm512_maskz_loadu_ps(m, ep.bias.as_ptr().add(col0 + c));
                let slope = ep
                    .slope
                    .map(|s| _mm512_maskz_loadu_ps(m, s.as_ptr().add(col0 + c)));
                for (r, row) in acc.iter().enumerate() {
                    let mut y = _mm512_add_ps(row[v], bias);
                    if let Some(res) = residual {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, res.add(r * n + c)));
                    }
                    if let Some(s) = slope {
                        y = _mm512_fmadd_ps(s, _mm512_min_ps(y, zero), _mm512_max_ps(y, zero));
                    }
                    if let Some(cap) = ep.cap {
                        y = _mm512_min_ps(y, _mm512_set1_ps(cap));
                    }
                    _mm512_mask_storeu_ps(out.add(r * n + c), m, y);
                }
            }
        }
    }

    /// [`super::matmul`] on packed weights.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out` holds `rows x n`, `x` `rows x k`, `w` the packed
    /// panels of a `k x n` matrix starting 64-byte aligned, `ep`'s vectors `n` values and
    /// its residual `rows x n`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn matmul(
        out: &mut [f32],
        x: &[f32],
        rows: usize,
        k: usize,
        n: usize,
        w: &[f32],
        ep: Epilogue,
    ) {
        let mut r0 = 0;
        while r0 < rows {
            let r = MR.min(rows - r0);
            let a = x[r0 * k..].as_ptr();
            let o = out[r0 * n..].as_mut_ptr();
            let res = ep.residual.map(|res| res[r0 * n..].as_ptr());
            let mut at = 0;
            for (c0, cols) in panels(n) {
                let stride = cols.next_multiple_of(16);
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
                        match stride / 16 {
                            // SAFETY: the extents are as `tile` requires: `r` rows from
                            // `r0`, this panel's `k x stride` weights and `cols` columns
                            // from `c0`.
                            $($v => unsafe {
                                tile::<$r, $v>(a, k, b, stride, o, n, cols, &ep, c0, res)
                            },)*
                            _ => unreachable!(),
                        }
                    };
                }
                run!(1 2 3 4 5 6; 1 2 3 4);
                at += k * stride;
            }
            r0 += r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.618 + seed as f32).sin() * 3.7).fract())
            .collect()
    }

    /// Every row count up to two tiles, full and partial panels and vectors, each
    /// epilogue, against a plain triple loop.
    #[test]
    fn matches_a_plain_product() {
        for (k, n) in [(3, 5), (37, 64), (16, 70), (128, 130), (64, 200)] {
            let wt = values(k * n, 1);
            let w = Weights::new(wt.clone(), k, n);
            let bias = values(n, 2);
            let slope = values(n, 3);
            for rows in (1..=2 * MR + 1).chain([40]) {
                let x = values(rows * k, 4);
                let res = values(rows * n, 5);
                for (slope, cap, residual) in [
                    (None, None, None),
                    (Some(&slope[..]), None, None),
                    (Some(&slope[..]), Some(0.5), None),
                    (None, None, Some(&res[..])),
                ] {
                    let ep = Epilogue {
                        bias: &bias,
                        slope,
                        cap,
                        residual,
                    };
                    let mut out = vec![f32::NAN; rows * n];
                    matmul(&mut out, &x, rows, &w, ep);
                    for r in 0..rows {
                        for c in 0..n {
                            let mut y = bias[c];
                            for kk in 0..k {
                                y += x[r * k + kk] * wt[kk * n + c];
                            }
                            if let Some(res) = residual {
                                y += res[r * n + c];
                            }
                            if let Some(a) = slope {
                                y = y.max(0.0) + a[c] * y.min(0.0);
                            }
                            if let Some(cap) = cap {
                                y = y.min(cap);
                            }
                            let got = out[r * n + c];
                            assert!(
                                (got - y).abs() <= 1e-4 * (1.0 + y.abs()),
                                "k {k} n {n} rows {r}/{rows} col {c}: {got} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Prints GMAC/s of both kernels on MobileFaceNet's shapes:
    /// `cargo test --release -p mfn-model --lib gemm_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gemm_speed() {
        for (m, k, n) in [
            (3136, 128, 128),
            (784, 128, 128),
            (196, 256, 256),
            (49, 256, 512),
            (49, 512, 256),
        ] {
            let x = vec![0.5f32; m * k];
            let wt = vec![0.25f32; k * n];
            let bias = vec![0.0; n];
            let slope = vec![0.1; n];
            let ep = Epilogue {
                bias: &bias,
                slope: Some(&slope),
                cap: None,
                residual: None,
            };
            let mut out = vec![0f32; m * n];
            for (name, w) in [
                ("packed", Weights::new(wt.clone(), k, n)),
                (
                    "plain",
                    Weights {
                        k,
                        n,
                        layout: Layout::Plain(wt.clone()),
                    },
                ),
            ] {
                let reps = (200_000_000 / (m * k * n)).max(3);
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        matmul(&mut out, &x, m, &w, ep);
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                println!(
                    "{m}x{k}x{n} {name}: {:.1} GMAC/s",
                    (m * k * n) as f64 / best / 1e9
                );
            }
        }
    }
}
