//! The CPU inference engine behind [`crate::MobileFaceNet::forward`].
//!
//! Activations are NHWC, so that a 1x1 conv over a whole batch is one matrix product
//! `(N*H*W, Cin) x (Cin, Cout)` with no im2col copy, and depthwise and stem convs vectorise
//! across channels. BatchNorm is folded into the weights when the engine is built. Bias,
//! PReLU and the residual add are applied to each tile of rows right after its product,
//! while the tile is still in cache. Buffers are kept between calls.
//!
//! All work runs on rayon's global pool: the matrix products are split into row tiles that
//! each run single-threaded, so [`crate::set_num_threads`] bounds everything and nothing
//! nests.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

/// Which part of the network a layer belongs to, for per-layer timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// Input normalisation and the dense 3x3 stride-2 conv.
    Stem,
    /// The 3x3 depthwise convs.
    Depthwise,
    /// The 1x1 convs (with the residual adds).
    Pointwise,
    /// The pooling before the embedding layer: the global depthwise conv, or the 1x1
    /// reduce conv of [`crate::Pooling::ConvReduce`].
    GdConv,
    /// The embedding layer.
    Head,
}

impl LayerKind {
    /// Every kind, in network order.
    pub const ALL: [LayerKind; 5] = [
        LayerKind::Stem,
        LayerKind::Depthwise,
        LayerKind::Pointwise,
        LayerKind::GdConv,
        LayerKind::Head,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Stem => "stem",
            LayerKind::Depthwise => "depthwise",
            LayerKind::Pointwise => "pointwise",
            LayerKind::GdConv => "gdconv",
            LayerKind::Head => "head",
        }
    }
}

/// A conv that slides a window over the image (dense or depthwise), with folded
/// BatchNorm, computed directly in NHWC.
#[derive(Clone, Debug)]
pub(crate) struct WindowConv {
    /// Dense: `[kh][kw][cin][cout]`; depthwise: `[kh][kw][c]`, each tap a channel vector.
    pub w: Vec<f32>,
    pub bias: Vec<f32>,
    pub slope: Option<Vec<f32>>,
    /// Upper clamp after the activation (ReLU6).
    pub cap: Option<f32>,
    pub cin: usize,
    pub cout: usize,
    pub kernel: [usize; 2],
    pub stride: usize,
    pub pad: [usize; 2],
    /// One filter per channel rather than a full `cin x cout` one.
    pub depthwise: bool,
}

/// A grouped conv that is neither dense nor depthwise (e.g. 2 channels per group), run as
/// one depthwise pass per input channel of a group over a gathered copy of the input.
#[derive(Clone, Debug)]
pub(crate) struct GroupedConv {
    /// One depthwise conv per input channel of a group; only the first carries the bias.
    pub parts: Vec<WindowConv>,
    pub slope: Option<Vec<f32>>,
    pub cap: Option<f32>,
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
}

/// The conv after the stem: depthwise in MobileFaceNet, grouped in insightface's `mbf`.
#[derive(Clone, Debug)]
pub(crate) enum Spatial {
    Window(WindowConv),
    Grouped(GroupedConv),
}

/// A 1x1 conv or linear layer with folded BatchNorm: `x (M, cin) @ w (cin, cout)`.
#[derive(Clone, Debug)]
pub(crate) struct Pointwise {
    /// `[cin][cout]`.
    pub w: Vec<f32>,
    pub bias: Vec<f32>,
    pub slope: Option<Vec<f32>>,
    pub cap: Option<f32>,
    pub cin: usize,
    pub cout: usize,
}

/// Clamps from above: the top of ReLU6.
fn apply_cap(v: &mut [f32], cap: Option<f32>) {
    if let Some(cap) = cap {
        v.iter_mut().for_each(|x| *x = x.min(cap));
    }
}

/// What pools the last map for the embedding layer.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    /// The global depthwise conv: one value per channel.
    GdConv(WindowConv),
    /// A 1x1 conv that keeps the map; the head's weights are in NHWC order to match.
    Reduce(Pointwise),
}

#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub expand: Pointwise,
    pub depthwise: WindowConv,
    pub project: Pointwise,
    pub residual: bool,
}

/// The whole network as CPU kernels.
#[derive(Debug)]
pub(crate) struct CpuEngine {
    pub input_hw: [usize; 2],
    pub mean: [f32; 3],
    pub scale: [f32; 3],
    pub stem: WindowConv,
    pub stem_dw: Option<Spatial>,
    pub stem_pw: Option<Pointwise>,
    pub blocks: Vec<Block>,
    pub last: Pointwise,
    pub pool: Pool,
    /// The embedding layer, its input features in NHWC order.
    pub head: Pointwise,
    pub workspaces: Mutex<Vec<Workspace>>,
}

/// Activation buffers reused across calls.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    x: Vec<f32>,
    y: Vec<f32>,
    e: Vec<f32>,
    d: Vec<f32>,
}

/// Wall time per [`LayerKind`] of one forward pass.
pub type LayerTimes = BTreeMap<LayerKind, Duration>;

/// Height, width and channels of an NHWC activation (the batch is fixed per call).
#[derive(Clone, Copy, Debug)]
struct Hwc {
    h: usize,
    w: usize,
    c: usize,
}

fn out_dim(size: usize, k: usize, s: usize, p: usize) -> usize {
    crate::config::conv_out(size, k, s, p)
}

/// Grows `buf` to `len` without shrinking its capacity; contents are overwritten by the
/// caller, so only new elements are initialised.
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Runs `f(index, chunk)` over `chunk`-sized pieces of `out`, on the pool when `parallel`.
fn each_chunk<F>(parallel: bool, out: &mut [f32], chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    if parallel {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, o)| f(i, o));
    } else {
        out.chunks_mut(chunk).enumerate().for_each(|(i, o)| f(i, o));
    }
}

/// Rows per task for a product over `m` rows: enough tasks to balance the threads, small
/// enough that a tile of input and output stays in L2.
fn tile_rows(m: usize, parallel: bool) -> usize {
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    m.div_ceil(threads * 2).clamp(8, 256)
}

mod simd {
    //! Channel-vector loops, compiled once plainly and once with AVX2 + FMA, chosen at run
    //! time, so that one binary runs everywhere and uses FMA where the CPU has it.
    //!
    //! Channels are processed in blocks of [`BLOCK`]; a full block is a fixed-size array,
    //! which the compiler keeps in vector registers across all taps of a kernel.

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

    /// Stores a block, with PReLU when given.
    #[inline(always)]
    fn store(out: &mut [f32], acc: &[f32], slope: Option<&[f32]>) {
        match slope {
            Some(a) => {
                for ((o, v), a) in out.iter_mut().zip(acc).zip(a) {
                    *o = prelu(*v, *a);
                }
            }
            None => out.copy_from_slice(acc),
        }
    }

    /// The range of kernel taps `k` for which `o * stride + k - pad` lies in `0..size`.
    #[inline(always)]
    fn valid_taps(
        o: usize,
        stride: usize,
        pad: usize,
        k: usize,
        size: usize,
    ) -> (usize, usize, isize) {
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
        slope: Option<&[f32]>,
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
                store(&mut o[c0..c0 + n], &acc[..n], slope.map(|a| &a[c0..c0 + n]));
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
        slope: Option<&[f32]>,
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
                store(&mut o[c0..c0 + n], &acc[..n], slope.map(|a| &a[c0..c0 + n]));
                c0 += n;
            }
        }
    }

    /// Defines `$name`, which runs `$impl::<true>` compiled with AVX2 + FMA where the CPU
    /// has them and `$impl::<false>` elsewhere.
    macro_rules! dispatch {
        ($name:ident, $impl:ident, ($($arg:ident: $ty:ty),*)) => {
            #[allow(clippy::too_many_arguments)]
            pub fn $name($($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx2,fma")]
                    #[allow(clippy::too_many_arguments)]
                    unsafe fn fast($($arg: $ty),*) {
                        $impl::<true>($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU supports the features `fast` is compiled for.
                        return unsafe { fast($($arg),*) };
                    }
                }
                $impl::<false>($($arg),*)
            }
        };
    }

    dispatch!(depthwise_row, depthwise_row_impl, (
        out: &mut [f32], input: &[f32], shape: (usize, usize, usize), oy: usize,
        weights: &[f32], bias: &[f32], slope: Option<&[f32]>,
        geometry: (usize, usize, usize, usize, usize)
    ));
    dispatch!(dense_row, dense_row_impl, (
        out: &mut [f32], input: &[f32], shape: (usize, usize, usize), oy: usize,
        weights: &[f32], bias: &[f32], slope: Option<&[f32]>,
        geometry: (usize, usize, usize, usize, usize)
    ));
    dispatch!(bias_prelu, bias_prelu_impl, (rows: &mut [f32], bias: &[f32], slope: Option<&[f32]>));
    dispatch!(add_bias, add_bias_impl, (dst: &mut [f32], src: &[f32], bias: &[f32]));
}

impl WindowConv {
    fn run(&self, x: &[f32], n: usize, s: Hwc, out: &mut Vec<f32>, parallel: bool) -> Hwc {
        debug_assert_eq!(s.c, self.cin);
        let [kh, kw] = self.kernel;
        let ho = out_dim(s.h, kh, self.stride, self.pad[0]);
        let wo = out_dim(s.w, kw, self.stride, self.pad[1]);
        let row = wo * self.cout;
        let out = sized(out, n * ho * row);
        let geometry = (kh, kw, self.stride, self.pad[0], self.pad[1]);
        let plane = s.h * s.w * s.c;
        let kernel = if self.depthwise {
            simd::depthwise_row
        } else {
            simd::dense_row
        };
        each_chunk(parallel, out, row, |r, o| {
            let (img, oy) = (r / ho, r % ho);
            kernel(
                o,
                &x[img * plane..(img + 1) * plane],
                (s.h, s.w, s.c),
                oy,
                &self.w,
                &self.bias,
                self.slope.as_deref(),
                geometry,
            );
            apply_cap(o, self.cap);
        });
        Hwc {
            h: ho,
            w: wo,
            c: self.cout,
        }
    }
}

impl GroupedConv {
    fn run(&self, x: &[f32], n: usize, s: Hwc, out: &mut Vec<f32>, parallel: bool) -> Hwc {
        let (cin_g, cout_g) = (self.cin / self.groups, self.cout / self.groups);
        let mut gathered = vec![0f32; n * s.h * s.w * self.cout];
        let mut part_out = Vec::new();
        let mut shape = s;
        for (ci, part) in self.parts.iter().enumerate() {
            for (g, px) in gathered
                .chunks_exact_mut(self.cout)
                .zip(x.chunks_exact(s.c))
            {
                for (o, v) in g.iter_mut().enumerate() {
                    *v = px[(o / cout_g) * cin_g + ci];
                }
            }
            let inner = Hwc { c: self.cout, ..s };
            if ci == 0 {
                shape = part.run(&gathered, n, inner, out, parallel);
            } else {
                part.run(&gathered, n, inner, &mut part_out, parallel);
                let len = n * shape.h * shape.w * shape.c;
                for (o, p) in out[..len].iter_mut().zip(&part_out[..len]) {
                    *o += p;
                }
            }
        }
        if let Some(a) = &self.slope {
            let len = n * shape.h * shape.w * shape.c;
            for row in out[..len].chunks_exact_mut(self.cout) {
                for (v, a) in row.iter_mut().zip(a) {
                    *v = v.max(0.0) + a * v.min(0.0);
                }
            }
        }
        apply_cap(&mut out[..n * shape.h * shape.w * shape.c], self.cap);
        shape
    }
}

impl Spatial {
    fn run(&self, x: &[f32], n: usize, s: Hwc, out: &mut Vec<f32>, parallel: bool) -> Hwc {
        match self {
            Spatial::Window(w) => w.run(x, n, s, out, parallel),
            Spatial::Grouped(g) => g.run(x, n, s, out, parallel),
        }
    }
}

impl Pointwise {
    /// `out = epilogue(x @ w)` over `m` rows, or `out = residual + bias + x @ w`.
    fn run(
        &self,
        x: &[f32],
        m: usize,
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
        parallel: bool,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let out = sized(out, m * cout);
        let tile = tile_rows(m, parallel);
        each_chunk(parallel, out, tile * cout, |t, o| {
            let rows = o.len() / cout;
            let r0 = t * tile;
            let xin = &x[r0 * cin..(r0 + rows) * cin];
            if let Some(res) = residual {
                simd::add_bias(o, &res[r0 * cout..(r0 + rows) * cout], &self.bias);
            }
            // SAFETY: `o` is `rows x cout`, `xin` is `rows x cin` and `w` is
            // `cin x cout`, all row-major and in bounds.
            unsafe {
                gemm::gemm(
                    rows,
                    cout,
                    cin,
                    o.as_mut_ptr(),
                    1,
                    cout as isize,
                    residual.is_some(),
                    xin.as_ptr(),
                    1,
                    cin as isize,
                    self.w.as_ptr(),
                    1,
                    cout as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            if residual.is_none() {
                simd::bias_prelu(o, &self.bias, self.slope.as_deref());
                apply_cap(o, self.cap);
            }
        });
    }
}

impl CpuEngine {
    fn workspace(&self) -> Workspace {
        self.workspaces
            .lock()
            .ok()
            .and_then(|mut w| w.pop())
            .unwrap_or_default()
    }

    fn give_back(&self, ws: Workspace) {
        if let Ok(mut w) = self.workspaces.lock() {
            w.push(ws);
        }
    }

    /// Raw embeddings of `n` images given as NCHW RGB `0..=255`; `times`, when given,
    /// receives the wall time of each layer kind.
    ///
    /// With at least as many images as threads, each image runs the whole network on one
    /// thread: its activations stay in that core's cache (a whole batch's would not) and
    /// the threads never wait on each other. Otherwise every layer is split across threads.
    pub fn forward(&self, input: &[f32], n: usize, times: Option<&mut LayerTimes>) -> Vec<f32> {
        let threads = rayon::current_num_threads();
        if n == 1 || n < threads {
            return self.run(input, n, threads > 1, times);
        }
        let per_image = 3 * self.input_hw[0] * self.input_hw[1];
        let emb = self.head.cout;
        let mut out = vec![0f32; n * emb];
        let start = Instant::now();
        let busy: Mutex<LayerTimes> = Mutex::new(LayerTimes::new());
        let timed = times.is_some();
        out.par_chunks_mut(emb)
            .zip(input.par_chunks(per_image))
            .for_each(|(o, x)| {
                let mut mine = LayerTimes::new();
                let y = self.run(x, 1, false, timed.then_some(&mut mine));
                o.copy_from_slice(&y);
                if timed {
                    if let Ok(mut b) = busy.lock() {
                        for (k, d) in mine {
                            *b.entry(k).or_default() += d;
                        }
                    }
                }
            });
        if let (Some(t), Ok(busy)) = (times, busy.into_inner()) {
            // Threads overlap, so each kind gets its share of the wall time.
            let wall = start.elapsed();
            let total: Duration = busy.values().sum();
            for (k, d) in busy {
                let share = d.as_secs_f64() / total.as_secs_f64().max(f64::MIN_POSITIVE);
                *t.entry(k).or_default() += wall.mul_f64(share);
            }
        }
        out
    }

    /// The network on `n` images, splitting each layer across threads when `parallel`.
    fn run(
        &self,
        input: &[f32],
        n: usize,
        parallel: bool,
        mut times: Option<&mut LayerTimes>,
    ) -> Vec<f32> {
        let [h, w] = self.input_hw;
        let mut ws = self.workspace();
        let mut clock = Instant::now();
        let mut lap = |kind: LayerKind, times: &mut Option<&mut LayerTimes>| {
            if let Some(t) = times.as_deref_mut() {
                let now = Instant::now();
                *t.entry(kind).or_default() += now - clock;
                clock = now;
            }
        };

        // NCHW pixels to normalised NHWC.
        let plane = h * w;
        let (mean, scale) = (self.mean, self.scale);
        each_chunk(parallel, sized(&mut ws.y, n * plane * 3), w * 3, |r, o| {
            let (img, y) = (r / h, r % h);
            let base = img * 3 * plane + y * w;
            for (x, px) in o.chunks_exact_mut(3).enumerate() {
                for c in 0..3 {
                    px[c] = (input[base + c * plane + x] - mean[c]) * scale[c];
                }
            }
        });
        let s = Hwc { h, w, c: 3 };
        let s = self.stem.run(&ws.y, n, s, &mut ws.x, parallel);
        lap(LayerKind::Stem, &mut times);
        let mut s = s;
        if let Some(dw) = &self.stem_dw {
            s = dw.run(&ws.x, n, s, &mut ws.y, parallel);
            std::mem::swap(&mut ws.x, &mut ws.y);
            lap(LayerKind::Depthwise, &mut times);
        }
        if let Some(pw) = &self.stem_pw {
            pw.run(&ws.x, n * s.h * s.w, None, &mut ws.y, parallel);
            std::mem::swap(&mut ws.x, &mut ws.y);
            s = Hwc { c: pw.cout, ..s };
            lap(LayerKind::Pointwise, &mut times);
        }

        for b in &self.blocks {
            let m = n * s.h * s.w;
            b.expand.run(&ws.x, m, None, &mut ws.e, parallel);
            lap(LayerKind::Pointwise, &mut times);
            let e = Hwc {
                c: b.expand.cout,
                ..s
            };
            let d = b.depthwise.run(&ws.e, n, e, &mut ws.d, parallel);
            lap(LayerKind::Depthwise, &mut times);
            let m = n * d.h * d.w;
            let residual = b.residual.then_some(&ws.x[..m * b.project.cout]);
            b.project.run(&ws.d, m, residual, &mut ws.y, parallel);
            std::mem::swap(&mut ws.x, &mut ws.y);
            lap(LayerKind::Pointwise, &mut times);
            s = Hwc {
                c: b.project.cout,
                ..d
            };
        }

        let m = n * s.h * s.w;
        self.last.run(&ws.x, m, None, &mut ws.e, parallel);
        lap(LayerKind::Pointwise, &mut times);
        let s = Hwc {
            c: self.last.cout,
            ..s
        };
        // Each image's pooled map, `h * w * c` values in NHWC order, is one row of the
        // embedding layer's input.
        let g = match &self.pool {
            Pool::GdConv(conv) => conv.run(&ws.e, n, s, &mut ws.d, parallel),
            Pool::Reduce(conv) => {
                conv.run(&ws.e, n * s.h * s.w, None, &mut ws.d, parallel);
                Hwc { c: conv.cout, ..s }
            }
        };
        lap(LayerKind::GdConv, &mut times);
        let mut out = Vec::new();
        self.head.run(&ws.d, n, None, &mut out, parallel);
        out.truncate(n * self.head.cout);
        lap(LayerKind::Head, &mut times);
        debug_assert_eq!(g.h * g.w * g.c, self.head.cin);
        self.give_back(ws);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Deterministic values in about -1..1.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn nchw(v: &[f32], shape: [usize; 4]) -> Tensor {
        Tensor::from_slice(v, shape.as_slice(), &Device::Cpu).unwrap()
    }

    fn to_nhwc(t: &Tensor) -> Vec<f32> {
        t.permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// candle's conv plus bias and PReLU: the reference.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        bias: &[f32],
        slope: Option<&[f32]>,
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Tensor {
        let c = bias.len();
        let y = x
            .conv2d(w, pad, stride, 1, groups)
            .unwrap()
            .broadcast_add(&nchw(bias, [1, c, 1, 1]))
            .unwrap();
        match slope {
            None => y,
            Some(a) => {
                let a = nchw(a, [1, c, 1, 1]);
                let zeros = y.zeros_like().unwrap();
                (y.maximum(&zeros).unwrap() + y.minimum(&zeros).unwrap().broadcast_mul(&a).unwrap())
                    .unwrap()
            }
        }
    }

    fn assert_close(got: &[f32], want: &Tensor, what: &str) {
        let want = to_nhwc(want);
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{what}: max diff {diff} (scale {scale})"
        );
    }

    #[test]
    fn dense_conv_matches_candle() {
        for (n, cin, cout, h, w, k, stride, pad) in [
            (3, 3, 64, 13, 11, 3, 2, 1),
            (2, 5, 70, 9, 8, 3, 1, 1),
            (1, 2, 130, 7, 7, 3, 2, 0),
        ] {
            let x = values(n * cin * h * w, 1);
            let wt = values(cout * cin * k * k, 2);
            let bias = values(cout, 3);
            let slope = values(cout, 4);
            let xt = nchw(&x, [n, cin, h, w]);
            let wtt = nchw(&wt, [cout, cin, k, k]);
            let mut hwio = vec![0f32; wt.len()];
            for o in 0..cout {
                for i in 0..cin {
                    for t in 0..k * k {
                        hwio[(t * cin + i) * cout + o] = wt[(o * cin + i) * k * k + t];
                    }
                }
            }
            let conv = WindowConv {
                w: hwio,
                bias: bias.clone(),
                slope: Some(slope.clone()),
                cap: None,
                cin,
                cout,
                kernel: [k, k],
                stride,
                pad: [pad, pad],
                depthwise: false,
            };
            let mut out = Vec::new();
            for parallel in [false, true] {
                let shape = conv.run(&to_nhwc(&xt), n, Hwc { h, w, c: cin }, &mut out, parallel);
                let want = reference(&xt, &wtt, &bias, Some(&slope), stride, pad, 1);
                assert_eq!(
                    [n, shape.c, shape.h, shape.w],
                    [
                        want.dims()[0],
                        want.dims()[1],
                        want.dims()[2],
                        want.dims()[3]
                    ]
                );
                assert_close(&out[..want.elem_count()], &want, "dense");
            }
        }
    }

    #[test]
    fn depthwise_conv_matches_candle() {
        for (n, c, h, w, k, stride, pad, prelu) in [
            (2, 70, 9, 7, 3, 1, 1, true),
            (3, 64, 11, 13, 3, 2, 1, true),
            (2, 128, 8, 8, 3, 2, 1, false),
            (2, 512, 7, 7, 7, 1, 0, false),
            (1, 5, 1, 1, 3, 1, 1, true),
        ] {
            let x = values(n * c * h * w, 5);
            let wt = values(c * k * k, 6);
            let bias = values(c, 7);
            let slope = values(c, 8);
            let xt = nchw(&x, [n, c, h, w]);
            let wtt = nchw(&wt, [c, 1, k, k]);
            let mut hwc = vec![0f32; wt.len()];
            for ch in 0..c {
                for t in 0..k * k {
                    hwc[t * c + ch] = wt[ch * k * k + t];
                }
            }
            let conv = WindowConv {
                w: hwc,
                bias: bias.clone(),
                slope: prelu.then(|| slope.clone()),
                cap: None,
                cin: c,
                cout: c,
                kernel: [k, k],
                stride,
                pad: [pad, pad],
                depthwise: true,
            };
            let want = reference(
                &xt,
                &wtt,
                &bias,
                prelu.then_some(&slope[..]),
                stride,
                pad,
                c,
            );
            let mut out = Vec::new();
            for parallel in [false, true] {
                conv.run(&to_nhwc(&xt), n, Hwc { h, w, c }, &mut out, parallel);
                assert_close(&out[..want.elem_count()], &want, "depthwise");
            }
        }
    }

    #[test]
    fn pointwise_matches_candle_with_and_without_residual() {
        let (n, cin, cout, h, w) = (3, 37, 70, 5, 7);
        let x = values(n * cin * h * w, 9);
        let wt = values(cout * cin, 10);
        let bias = values(cout, 11);
        let slope = values(cout, 12);
        let res = values(n * cout * h * w, 13);
        let xt = nchw(&x, [n, cin, h, w]);
        let wtt = nchw(&wt, [cout, cin, 1, 1]);
        let mut io = vec![0f32; wt.len()];
        for o in 0..cout {
            for i in 0..cin {
                io[i * cout + o] = wt[o * cin + i];
            }
        }
        let layer = |slope: Option<Vec<f32>>| Pointwise {
            w: io.clone(),
            bias: bias.clone(),
            slope,
            cap: None,
            cin,
            cout,
        };
        let m = n * h * w;
        let mut out = Vec::new();
        for parallel in [false, true] {
            layer(Some(slope.clone())).run(&to_nhwc(&xt), m, None, &mut out, parallel);
            let want = reference(&xt, &wtt, &bias, Some(&slope), 1, 0, 1);
            assert_close(&out[..m * cout], &want, "pointwise + prelu");

            let rt = nchw(&res, [n, cout, h, w]);
            layer(None).run(&to_nhwc(&xt), m, Some(&to_nhwc(&rt)), &mut out, parallel);
            let want = (reference(&xt, &wtt, &bias, None, 1, 0, 1) + &rt).unwrap();
            assert_close(&out[..m * cout], &want, "pointwise + residual");
        }
    }
}
