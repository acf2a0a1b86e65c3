//! CPU kernels for the convs candle runs slowly: a 1x1 conv as one matrix product, and
//! any other dense conv as im2col and a matrix product, tile by tile.
//!
//! candle's 1x1 conv copies its input element by element into a new buffer, multiplies,
//! then copies the product out again, and its other convs build their im2col matrix one
//! element at a time; the bias and ReLU each take a further pass. Here each product
//! writes straight into the output, which starts as the bias, and the ReLU runs on each
//! tile right after its product, while the tile is still in cache. A dense conv's
//! im2col matrix is built for a few output rows at a time, small enough to stay in L2,
//! and whole rows of it are copied at once.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// A 1x1, stride-1, unpadded conv with bias and an optional ReLU on NCHW `f32`:
/// `out[n] = relu(W x[n] + b)`, with `x[n]` the `cin x (h*w)` matrix of image `n`.
#[derive(Clone, Debug)]
pub(super) struct Pointwise {
    /// `[cout][cin]`, row-major.
    pub weight: Arc<Vec<f32>>,
    /// One bias per output channel.
    pub bias: Arc<Vec<f32>>,
    /// Clamp negatives to zero after the bias.
    pub relu: bool,
    pub cin: usize,
    pub cout: usize,
}

/// The output pointer, shared by tasks that each write their own columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint column ranges of the buffer, which outlives them all.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer `offset` values in. A method, so that closures capture the whole
    /// `Out` (which is `Sync`) rather than its raw pointer field.
    ///
    /// # Safety
    /// `offset` must lie inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// An NCHW output of `n` images, each channel's plane of `plane` values set to its bias,
/// written once (no zeroing pass first).
fn biased(bias: &[f32], n: usize, plane: usize) -> Vec<f32> {
    let mut dst = Vec::with_capacity(n * bias.len() * plane);
    for _ in 0..n {
        for b in bias {
            dst.extend(std::iter::repeat_n(*b, plane));
        }
    }
    dst
}

impl Pointwise {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// Columns per task: enough tasks to keep every thread busy, each wide enough for the
    /// product's micro-kernels and small enough that its output tile stays in L2.
    fn tile(&self, hw: usize) -> usize {
        let threads = rayon::current_num_threads().max(1);
        let by_threads = hw.div_ceil(threads * 4);
        let by_cache = (64 * 1024 / self.cout.max(1)).max(64);
        by_threads
            .min(by_cache)
            .clamp(64, 4096)
            .next_multiple_of(16)
    }
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        "scrfd-pointwise-conv"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.cin
            || self.weight.len() != self.cin * self.cout
            || self.bias.len() != self.cout
        {
            candle_core::bail!(
                "1x1 conv: input has {c} channels, weights are {}x{}",
                self.cout,
                self.cin
            );
        }
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((a, b))) => &data[a..b],
            (CpuStorage::F32(_), None) => candle_core::bail!("1x1 conv: input must be contiguous"),
            _ => candle_core::bail!("1x1 conv: only f32 is supported"),
        };
        let (cin, cout, hw) = (self.cin, self.cout, h * w);
        // Each output row starts as its channel's bias; the product accumulates onto it.
        let mut dst = biased(&self.bias, n, hw);
        if dst.is_empty() {
            return Ok((CpuStorage::F32(dst), Shape::from((n, cout, h, w))));
        }
        let tile = self.tile(hw);
        let tiles = hw.div_ceil(tile);
        let out = Out(dst.as_mut_ptr());
        (0..n * tiles).into_par_iter().for_each(|t| {
            let (img, j0) = (t / tiles, (t % tiles) * tile);
            let cols = tile.min(hw - j0);
            let x = &src[img * cin * hw..(img + 1) * cin * hw];
            // SAFETY: `out` points to `n * cout * hw` values; this task reads and writes
            // columns `j0..j0 + cols` of image `img`'s `cout x hw` block only, which no
            // other task touches. `x` is `cin x hw` and the weights `cout x cin`, both
            // row-major and in bounds.
            unsafe {
                let o = out.at(img * cout * hw + j0);
                gemm::gemm(
                    cout,
                    cols,
                    cin,
                    o,
                    1,
                    hw as isize,
                    true,
                    self.weight.as_ptr(),
                    1,
                    cin as isize,
                    x.as_ptr().add(j0),
                    1,
                    hw as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                if self.relu {
                    for co in 0..cout {
                        let row = std::slice::from_raw_parts_mut(o.add(co * hw), cols);
                        row.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((n, cout, h, w))))
    }
}

/// A dense (`groups == 1`) conv of any kernel, stride and padding, with bias and an
/// optional ReLU, on NCHW `f32`.
#[derive(Clone, Debug)]
pub(super) struct Dense {
    /// `[cout][cin][kh][kw]`, row-major: row `co` of the product's left matrix.
    pub weight: Arc<Vec<f32>>,
    /// One bias per output channel.
    pub bias: Arc<Vec<f32>>,
    /// Clamp negatives to zero after the bias.
    pub relu: bool,
    pub cin: usize,
    pub cout: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Top, left, bottom, right.
    pub pads: [usize; 4],
}

/// Bytes of im2col matrix per task: most of a core's L2.
const COLUMN_BYTES: usize = 384 * 1024;

impl Dense {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// Output height and width for an `h` x `w` input, `None` when the kernel does not
    /// fit in the padded input.
    pub fn out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let [t, l, b, r] = self.pads;
        let [kh, kw] = self.kernel;
        let hp = (h + t + b).checked_sub(kh)?;
        let wp = (w + l + r).checked_sub(kw)?;
        Some((hp / self.stride[0] + 1, wp / self.stride[1] + 1))
    }

    /// Writes the im2col rows for output rows `oy0..oy0 + rows` of one image: row
    /// `(ci * kh + ky) * kw + kx` holds, for each output pixel, the input value that tap
    /// multiplies (zero in the padding).
    fn im2col(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        ow: usize,
        oy0: usize,
        rows: usize,
        col: &mut [f32],
    ) {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [t, l, _, _] = self.pads;
        let cols = rows * ow;
        for ci in 0..self.cin {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let r = (ci * kh + ky) * kw + kx;
                    let dst = &mut col[r * cols..(r + 1) * cols];
                    // Output columns whose input column `ox * sw + kx - l` is inside.
                    let lo = l.saturating_sub(kx).div_ceil(sw).min(ow);
                    let hi = match (w + l).checked_sub(kx + 1) {
                        Some(reach) => (reach / sw + 1).min(ow),
                        None => 0,
                    }
                    .max(lo);
                    for (i, out) in dst.chunks_exact_mut(ow).enumerate() {
                        let iy = ((oy0 + i) * sh + ky) as isize - t as isize;
                        if iy < 0 || iy >= h as isize || lo == hi {
                            out.fill(0.0);
                            continue;
                        }
                        let row = &plane[iy as usize * w..(iy as usize + 1) * w];
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        let start = lo * sw + kx - l;
                        if sw == 1 {
                            out[lo..hi].copy_from_slice(&row[start..start + (hi - lo)]);
                        } else if sw == 2 && start + 2 * (hi - lo) <= w {
                            // Pairs rather than a stepped iterator: this form vectorises.
                            for (o, pair) in
                                out[lo..hi].iter_mut().zip(row[start..].chunks_exact(2))
                            {
                                *o = pair[0];
                            }
                        } else {
                            for (o, v) in
                                out[lo..hi].iter_mut().zip(row[start..].iter().step_by(sw))
                            {
                                *o = *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        "scrfd-dense-conv"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let [kh, kw] = self.kernel;
        let k = self.cin * kh * kw;
        if c != self.cin || self.weight.len() != self.cout * k || self.bias.len() != self.cout {
            candle_core::bail!(
                "conv: input has {c} channels, weights are {}x{}x{kh}x{kw}",
                self.cout,
                self.cin
            );
        }
        if self.stride.contains(&0) {
            candle_core::bail!("conv: zero stride");
        }
        let Some((oh, ow)) = self.out_hw(h, w) else {
            candle_core::bail!("conv: a {h}x{w} input is smaller than the {kh}x{kw} kernel");
        };
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((a, b))) => &data[a..b],
            (CpuStorage::F32(_), None) => candle_core::bail!("conv: input must be contiguous"),
            _ => candle_core::bail!("conv: only f32 is supported"),
        };
        let cout = self.cout;
        let plane = oh * ow;
        let mut dst = biased(&self.bias, n, plane);
        if dst.is_empty() {
            return Ok((CpuStorage::F32(dst), Shape::from((n, cout, oh, ow))));
        }
        let threads = rayon::current_num_threads().max(1);
        let by_cache = (COLUMN_BYTES / (4 * k * ow).max(1)).max(1);
        let by_threads = (n * oh).div_ceil(threads * 3).max(1);
        let rows = by_cache.min(by_threads).min(oh);
        let tiles = oh.div_ceil(rows);
        let out = Out(dst.as_mut_ptr());
        (0..n * tiles)
            .into_par_iter()
            .for_each_init(Vec::new, |col: &mut Vec<f32>, t| {
                let (img, oy0) = (t / tiles, (t % tiles) * rows);
                let rows = rows.min(oh - oy0);
                let cols = rows * ow;
                if col.len() < k * cols {
                    col.resize(k * cols, 0.0);
                }
                let x = &src[img * c * h * w..(img + 1) * c * h * w];
                self.im2col(x, (h, w), ow, oy0, rows, &mut col[..k * cols]);
                // SAFETY: `out` points to `n * cout * plane` values; this task reads and
                // writes output rows `oy0..oy0 + rows` (columns `oy0 * ow..` of length
                // `cols`) of image `img`, which no other task touches. The weights are
                // `cout x k` and `col` is `k x cols`, both row-major and in bounds.
                unsafe {
                    let o = out.at(img * cout * plane + oy0 * ow);
                    gemm::gemm(
                        cout,
                        cols,
                        k,
                        o,
                        1,
                        plane as isize,
                        true,
                        self.weight.as_ptr(),
                        1,
                        k as isize,
                        col.as_ptr(),
                        1,
                        cols as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    if self.relu {
                        for co in 0..cout {
                            let row = std::slice::from_raw_parts_mut(o.add(co * plane), cols);
                            row.iter_mut().for_each(|v| *v = v.max(0.0));
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dst), Shape::from((n, cout, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.731 + seed).sin() * 1.3).fract())
            .collect()
    }

    #[test]
    fn pointwise_matches_candle() {
        for (n, cin, cout, h, w, relu) in [
            (1, 16, 40, 9, 7, true),
            (2, 3, 5, 1, 1, false),
            (1, 72, 16, 40, 40, false),
            (1, 8, 288, 20, 33, true),
        ] {
            let op = Pointwise {
                weight: Arc::new(values(cout * cin, 1.0)),
                bias: Arc::new(values(cout, 2.0)),
                relu,
                cin,
                cout,
            };
            let x = Tensor::from_vec(values(n * cin * h * w, 3.0), (n, cin, h, w), &Device::Cpu)
                .unwrap();
            let got = op.forward(&x).unwrap();
            let wt = Tensor::from_vec(op.weight.to_vec(), (cout, cin, 1, 1), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(op.bias.to_vec(), (1, cout, 1, 1), &Device::Cpu).unwrap();
            let mut want = x
                .conv2d(&wt, 0, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            if relu {
                want = want.relu().unwrap();
            }
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{n}x{cin}->{cout} {h}x{w}: {diff}");
        }
    }

    #[test]
    fn dense_matches_candle() {
        // (n, cin, cout, h, w, k, stride, pad, relu)
        for (n, cin, cout, h, w, k, s, p, relu) in [
            (1, 3, 16, 32, 32, 3, 2, 1, true),
            (2, 16, 16, 9, 7, 3, 1, 1, false),
            (1, 64, 30, 20, 20, 3, 1, 1, false),
            (1, 4, 5, 11, 13, 3, 2, 1, true),
            (1, 3, 8, 10, 6, 5, 1, 2, false),
            (1, 2, 3, 7, 9, 3, 2, 0, false),
            (1, 2, 3, 1, 1, 3, 1, 1, true),
            (1, 5, 4, 3, 4, 2, 3, 0, false),
        ] {
            let op = Dense {
                weight: Arc::new(values(cout * cin * k * k, 1.0)),
                bias: Arc::new(values(cout, 2.0)),
                relu,
                cin,
                cout,
                kernel: [k, k],
                stride: [s, s],
                pads: [p; 4],
            };
            let x = Tensor::from_vec(values(n * cin * h * w, 3.0), (n, cin, h, w), &Device::Cpu)
                .unwrap();
            let got = op.forward(&x).unwrap();
            let wt = Tensor::from_vec(op.weight.to_vec(), (cout, cin, k, k), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(op.bias.to_vec(), (1, cout, 1, 1), &Device::Cpu).unwrap();
            let mut want = x
                .conv2d(&wt, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            if relu {
                want = want.relu().unwrap();
            }
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{cin}->{cout} {h}x{w} k{k} s{s} p{p}: {diff}");
        }
    }

    #[test]
    fn dense_pads_each_side_on_its_own() {
        // Pads top 0, left 1, bottom 2, right 0 against an explicitly padded input.
        let (cin, cout, h, w) = (2, 3, 6, 5);
        let op = Dense {
            weight: Arc::new(values(cout * cin * 9, 4.0)),
            bias: Arc::new(vec![0.0; cout]),
            relu: false,
            cin,
            cout,
            kernel: [3, 3],
            stride: [2, 1],
            pads: [0, 1, 2, 0],
        };
        let x = Tensor::from_vec(values(cin * h * w, 5.0), (1, cin, h, w), &Device::Cpu).unwrap();
        let got = op.forward(&x).unwrap();
        let xp = x
            .pad_with_zeros(2, 0, 2)
            .unwrap()
            .pad_with_zeros(3, 1, 0)
            .unwrap();
        let wt = Tensor::from_vec(op.weight.to_vec(), (cout, cin, 3, 3), &Device::Cpu).unwrap();
        // candle takes one stride: stride 1, then every other row.
        let full = xp.conv2d(&wt, 0, 1, 1, 1).unwrap();
        let rows: Vec<u32> = (0..full.dim(2).unwrap() as u32).step_by(2).collect();
        let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let want = full.index_select(&idx, 2).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
