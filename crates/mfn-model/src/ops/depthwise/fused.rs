//! The inference depthwise conv: a forward-only candle op with BatchNorm already folded
//! into its weights, bias and PReLU fused.
//!
//! candle runs a conv with `groups > 1` as one convolution per group and concatenates the
//! results, which makes depthwise convs orders of magnitude slower than they need to be.
//! This kernel works on a whole NCHW tensor at once, a few channel planes per rayon task.
//! With the `cuda` feature it also runs on CUDA devices (f32, f16 or bf16 storage, f32
//! arithmetic), copying its parameters to the device on each call; the network's own layers
//! keep theirs on the device instead. Other devices fall back to candle's own ops, so
//! results are the same everywhere.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// A depthwise conv with a per-channel bias and an optional per-channel PReLU, fused.
#[derive(Clone, Debug)]
pub struct DepthwiseConv2d {
    /// `[channels, kh, kw]`, row-major.
    pub weight: Arc<Vec<f32>>,
    /// One bias per channel.
    pub bias: Arc<Vec<f32>>,
    /// One PReLU slope per channel, or `None` for a linear output. ReLU is a zero slope.
    pub prelu: Option<Arc<Vec<f32>>>,
    /// An upper clamp after the activation (6 for ReLU6), or `None`.
    pub cap: Option<f32>,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding along height and width.
    pub pad: [usize; 2],
}

impl DepthwiseConv2d {
    fn out_hw(&self, h: usize, w: usize) -> [usize; 2] {
        [
            crate::config::conv_out(h, self.kernel[0], self.stride, self.pad[0]),
            crate::config::conv_out(w, self.kernel[1], self.stride, self.pad[1]),
        ]
    }

    /// Runs the conv on an NCHW tensor.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// The geometry [`simd::depthwise_planes`] works with for an `h x w` input.
    fn geometry(&self, h: usize, w: usize) -> simd::DwGeometry {
        let [oh, ow] = self.out_hw(h, w);
        simd::DwGeometry::new([h, w], [oh, ow], self.kernel, self.stride, self.pad)
    }
}

thread_local! {
    /// Each thread's depthwise scratch, kept from call to call: allocated afresh, its
    /// pages would be faulted in again on every conv.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Planes per rayon task: enough tasks to balance the threads, each with enough work
/// (about 16K output values) that scheduling does not dominate small planes.
fn planes_per_task(planes: usize, plane_len: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_work = (16 * 1024 / plane_len.max(1)).max(1);
    let by_threads = planes.div_ceil(threads * 4).max(1);
    by_work.min(by_threads)
}

mod simd {
    //! The depthwise inner loop, compiled once plainly and once with AVX2 + FMA, chosen at
    //! run time, as in `crate::engine`.
    //!
    //! A band of output rows at a time, the input rows it reads are first copied,
    //! zero-padded, into `stride * stride` phase planes (phase `(py, px)` holds the padded
    //! input at rows `py, py + stride, ...` and columns `px, px + stride, ...`), all `cols`
    //! wide. Every tap then reads its phase plane at a fixed offset from the output
    //! position, so the band, flattened with `cols` values per row, is one long run of
    //! fixed-size blocks: no per-row bounds, no strided loads, and small planes do not pay
    //! a partial block per row. The `cols - ow` spare values at the end of each flattened
    //! row are computed and dropped. Bands are sized so that their phase planes and sums
    //! stay in L1.

    /// Output values per block: four AVX2 registers of independent sums.
    const BLOCK: usize = 32;

    /// Scratch bytes a band aims for: most of a 32-48 KiB L1 data cache.
    const BAND_BYTES: usize = 24 * 1024;

    /// Where each tap reads and how big the phase planes are.
    #[derive(Clone, Debug)]
    pub(super) struct DwGeometry {
        h: usize,
        w: usize,
        oh: usize,
        ow: usize,
        stride: usize,
        pad: [usize; 2],
        /// Output rows per band.
        band: usize,
        /// Phase-plane rows a band reads beyond its own: `(kh - 1) / stride`.
        halo: usize,
        /// Columns of each phase plane.
        cols: usize,
        /// Values per phase plane, with the slack the last block reads past its end.
        phase_len: usize,
        /// Per tap, in weight order: the offset of its phase plane in the scratch plus its
        /// row and column shift inside it.
        taps: Vec<usize>,
    }

    impl DwGeometry {
        pub(super) fn new(
            [h, w]: [usize; 2],
            [oh, ow]: [usize; 2],
            [kh, kw]: [usize; 2],
            stride: usize,
            pad: [usize; 2],
        ) -> Self {
            let s = stride.max(1);
            let halo = (kh - 1) / s;
            let cols = ow + (kw - 1) / s;
            let per_row = 4 * cols * (s * s + 1);
            let band = (BAND_BYTES / per_row.max(1)).clamp(1, oh.max(1));
            // The last block starts below `band * cols` and reads `BLOCK` values past the
            // largest tap shift, `halo * cols + (kw - 1) / s`.
            let phase_len = (band + halo) * cols + BLOCK + cols;
            let mut taps = Vec::with_capacity(kh * kw);
            for ky in 0..kh {
                for kx in 0..kw {
                    let phase = (ky % s) * s + kx % s;
                    taps.push(phase * phase_len + (ky / s) * cols + kx / s);
                }
            }
            Self {
                h,
                w,
                oh,
                ow,
                stride: s,
                pad,
                band,
                halo,
                cols,
                phase_len,
                taps,
            }
        }

        /// Scratch values one plane needs: its phase planes, then the flattened output.
        pub(super) fn scratch_len(&self) -> usize {
            self.stride * self.stride * self.phase_len + self.flat_len()
        }

        fn flat_len(&self) -> usize {
            (self.band * self.cols).next_multiple_of(BLOCK)
        }
    }

    /// Per-plane parameters.
    pub(super) struct DwParams<'a> {
        /// `[planes per image][kh * kw]`.
        pub weight: &'a [f32],
        pub bias: &'a [f32],
        pub slope: Option<&'a [f32]>,
        pub cap: Option<f32>,
    }

    /// Fills the phase planes for output rows `oy0..oy0 + rows` of one input plane,
    /// padding included.
    #[inline(always)]
    fn fill_phases(g: &DwGeometry, src: &[f32], phases: &mut [f32], oy0: usize, rows: usize) {
        let s = g.stride;
        let [ph, pw] = g.pad;
        for py in 0..s {
            for px in 0..s {
                let plane = &mut phases[(py * s + px) * g.phase_len..][..g.phase_len];
                let (body, tail) = plane.split_at_mut((rows + g.halo) * g.cols);
                tail.fill(0.0);
                // Columns `c` whose input column `c * s + px - pw` lies in `0..w`.
                let lo = pw.saturating_sub(px).div_ceil(s).min(g.cols);
                let hi = match (g.w + pw).checked_sub(px + 1) {
                    Some(reach) => (reach / s + 1).min(g.cols),
                    None => 0,
                }
                .max(lo);
                for (r, row) in body.chunks_exact_mut(g.cols).enumerate() {
                    let iy = ((oy0 + r) * s + py).wrapping_sub(ph);
                    if iy >= g.h || lo == hi {
                        row.fill(0.0);
                        continue;
                    }
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    let start = lo * s + px - pw;
                    let input = &src[iy * g.w..(iy + 1) * g.w];
                    let out = &mut row[lo..hi];
                    if s == 1 {
                        out.copy_from_slice(&input[start..start + out.len()]);
                    } else if s == 2 {
                        take_even(out, &input[start..]);
                    } else {
                        for (o, v) in out.iter_mut().zip(input[start..].iter().step_by(s)) {
                            *o = *v;
                        }
                    }
                }
            }
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

    /// Branch-free PReLU, so that it vectorises.
    #[inline(always)]
    fn prelu(y: f32, a: f32) -> f32 {
        y.max(0.0) + a * y.min(0.0)
    }

    /// Runs the conv on consecutive planes `first..first + out.len() / (oh * ow)` of the
    /// batch (`first` counts across images), reading their inputs from `src`.
    #[inline(always)]
    fn depthwise_planes_impl<const FMA: bool>(
        g: &DwGeometry,
        p: &DwParams<'_>,
        first: usize,
        src: &[f32],
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let channels = p.bias.len();
        let taps = g.taps.len();
        let (phases, flat) = scratch.split_at_mut(g.stride * g.stride * g.phase_len);
        let flat = &mut flat[..g.flat_len()];
        for (i, (out, src)) in out
            .chunks_exact_mut(g.oh * g.ow)
            .zip(src.chunks_exact(g.h * g.w))
            .enumerate()
        {
            let c = (first + i) % channels;
            let weight = &p.weight[c * taps..(c + 1) * taps];
            let (bias, slope) = (p.bias[c], p.slope.map(|a| a[c]));
            for oy0 in (0..g.oh).step_by(g.band) {
                let rows = g.band.min(g.oh - oy0);
                fill_phases(g, src, phases, oy0, rows);
                let flat = &mut flat[..(rows * g.cols).next_multiple_of(BLOCK)];
                band_impl::<FMA>(g, p, weight, (bias, slope), phases, flat);
                let out = &mut out[oy0 * g.ow..(oy0 + rows) * g.ow];
                for (o, f) in out.chunks_exact_mut(g.ow).zip(flat.chunks_exact(g.cols)) {
                    o.copy_from_slice(&f[..g.ow]);
                }
            }
        }
    }

    /// The flattened sums of one band from its phase planes, activation applied.
    #[inline(always)]
    fn band_impl<const FMA: bool>(
        g: &DwGeometry,
        p: &DwParams<'_>,
        weight: &[f32],
        (bias, slope): (f32, Option<f32>),
        phases: &[f32],
        flat: &mut [f32],
    ) {
        for (b, block) in flat.chunks_exact_mut(BLOCK).enumerate() {
            let at = b * BLOCK;
            let mut acc = [bias; BLOCK];
            for (&off, &wt) in g.taps.iter().zip(weight) {
                let x: &[f32; BLOCK] = phases[at + off..at + off + BLOCK]
                    .try_into()
                    .expect("a block of the phase plane");
                for j in 0..BLOCK {
                    acc[j] = if FMA {
                        x[j].mul_add(wt, acc[j])
                    } else {
                        acc[j] + wt * x[j]
                    };
                }
            }
            if let Some(a) = slope {
                acc.iter_mut().for_each(|v| *v = prelu(*v, a));
            }
            if let Some(cap) = p.cap {
                acc.iter_mut().for_each(|v| *v = v.min(cap));
            }
            block.copy_from_slice(&acc);
        }
    }

    /// [`depthwise_planes_impl`] with AVX2 + FMA where the CPU has them.
    pub(super) fn depthwise_planes(
        g: &DwGeometry,
        p: &DwParams<'_>,
        first: usize,
        src: &[f32],
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast(
                g: &DwGeometry,
                p: &DwParams<'_>,
                first: usize,
                src: &[f32],
                out: &mut [f32],
                scratch: &mut [f32],
            ) {
                depthwise_planes_impl::<true>(g, p, first, src, out, scratch)
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features `fast` is compiled for.
                return unsafe { fast(g, p, first, src, out, scratch) };
            }
        }
        depthwise_planes_impl::<false>(g, p, first, src, out, scratch)
    }
}

impl CustomOp1 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "mfn-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        if self.kernel.contains(&0) || self.stride == 0 {
            candle_core::bail!("depthwise conv: empty kernel or zero stride");
        }
        if c * self.kernel[0] * self.kernel[1] != self.weight.len() {
            candle_core::bail!(
                "depthwise conv: input has {c} channels, weights are for {}",
                self.weight.len() / (self.kernel[0] * self.kernel[1])
            );
        }
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((a, b))) => &data[a..b],
            (CpuStorage::F32(_), None) => {
                candle_core::bail!("depthwise conv: input must be contiguous")
            }
            _ => candle_core::bail!("depthwise conv: only f32 is supported"),
        };
        if self.bias.len() != c || self.prelu.as_ref().is_some_and(|a| a.len() != c) {
            candle_core::bail!(
                "depthwise conv: {c} channels, {} biases, {} slopes",
                self.bias.len(),
                self.prelu.as_ref().map_or(0, |a| a.len())
            );
        }
        let [oh, ow] = self.out_hw(h, w);
        let mut dst = vec![0f32; n * c * oh * ow];
        if dst.is_empty() || h * w == 0 {
            return Ok((CpuStorage::F32(dst), Shape::from((n, c, oh, ow))));
        }
        let g = self.geometry(h, w);
        let params = simd::DwParams {
            weight: &self.weight,
            bias: &self.bias,
            slope: self.prelu.as_deref().map(|a| a.as_slice()),
            cap: self.cap,
        };
        let per_task = planes_per_task(n * c, oh * ow);
        let scratch_len = g.scratch_len();
        dst.par_chunks_mut(per_task * oh * ow)
            .zip(src.par_chunks(per_task * h * w))
            .enumerate()
            .for_each(|(t, (out, inp))| {
                SCRATCH.with_borrow_mut(|scratch| {
                    if scratch.len() < scratch_len {
                        scratch.resize(scratch_len, 0.0);
                    }
                    simd::depthwise_planes(&g, &params, t * per_task, inp, out, scratch);
                })
            });
        Ok((CpuStorage::F32(dst), Shape::from((n, c, oh, ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let taps = self.kernel[0] * self.kernel[1];
        if c * taps != self.weight.len() || self.bias.len() != c {
            candle_core::bail!(
                "depthwise conv: input has {c} channels, weights are for {}",
                self.weight.len() / taps.max(1)
            );
        }
        if self.prelu.as_ref().is_some_and(|a| a.len() != c) {
            candle_core::bail!(
                "depthwise conv: {c} channels, {} slopes",
                self.prelu.as_ref().map_or(0, |a| a.len())
            );
        }
        let [oh, ow] = self.out_hw(h, w);
        let shape =
            crate::cuda::DwShape::new([n, c, h, w], self.kernel, [oh, ow], self.stride, self.pad)?;
        let params = crate::cuda::pack_params(
            &self.weight,
            Some(&self.bias),
            self.prelu.as_deref().map(|v| v.as_slice()),
        );
        let params = crate::cuda::upload(&storage.device, &params)?;
        let layout_p = crate::cuda::ParamLayout {
            channels: c,
            taps,
            bias: true,
            slope: self.prelu.is_some(),
        };
        let y = crate::cuda::depthwise_fused(
            storage,
            layout,
            &params.slice(..),
            layout_p,
            self.cap,
            shape,
            self.name(),
        )?;
        Ok((y, Shape::from((n, c, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.37 + seed).sin() * 1.7).fract())
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn reference(x: &Tensor, op: &DepthwiseConv2d) -> Tensor {
        let c = x.dim(1).unwrap();
        let w = Tensor::from_vec(
            op.weight.to_vec(),
            (c, 1, op.kernel[0], op.kernel[1]),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(op.pad[0], op.pad[1]);
        let y = x
            .conv2d(&w, op.pad[0], op.stride, 1, c)
            .unwrap()
            .broadcast_add(&Tensor::from_vec(op.bias.to_vec(), (1, c, 1, 1), &Device::Cpu).unwrap())
            .unwrap();
        match &op.prelu {
            None => y,
            Some(a) => {
                let a = Tensor::from_vec(a.to_vec(), (1, c, 1, 1), &Device::Cpu).unwrap();
                let zeros = y.zeros_like().unwrap();
                (y.maximum(&zeros).unwrap() + y.minimum(&zeros).unwrap().broadcast_mul(&a).unwrap())
                    .unwrap()
            }
        }
    }

    fn check(shape: [usize; 4], k: usize, stride: usize, pad: usize, prelu: bool, transpose: bool) {
        let c = shape[1];
        let op = DepthwiseConv2d {
            weight: Arc::new(
                ramp(&[c * k * k], 1.0)
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            ),
            bias: Arc::new(ramp(&[c], 2.0).to_vec1().unwrap()),
            prelu: prelu.then(|| Arc::new(ramp(&[c], 3.0).to_vec1().unwrap())),
            cap: None,
            kernel: [k, k],
            stride,
            pad: [pad, pad],
        };
        let mut x = ramp(&shape, 0.5);
        if transpose {
            // Same shape, but a strided view: swap H and W of a transposed buffer.
            x = ramp(&[shape[0], shape[1], shape[3], shape[2]], 0.5)
                .transpose(2, 3)
                .unwrap();
            assert!(!x.is_contiguous());
        }
        let got = op.forward(&x).unwrap();
        let want = reference(&x, &op);
        assert_eq!(got.dims(), want.dims());
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "max diff {diff} for {shape:?} k{k} s{stride}"
        );
    }

    #[test]
    fn depthwise_matches_candle_conv() {
        check([2, 5, 9, 7], 3, 1, 1, true, false);
        check([2, 5, 9, 7], 3, 2, 1, true, false);
        check([3, 4, 8, 8], 3, 2, 1, false, false);
        check([1, 6, 7, 7], 7, 1, 0, false, false);
        check([2, 3, 11, 13], 3, 2, 1, true, true);
        check([1, 2, 1, 1], 3, 1, 1, true, false);
        // Planes of several blocks, odd and even sides, wider kernels and strides.
        check([1, 3, 41, 37], 3, 1, 1, true, false);
        check([2, 3, 40, 42], 3, 2, 1, false, false);
        check([1, 4, 33, 35], 3, 2, 1, true, false);
        check([1, 2, 17, 19], 5, 1, 2, true, false);
        check([1, 2, 17, 19], 5, 2, 2, false, false);
        check([1, 2, 16, 16], 3, 3, 0, true, false);
        check([1, 2, 9, 9], 1, 2, 0, false, false);
        // Planes of several bands, the last one short.
        check([1, 2, 130, 200], 3, 1, 1, true, false);
        check([1, 2, 131, 201], 3, 2, 1, true, false);
    }
}
