//! AVX-512 row kernels for the window convs: 3x3 depthwise, 3x3 grouped with two
//! channels per group, and dense convs such as the stem.
//!
//! The depthwise and grouped kernels compute tiles of up to 8 output columns, one block
//! of 16 channels (one register) at a time, with the block's nine taps' weights in
//! registers: each input register is loaded once per window row and used by every
//! column of the tile whose window holds it. Window rows that fall outside the image get
//! zero weights (and read a real row), so the rows need no branches; the few output
//! columns whose window crosses the left or right edge take a checked path.
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
/// output width, `weights` is `[3][3][c]`, `bias` and the slopes hold `c`, and `stride`
/// is 1 or 2.
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
    let g = Row::new(
        out,
        input,
        (h, w, c),
        oy,
        [weights, weights],
        bias,
        act,
        (stride, ph, pw),
    );
    match stride {
        1 => row::<1, 1>(&g),
        _ => row::<1, 2>(&g),
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
    let g = Row::new(
        out,
        input,
        (h, w, c),
        oy,
        [w0, w1],
        bias,
        act,
        (stride, ph, pw),
    );
    match stride {
        1 => row::<2, 1>(&g),
        _ => row::<2, 2>(&g),
    }
}

/// What the loops of a 3x3 row need: pointers, the window rows and sizes.
struct Row {
    /// The output row, `wo x c`.
    out: *mut f32,
    /// The three window rows in the input; one outside the image points at a real row.
    rows: [*const f32; 3],
    /// Which window rows lie inside the image.
    inside: [bool; 3],
    /// The weights (`[3][3][c]`) per input channel of a group.
    weights: [*const f32; 2],
    /// `c` values.
    bias: *const f32,
    /// `c` PReLU slopes, if any.
    slope: Option<*const f32>,
    /// The cap, broadcast.
    cap: Option<__m512>,
    /// Channels.
    c: usize,
    /// Input width.
    w: usize,
    /// Output width.
    wo: usize,
    /// Left padding.
    pw: usize,
}

impl Row {
    /// The pointers and sizes for output row `oy`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn new(
        out: &mut [f32],
        input: &[f32],
        (h, w, c): (usize, usize, usize),
        oy: usize,
        weights: [&[f32]; 2],
        bias: &[f32],
        act: Act,
        (stride, ph, pw): (usize, usize, usize),
    ) -> Self {
        let (at, inside) = window_rows(oy, stride, ph, h, w * c);
        let x = input.as_ptr();
        Row {
            out: out.as_mut_ptr(),
            rows: [x.add(at[0]), x.add(at[1]), x.add(at[2])],
            inside,
            weights: [weights[0].as_ptr(), weights[1].as_ptr()],
            bias: bias.as_ptr(),
            slope: act.slope.map(|a| a.as_ptr()),
            cap: act.cap.map(|v| _mm512_set1_ps(v)),
            c,
            w,
            wo: out.len() / c,
            pw,
        }
    }
}

/// A whole output row, `G` input channels per group (1: depthwise, 2: pairs), stride
/// `S`. Columns go in tiles, and each tile runs through all the channel blocks before
/// the next: the input it reads is then contiguous, and the tiles' FMA chains are
/// independent for the out-of-order core to overlap. (Sweeping a row per channel block
/// instead reads one line every `4 c` bytes, which with `c` of 512 or more lands every
/// load in the same few cache sets.)
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row<const G: usize, const S: usize>(g: &Row) {
    let (lo, hi) = interior(g.wo, g.w, 3, S, g.pw);
    for ox in 0..lo {
        blocks(g, |cb, m, full| edge::<G, S>(g, ox, cb, m, full));
    }
    let mut ox = lo;
    while ox + 8 <= hi {
        blocks(g, |cb, m, full| cols_any::<G, S, 8>(g, ox, cb, m, full));
        ox += 8;
    }
    if ox + 4 <= hi {
        blocks(g, |cb, m, full| cols_any::<G, S, 4>(g, ox, cb, m, full));
        ox += 4;
    }
    // The last few columns, and those whose window crosses the right edge, one at a
    // time: the edge path's per-row partial sums suit a lone column.
    for ox in ox.max(lo)..g.wo {
        blocks(g, |cb, m, full| edge::<G, S>(g, ox, cb, m, full));
    }
}

/// Calls `f(first channel, lane mask, whether the block is full)` for each block of 16
/// channels.
#[inline(always)]
fn blocks(g: &Row, mut f: impl FnMut(usize, __mmask16, bool)) {
    let mut cb = 0;
    while cb < g.c {
        f(cb, lanes(g.c - cb), g.c - cb >= L);
        cb += L;
    }
}

/// The weights of channel block `cb`, `[ci][ky][kx]`, zero for window rows outside the
/// image and for the window columns `kx` where `cols_in[kx]` is false.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn taps<const G: usize>(
    g: &Row,
    cb: usize,
    m: __mmask16,
    cols_in: [bool; 3],
) -> [[[__m512; 3]; 3]; G] {
    let mut wv = [[[_mm512_setzero_ps(); 3]; 3]; G];
    for ci in 0..G {
        for ky in 0..3 {
            for kx in 0..3 {
                let mk = if g.inside[ky] && cols_in[kx] { m } else { 0 };
                let at = g.weights[ci].add((ky * 3 + kx) * g.c + cb);
                wv[ci][ky][kx] = _mm512_maskz_loadu_ps(mk, at);
            }
        }
    }
    wv
}

/// Input register `x` as the lanes that input channel `ci` of each lane's group feeds:
/// itself for a depthwise conv, its even or its odd lanes duplicated for pairs.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn spread<const G: usize>(x: __m512, ci: usize) -> __m512 {
    match (G, ci) {
        (1, _) => x,
        (_, 0) => _mm512_moveldup_ps(x),
        _ => _mm512_movehdup_ps(x),
    }
}

/// Sums the per-input accumulators of a column, applies the activation and stores it.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn put<const FULL: bool>(g: &Row, ox: usize, cb: usize, m: __mmask16, parts: &[__m512]) {
    let mut v = parts[0];
    for p in &parts[1..] {
        v = _mm512_add_ps(v, *p);
    }
    let slope = g.slope.map(|a| ld::<FULL>(a.add(cb), m));
    st::<FULL>(g.out.add(ox * g.c + cb), m, finish(v, slope, g.cap));
}

/// A column whose window may cross the left or right edge. The taps outside get zero
/// weights and read the nearest column inside, so the loop has no branches; each window
/// row has its own accumulator, to shorten the chain of dependent FMAs.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn edge<const G: usize, const S: usize>(
    g: &Row,
    ox: usize,
    cb: usize,
    m: __mmask16,
    full: bool,
) {
    let ix0 = (ox * S) as isize - g.pw as isize;
    let mut at = [0usize; 3];
    let mut cols_in = [false; 3];
    for kx in 0..3 {
        let ix = ix0 + kx as isize;
        cols_in[kx] = (0..g.w as isize).contains(&ix);
        at[kx] = ix.clamp(0, g.w as isize - 1) as usize * g.c + cb;
    }
    let wv = taps::<G>(g, cb, m, cols_in);
    let mut acc = [[_mm512_setzero_ps(); G]; 3];
    acc[0][0] = _mm512_maskz_loadu_ps(m, g.bias.add(cb));
    for ky in 0..3 {
        for kx in 0..3 {
            let x = _mm512_maskz_loadu_ps(m, g.rows[ky].add(at[kx]));
            for ci in 0..G {
                acc[ky][ci] = _mm512_fmadd_ps(spread::<G>(x, ci), wv[ci][ky][kx], acc[ky][ci]);
            }
        }
    }
    let mut parts = [_mm512_setzero_ps(); 3];
    for (p, a) in parts.iter_mut().zip(&acc) {
        *p = a[0];
        for v in &a[1..] {
            *p = _mm512_add_ps(*p, *v);
        }
    }
    if full {
        put::<true>(g, ox, cb, m, &parts)
    } else {
        put::<false>(g, ox, cb, m, &parts)
    }
}

/// [`cols`] for a full or a partial channel block.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn cols_any<const G: usize, const S: usize, const N: usize>(
    g: &Row,
    ox: usize,
    cb: usize,
    m: __mmask16,
    full: bool,
) {
    if full {
        cols::<true, G, S, N>(g, ox, cb, m)
    } else {
        cols::<false, G, S, N>(g, ox, cb, m)
    }
}

/// `N` interior output columns from `ox` of channel block `cb`, no bounds checks. Each
/// input register is loaded once per window row and fed at once to every column whose
/// window holds it, so few registers are live: the weights, `N x G` accumulators and it.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn cols<const FULL: bool, const G: usize, const S: usize, const N: usize>(
    g: &Row,
    ox: usize,
    cb: usize,
    m: __mmask16,
) {
    let c = g.c;
    let wv = taps::<G>(g, cb, m, [true; 3]);
    let ix0 = ox * S - g.pw;
    let mut acc = [[_mm512_setzero_ps(); G]; N];
    let bias = ld::<FULL>(g.bias.add(cb), m);
    for a in acc.iter_mut() {
        a[0] = bias;
    }
    for ky in 0..3 {
        let r = g.rows[ky].add(ix0 * c + cb);
        for col in 0..S * (N - 1) + 3 {
            let x = ld::<FULL>(r.add(col * c), m);
            for j in 0..N {
                if col >= S * j && col - S * j < 3 {
                    let kx = col - S * j;
                    for ci in 0..G {
                        acc[j][ci] =
                            _mm512_fmadd_ps(spread::<G>(x, ci), wv[ci][ky][kx], acc[j][ci]);
                    }
                }
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        put::<FULL>(g, ox + j, cb, m, a);
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
