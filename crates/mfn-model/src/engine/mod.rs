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

mod fp32;
mod int8;
mod layers;
mod quantize;

pub(crate) use layers::{Block, GroupedConv, Pointwise, Pool, Spatial, WindowConv};

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
    /// Quantised input rows of int8 products.
    q: Vec<u8>,
}

/// What calibration is shown: each matrix product's number and input.
type Observer<'a> = &'a mut dyn FnMut(usize, &[f32]);

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
    let rows = m.div_ceil(threads * 2).clamp(8, 256);
    // Whole microkernel tiles, but for the smallest maps, which are better balanced.
    if rows >= 4 * fp32::MR {
        rows.next_multiple_of(fp32::MR)
    } else {
        rows
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
        self.run_observed(input, n, parallel, times.take(), None)
    }

    /// The network on `n` images (as [`Self::forward`] takes them) that shows `observe`
    /// the input of every matrix product, numbered in the order they run (see
    /// [`crate::quant::product_layers`]): how calibration measures activation ranges.
    pub fn observe(&self, input: &[f32], n: usize, observe: &mut dyn FnMut(usize, &[f32])) {
        let parallel = rayon::current_num_threads() > 1;
        self.run_observed(input, n, parallel, None, Some(observe));
    }

    /// The matrix products in the order they run (see [`crate::quant::product_layers`]).
    pub fn products(&self) -> Vec<&Pointwise> {
        let mut out: Vec<&Pointwise> = self.stem_pw.iter().collect();
        for b in &self.blocks {
            out.push(&b.expand);
            out.push(&b.project);
        }
        out.push(&self.last);
        if let Pool::Reduce(p) = &self.pool {
            out.push(p);
        }
        out.push(&self.head);
        out
    }

    fn run_observed(
        &self,
        input: &[f32],
        n: usize,
        parallel: bool,
        mut times: Option<&mut LayerTimes>,
        mut observe: Option<Observer<'_>>,
    ) -> Vec<f32> {
        let mut product = 0;
        let mut seen = |x: &[f32]| {
            if let Some(f) = observe.as_deref_mut() {
                f(product, x);
            }
            product += 1;
        };
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
            seen(&ws.x[..n * s.h * s.w * s.c]);
            pw.run(&ws.x, n * s.h * s.w, None, &mut ws.y, &mut ws.q, parallel);
            std::mem::swap(&mut ws.x, &mut ws.y);
            s = Hwc { c: pw.cout, ..s };
            lap(LayerKind::Pointwise, &mut times);
        }

        for b in &self.blocks {
            let m = n * s.h * s.w;
            seen(&ws.x[..m * s.c]);
            b.expand.run(&ws.x, m, None, &mut ws.e, &mut ws.q, parallel);
            lap(LayerKind::Pointwise, &mut times);
            let e = Hwc {
                c: b.expand.cout,
                ..s
            };
            let d = b.depthwise.run(&ws.e, n, e, &mut ws.d, parallel);
            lap(LayerKind::Depthwise, &mut times);
            let m = n * d.h * d.w;
            seen(&ws.d[..m * d.c]);
            let residual = b.residual.then_some(&ws.x[..m * b.project.cout]);
            b.project
                .run(&ws.d, m, residual, &mut ws.y, &mut ws.q, parallel);
            std::mem::swap(&mut ws.x, &mut ws.y);
            lap(LayerKind::Pointwise, &mut times);
            s = Hwc {
                c: b.project.cout,
                ..d
            };
        }

        let m = n * s.h * s.w;
        seen(&ws.x[..m * s.c]);
        self.last
            .run(&ws.x, m, None, &mut ws.e, &mut ws.q, parallel);
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
                seen(&ws.e[..n * s.h * s.w * s.c]);
                conv.run(&ws.e, n * s.h * s.w, None, &mut ws.d, &mut ws.q, parallel);
                Hwc { c: conv.cout, ..s }
            }
        };
        lap(LayerKind::GdConv, &mut times);
        seen(&ws.d[..n * self.head.cin]);
        let mut out = Vec::new();
        self.head.run(&ws.d, n, None, &mut out, &mut ws.q, parallel);
        out.truncate(n * self.head.cout);
        lap(LayerKind::Head, &mut times);
        debug_assert_eq!(g.h * g.w * g.c, self.head.cin);
        self.give_back(ws);
        out
    }
}
