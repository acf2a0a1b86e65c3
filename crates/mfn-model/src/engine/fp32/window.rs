//! Channel-vector loops for the window convs (depthwise, grouped and dense) and the row
//! epilogues, compiled once plainly and once with AVX2 + FMA, with hand-written AVX-512
//! kernels for the common shapes ([`super::window512`]); the best the CPU has is chosen at
//! run time, so that one binary runs everywhere.
//!
//! Channels are processed in blocks of [`BLOCK`]; a full block is a fixed-size array,
//! which the compiler keeps in vector registers across all taps of a kernel.

#[cfg(target_arch = "x86_64")]
use super::window512;

/// The instruction set a window kernel runs with. It is a parameter rather than a global
/// choice so that the tests can run every path the CPU supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Isa {
    /// Plain Rust, whatever the compiler makes of it for the build target.
    Portable,
    /// The plain loops compiled with AVX2 and FMA.
    Avx2,
    /// The AVX-512 kernels where one fits the shape, else the AVX2 loops.
    Avx512,
}

impl Isa {
    /// The fastest set the running CPU has.
    pub(crate) fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                return if has!("avx512f") {
                    Isa::Avx512
                } else {
                    Isa::Avx2
                };
            }
        }
        Isa::Portable
    }

    /// Every set the running CPU has, for tests that compare the paths.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let best = Isa::best();
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| *i as u8 <= best as u8)
            .collect()
    }
}

/// The activation that ends a window conv: PReLU slopes (one per channel), then the cap
/// (the top of ReLU6).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Act<'a> {
    /// One PReLU slope per output channel, or no activation.
    pub slope: Option<&'a [f32]>,
    /// The upper clamp after it, if any.
    pub cap: Option<f32>,
}

/// Channels per register block: 8 AVX2 registers.
const BLOCK: usize = 64;

/// `acc[i] += x[i] * w[i]`, fused where the target allows it.
#[inline(always)]
fn madd<const FMA: bool>(acc: &mut [f32], x: &[f32], w: &[f32]) {
    for ((a, x), w) in acc.iter_mut().zip(x).zip(w) {
        *a = if FMA { x.mul_add(*w, *a) } else { *a + x * w };
    }
}

/// [`madd`] on a full block, with the length known at compile time.
#[inline(always)]
fn madd_block<const FMA: bool>(acc: &mut [f32; BLOCK], x: &[f32], w: &[f32]) {
    let (Ok(x), Ok(w)) = (<&[f32; BLOCK]>::try_from(x), <&[f32; BLOCK]>::try_from(w)) else {
        return madd::<FMA>(acc, x, w);
    };
    for i in 0..BLOCK {
        acc[i] = if FMA {
            x[i].mul_add(w[i], acc[i])
        } else {
            acc[i] + x[i] * w[i]
        };
    }
}

/// `acc[i] += s * w[i]` on a full block.
#[inline(always)]
fn saxpy_block<const FMA: bool>(acc: &mut [f32; BLOCK], s: f32, w: &[f32]) {
    let Ok(w) = <&[f32; BLOCK]>::try_from(w) else {
        for (a, w) in acc.iter_mut().zip(w) {
            *a = if FMA { s.mul_add(*w, *a) } else { *a + s * w };
        }
        return;
    };
    for i in 0..BLOCK {
        acc[i] = if FMA {
            s.mul_add(w[i], acc[i])
        } else {
            acc[i] + s * w[i]
        };
    }
}

/// Branch-free PReLU, so that it vectorises.
#[inline(always)]
fn prelu(y: f32, a: f32) -> f32 {
    y.max(0.0) + a * y.min(0.0)
}

/// Bias then optional PReLU on rows of `bias.len()` channels.
#[inline(always)]
fn bias_prelu_impl<const FMA: bool>(rows: &mut [f32], bias: &[f32], slope: Option<&[f32]>) {
    for row in rows.chunks_exact_mut(bias.len()) {
        match slope {
            Some(a) => {
                for ((v, b), a) in row.iter_mut().zip(bias).zip(a) {
                    *v = prelu(*v + b, *a);
                }
            }
            None => row.iter_mut().zip(bias).for_each(|(v, b)| *v += b),
        }
    }
}

/// Residual plus bias: `dst = src + bias`, row by row.
#[inline(always)]
fn add_bias_impl<const FMA: bool>(dst: &mut [f32], src: &[f32], bias: &[f32]) {
    for (d, s) in dst
        .chunks_exact_mut(bias.len())
        .zip(src.chunks_exact(bias.len()))
    {
        for ((d, s), b) in d.iter_mut().zip(s).zip(bias) {
            *d = s + b;
        }
    }
}

/// Stores a block of the channels from `c0`, with the activation.
#[inline(always)]
fn store(out: &mut [f32], acc: &[f32], act: Act, c0: usize) {
    match act.slope {
        Some(a) => {
            for ((o, v), a) in out.iter_mut().zip(acc).zip(&a[c0..]) {
                *o = prelu(*v, *a);
            }
        }
        None => out.copy_from_slice(acc),
    }
    if let Some(cap) = act.cap {
        out.iter_mut().for_each(|v| *v = v.min(cap));
    }
}

/// The range of kernel taps `k` for which `o * stride + k - pad` lies in `0..size`.
#[inline(always)]
fn valid_taps(o: usize, stride: usize, pad: usize, k: usize, size: usize) -> (usize, usize, isize) {
    let start = (o * stride) as isize - pad as isize;
    let lo = (-start).max(0) as usize;
    let hi = (size as isize - start).clamp(0, k as isize) as usize;
    (lo.min(hi), hi, start)
}

/// One output row of a depthwise conv in NHWC.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn depthwise_row_impl<const FMA: bool>(
    out: &mut [f32],
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    bias: &[f32],
    act: Act,
    (kh, kw, stride, ph, pw): (usize, usize, usize, usize, usize),
) {
    let wo = out.len() / c;
    let (ky_lo, ky_hi, iy0) = valid_taps(oy, stride, ph, kh, h);
    for ox in 0..wo {
        let (kx_lo, kx_hi, ix0) = valid_taps(ox, stride, pw, kw, w);
        let o = &mut out[ox * c..(ox + 1) * c];
        let mut c0 = 0;
        while c0 < c {
            let n = BLOCK.min(c - c0);
            let mut acc = [0f32; BLOCK];
            acc[..n].copy_from_slice(&bias[c0..c0 + n]);
            for ky in ky_lo..ky_hi {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx_lo..kx_hi {
                    let at = (iy * w + (ix0 + kx as isize) as usize) * c + c0;
                    let tap = (ky * kw + kx) * c + c0;
                    madd_block::<FMA>(&mut acc, &input[at..at + n], &weights[tap..tap + n]);
                }
            }
            store(&mut o[c0..c0 + n], &acc[..n], act, c0);
            c0 += n;
        }
    }
}

/// One output row of a dense conv in NHWC, accumulating each input value times its
/// output-channel weight vector.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dense_row_impl<const FMA: bool>(
    out: &mut [f32],
    input: &[f32],
    (h, w, cin): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    bias: &[f32],
    act: Act,
    (kh, kw, stride, ph, pw): (usize, usize, usize, usize, usize),
) {
    let cout = bias.len();
    let wo = out.len() / cout;
    let (ky_lo, ky_hi, iy0) = valid_taps(oy, stride, ph, kh, h);
    for ox in 0..wo {
        let (kx_lo, kx_hi, ix0) = valid_taps(ox, stride, pw, kw, w);
        let o = &mut out[ox * cout..(ox + 1) * cout];
        let mut c0 = 0;
        while c0 < cout {
            let n = BLOCK.min(cout - c0);
            let mut acc = [0f32; BLOCK];
            acc[..n].copy_from_slice(&bias[c0..c0 + n]);
            for ky in ky_lo..ky_hi {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx_lo..kx_hi {
                    let at = (iy * w + (ix0 + kx as isize) as usize) * cin;
                    for ci in 0..cin {
                        let wt = ((ky * kw + kx) * cin + ci) * cout + c0;
                        saxpy_block::<FMA>(&mut acc, input[at + ci], &weights[wt..wt + n]);
                    }
                }
            }
            store(&mut o[c0..c0 + n], &acc[..n], act, c0);
            c0 += n;
        }
    }
}

/// `acc[i] += x[i & !1] * w0[i] + x[i | 1] * w1[i]`: lane `i` gets the two input channels
/// of its two-channel group. On a full block the index patterns are constants, so the
/// compiler turns them into shuffles.
#[inline(always)]
fn madd_pairs<const FMA: bool>(acc: &mut [f32], x: &[f32], w0: &[f32], w1: &[f32]) {
    let fma = |a: f32, x: f32, w: f32| if FMA { x.mul_add(w, a) } else { a + x * w };
    if let (Ok(acc), Ok(x), Ok(w0), Ok(w1)) = (
        <&mut [f32; BLOCK]>::try_from(&mut *acc),
        <&[f32; BLOCK]>::try_from(x),
        <&[f32; BLOCK]>::try_from(w0),
        <&[f32; BLOCK]>::try_from(w1),
    ) {
        for i in 0..BLOCK {
            acc[i] = fma(fma(acc[i], x[i & !1], w0[i]), x[i | 1], w1[i]);
        }
        return;
    }
    for i in 0..acc.len() {
        acc[i] = fma(fma(acc[i], x[i & !1], w0[i]), x[i | 1], w1[i]);
    }
}

/// One output row of a grouped conv with two input and two output channels per group, in
/// NHWC: `w0` and `w1` (`[kh][kw][c]`) are the weights each output channel gives to the
/// first and the second input channel of its group.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grouped2_row_impl<const FMA: bool>(
    out: &mut [f32],
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    oy: usize,
    (w0, w1): (&[f32], &[f32]),
    bias: &[f32],
    act: Act,
    (kh, kw, stride, ph, pw): (usize, usize, usize, usize, usize),
) {
    let wo = out.len() / c;
    let (ky_lo, ky_hi, iy0) = valid_taps(oy, stride, ph, kh, h);
    for ox in 0..wo {
        let (kx_lo, kx_hi, ix0) = valid_taps(ox, stride, pw, kw, w);
        let o = &mut out[ox * c..(ox + 1) * c];
        let mut c0 = 0;
        while c0 < c {
            let n = BLOCK.min(c - c0);
            let mut acc = [0f32; BLOCK];
            acc[..n].copy_from_slice(&bias[c0..c0 + n]);
            for ky in ky_lo..ky_hi {
                let iy = (iy0 + ky as isize) as usize;
                for kx in kx_lo..kx_hi {
                    let at = (iy * w + (ix0 + kx as isize) as usize) * c + c0;
                    let tap = (ky * kw + kx) * c + c0;
                    madd_pairs::<FMA>(
                        &mut acc[..n],
                        &input[at..at + n],
                        &w0[tap..tap + n],
                        &w1[tap..tap + n],
                    );
                }
            }
            store(&mut o[c0..c0 + n], &acc[..n], act, c0);
            c0 += n;
        }
    }
}

/// Defines `$name`, which runs `$impl::<true>` compiled with AVX2 + FMA for
/// [`Isa::Avx2`] and [`Isa::Avx512`], and `$impl::<false>` for [`Isa::Portable`].
macro_rules! dispatch {
    ($name:ident, $impl:ident, ($($arg:ident: $ty:ty),*)) => {
        #[doc = concat!("[`", stringify!($impl), "`] compiled for `isa`'s vector width.")]
        #[allow(clippy::too_many_arguments)]
        fn $name(isa: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                /// The loops with AVX2 and FMA enabled.
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) {
                    $impl::<true>($($arg),*)
                }
                if isa != Isa::Portable {
                    // SAFETY: `Isa::best` picks a set beyond the portable one only where
                    // the CPU has AVX2 and FMA.
                    return unsafe { fast($($arg),*) };
                }
            }
            let _ = isa;
            $impl::<false>($($arg),*)
        }
    };
}

dispatch!(depthwise_loops, depthwise_row_impl, (
    out: &mut [f32], input: &[f32], shape: (usize, usize, usize), oy: usize,
    weights: &[f32], bias: &[f32], act: Act,
    geometry: (usize, usize, usize, usize, usize)
));
dispatch!(dense_loops, dense_row_impl, (
    out: &mut [f32], input: &[f32], shape: (usize, usize, usize), oy: usize,
    weights: &[f32], bias: &[f32], act: Act,
    geometry: (usize, usize, usize, usize, usize)
));
dispatch!(grouped2_loops, grouped2_row_impl, (
    out: &mut [f32], input: &[f32], shape: (usize, usize, usize), oy: usize,
    weights: (&[f32], &[f32]), bias: &[f32], act: Act,
    geometry: (usize, usize, usize, usize, usize)
));
dispatch!(bias_prelu_loops, bias_prelu_impl, (rows: &mut [f32], bias: &[f32], slope: Option<&[f32]>));
dispatch!(add_bias_loops, add_bias_impl, (dst: &mut [f32], src: &[f32], bias: &[f32]));

/// Whether the AVX-512 3x3 kernels take a conv of this geometry.
#[cfg(target_arch = "x86_64")]
fn fits_3x3(isa: Isa, (kh, kw, stride, _, _): (usize, usize, usize, usize, usize)) -> bool {
    isa == Isa::Avx512 && kh == 3 && kw == 3 && (stride == 1 || stride == 2)
}

/// One output row (`out`, `wo x c`) of a depthwise conv over `input` (`h x w x c`, NHWC)
/// with weights `[kh][kw][c]`, the bias and the activation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise_row(
    isa: Isa,
    out: &mut [f32],
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    bias: &[f32],
    act: Act,
    geometry: (usize, usize, usize, usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if fits_3x3(isa, geometry) {
        let (_, _, stride, ph, pw) = geometry;
        assert!(input.len() >= h * w * c && weights.len() >= 9 * c && bias.len() >= c);
        assert!(act.slope.is_none_or(|a| a.len() >= c) && out.len().is_multiple_of(c));
        // SAFETY: `Isa::Avx512` is only chosen where the CPU has AVX-512F, and the sizes
        // were checked above.
        return unsafe {
            window512::depthwise3_row(
                out,
                input,
                (h, w, c),
                oy,
                weights,
                bias,
                act,
                (stride, ph, pw),
            )
        };
    }
    depthwise_loops(isa, out, input, (h, w, c), oy, weights, bias, act, geometry)
}

/// One output row of a grouped conv with two input and two output channels per group;
/// as [`depthwise_row`], with the weights `(w0, w1)` each output channel gives to the
/// first and the second input channel of its group.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grouped2_row(
    isa: Isa,
    out: &mut [f32],
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    oy: usize,
    weights: (&[f32], &[f32]),
    bias: &[f32],
    act: Act,
    geometry: (usize, usize, usize, usize, usize),
) {
    assert!(
        c.is_multiple_of(2),
        "two-channel groups need an even channel count"
    );
    #[cfg(target_arch = "x86_64")]
    if fits_3x3(isa, geometry) {
        let (_, _, stride, ph, pw) = geometry;
        let (w0, w1) = weights;
        assert!(input.len() >= h * w * c && w0.len() >= 9 * c && w1.len() >= 9 * c);
        assert!(bias.len() >= c && act.slope.is_none_or(|a| a.len() >= c));
        assert!(out.len().is_multiple_of(c));
        // SAFETY: as in `depthwise_row`.
        return unsafe {
            window512::grouped2_3_row(
                out,
                input,
                (h, w, c),
                oy,
                weights,
                bias,
                act,
                (stride, ph, pw),
            )
        };
    }
    grouped2_loops(isa, out, input, (h, w, c), oy, weights, bias, act, geometry)
}

/// One output row (`out`, `wo x cout`) of a dense conv over `input` (`h x w x cin`, NHWC)
/// with weights `[kh][kw][cin][cout]`, the bias (`cout`) and the activation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_row(
    isa: Isa,
    out: &mut [f32],
    input: &[f32],
    (h, w, cin): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    bias: &[f32],
    act: Act,
    geometry: (usize, usize, usize, usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && bias.len().is_multiple_of(16) {
        let (kh, kw, ..) = geometry;
        let cout = bias.len();
        assert!(input.len() >= h * w * cin && weights.len() >= kh * kw * cin * cout);
        assert!(act.slope.is_none_or(|a| a.len() >= cout) && out.len().is_multiple_of(cout));
        // SAFETY: as in `depthwise_row`.
        return unsafe {
            window512::dense_row(
                out,
                input,
                (h, w, cin),
                oy,
                weights,
                (bias, cout),
                act,
                geometry,
            )
        };
    }
    dense_loops(
        isa,
        out,
        input,
        (h, w, cin),
        oy,
        weights,
        bias,
        act,
        geometry,
    )
}

/// Bias then optional PReLU on rows of `bias.len()` channels.
pub(crate) fn bias_prelu(rows: &mut [f32], bias: &[f32], slope: Option<&[f32]>) {
    bias_prelu_loops(Isa::best(), rows, bias, slope)
}

/// Residual plus bias: `dst = src + bias`, row by row.
pub(crate) fn add_bias(dst: &mut [f32], src: &[f32], bias: &[f32]) {
    add_bias_loops(Isa::best(), dst, src, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about -1..1.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(7);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A grouped conv computed tap by tap in plain scalar code: `groups` groups of
    /// `cin / groups` inputs and `cout / groups` outputs, weights `[kh][kw][cin/g][cout]`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        (h, w, cin): (usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        act: Act,
        (kh, kw, stride, ph, pw): (usize, usize, usize, usize, usize),
        groups: usize,
    ) -> Vec<f32> {
        let cout = bias.len();
        let (cin_g, cout_g) = (cin / groups, cout / groups);
        let ho = (h + 2 * ph - kh) / stride + 1;
        let wo = (w + 2 * pw - kw) / stride + 1;
        let mut out = vec![0f32; ho * wo * cout];
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cout {
                    let mut v = bias[o];
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * stride + ky) as isize - ph as isize;
                            let ix = (ox * stride + kx) as isize - pw as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            for ci in 0..cin_g {
                                let i = (o / cout_g) * cin_g + ci;
                                let xv = x[(iy as usize * w + ix as usize) * cin + i];
                                v += xv * wt[((ky * kw + kx) * cin_g + ci) * cout + o];
                            }
                        }
                    }
                    if let Some(a) = act.slope {
                        v = prelu(v, a[o]);
                    }
                    if let Some(cap) = act.cap {
                        v = v.min(cap);
                    }
                    out[(oy * wo + ox) * cout + o] = v;
                }
            }
        }
        out
    }

    /// Element-wise agreement to float rounding, naming the case on failure.
    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{what}: [{i}] {a} vs {b}"
            );
        }
    }

    /// Shapes that reach every branch of the kernels: channel tails, maps narrower than
    /// the window, both strides and pads, and widths that use each column-tile size.
    const SHAPES: [(usize, usize, usize, usize, usize); 12] = [
        // (h, w, c, stride, pad)
        (9, 23, 32, 1, 1),
        (8, 21, 48, 2, 1),
        (5, 14, 16, 1, 1),
        (7, 7, 64, 2, 1),
        (6, 13, 20, 1, 1),
        (5, 9, 6, 2, 1),
        (1, 1, 16, 1, 1),
        (2, 3, 34, 2, 1),
        (4, 12, 18, 1, 0),
        (7, 17, 30, 2, 0),
        (3, 2, 2, 1, 1),
        (12, 40, 128, 2, 1),
    ];

    /// Runs a row kernel over every output row.
    fn rows(ho: usize, row: usize, mut f: impl FnMut(&mut [f32], usize)) -> Vec<f32> {
        let mut out = vec![f32::NAN; ho * row];
        for (oy, o) in out.chunks_mut(row).enumerate() {
            f(o, oy);
        }
        out
    }

    /// Every depthwise path the CPU has against the scalar loops.
    #[test]
    fn depthwise_paths_match_scalar() {
        for (i, &(h, w, c, stride, pad)) in SHAPES.iter().enumerate() {
            let x = values(h * w * c, i as u64);
            let wt = values(9 * c, 100 + i as u64);
            let bias = values(c, 200 + i as u64);
            let slope = values(c, 300 + i as u64);
            for act in [
                Act::default(),
                Act {
                    slope: Some(&slope),
                    cap: Some(0.3),
                },
            ] {
                let g = (3, 3, stride, pad, pad);
                let want = naive(&x, (h, w, c), &wt, &bias, act, g, c);
                let (ho, wo) = (
                    (h + 2 * pad - 3) / stride + 1,
                    (w + 2 * pad - 3) / stride + 1,
                );
                for isa in Isa::available() {
                    let got = rows(ho, wo * c, |o, oy| {
                        depthwise_row(isa, o, &x, (h, w, c), oy, &wt, &bias, act, g)
                    });
                    assert_close(
                        &got,
                        &want,
                        &format!("depthwise {isa:?} {h}x{w}x{c} s{stride}"),
                    );
                }
            }
        }
    }

    /// Every two-channel grouped path the CPU has against the scalar loops.
    #[test]
    fn grouped2_paths_match_scalar() {
        for (i, &(h, w, c, stride, pad)) in SHAPES.iter().enumerate() {
            let x = values(h * w * c, i as u64);
            // `[ky][kx][ci][c]`, and the same split into the two inputs of each group.
            let wt = values(9 * 2 * c, 100 + i as u64);
            let mut w0 = vec![0f32; 9 * c];
            let mut w1 = vec![0f32; 9 * c];
            for t in 0..9 {
                w0[t * c..(t + 1) * c].copy_from_slice(&wt[(t * 2) * c..(t * 2 + 1) * c]);
                w1[t * c..(t + 1) * c].copy_from_slice(&wt[(t * 2 + 1) * c..(t * 2 + 2) * c]);
            }
            let bias = values(c, 200 + i as u64);
            let slope = values(c, 300 + i as u64);
            for act in [
                Act::default(),
                Act {
                    slope: Some(&slope),
                    cap: Some(0.3),
                },
            ] {
                let g = (3, 3, stride, pad, pad);
                let want = naive(&x, (h, w, c), &wt, &bias, act, g, c / 2);
                let (ho, wo) = (
                    (h + 2 * pad - 3) / stride + 1,
                    (w + 2 * pad - 3) / stride + 1,
                );
                for isa in Isa::available() {
                    let got = rows(ho, wo * c, |o, oy| {
                        grouped2_row(isa, o, &x, (h, w, c), oy, (&w0, &w1), &bias, act, g)
                    });
                    assert_close(
                        &got,
                        &want,
                        &format!("grouped {isa:?} {h}x{w}x{c} s{stride}"),
                    );
                }
            }
        }
    }

    /// Every dense path the CPU has against the scalar loops, with output channels on and
    /// off the AVX-512 kernel's multiples of 16.
    #[test]
    fn dense_paths_match_scalar() {
        for (i, (h, w, cin, cout, k, stride, pad)) in [
            (17, 29, 3, 64, 3, 2, 1),
            (16, 16, 3, 128, 3, 2, 1),
            (9, 11, 3, 48, 3, 1, 1),
            (5, 8, 2, 16, 3, 2, 0),
            (6, 7, 5, 80, 1, 1, 0),
            (3, 4, 3, 32, 3, 1, 1),
            (8, 9, 4, 20, 3, 2, 1),
            (10, 30, 3, 64, 5, 2, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let x = values(h * w * cin, i as u64);
            let wt = values(k * k * cin * cout, 100 + i as u64);
            let bias = values(cout, 200 + i as u64);
            let slope = values(cout, 300 + i as u64);
            for act in [
                Act::default(),
                Act {
                    slope: Some(&slope),
                    cap: Some(0.3),
                },
            ] {
                let g = (k, k, stride, pad, pad);
                let want = naive(&x, (h, w, cin), &wt, &bias, act, g, 1);
                let (ho, wo) = (
                    (h + 2 * pad - k) / stride + 1,
                    (w + 2 * pad - k) / stride + 1,
                );
                for isa in Isa::available() {
                    let got = rows(ho, wo * cout, |o, oy| {
                        dense_row(isa, o, &x, (h, w, cin), oy, &wt, &bias, act, g)
                    });
                    assert_close(&got, &want, &format!("dense {isa:?} {h}x{w}x{cin}->{cout}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Prints GMAC/s of each kernel set on w600k_mbf's window convs (the grouped one, the
    /// depthwise ones and the stem):
    /// `cargo test --release -p mfn-model --lib window_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn window_speed() {
        // (name, h, w, cin, cout, stride): cin 3 is the stem, cin == cout a depthwise
        // conv, "grouped" the two-channel groups.
        for (name, h, w, cin, cout, stride) in [
            ("stem", 112, 112, 3, 128, 2),
            ("grouped", 56, 56, 128, 128, 1),
            ("dw", 56, 56, 256, 256, 2),
            ("dw", 28, 28, 256, 256, 1),
            ("dw", 28, 28, 512, 512, 2),
            ("dw", 14, 14, 512, 512, 1),
            ("dw", 14, 14, 1024, 1024, 2),
            ("dw", 7, 7, 512, 512, 1),
        ] {
            let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
            let x = vec![0.5f32; h * w * cin];
            let wt = vec![0.25f32; 9 * cin * cout];
            let bias = vec![0.0; cout];
            let slope = vec![0.1; cout];
            let act = Act {
                slope: Some(&slope),
                cap: None,
            };
            let g = (3, 3, stride, 1, 1);
            let macs = ho
                * wo
                * cout
                * 9
                * if name == "grouped" {
                    2
                } else {
                    cin.min(cout) / cout.min(cin) * if cin == 3 { 3 } else { 1 }
                };
            let mut out = vec![0f32; ho * wo * cout];
            for isa in Isa::available() {
                let mut best = f64::MAX;
                for _ in 0..20 {
                    let t = std::time::Instant::now();
                    for (oy, o) in out.chunks_mut(wo * cout).enumerate() {
                        match name {
                            "stem" => dense_row(isa, o, &x, (h, w, cin), oy, &wt, &bias, act, g),
                            "grouped" => grouped2_row(
                                isa,
                                o,
                                &x,
                                (h, w, cin),
                                oy,
                                (&wt[..9 * cin], &wt[9 * cin..18 * cin]),
                                &bias,
                                act,
                                g,
                            ),
                            _ => depthwise_row(isa, o, &x, (h, w, cin), oy, &wt, &bias, act, g),
                        }
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{name:8} {h:3}x{w:3}x{cin:4}->{cout:4} s{stride} {isa:?}: {:7.1} us, {:5.1} GMAC/s",
                    best * 1e6,
                    macs as f64 / best / 1e9
                );
            }
        }
    }
}
