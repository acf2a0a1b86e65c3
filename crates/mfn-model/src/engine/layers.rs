//! The engine's layers, each computed directly in NHWC with folded BatchNorm.

use super::{each_chunk, fp32, int8, out_dim, sized, tile_rows, Hwc};

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

/// A grouped conv that is neither dense nor depthwise (e.g. 2 channels per group). Its
/// weights are split per input channel of a group, as depthwise convs over all output
/// channels: that is the layout both the direct two-channel kernel and the general
/// gather-and-sum path want.
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
    /// `[cin][cout]`, packed for the running CPU's kernel.
    pub w: fp32::Weights,
    pub bias: Vec<f32>,
    pub slope: Option<Vec<f32>>,
    pub cap: Option<f32>,
    pub cin: usize,
    pub cout: usize,
    /// The int8 product that replaces the f32 one, when quantised.
    pub int8: Option<Int8Product>,
}

/// A pointwise layer's int8 product. Input channel `c` is brought to its calibrated grid
/// `u = x / in_scale[c] + zero[c]` (the scales folded into the weights `q`), and each row
/// is quantised over its own span, `u ≈ low + step * a` (see `super::quantize`), so that
/// `y = w_scale * (step * acc + low * sum_c q[c] - sum_c zero[c] * q[c]) + bias`, with
/// `acc` the exact i32 product of `a` and `q`.
#[derive(Clone, Debug)]
pub(crate) struct Int8Product {
    pub w: int8::QWeights,
    /// Per output channel: the weight scale.
    pub scale: Vec<f32>,
    /// Per output channel: `bias - w_scale * sum_c zero[c] * q[c]`.
    pub offset: Vec<f32>,
    /// Per output channel: `w_scale * sum_c q[c]`.
    pub low_weight: Vec<f32>,
    /// Per input channel.
    pub inv_in_scale: Vec<f32>,
    /// Per input channel, as f32 for the rounding.
    pub zero: Vec<f32>,
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

impl WindowConv {
    /// The conv over `n` images of shape `s`, on the best kernels the CPU has.
    pub(super) fn run(
        &self,
        x: &[f32],
        n: usize,
        s: Hwc,
        out: &mut Vec<f32>,
        parallel: bool,
    ) -> Hwc {
        self.run_on(fp32::Isa::best(), x, n, s, out, parallel)
    }

    /// [`Self::run`] on the kernels of `isa`, which the tests choose to cover every path.
    pub(super) fn run_on(
        &self,
        isa: fp32::Isa,
        x: &[f32],
        n: usize,
        s: Hwc,
        out: &mut Vec<f32>,
        parallel: bool,
    ) -> Hwc {
        debug_assert_eq!(s.c, self.cin);
        let [kh, kw] = self.kernel;
        let ho = out_dim(s.h, kh, self.stride, self.pad[0]);
        let wo = out_dim(s.w, kw, self.stride, self.pad[1]);
        let row = wo * self.cout;
        let out = sized(out, n * ho * row);
        let geometry = (kh, kw, self.stride, self.pad[0], self.pad[1]);
        let plane = s.h * s.w * s.c;
        let kernel = if self.depthwise {
            fp32::depthwise_row
        } else {
            fp32::dense_row
        };
        let act = fp32::Act {
            slope: self.slope.as_deref(),
            cap: self.cap,
        };
        each_chunk(parallel, out, row, |r, o| {
            let (img, oy) = (r / ho, r % ho);
            kernel(
                isa,
                o,
                &x[img * plane..(img + 1) * plane],
                (s.h, s.w, s.c),
                oy,
                &self.w,
                &self.bias,
                act,
                geometry,
            );
        });
        Hwc {
            h: ho,
            w: wo,
            c: self.cout,
        }
    }
}

impl GroupedConv {
    /// The conv over `n` images of shape `s`, on the best kernels the CPU has.
    pub(super) fn run(
        &self,
        x: &[f32],
        n: usize,
        s: Hwc,
        out: &mut Vec<f32>,
        parallel: bool,
    ) -> Hwc {
        self.run_on(fp32::Isa::best(), x, n, s, out, parallel)
    }

    /// [`Self::run`] on the kernels of `isa`. Two channels per group in and out (as in
    /// insightface's `mbf`) run directly on the input, row by row like a depthwise conv;
    /// other groupings gather a copy of the input per input channel of a group.
    pub(super) fn run_on(
        &self,
        isa: fp32::Isa,
        x: &[f32],
        n: usize,
        s: Hwc,
        out: &mut Vec<f32>,
        parallel: bool,
    ) -> Hwc {
        let (cin_g, cout_g) = (self.cin / self.groups, self.cout / self.groups);
        if cin_g == 2 && cout_g == 2 && self.parts.len() == 2 {
            let p = &self.parts[0];
            let [kh, kw] = p.kernel;
            let ho = out_dim(s.h, kh, p.stride, p.pad[0]);
            let wo = out_dim(s.w, kw, p.stride, p.pad[1]);
            let row = wo * self.cout;
            let out = sized(out, n * ho * row);
            let geometry = (kh, kw, p.stride, p.pad[0], p.pad[1]);
            let plane = s.h * s.w * s.c;
            let act = fp32::Act {
                slope: self.slope.as_deref(),
                cap: self.cap,
            };
            let weights = (&p.w[..], &self.parts[1].w[..]);
            each_chunk(parallel, out, row, |r, o| {
                let (img, oy) = (r / ho, r % ho);
                fp32::grouped2_row(
                    isa,
                    o,
                    &x[img * plane..(img + 1) * plane],
                    (s.h, s.w, s.c),
                    oy,
                    weights,
                    &p.bias,
                    act,
                    geometry,
                );
            });
            return Hwc {
                h: ho,
                w: wo,
                c: self.cout,
            };
        }
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
                shape = part.run_on(isa, &gathered, n, inner, out, parallel);
            } else {
                part.run_on(isa, &gathered, n, inner, &mut part_out, parallel);
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
    pub(super) fn run(
        &self,
        x: &[f32],
        n: usize,
        s: Hwc,
        out: &mut Vec<f32>,
        parallel: bool,
    ) -> Hwc {
        match self {
            Spatial::Window(w) => w.run(x, n, s, out, parallel),
            Spatial::Grouped(g) => g.run(x, n, s, out, parallel),
        }
    }
}

impl Pointwise {
    /// A layer from `[cin][cout]` weights, packed for this CPU's kernel.
    pub fn new(
        w: Vec<f32>,
        bias: Vec<f32>,
        slope: Option<Vec<f32>>,
        cap: Option<f32>,
        cin: usize,
        cout: usize,
    ) -> Self {
        Self {
            w: fp32::Weights::new(w, cin, cout),
            bias,
            slope,
            cap,
            cin,
            cout,
            int8: None,
        }
    }

    /// The layer with its product in int8: `q` is `[cin][cout]` in `-127..=127` with the
    /// input channels' scales folded in, one `w_scale` per output channel, and input channel
    /// `c` is quantised with `in_scale[c]` and `zero[c]`.
    pub fn with_int8(mut self, q: Vec<i8>, w_scale: &[f32], in_scale: &[f32], zero: &[u8]) -> Self {
        let (cin, cout) = (self.cin, self.cout);
        debug_assert_eq!(q.len(), cin * cout);
        let (mut zero_sum, mut weight_sum) = (vec![0i64; cout], vec![0i64; cout]);
        for (row, &z) in q.chunks_exact(cout).zip(zero) {
            for ((acc, sum), &w) in zero_sum.iter_mut().zip(&mut weight_sum).zip(row) {
                *acc += z as i64 * w as i64;
                *sum += w as i64;
            }
        }
        let offset = self
            .bias
            .iter()
            .zip(w_scale)
            .zip(&zero_sum)
            .map(|((b, s), &sum)| b - (sum as f64 * *s as f64) as f32)
            .collect();
        let low_weight = w_scale
            .iter()
            .zip(&weight_sum)
            .map(|(s, &sum)| (sum as f64 * *s as f64) as f32)
            .collect();
        self.int8 = Some(Int8Product {
            w: int8::QWeights::new(&q, cin, cout),
            scale: w_scale.to_vec(),
            offset,
            low_weight,
            inv_in_scale: in_scale.iter().map(|s| 1.0 / s).collect(),
            zero: zero.iter().map(|&z| z as f32).collect(),
        });
        self
    }

    /// `out = epilogue(x @ w)` over `m` rows, or `out = residual + bias + x @ w`; `q` is
    /// scratch for the quantised input of an int8 product.
    pub(crate) fn run(
        &self,
        x: &[f32],
        m: usize,
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
        q: &mut Vec<u8>,
        parallel: bool,
    ) {
        if let Some(p) = &self.int8 {
            return self.run_int8(p, x, m, residual, out, q, parallel);
        }
        let (cin, cout) = (self.cin, self.cout);
        debug_assert_eq!(self.w.k(), cin);
        let out = sized(out, m * cout);
        let tile = tile_rows(m, parallel);
        each_chunk(parallel, out, tile * cout, |t, o| {
            let rows = o.len() / cout;
            let r0 = t * tile;
            let ep = fp32::Epilogue {
                bias: &self.bias,
                slope: self.slope.as_deref(),
                cap: self.cap,
                residual: residual.map(|res| &res[r0 * cout..(r0 + rows) * cout]),
            };
            fp32::matmul(o, &x[r0 * cin..(r0 + rows) * cin], rows, &self.w, ep);
        });
    }

    /// [`Self::run`] in int8: each tile of rows is quantised and multiplied by the same
    /// task, so the u8 rows are still in cache for the product.
    #[allow(clippy::too_many_arguments)]
    fn run_int8(
        &self,
        p: &Int8Product,
        x: &[f32],
        m: usize,
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
        q: &mut Vec<u8>,
        parallel: bool,
    ) {
        let (cin, cout, ks) = (self.cin, self.cout, p.w.k_stride());
        let out = sized(out, m * cout);
        if q.len() < m * ks {
            q.resize(m * ks, 0);
        }
        let q = &mut q[..m * ks];
        let tile = tile_rows(m, parallel);
        let task = |t: usize, (o, qt): (&mut [f32], &mut [u8])| {
            let rows = o.len() / cout;
            let r0 = t * tile;
            // One allocation per tile: each row's step and low end, and the quantiser's row
            // of grid values.
            let mut scratch = vec![0f32; 2 * rows + cin];
            let (step, rest) = scratch.split_at_mut(rows);
            let (low, grid) = rest.split_at_mut(rows);
            super::quantize::quantize_rows(
                qt,
                step,
                low,
                grid,
                &x[r0 * cin..(r0 + rows) * cin],
                rows,
                cin,
                ks,
                &p.inv_in_scale,
                &p.zero,
            );
            let ep = int8::QEpilogue {
                scale: &p.scale,
                offset: &p.offset,
                low_weight: &p.low_weight,
                row_step: step,
                row_low: low,
                slope: self.slope.as_deref(),
                cap: self.cap,
                residual: residual.map(|res| &res[r0 * cout..(r0 + rows) * cout]),
            };
            int8::matmul(o, qt, rows, &p.w, ep);
        };
        if parallel {
            use rayon::prelude::*;
            out.par_chunks_mut(tile * cout)
                .zip(q.par_chunks_mut(tile * ks))
                .enumerate()
                .for_each(|(t, piece)| task(t, piece));
        } else {
            out.chunks_mut(tile * cout)
                .zip(q.chunks_mut(tile * ks))
                .enumerate()
                .for_each(|(t, piece)| task(t, piece));
        }
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
            for (isa, parallel) in paths() {
                let shape = conv.run_on(
                    isa,
                    &to_nhwc(&xt),
                    n,
                    Hwc { h, w, c: cin },
                    &mut out,
                    parallel,
                );
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
            for (isa, parallel) in paths() {
                conv.run_on(isa, &to_nhwc(&xt), n, Hwc { h, w, c }, &mut out, parallel);
                assert_close(&out[..want.elem_count()], &want, "depthwise");
            }
        }
    }

    /// Every kernel set the CPU has, each on one thread and split across the pool.
    fn paths() -> Vec<(fp32::Isa, bool)> {
        fp32::Isa::available()
            .into_iter()
            .flat_map(|isa| [(isa, false), (isa, true)])
            .collect()
    }

    /// Grouped convs on every path, direct and gathered, against candle's.
    #[test]
    fn grouped_conv_matches_candle() {
        // Two channels per group take the direct kernel, four the gather-and-sum path.
        for (n, c, per_group, h, w, stride, cap) in [
            (2, 64, 2, 9, 11, 1, None),
            (1, 128, 2, 14, 14, 1, Some(0.5)),
            (3, 36, 2, 7, 8, 2, None),
            (2, 32, 4, 6, 7, 1, Some(0.5)),
        ] {
            let (k, pad, groups) = (3, 1, c / per_group);
            let x = values(n * c * h * w, 14);
            let wt = values(c * per_group * k * k, 15);
            let bias = values(c, 16);
            let slope = values(c, 17);
            let xt = nchw(&x, [n, c, h, w]);
            let wtt = nchw(&wt, [c, per_group, k, k]);
            let parts = (0..per_group)
                .map(|ci| {
                    let mut hwc = vec![0f32; k * k * c];
                    for o in 0..c {
                        for t in 0..k * k {
                            hwc[t * c + o] = wt[(o * per_group + ci) * k * k + t];
                        }
                    }
                    WindowConv {
                        w: hwc,
                        bias: if ci == 0 { bias.clone() } else { vec![0.0; c] },
                        slope: None,
                        cap: None,
                        cin: c,
                        cout: c,
                        kernel: [k, k],
                        stride,
                        pad: [pad, pad],
                        depthwise: true,
                    }
                })
                .collect();
            let conv = GroupedConv {
                parts,
                slope: Some(slope.clone()),
                cap,
                cin: c,
                cout: c,
                groups,
            };
            let mut want = reference(&xt, &wtt, &bias, Some(&slope), stride, pad, groups);
            if let Some(cap) = cap {
                want = want.clamp(f32::MIN, cap).unwrap();
            }
            let mut out = Vec::new();
            for (isa, parallel) in paths() {
                conv.run_on(isa, &to_nhwc(&xt), n, Hwc { h, w, c }, &mut out, parallel);
                assert_close(&out[..want.elem_count()], &want, "grouped");
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
        let layer = |slope: Option<Vec<f32>>| {
            Pointwise::new(io.clone(), bias.clone(), slope, None, cin, cout)
        };
        let m = n * h * w;
        let mut out = Vec::new();
        for parallel in [false, true] {
            layer(Some(slope.clone())).run(
                &to_nhwc(&xt),
                m,
                None,
                &mut out,
                &mut Vec::new(),
                parallel,
            );
            let want = reference(&xt, &wtt, &bias, Some(&slope), 1, 0, 1);
            assert_close(&out[..m * cout], &want, "pointwise + prelu");

            let rt = nchw(&res, [n, cout, h, w]);
            layer(None).run(
                &to_nhwc(&xt),
                m,
                Some(&to_nhwc(&rt)),
                &mut out,
                &mut Vec::new(),
                parallel,
            );
            let want = (reference(&xt, &wtt, &bias, None, 1, 0, 1) + &rt).unwrap();
            assert_close(&out[..m * cout], &want, "pointwise + residual");
        }
    }
}
