//! AVX-512 row kernels for the window convs: 3x3 depthwise, 3x3 grouped with two
//! channels per group, and dense convs such as the stem.
//!
//! The depthwise and grouped kernels walk the channels in blocks of 16 (one register)
//! and keep all nine taps' weights of a block in registers while they sweep the row, so
//! that the inner loop is one load and one FMA per tap. Window rows that fall outside the
//! image get zero weights (and read a real row), so the rows need no branches; the few
//! output columns whose window crosses the left or right edge take a checked path and the
//! rest go through an unchecked one that computes several columns at once, to keep enough
//! independent accumulators in flight to cover the FMA latency.
//!
//! The dense kernel is a small matrix product per output row: [`PIXELS`] output columns
//! times four registers of output channels, each input value broadcast against the
//! weights' channel vectors, as the pointwise kernel does.

// The taps index several register arrays at once (weights, rows, accumulators), which
// reads more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::window::Act;

/// Lanes per register.
const L: usize = 16;

/// Output columns per dense-kernel tile: `PIXELS x 4` accumulators, four weight
/// registers and a broadcast fit in the 32 registers.
const PIXELS: usize = 6;

/// Lane mask of the first `n` of 16 lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= L {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// Loads 16 lanes, or the masked ones of a partial block.
///
/// # Safety
/// The CPU has AVX-512F and the lanes in `m` (all when `FULL`) are readable at `p`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn ld<const FULL: bool>(p: *const f32, m: __mmask16) -> __m512 {
    if FULL {
        _mm512_loadu_ps(p)
    } else {
        _mm512_maskz_loadu_ps(m, p)
    }
}

/// Stores 16 lanes, or the masked ones of a partial block.
///
/// # Safety
/// The CPU has AVX-512F and the lanes in `m` (all when `FULL`) are writable at `p`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn st<const FULL: bool>(p: *mut f32, m: __mmask16, v: __m512) {
    if FULL {
        _mm512_storeu_ps(p, v)
    } else {
        _mm512_mask_storeu_ps(p, m, v)
    }
}

/// PReLU then the cap, on one register of channels.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn finish(v: __m512, slope: Option<__m512>, cap: Option<__m512>) -> __m512 {
    let zero = _mm512_setzero_ps();
    let v = match slope {
        Some(a) => _mm512_fmadd_ps(a, _mm512_min_ps(v, zero), _mm512_max_ps(v, zero)),
        None => v,
    };
    match cap {
        Some(c) => _mm512_min_ps(v, c),
        None => v,
    }
}

/// The output columns `lo..hi` whose whole `k`-wide window lies inside a row of `w`.
fn interior(wo: usize, w: usize, k: usize, stride: usize, pad: usize) -> (usize, usize) {
    let hi = if w + pad >= k {
        ((w + pad - k) / stride + 1).min(wo)
    } else {
        0
    };
    (pad.div_ceil(stride).min(hi), hi)
}

/// Offsets (in floats) of the three window rows of output row `oy` in an image of `h`
/// rows of `row` floats, and which of them lie inside the image. A row outside points
/// at a real one, so that reading it is safe; its weights are zeroed instead.
fn window_rows(
    oy: usize,
    stride: usize,
    pad: usize,
    h: usize,
    row: usize,
) -> ([usize; 3], [bool; 3]) {
    let iy0 = (oy * stride) as isize - pad as isize;
    let mut at = [0usize; 3];
    let mut inside = [false; 3];
    for ky in 0..3 {
        let iy = iy0 + ky as isize;
        if (0..h as isize).contains(&iy) {
            at[ky] = iy as usize * row;
            inside[ky] = true;
        }
    }
    let any = (0..3).find(|&k| inside[k]).map_or(0, |k| at[k]);
    for ky in 0..3 {
        if !inside[ky] {
            at[ky] = any;
        }
    }
    (at, inside)
}

/// One output row of a 3x3 depthwise conv in NHWC (`stride` 1 or 2), with the
/// activation applied.
///
/// # Safety
/// The CPU has AVX-512F; `input` is `h x w x c`, `out` is `wo x c` with `wo` the row's
/// output width, `weights` is `[3][3][c]`, `bias` and the slopes hold `c`, `stride` is 1
/// or 2 and `pw < 3`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn depthwise3_row(
    out: &mut [f32],
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    bias: &[f32],
    act: Act,
    (stride, ph, pw): (usize, usize, usize),
) {
    debug_assert!(input.len() >= h * w * c && weights.len() >= 9 * c && bias.len() >= c);
    let wo = out.len() / c;
    let (rows, inside) = window_rows(oy, stride, ph, h, w * c);
    let g = Row {
        out: out.as_mut_ptr(),
        input: input.as_ptr(),
        rows,
        inside,
        c,
        w,
        wo,
        pw,
        cap: act.cap.map(|v| _mm512_set1_ps(v)),
    };
    let mut cb = 0;
    while cb < c {
        let m = lanes(c - cb);
        let slope = act.slope.map(|a| a.as_ptr().add(cb));
        let (wt, b) = (weights.as_ptr().add(cb), bias.as_ptr().add(cb));
        match (c - cb >= L, stride) {
            (true, 1) => dw_block::<true, 1>(&g, cb, m, wt, b, slope),
            (true, _) => dw_block::<true, 2>(&g, cb, m, wt, b, slope),
            (false, 1) => dw_block::<false, 1>(&g, cb, m, wt, b, slope),
            (false, _) => dw_block::<false, 2>(&g, cb, m, wt, b, slope),
        }
        cb += L;
    }
}

/// What the per-block loops of a 3x3 row need: pointers, the window rows and sizes.
struct Row {
    out: *mut f32,
    input: *const f32,
    /// Offsets of the three window rows in `input`.
    rows: [usize; 3],
    inside: [bool; 3],
    c: usize,
    w: usize,
    wo: usize,
    pw: usize,
    cap: Option<__m512>,
}

/// One block of 16 channels (masked by `m` unless `FULL`) across the whole output row.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dw_block<const FULL: bool, const S: usize>(
    g: &Row,
    cb: usize,
    m: __mmask16,
    wt: *const f32,
    b: *const f32,
    slope: Option<*const f32>,
) {
    let c = g.c;
    let mut wv = [[_mm512_setzero_ps(); 3]; 3];
    for ky in 0..3 {
        if g.inside[ky] {
            for kx in 0..3 {
                wv[ky][kx] = ld::<FULL>(wt.add((ky * 3 + kx) * c), m);
            }
        }
    }
    let bias = ld::<FULL>(b, m);
    let slope = slope.map(|a| ld::<FULL>(a, m));
    let rows = [
        g.input.add(g.rows[0] + cb),
        g.input.add(g.rows[1] + cb),
        g.input.add(g.rows[2] + cb),
    ];
    let out = g.out.add(cb);
    let (lo, hi) = interior(g.wo, g.w, 3, S, g.pw);

    // A column whose window may cross the edge: only the taps inside.
    let edge = |ox: usize| {
        let ix0 = (ox * S) as isize - g.pw as isize;
        let mut acc = [bias, _mm512_setzero_ps(), _mm512_setzero_ps()];
        for ky in 0..3 {
            for kx in 0..3 {
                let ix = ix0 + kx as isize;
                if (0..g.w as isize).contains(&ix) {
                    let x = ld::<FULL>(rows[ky].add(ix as usize * c), m);
                    acc[ky] = _mm512_fmadd_ps(x, wv[ky][kx], acc[ky]);
                }
            }
        }
        let v = _mm512_add_ps(acc[0], _mm512_add_ps(acc[1], acc[2]));
        st::<FULL>(out.add(ox * c), m, finish(v, slope, g.cap));
    };

    for ox in 0..lo {
        edge(ox);
    }
    let mut ox = lo;
    while ox + 8 <= hi {
        dw_cols::<FULL, S, 8>(&rows, out, c, m, ox, g.pw, &wv, bias, slope, g.cap);
        ox += 8;
    }
    if ox + 4 <= hi {
        dw_cols::<FULL, S, 4>(&rows, out, c, m, ox, g.pw, &wv, bias, slope, g.cap);
        ox += 4;
    }
    while ox < hi {
        dw_cols::<FULL, S, 1>(&rows, out, c, m, ox, g.pw, &wv, bias, slope, g.cap);
        ox += 1;
    }
    for ox in hi.max(lo)..g.wo {
        edge(ox);
    }
}

/// `N` interior output columns from `ox` of one channel block, no bounds checks.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dw_cols<const FULL: bool, const S: usize, const N: usize>(
    rows: &[*const f32; 3],
    out: *mut f32,
    c: usize,
    m: __mmask16,
    ox: usize,
    pw: usize,
    wv: &[[__m512; 3]; 3],
    bias: __m512,
    slope: Option<__m512>,
    cap: Option<__m512>,
) {
    let ix0 = ox * S - pw;
    if N == 1 {
        // One column: a partial sum per window row, to shorten the dependency chain.
        let mut acc = [bias, _mm512_setzero_ps(), _mm512_setzero_ps()];
        for ky in 0..3 {
            for kx in 0..3 {
                let x = ld::<FULL>(rows[ky].add((ix0 + kx) * c), m);
                acc[ky] = _mm512_fmadd_ps(x, wv[ky][kx], acc[ky]);
            }
        }
        let v = _mm512_add_ps(acc[0], _mm512_add_ps(acc[1], acc[2]));
        st::<FULL>(out.add(ox * c), m, finish(v, slope, cap));
        return;
    }
    let mut acc = [bias; N];
    for ky in 0..3 {
        let r = rows[ky].add(ix0 * c);
        for kx in 0..3 {
            let wk = wv[ky][kx];
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(ld::<FULL>(r.add((S * j + kx) * c), m), wk, *a);
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        st::<FULL>(out.add((ox + j) * c), m, finish(*a, slope, cap));
    }
}

/// One output row of a 3x3 grouped conv with two input and two output channels per
/// group, in NHWC (`stride` 1 or 2), with the activation applied. `w0` and `w1` are the
/// weights (`[3][3][c]`) that output channel `o` gives to the first and the second input
/// channel of its group.
///
/// Each loaded register of 16 input channels is shuffled twice, into its even channels
/// duplicated and its odd channels duplicated: lane `o` then holds the first and the
/// second input of `o`'s group, so no gathered copy of the input is needed.
///
/// # Safety
/// As [`depthwise3_row`], with `c` even and `w0`, `w1` both `[3][3][c]`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn grouped2_3_row(
    out: &mut [f32],
    input: &[f32],
    (h, w, c): (usize, usize, usize),
    oy: usize,
    (w0, w1): (&[f32], &[f32]),
    bias: &[f32],
    act: Act,
    (stride, ph, pw): (usize, usize, usize),
) {
    debug_assert!(input.len() >= h * w * c && w0.len() >= 9 * c && w1.len() >= 9 * c);
    debug_assert!(c.is_multiple_of(2) && bias.len() >= c);
    let wo = out.len() / c;
    let (rows, inside) = window_rows(oy, stride, ph, h, w * c);
    let g = Row {
        out: out.as_mut_ptr(),
        input: input.as_ptr(),
        rows,
        inside,
        c,
        w,
        wo,
        pw,
        cap: act.cap.map(|v| _mm512_set1_ps(v)),
    };
    let mut cb = 0;
    while cb < c {
        let m = lanes(c - cb);
        let slope = act.slope.map(|a| a.as_ptr().add(cb));
        let wt = (w0.as_ptr().add(cb), w1.as_ptr().add(cb));
        let b = bias.as_ptr().add(cb);
        match (c - cb >= L, stride) {
            (true, 1) => g2_block::<true, 1>(&g, cb, m, wt, b, slope),
            (true, _) => g2_block::<true, 2>(&g, cb, m, wt, b, slope),
            (false, 1) => g2_block::<false, 1>(&g, cb, m, wt, b, slope),
            (false, _) => g2_block::<false, 2>(&g, cb, m, wt, b, slope),
        }
        cb += L;
    }
}

/// [`dw_block`] for the two-channel groups.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn g2_block<const FULL: bool, const S: usize>(
    g: &Row,
    cb: usize,
    m: __mmask16,
    (w0, w1): (*const f32, *const f32),
    b: *const f32,
    slope: Option<*const f32>,
) {
    let c = g.c;
    let mut wv = [[[_mm512_setzero_ps(); 3]; 3]; 2];
    for ky in 0..3 {
        if g.inside[ky] {
            for kx in 0..3 {
                wv[0][ky][kx] = ld::<FULL>(w0.add((ky * 3 + kx) * c), m);
                wv[1][ky][kx] = ld::<FULL>(w1.add((ky * 3 + kx) * c), m);
            }
        }
    }
    let bias = ld::<FULL>(b, m);
    let slope = slope.map(|a| ld::<FULL>(a, m));
    let rows = [
        g.input.add(g.rows[0] + cb),
        g.input.add(g.rows[1] + cb),
        g.input.add(g.rows[2] + cb),
    ];
    let out = g.out.add(cb);
    let (lo, hi) = interior(g.wo, g.w, 3, S, g.pw);

    let edge = |ox: usize| {
        let ix0 = (ox * S) as isize - g.pw as isize;
        let mut acc = [bias, _mm512_setzero_ps()];
        for ky in 0..3 {
            for kx in 0..3 {
                let ix = ix0 + kx as isize;
                if (0..g.w as isize).contains(&ix) {
                    let x = ld::<FULL>(rows[ky].add(ix as usize * c), m);
                    acc[0] = _mm512_fmadd_ps(_mm512_moveldup_ps(x), wv[0][ky][kx], acc[0]);
                    acc[1] = _mm512_fmadd_ps(_mm512_movehdup_ps(x), wv[1][ky][kx], acc[1]);
                }
            }
        }
        let v = _mm512_add_ps(acc[0], acc[1]);
        st::<FULL>(out.add(ox * c), m, finish(v, slope, g.cap));
    };

    for ox in 0..lo {
        edge(ox);
    }
    let mut ox = lo;
    while ox + 4 <= hi {
        g2_cols::<FULL, S, 4>(&rows, out, c, m, ox, g.pw, &wv, bias, slope, g.cap);
        ox += 4;
    }
    while ox < hi {
        g2_cols::<FULL, S, 1>(&rows, out, c, m, ox, g.pw, &wv, bias, slope, g.cap);
        ox += 1;
    }
    for ox in hi.max(lo)..g.wo {
        edge(ox);
    }
}

/// [`dw_cols`] for the two-channel groups: `N` columns, each with one accumulator per
/// input channel of the group.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn g2_cols<const FULL: bool, const S: usize, const N: usize>(
    rows: &[*const f32; 3],
    out: *mut f32,
    c: usize,
    m: __mmask16,
    ox: usize,
    pw: usize,
    wv: &[[[__m512; 3]; 3]; 2],
    bias: __m512,
    slope: Option<__m512>,
    cap: Option<__m512>,
) {
    let ix0 = ox * S - pw;
    let mut even = [bias; N];
    let mut odd = [_mm512_setzero_ps(); N];
    for ky in 0..3 {
        let r = rows[ky].add(ix0 * c);
        for kx in 0..3 {
            for j in 0..N {
                let x = ld::<FULL>(r.add((S * j + kx) * c), m);
                even[j] = _mm512_fmadd_ps(_mm512_moveldup_ps(x), wv[0][ky][kx], even[j]);
                odd[j] = _mm512_fmadd_ps(_mm512_movehdup_ps(x), wv[1][ky][kx], odd[j]);
            }
        }
    }
    for j in 0..N {
        let v = _mm512_add_ps(even[j], odd[j]);
        st::<FULL>(out.add((ox + j) * c), m, finish(v, slope, cap));
    }
}

/// One output row of a dense conv in NHWC whose output channels are a multiple of 16,
/// with the activation applied. `weights` is `[kh][kw][cin][cout]`.
///
/// A window row of an output column is `kw * cin` contiguous input values, so each tile
/// of [`PIXELS`] interior columns is a small product of those values with the weights'
/// rows; columns whose window crosses the edge run one at a time over their valid taps.
///
/// # Safety
/// The CPU has AVX-512F; `input` is `h x w x cin`, `out` is `wo x cout` with `wo` the
/// row's output width, `cout % 16 == 0`, `weights` is `kh x kw x cin x cout` and `bias`
/// and the slopes hold `cout`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dense_row(
    out: &mut [f32],
    input: &[f32],
    (h, w, cin): (usize, usize, usize),
    oy: usize,
    weights: &[f32],
    (bias, cout): (&[f32], usize),
    act: Act,
    (kh, kw, stride, ph, pw): (usize, usize, usize, usize, usize),
) {
    debug_assert!(cout.is_multiple_of(L) && bias.len() >= cout);
    debug_assert!(input.len() >= h * w * cin && weights.len() >= kh * kw * cin * cout);
    let wo = out.len() / cout;
    let iy0 = (oy * stride) as isize - ph as isize;
    let ky_lo = (-iy0).clamp(0, kh as isize) as usize;
    let ky_hi = (h as isize - iy0).clamp(ky_lo as isize, kh as isize) as usize;
    let (lo, hi) = interior(wo, w, kw, stride, pw);
    let cap = act.cap.map(|v| _mm512_set1_ps(v));
    let span = kw * cin;
    let (o, x, wt) = (out.as_mut_ptr(), input.as_ptr(), weights.as_ptr());
    // The start of the window row `ky` of output column `ox`, as an input offset, with
    // the first valid tap's offset into the weights; only for in-image columns.
    let row_at = |ky: usize| ((iy0 + ky as isize) as usize * w) * cin;
    let mut c0 = 0;
    while c0 < cout {
        let v = ((cout - c0) / L).min(4);
        let slope = act.slope.map(|a| a.as_ptr().add(c0));
        let b = bias.as_ptr().add(c0);
        let mut ox = 0;
        while ox < wo {
            let full = ox >= lo && ox + PIXELS <= hi;
            if full {
                let mut acc = [[_mm512_setzero_ps(); 4]; PIXELS];
                for a in acc.iter_mut() {
                    for (i, r) in a.iter_mut().enumerate().take(v) {
                        *r = _mm512_loadu_ps(b.add(i * L));
                    }
                }
                for ky in ky_lo..ky_hi {
                    let base = x.add(row_at(ky) + (ox * stride - pw) * cin);
                    let wrow = wt.add(ky * span * cout + c0);
                    match v {
                        4 => dense_tile::<4>(&mut acc, base, stride * cin, wrow, cout, span),
                        3 => dense_tile::<3>(&mut acc, base, stride * cin, wrow, cout, span),
                        2 => dense_tile::<2>(&mut acc, base, stride * cin, wrow, cout, span),
                        _ => dense_tile::<1>(&mut acc, base, stride * cin, wrow, cout, span),
                    }
                }
                for (p, a) in acc.iter().enumerate() {
                    for (i, r) in a.iter().enumerate().take(v) {
                        let s = slope.map(|s| _mm512_loadu_ps(s.add(i * L)));
                        _mm512_storeu_ps(o.add((ox + p) * cout + c0 + i * L), finish(*r, s, cap));
                    }
                }
                ox += PIXELS;
            } else {
                // One column, over the taps inside the image.
                let ix0 = (ox * stride) as isize - pw as isize;
                let kx_lo = (-ix0).clamp(0, kw as isize) as usize;
                let kx_hi = (w as isize - ix0).clamp(kx_lo as isize, kw as isize) as usize;
                let mut acc = [_mm512_setzero_ps(); 4];
                for (i, r) in acc.iter_mut().enumerate().take(v) {
                    *r = _mm512_loadu_ps(b.add(i * L));
                }
                for ky in ky_lo..ky_hi {
                    for kx in kx_lo..kx_hi {
                        let at = x.add(row_at(ky) + (ix0 + kx as isize) as usize * cin);
                        for ci in 0..cin {
                            let s = _mm512_set1_ps(*at.add(ci));
                            let wrow = wt.add(((ky * kw + kx) * cin + ci) * cout + c0);
                            for (i, r) in acc.iter_mut().enumerate().take(v) {
                                *r = _mm512_fmadd_ps(s, _mm512_loadu_ps(wrow.add(i * L)), *r);
                            }
                        }
                    }
                }
                for (i, r) in acc.iter().enumerate().take(v) {
                    let s = slope.map(|s| _mm512_loadu_ps(s.add(i * L)));
                    _mm512_storeu_ps(o.add(ox * cout + c0 + i * L), finish(*r, s, cap));
                }
                ox += 1;
            }
        }
        c0 += v * L;
    }
}

/// One window row of a dense tile: `acc[p] += x[p * step + k] * w[k]` over the row's
/// `span` values `k`, for the [`PIXELS`] columns `p` and `V` registers of channels.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dense_tile<const V: usize>(
    acc: &mut [[__m512; 4]; PIXELS],
    x: *const f32,
    step: usize,
    w: *const f32,
    cout: usize,
    span: usize,
) {
    for k in 0..span {
        let mut wv = [_mm512_setzero_ps(); V];
        for (i, r) in wv.iter_mut().enumerate() {
            *r = _mm512_loadu_ps(w.add(k * cout + i * L));
        }
        for (p, a) in acc.iter_mut().enumerate() {
            let s = _mm512_set1_ps(*x.add(p * step + k));
            for i in 0..V {
                a[i] = _mm512_fmadd_ps(s, wv[i], a[i]);
            }
        }
    }
}
