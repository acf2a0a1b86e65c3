//! CPU kernels for the convs candle runs slowly: a 1x1 conv as one matrix product, and
//! any other dense conv as im2col and a matrix product, tile by tile.
//!
//! candle's 1x1 conv copies its input element by element into a new buffer, multiplies,
//! then copies the product out again, and its other convs build their im2col matrix one
//! element at a time; the bias and ReLU each take a further pass. Here the product is a
//! register-blocked kernel of its own: the weights are packed once, at load, into panels
//! of [`MR`] output channels; each block of output starts in registers as the bias, takes
//! every input channel straight from the NCHW input (no packing of the activations,
//! which the small channel counts of a detector would not repay), and is stored once,
//! ReLU applied. A dense conv never writes its im2col matrix: for a few output rows at a
//! time, small enough to stay in L2, its input is copied once into zero-padded phase
//! planes (one per channel and stride phase), and each im2col row is a shifted view of
//! one of them.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Output channels per weight panel (rows of a register block).
const MR: usize = 6;
/// Output pixels per register block: two AVX2 registers per row, so that the `MR x NR`
/// sums fill 12 of the 16 registers.
const NR: usize = 16;

/// A `cout x k` weight matrix packed for [`simd::product`]: panel `p` holds rows
/// `p * MR..(p + 1) * MR` column by column (`[k][MR]`), rows past `cout` zero, so that
/// one input channel's weights for a register block are one contiguous load.
#[derive(Clone, Debug)]
pub(super) struct Panels {
    values: Arc<Vec<f32>>,
    /// The unpacked `cout x k` matrix, for gemm where AVX2 is missing.
    weight: Arc<Vec<f32>>,
    cout: usize,
    k: usize,
}

impl Panels {
    fn new(weight: &Arc<Vec<f32>>, cout: usize, k: usize) -> Self {
        let panels = cout.div_ceil(MR);
        let mut values = vec![0f32; panels * k * MR];
        for (co, row) in weight.chunks_exact(k.max(1)).take(cout).enumerate() {
            let panel = &mut values[(co / MR) * k * MR..][..k * MR];
            for (ci, w) in row.iter().enumerate() {
                panel[ci * MR + co % MR] = *w;
            }
        }
        Self {
            values: Arc::new(values),
            weight: weight.clone(),
            cout,
            k,
        }
    }
}

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
    /// `weight`, packed.
    panels: Panels,
}

thread_local! {
    /// Each thread's im2col matrix and partial-block copy, kept from call to call:
    /// allocated afresh, their pages would be faulted in again on every conv.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
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

/// `out[i] = src[2 * i]`, in fixed-size chunks: the compiler vectorises those into
/// shuffles, not a stepped iterator or a zip over pairs.
#[inline(always)]
fn take_even(out: &mut [f32], src: &[f32]) {
    let chunks = (src.len() / 16).min(out.len() / 8);
    let (head, rest) = out.split_at_mut(chunks * 8);
    for (o, s) in head.chunks_exact_mut(8).zip(src.chunks_exact(16)) {
        let o: &mut [f32; 8] = o.try_into().expect("8 values");
        let s: &[f32; 16] = s.try_into().expect("16 values");
        for (i, o) in o.iter_mut().enumerate() {
            *o = s[2 * i];
        }
    }
    for (o, v) in rest.iter_mut().zip(src[chunks * 16..].iter().step_by(2)) {
        *o = *v;
    }
}

/// The `rows` output rows of `cols` values starting at `o`, `stride` values apart.
///
/// # Safety
/// The rows must lie inside one live buffer, and nothing else may access them while the
/// returned slices live.
unsafe fn rows_at<'a>(o: *mut f32, rows: usize, stride: usize, cols: usize) -> Vec<&'a mut [f32]> {
    (0..rows)
        .map(|r| std::slice::from_raw_parts_mut(o.add(r * stride), cols))
        .collect()
}

impl Pointwise {
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, relu: bool, cin: usize, cout: usize) -> Self {
        let weight = Arc::new(weight);
        Self {
            panels: Panels::new(&weight, cout, cin),
            weight,
            bias: Arc::new(bias),
            relu,
            cin,
            cout,
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// Where each input channel's row starts in an image of `hw` pixels.
    fn offsets(&self, hw: usize) -> Vec<usize> {
        (0..self.cin).map(|c| c * hw).collect()
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
        let mut dst = vec![0f32; n * cout * hw];
        if dst.is_empty() {
            return Ok((CpuStorage::F32(dst), Shape::from((n, cout, h, w))));
        }
        let tile = self.tile(hw);
        let tiles = hw.div_ceil(tile);
        // Too few column tiles to keep the threads busy (small inputs): split the output
        // channels too, in whole panels.
        let panels = cout.div_ceil(MR);
        let threads = rayon::current_num_threads().max(1);
        let per_group = if n * tiles >= 2 * threads {
            panels
        } else {
            panels.div_ceil((2 * threads).div_ceil(n * tiles)).max(1)
        };
        let groups = panels.div_ceil(per_group);
        let offsets = self.offsets(hw);
        let out = Out(dst.as_mut_ptr());
        (0..n * tiles * groups).into_par_iter().for_each(|t| {
            SCRATCH.with_borrow_mut(|(_, scratch)| {
                let (img, j0) = (t / groups / tiles, (t / groups % tiles) * tile);
                let first = t % groups * per_group;
                let (co0, co1) = (first * MR, ((first + per_group) * MR).min(cout));
                let cols = tile.min(hw - j0);
                let x = &src[img * cin * hw..(img + 1) * cin * hw];
                // SAFETY: `out` points to `n * cout * hw` values; this task takes columns
                // `j0..j0 + cols` of rows `co0..co1` of image `img`'s `cout x hw` block,
                // which no other task touches.
                let mut rows =
                    unsafe { rows_at(out.at((img * cout + co0) * hw + j0), co1 - co0, hw, cols) };
                simd::product(
                    &self.panels,
                    first,
                    &self.bias[co0..],
                    self.relu,
                    (&x[j0..], &offsets),
                    &mut rows,
                    scratch,
                );
            })
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
    /// `weight`, packed.
    panels: Panels,
}

/// Bytes of phase planes and product per task: most of a core's L2.
const TILE_BYTES: usize = 384 * 1024;

impl Dense {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        relu: bool,
        cin: usize,
        cout: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
    ) -> Self {
        let weight = Arc::new(weight);
        Self {
            panels: Panels::new(&weight, cout, cin * kernel[0] * kernel[1]),
            weight,
            bias: Arc::new(bias),
            relu,
            cin,
            cout,
            kernel,
            stride,
            pads,
        }
    }

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

    /// Columns of each phase plane for an output `ow` wide: the output row plus the
    /// furthest column shift of a tap.
    fn phase_cols(&self, ow: usize) -> usize {
        ow + (self.kernel[1] - 1) / self.stride[1]
    }

    /// Phase-plane rows a tile of output rows reads beyond its own.
    fn halo(&self) -> usize {
        (self.kernel[0] - 1) / self.stride[0]
    }

    /// Values per phase plane for a tile of `rows` output rows: the rows it reads, and
    /// one more row of slack for the spare columns the last output row computes.
    fn phase_len(&self, rows: usize, ow: usize) -> usize {
        (rows + self.halo() + 1) * self.phase_cols(ow)
    }

    /// Where each im2col row `(ci * kh + ky) * kw + kx` starts in the phase planes: tap
    /// `(ky, kx)` of channel `ci` reads phase plane `(ci, ky % sh, kx % sw)` shifted by
    /// `ky / sh` rows and `kx / sw` columns, for the flattened output position.
    fn offsets(&self, phase_len: usize, cols: usize) -> Vec<usize> {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let mut offs = Vec::with_capacity(self.cin * kh * kw);
        for ci in 0..self.cin {
            for ky in 0..kh {
                for kx in 0..kw {
                    let phase = (ci * sh + ky % sh) * sw + kx % sw;
                    offs.push(phase * phase_len + (ky / sh) * cols + kx / sw);
                }
            }
        }
        offs
    }

    /// Fills the phase planes for output rows `oy0..oy0 + rows` of one image: phase
    /// `(ci, py, px)` holds, row `r` and column `c`, the input of channel `ci` at row
    /// `(oy0 + r) * sh + py - top` and column `c * sw + px - left` (zero in the padding).
    /// Flattened with [`Self::phase_cols`] values per row, each im2col row is then one
    /// shifted view of a phase plane.
    fn phases(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        ow: usize,
        (oy0, rows): (usize, usize),
        dst: &mut [f32],
    ) {
        let [sh, sw] = self.stride;
        let [t, l, _, _] = self.pads;
        let cols = self.phase_cols(ow);
        let len = self.phase_len(rows, ow);
        let used = (rows + self.halo()) * cols;
        for (p, plane) in dst.chunks_exact_mut(len).enumerate() {
            let (ci, py, px) = (p / (sh * sw), p / sw % sh, p % sw);
            let src = &x[ci * h * w..(ci + 1) * h * w];
            plane[used..].fill(0.0);
            // Columns `c` whose input column `c * sw + px - l` lies in `0..w`.
            let lo = l.saturating_sub(px).div_ceil(sw).min(cols);
            let hi = match (w + l).checked_sub(px + 1) {
                Some(reach) => (reach / sw + 1).min(cols),
                None => 0,
            }
            .max(lo);
            for (r, row) in plane[..used].chunks_exact_mut(cols).enumerate() {
                let iy = ((oy0 + r) * sh + py).wrapping_sub(t);
                if iy >= h || lo == hi {
                    row.fill(0.0);
                    continue;
                }
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                let start = lo * sw + px - l;
                let input = &src[iy * w..(iy + 1) * w];
                let out = &mut row[lo..hi];
                if sw == 1 {
                    out.copy_from_slice(&input[start..start + out.len()]);
                } else if sw == 2 {
                    take_even(out, &input[start..]);
                } else {
                    for (o, v) in out.iter_mut().zip(input[start..].iter().step_by(sw)) {
                        *o = *v;
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
        if self.stride.contains(&0) || self.kernel.contains(&0) {
            candle_core::bail!("conv: zero stride or empty kernel");
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
        let mut dst = vec![0f32; n * cout * plane];
        if dst.is_empty() {
            return Ok((CpuStorage::F32(dst), Shape::from((n, cout, oh, ow))));
        }
        let [sh, sw] = self.stride;
        let phases = c * sh * sw;
        let cols = self.phase_cols(ow);
        // Bytes per output row of a tile: its share of the phase planes and of the
        // flattened product.
        let per_row = 4 * cols * (phases + cout);
        let threads = rayon::current_num_threads().max(1);
        let by_cache = (TILE_BYTES / per_row.max(1)).max(1);
        let by_threads = (n * oh).div_ceil(threads * 3).max(1);
        let rows = by_cache.min(by_threads).min(oh);
        let tiles = oh.div_ceil(rows);
        let out = Out(dst.as_mut_ptr());
        (0..n * tiles).into_par_iter().for_each(|t| {
            SCRATCH.with_borrow_mut(|(buf, scratch)| {
                let (img, oy0) = (t / tiles, (t % tiles) * rows);
                let rows = rows.min(oh - oy0);
                let len = self.phase_len(rows, ow);
                let flat = rows * cols;
                if buf.len() < phases * len + cout * flat {
                    buf.resize(phases * len + cout * flat, 0.0);
                }
                let (planes, sums) = buf.split_at_mut(phases * len);
                let x = &src[img * c * h * w..(img + 1) * c * h * w];
                self.phases(x, (h, w), ow, (oy0, rows), &mut planes[..phases * len]);
                let mut sums: Vec<&mut [f32]> =
                    sums[..cout * flat].chunks_exact_mut(flat).collect();
                simd::product(
                    &self.panels,
                    0,
                    &self.bias,
                    self.relu,
                    (&planes[..phases * len], &self.offsets(len, cols)),
                    &mut sums,
                    scratch,
                );
                // SAFETY: `out` points to `n * cout * plane` values; this task takes
                // output rows `oy0..oy0 + rows` (columns `oy0 * ow..` of length
                // `rows * ow`) of the `cout` channels of image `img`, which no other task
                // touches.
                let dst_rows = unsafe {
                    rows_at(
                        out.at(img * cout * plane + oy0 * ow),
                        cout,
                        plane,
                        rows * ow,
                    )
                };
                for (d, s) in dst_rows.into_iter().zip(&sums) {
                    // Each flattened row has `cols - ow` spare sums at its end.
                    for (d, s) in d.chunks_exact_mut(ow).zip(s.chunks_exact(cols)) {
                        d.copy_from_slice(&s[..ow]);
                    }
                }
            })
        });
        Ok((CpuStorage::F32(dst), Shape::from((n, cout, oh, ow))))
    }
}

mod simd {
    //! The product: an AVX2 + FMA register block where the CPU has them (chosen at run
    //! time, as `mfn_model`'s kernels do), gemm elsewhere.
    //!
    //! The right-hand matrix is given as `k` rows, each at its own offset into one slice:
    //! the rows of an NCHW input for a 1x1 conv, or shifted views of a dense conv's phase
    //! planes (an im2col matrix that is never written out).

    use super::{Panels, MR, NR};

    /// `out = relu(W X + bias)`, row `c` of `X` being `x[offs[c]..]`, for the rows of
    /// `out` (each `cols` long), which are the output channels from panel `first` on;
    /// `bias` starts at the first of them.
    pub(super) fn product(
        w: &Panels,
        first: usize,
        bias: &[f32],
        relu: bool,
        x: (&[f32], &[usize]),
        out: &mut [&mut [f32]],
        scratch: &mut Vec<f32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features `avx2::product` is compiled for.
            return unsafe { avx2::product(w, first, bias, relu, x, out, scratch) };
        }
        fallback(w, first, bias, relu, x, out, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        //! Written with intrinsics: the compiler does not keep a two-dimensional block of
        //! sums in registers on its own.

        use std::arch::x86_64::*;

        use super::{Panels, MR, NR};

        /// [`super::product`].
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn product(
            w: &Panels,
            first: usize,
            bias: &[f32],
            relu: bool,
            (x, offs): (&[f32], &[usize]),
            out: &mut [&mut [f32]],
            scratch: &mut Vec<f32>,
        ) {
            let (k, cols) = (w.k, out.first().map_or(0, |r| r.len()));
            assert!(offs.len() == k && offs.iter().all(|o| o + cols <= x.len()));
            assert!(out.len() + first * MR <= w.cout && out.iter().all(|r| r.len() == cols));
            let panel_len = k * MR;
            let values = &w.values[first * panel_len..];
            let full = cols - cols % NR;
            for j in (0..full).step_by(NR) {
                for (p, rows) in out.chunks_mut(MR).enumerate() {
                    let panel = &values[p * panel_len..(p + 1) * panel_len];
                    // SAFETY: every row reaches `cols >= j + NR` values past its offset
                    // (asserted above).
                    block(panel, &bias[p * MR..], relu, (x, offs), rows, (j, j, NR));
                }
            }
            if full < cols {
                // The last columns, copied into a zero-padded block so that the register
                // block reads no further than the input.
                let n = cols - full;
                scratch.clear();
                scratch.resize(k * NR, 0.0);
                for (s, off) in scratch.chunks_exact_mut(NR).zip(offs) {
                    s[..n].copy_from_slice(&x[off + full..off + cols]);
                }
                let tail: Vec<usize> = (0..k).map(|c| c * NR).collect();
                for (p, rows) in out.chunks_mut(MR).enumerate() {
                    let panel = &values[p * panel_len..(p + 1) * panel_len];
                    // SAFETY: `scratch` holds `NR` values from each `tail` offset.
                    block(
                        panel,
                        &bias[p * MR..],
                        relu,
                        (scratch, &tail),
                        rows,
                        (0, full, n),
                    );
                }
            }
        }

        /// `out[r][oj + i] = relu(bias[r] + sum_c w[r][c] * x[offs[c] + xj + i])` for one
        /// `MR x NR` block of sums held in registers; stores the first `n` columns of the
        /// first `out.len()` rows.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA, and `x` must hold `NR` values from
        /// `offs[c] + xj` for each of the panel's `panel.len() / MR` rows `c`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn block(
            panel: &[f32],
            bias: &[f32],
            relu: bool,
            (x, offs): (&[f32], &[usize]),
            out: &mut [&mut [f32]],
            (xj, oj, n): (usize, usize, usize),
        ) {
            let k = panel.len() / MR;
            assert!(offs.len() >= k && out.len() <= MR && n <= NR);
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(bias.get(r).copied().unwrap_or(0.0));
                *a = [b, b];
            }
            let (xp, wp) = (x.as_ptr().add(xj), panel.as_ptr());
            for (c, &off) in offs[..k].iter().enumerate() {
                // SAFETY: the caller guarantees `NR` values of `x` from `offs[c] + xj`;
                // the panel holds `MR` weights from `c * MR`.
                let (x0, x1) = (
                    _mm256_loadu_ps(xp.add(off)),
                    _mm256_loadu_ps(xp.add(off + 8)),
                );
                for (r, a) in acc.iter_mut().enumerate() {
                    let w = _mm256_broadcast_ss(&*wp.add(c * MR + r));
                    a[0] = _mm256_fmadd_ps(x0, w, a[0]);
                    a[1] = _mm256_fmadd_ps(x1, w, a[1]);
                }
            }
            let zero = _mm256_setzero_ps();
            for (o, a) in out.iter_mut().zip(&acc) {
                let (a0, a1) = if relu {
                    (_mm256_max_ps(a[0], zero), _mm256_max_ps(a[1], zero))
                } else {
                    (a[0], a[1])
                };
                let o = &mut o[oj..oj + n];
                if n == NR {
                    // SAFETY: `o` holds `NR` values.
                    _mm256_storeu_ps(o.as_mut_ptr(), a0);
                    _mm256_storeu_ps(o.as_mut_ptr().add(8), a1);
                } else {
                    let mut tmp = [0f32; NR];
                    // SAFETY: `tmp` holds `NR` values.
                    _mm256_storeu_ps(tmp.as_mut_ptr(), a0);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a1);
                    o.copy_from_slice(&tmp[..n]);
                }
            }
        }
    }

    /// The product through gemm, for CPUs without AVX2 + FMA and other architectures:
    /// its kernels are written per architecture (NEON, SSE), where a portable register
    /// block compiles to a fraction of their speed. Rows not evenly spaced are gathered
    /// first.
    fn fallback(
        w: &Panels,
        first: usize,
        bias: &[f32],
        relu: bool,
        (x, offs): (&[f32], &[usize]),
        out: &mut [&mut [f32]],
        scratch: &mut Vec<f32>,
    ) {
        let (k, rows, cols) = (w.k, out.len(), out.first().map_or(0, |r| r.len()));
        assert!(offs.len() == k && offs.iter().all(|o| o + cols <= x.len()));
        assert!(first * MR + rows <= w.cout && out.iter().all(|r| r.len() == cols));
        if rows == 0 || cols == 0 {
            return;
        }
        let start = offs.first().copied().unwrap_or(0);
        let step = match offs {
            [a, b, ..] => b.wrapping_sub(*a),
            _ => cols,
        };
        let even = offs
            .iter()
            .enumerate()
            .all(|(c, &o)| Some(o) == step.checked_mul(c).and_then(|d| d.checked_add(start)));
        let (rhs, rhs_rs) = if even {
            (&x[start..], step)
        } else {
            scratch.clear();
            for &o in offs {
                scratch.extend_from_slice(&x[o..o + cols]);
            }
            (&scratch[..], cols)
        };
        let mut dst = vec![0f32; rows * cols];
        let lhs = &w.weight[first * MR * k..(first * MR + rows) * k];
        // SAFETY: `dst` is `rows x cols` and `lhs` `rows x k`, both row-major; `rhs` has
        // `k` rows of `cols` values, `rhs_rs` apart, inside the slice (asserted above:
        // each row `c` starts at `offs[c]`, and evenly spaced rows start at `start`).
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                dst.as_mut_ptr(),
                1,
                cols as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                rhs_rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for ((o, d), b) in out.iter_mut().zip(dst.chunks_exact(cols)).zip(bias) {
            for (o, d) in o.iter_mut().zip(d) {
                let v = d + b;
                *o = if relu { v.max(0.0) } else { v };
            }
        }
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
            let op = Pointwise::new(values(cout * cin, 1.0), values(cout, 2.0), relu, cin, cout);
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
            // Several tiles, the last one short.
            (1, 16, 30, 83, 80, 3, 1, 1, true),
            (2, 3, 16, 97, 64, 3, 2, 1, true),
        ] {
            let op = Dense::new(
                values(cout * cin * k * k, 1.0),
                values(cout, 2.0),
                relu,
                cin,
                cout,
                [k, k],
                [s, s],
                [p; 4],
            );
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
        let op = Dense::new(
            values(cout * cin * 9, 4.0),
            vec![0.0; cout],
            false,
            cin,
            cout,
            [3, 3],
            [2, 1],
            [0, 1, 2, 0],
        );
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
