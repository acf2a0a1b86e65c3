//! A depthwise conv for training: a candle custom op with a native backward pass.
//!
//! candle runs a conv with `groups > 1` as one convolution per group on a narrowed copy of
//! the input, and its backward pass widens every group's gradient back to the full input
//! before summing them, so the cost grows with the square of the channel count. These ops
//! work on whole NCHW tensors instead: the forward pass and the input gradient take one
//! channel plane per rayon task, the weight gradient one channel (over the whole batch) per
//! task.
//!
//! Every output value is accumulated by a single task in a fixed order, with no atomics, so
//! the results are bit-identical whatever the number of threads.
//!
//! With the `cuda` feature the same three ops run on CUDA devices as native kernels
//! (`mfn_model::cuda` (with the `cuda` feature)): one thread per output value for the forward pass and the input
//! gradient, one block per (channel, tap) with a fixed reduction tree for the weight
//! gradient.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::host_f32;

/// Which conv the graph path uses for depthwise layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GraphConv {
    /// [`depthwise_conv2d`]: the native op and its native backward.
    Native,
    /// candle's grouped `conv2d`, the reference the native op is checked against.
    #[cfg_attr(not(test), allow(dead_code))]
    Candle,
}

/// A depthwise 2-d convolution with no bias, differentiable in both arguments.
///
/// `x` is `[N, C, H, W]` and `w` is `[C, 1, KH, KW]`; the output is `[N, C, OH, OW]` with
/// `OH = (H + 2 * pad[0] - KH) / stride + 1` and likewise for `OW`. This is
/// `x.conv2d(w, pad, stride, 1, C)` (with the padding per axis), but on the CPU in `f32`
/// (and on CUDA devices in `f32` with the `cuda` feature) it runs as a custom op whose
/// backward pass is also native, many times faster than candle's. Other devices and dtypes
/// fall back to candle's own conv, so the function is correct everywhere.
///
/// Non-contiguous inputs are copied first. Mismatched shapes, a zero stride or kernel
/// size, an empty input plane and a kernel larger than the padded input are errors.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: [usize; 2]) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (wc, one, kh, kw) = w.dims4()?;
    if one != 1 || wc != c {
        bail!(
            "depthwise conv: weights {:?} do not match an input with {c} channels, expected [{c}, 1, KH, KW]",
            w.dims()
        );
    }
    let geom = Geometry {
        kernel: [kh, kw],
        stride,
        pad,
    };
    let [oh, ow] = geom.out_hw(h, wd)?;
    let native = crate::native_device(x.device())
        && x.device().same_device(w.device())
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32;
    if native {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, DepthwiseConv { geom });
    }
    // Rows and columns past the last the kernel reaches, per axis.
    let (h_left, w_left) = (
        (h + 2 * pad[0] - kh) % stride,
        (wd + 2 * pad[1] - kw) % stride,
    );
    if pad[0] == pad[1] && h_left == w_left {
        return x.conv2d(w, pad[0], stride, 1, c);
    }
    // candle's conv takes one padding for both axes, and its backward sizes the input
    // gradient of both axes from the height's leftover alone. Padding explicitly and
    // cropping to the reached pixels leaves no leftover, so the gradient is right.
    x.pad_with_zeros(2, pad[0], pad[0])?
        .pad_with_zeros(3, pad[1], pad[1])?
        .narrow(2, 0, (oh - 1) * stride + kh)?
        .narrow(3, 0, (ow - 1) * stride + kw)?
        .conv2d(w, 0, stride, 1, c)
}

/// Kernel size, stride and padding, shared by the forward pass and both gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    kernel: [usize; 2],
    stride: usize,
    pad: [usize; 2],
}

/// Where one kernel tap meets one row: the output columns `first..first + len` read input
/// columns `start, start + stride, ...`.
#[derive(Clone, Copy, Debug)]
struct Span {
    first: usize,
    len: usize,
    start: usize,
}

impl Geometry {
    /// The output size for an `h x w` input, or an error where there is none.
    fn out_hw(&self, h: usize, w: usize) -> Result<[usize; 2]> {
        let [kh, kw] = self.kernel;
        let [ph, pw] = self.pad;
        if self.stride == 0 || kh == 0 || kw == 0 {
            bail!(
                "depthwise conv: stride {} and kernel {kh}x{kw} must be positive",
                self.stride
            );
        }
        if h == 0 || w == 0 {
            bail!("depthwise conv: empty {h}x{w} input plane");
        }
        let padded = |size: usize, p: usize| p.checked_mul(2).and_then(|p| p.checked_add(size));
        let (Some(hp), Some(wp)) = (padded(h, ph), padded(w, pw)) else {
            bail!("depthwise conv: padding {ph}x{pw} is out of range");
        };
        if hp < kh || wp < kw {
            bail!("depthwise conv: kernel {kh}x{kw} is larger than the padded {h}x{w} input");
        }
        Ok([(hp - kh) / self.stride + 1, (wp - kw) / self.stride + 1])
    }

    /// The shape arguments of the CUDA kernels.
    #[cfg(feature = "cuda")]
    fn cuda_shape(&self, nchw: [usize; 4], out: [usize; 2]) -> Result<crate::cuda::DwShape> {
        crate::cuda::DwShape::new(nchw, self.kernel, out, self.stride, self.pad)
    }

    /// The input row that output row `oy` reads through kernel row `ky`, if inside the input.
    fn row(&self, oy: usize, ky: usize, h: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.pad[0])
            .filter(|&iy| iy < h)
    }

    /// The output columns whose input column through kernel column `kx` is inside a row of
    /// width `w`, for every `kx`. Padding columns are skipped rather than tested per pixel.
    fn spans(&self, w: usize, ow: usize) -> Vec<Option<Span>> {
        let (s, pw) = (self.stride, self.pad[1]);
        (0..self.kernel[1])
            .map(|kx| {
                let first = pw.saturating_sub(kx).div_ceil(s);
                let last = ((w + pw).checked_sub(kx + 1)? / s).min(ow - 1);
                (first <= last).then(|| Span {
                    first,
                    len: last - first + 1,
                    start: first * s + kx - pw,
                })
            })
            .collect()
    }
}

// The three inner loops below keep unit stride on the side that allows it, so that the
// stride-1 case (almost every layer) compiles to plain vector multiply-adds.

/// `out[i] += a * inp[i * s]`.
fn axpy_gather(out: &mut [f32], a: f32, inp: &[f32], s: usize) {
    if s == 1 {
        for (o, i) in out.iter_mut().zip(inp) {
            *o += a * *i;
        }
    } else {
        for (o, i) in out.iter_mut().zip(inp.iter().step_by(s)) {
            *o += a * *i;
        }
    }
}

/// `out[i * s] += a * g[i]`.
fn axpy_scatter(out: &mut [f32], a: f32, g: &[f32], s: usize) {
    if s == 1 {
        for (o, v) in out.iter_mut().zip(g) {
            *o += a * *v;
        }
    } else {
        for (o, v) in out.iter_mut().step_by(s).zip(g) {
            *o += a * *v;
        }
    }
}

/// `acc[i] += g[i] * inp[i * s]`.
fn mul_acc(acc: &mut [f32], g: &[f32], inp: &[f32], s: usize) {
    if s == 1 {
        for ((a, v), i) in acc.iter_mut().zip(g).zip(inp) {
            *a += *v * *i;
        }
    } else {
        for ((a, v), i) in acc.iter_mut().zip(g).zip(inp.iter().step_by(s)) {
            *a += *v * *i;
        }
    }
}

/// Checks that `w` is `[c, 1, KH, KW]` for this geometry.
fn check_weight(geom: &Geometry, c: usize, layout: &Layout, op: &str) -> Result<()> {
    let dims = layout.shape().dims();
    if dims != [c, 1, geom.kernel[0], geom.kernel[1]] {
        bail!(
            "{op}: weights {dims:?}, expected [{c}, 1, {}, {}]",
            geom.kernel[0],
            geom.kernel[1]
        );
    }
    Ok(())
}

/// The forward pass: `x` `[N, C, H, W]` and `w` `[C, 1, KH, KW]`.
#[derive(Clone, Debug)]
struct DepthwiseConv {
    geom: Geometry,
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "mfn-depthwise-conv2d-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        check_weight(&self.geom, c, wl, self.name())?;
        let x = host_f32(xs, xl, self.name())?;
        let wt = host_f32(ws, wl, self.name())?;
        let [oh, ow] = self.geom.out_hw(h, w)?;
        let taps = self.geom.kernel[0] * self.geom.kernel[1];
        let spans = self.geom.spans(w, ow);
        let s = self.geom.stride;
        let mut y = vec![0f32; n * c * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let k = &wt[(i % c) * taps..][..taps];
                for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
                    for ky in 0..self.geom.kernel[0] {
                        let Some(iy) = self.geom.row(oy, ky, h) else {
                            continue;
                        };
                        let in_row = &src[iy * w..][..w];
                        for (kx, span) in spans.iter().enumerate() {
                            if let Some(sp) = span {
                                axpy_gather(
                                    &mut out_row[sp.first..][..sp.len],
                                    k[ky * self.geom.kernel[1] + kx],
                                    &in_row[sp.start..],
                                    s,
                                );
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        check_weight(&self.geom, c, wl, self.name())?;
        let [oh, ow] = self.geom.out_hw(h, w)?;
        let shape = self.geom.cuda_shape([n, c, h, w], [oh, ow])?;
        let y = crate::cuda::depthwise_forward(xs, xl, ws, wl, shape, self.name())?;
        Ok((y, Shape::from((n, c, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Either argument may be a constant (the input images, frozen weights): skip its
        // gradient, which autograd would discard.
        let dx = if x.track_op() {
            let (_, _, h, wd) = x.dims4()?;
            let op = DepthwiseConvInputGrad {
                geom: self.geom,
                in_hw: [h, wd],
            };
            Some(grad.apply_op2_no_bwd(&w.contiguous()?, &op)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let op = DepthwiseConvWeightGrad { geom: self.geom };
            Some(grad.apply_op2_no_bwd(&x.contiguous()?, &op)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// The input gradient, a transposed depthwise conv: `grad` `[N, C, OH, OW]` and `w`
/// `[C, 1, KH, KW]` to `[N, C, H, W]`.
#[derive(Clone, Debug)]
struct DepthwiseConvInputGrad {
    geom: Geometry,
    /// The input size: with a stride above 1 it does not follow from the output size.
    in_hw: [usize; 2],
}

impl CustomOp2 for DepthwiseConvInputGrad {
    fn name(&self) -> &'static str {
        "mfn-depthwise-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, oh, ow) = gl.shape().dims4()?;
        let [h, w] = self.in_hw;
        if self.geom.out_hw(h, w)? != [oh, ow] {
            bail!(
                "{}: gradient {:?} does not come from a {h}x{w} input",
                self.name(),
                gl.shape().dims()
            );
        }
        check_weight(&self.geom, c, wl, self.name())?;
        let g = host_f32(gs, gl, self.name())?;
        let wt = host_f32(ws, wl, self.name())?;
        let taps = self.geom.kernel[0] * self.geom.kernel[1];
        let spans = self.geom.spans(w, ow);
        let s = self.geom.stride;
        // Input pixels no tap reaches (the bottom and right edges with a stride above 1)
        // keep this zero.
        let mut dx = vec![0f32; n * c * h * w];
        dx.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let k = &wt[(i % c) * taps..][..taps];
                for (oy, g_row) in src.chunks_exact(ow).enumerate() {
                    for ky in 0..self.geom.kernel[0] {
                        let Some(iy) = self.geom.row(oy, ky, h) else {
                            continue;
                        };
                        let dx_row = &mut dst[iy * w..][..w];
                        for (kx, span) in spans.iter().enumerate() {
                            if let Some(sp) = span {
                                axpy_scatter(
                                    &mut dx_row[sp.start..],
                                    k[ky * self.geom.kernel[1] + kx],
                                    &g_row[sp.first..][..sp.len],
                                    s,
                                );
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, oh, ow) = gl.shape().dims4()?;
        let [h, w] = self.in_hw;
        if self.geom.out_hw(h, w)? != [oh, ow] {
            bail!(
                "{}: gradient {:?} does not come from a {h}x{w} input",
                self.name(),
                gl.shape().dims()
            );
        }
        check_weight(&self.geom, c, wl, self.name())?;
        let shape = self.geom.cuda_shape([n, c, h, w], [oh, ow])?;
        let dx = crate::cuda::depthwise_input_grad(gs, gl, ws, wl, shape, self.name())?;
        Ok((dx, Shape::from((n, c, h, w))))
    }
}

/// The weight gradient: `grad` `[N, C, OH, OW]` and `x` `[N, C, H, W]` to `[C, 1, KH, KW]`.
#[derive(Clone, Debug)]
struct DepthwiseConvWeightGrad {
    geom: Geometry,
}

impl CustomOp2 for DepthwiseConvWeightGrad {
    fn name(&self) -> &'static str {
        "mfn-depthwise-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, oh, ow) = gl.shape().dims4()?;
        let (xn, xc, h, w) = xl.shape().dims4()?;
        if (xn, xc) != (n, c) || self.geom.out_hw(h, w)? != [oh, ow] {
            bail!(
                "{}: gradient {:?} does not match input {:?}",
                self.name(),
                gl.shape().dims(),
                xl.shape().dims()
            );
        }
        let g = host_f32(gs, gl, self.name())?;
        let x = host_f32(xs, xl, self.name())?;
        let [kh, kw] = self.geom.kernel;
        let spans = self.geom.spans(w, ow);
        let s = self.geom.stride;
        let mut dw = vec![0f32; c * kh * kw];
        // One task per channel, images in order: a fixed summation order without atomics.
        dw.par_chunks_mut(kh * kw)
            .enumerate()
            .for_each(|(ch, out)| {
                // One partial sum per tap and output column: the per-row updates are then
                // elementwise multiply-adds that vectorise, and the columns are summed once
                // at the end.
                let mut acc = vec![0f32; kh * kw * ow];
                for img in 0..n {
                    let plane = img * c + ch;
                    let gp = &g[plane * oh * ow..][..oh * ow];
                    let xp = &x[plane * h * w..][..h * w];
                    for (oy, g_row) in gp.chunks_exact(ow).enumerate() {
                        for ky in 0..kh {
                            let Some(iy) = self.geom.row(oy, ky, h) else {
                                continue;
                            };
                            let in_row = &xp[iy * w..][..w];
                            for (kx, span) in spans.iter().enumerate() {
                                if let Some(sp) = span {
                                    mul_acc(
                                        &mut acc[(ky * kw + kx) * ow + sp.first..][..sp.len],
                                        &g_row[sp.first..][..sp.len],
                                        &in_row[sp.start..],
                                        s,
                                    );
                                }
                            }
                        }
                    }
                }
                for (o, cols) in out.iter_mut().zip(acc.chunks_exact(ow)) {
                    *o = cols.iter().sum();
                }
            });
        Ok((CpuStorage::F32(dw), Shape::from((c, 1, kh, kw))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, oh, ow) = gl.shape().dims4()?;
        let (xn, xc, h, w) = xl.shape().dims4()?;
        if (xn, xc) != (n, c) || self.geom.out_hw(h, w)? != [oh, ow] {
            bail!(
                "{}: gradient {:?} does not match input {:?}",
                self.name(),
                gl.shape().dims(),
                xl.shape().dims()
            );
        }
        let shape = self.geom.cuda_shape([n, c, h, w], [oh, ow])?;
        let dw = crate::cuda::depthwise_weight_grad(gs, gl, xs, xl, shape, self.name())?;
        let [kh, kw] = self.geom.kernel;
        Ok((dw, Shape::from((c, 1, kh, kw))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// Deterministic values in about -1..1.
    fn noise(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The output and the gradients of `sum(y * r)` with respect to `x` and `w`.
    fn run(
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        conv: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> [Tensor; 3] {
        let xv = Var::from_tensor(x).unwrap();
        let wv = Var::from_tensor(w).unwrap();
        let y = conv(xv.as_tensor(), wv.as_tensor()).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        [
            y,
            grads.get(xv.as_tensor()).unwrap().clone(),
            grads.get(wv.as_tensor()).unwrap().clone(),
        ]
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Max difference relative to the largest magnitude in `want`.
    fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
        assert_eq!(got.dims(), want.dims());
        max_abs(&(got - want).unwrap()) / max_abs(want).max(1e-12)
    }

    /// candle's grouped conv on the explicitly padded input, cropped to the pixels the
    /// kernel reaches: candle's own backward sizes the input gradient of both axes from the
    /// height alone, which is wrong when only one axis has unread pixels at its end.
    fn candle_reference(x: &Tensor, w: &Tensor, stride: usize, pad: [usize; 2]) -> Result<Tensor> {
        let (_, c, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let used = |size: usize, k: usize, p: usize| (size + 2 * p - k) / stride * stride + k;
        x.pad_with_zeros(2, pad[0], pad[0])?
            .pad_with_zeros(3, pad[1], pad[1])?
            .narrow(2, 0, used(h, kh, pad[0]))?
            .narrow(3, 0, used(wd, kw, pad[1]))?
            .conv2d(w, 0, stride, 1, c)
    }

    fn check(x_dims: [usize; 4], kernel: [usize; 2], stride: usize, pad: [usize; 2]) {
        let c = x_dims[1];
        let x = noise(&x_dims, 1);
        let w = noise(&[c, 1, kernel[0], kernel[1]], 2);
        let y_dims = candle_reference(&x, &w, stride, pad)
            .unwrap()
            .dims()
            .to_vec();
        let r = noise(&y_dims, 3);
        let got = run(&x, &w, &r, |x, w| depthwise_conv2d(x, w, stride, pad));
        let leftover = |size: usize, k: usize, p: usize| (size + 2 * p - k) % stride;
        let candle_is_sound = pad[0] == pad[1]
            && leftover(x_dims[2], kernel[0], pad[0]) == leftover(x_dims[3], kernel[1], pad[1]);
        let want = if candle_is_sound {
            run(&x, &w, &r, |x, w| x.conv2d(w, pad[0], stride, 1, c))
        } else {
            run(&x, &w, &r, |x, w| candle_reference(x, w, stride, pad))
        };
        for ((what, g), w) in ["y", "dx", "dw"].iter().zip(&got).zip(&want) {
            let d = rel_diff(g, w);
            assert!(
                d <= 1e-4,
                "{what}: relative diff {d} for {x_dims:?} k{kernel:?} s{stride} p{pad:?}"
            );
        }
    }

    #[test]
    fn matches_candle_conv_and_its_gradients() {
        // 3x3, stride 1, pad 1, odd and even sizes.
        check([2, 5, 9, 7], [3, 3], 1, [1, 1]);
        check([3, 4, 8, 8], [3, 3], 1, [1, 1]);
        // 3x3, stride 2, pad 1.
        check([2, 6, 7, 9], [3, 3], 2, [1, 1]);
        check([2, 3, 56, 56], [3, 3], 2, [1, 1]);
        // Stride 2 without padding: the last row and column are never read.
        check([2, 3, 8, 10], [3, 3], 2, [0, 0]);
        // The GDConv: the whole 7x7 map to one value per channel.
        check([2, 512, 7, 7], [7, 7], 1, [0, 0]);
        // A non-square kernel with unequal padding, a 1x1 input under a padded 3x3, stride 3.
        check([2, 3, 11, 6], [3, 5], 2, [1, 2]);
        check([3, 2, 1, 1], [3, 3], 1, [1, 1]);
        check([1, 4, 5, 5], [3, 3], 3, [1, 1]);
    }

    #[test]
    fn non_contiguous_input_matches() {
        let x = noise(&[2, 3, 6, 9], 4).transpose(2, 3).unwrap();
        assert!(!x.is_contiguous());
        let w = noise(&[3, 1, 3, 3], 5);
        let r = noise(&[2, 3, 5, 3], 6);
        let got = run(&x, &w, &r, |x, w| depthwise_conv2d(x, w, 2, [1, 1]));
        let want = run(&x, &w, &r, |x, w| candle_reference(x, w, 2, [1, 1]));
        for (g, w) in got.iter().zip(&want) {
            assert!(rel_diff(g, w) <= 1e-4);
        }
    }

    #[test]
    fn constant_arguments_still_get_the_other_gradient() {
        let x = noise(&[2, 3, 6, 6], 7);
        let w = Var::from_tensor(&noise(&[3, 1, 3, 3], 8)).unwrap();
        let y = depthwise_conv2d(&x, w.as_tensor(), 1, [1, 1]).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        let want = x.conv2d(w.as_tensor(), 1, 1, 1, 3).unwrap();
        let want = want.sum_all().unwrap().backward().unwrap();
        let (g, w) = (grads.get(w.as_tensor()), want.get(w.as_tensor()));
        assert!(rel_diff(g.unwrap(), w.unwrap()) <= 1e-4);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let cases = [
            ([5, 16, 20, 18], [3, 3], 1, [1, 1]),
            ([4, 12, 15, 13], [3, 3], 2, [1, 1]),
            ([6, 64, 7, 7], [7, 7], 1, [0, 0]),
        ];
        for (i, (dims, kernel, stride, pad)) in cases.into_iter().enumerate() {
            let x = noise(&dims, 10 + i as u64);
            let w = noise(&[dims[1], 1, kernel[0], kernel[1]], 20 + i as u64);
            let y_dims = candle_reference(&x, &w, stride, pad)
                .unwrap()
                .dims()
                .to_vec();
            let r = noise(&y_dims, 30 + i as u64);
            let bits = |threads: usize| -> Vec<Vec<u32>> {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| run(&x, &w, &r, |x, w| depthwise_conv2d(x, w, stride, pad)))
                    .iter()
                    .map(|t| {
                        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                        v.into_iter().map(f32::to_bits).collect()
                    })
                    .collect()
            };
            let one = bits(1);
            assert_eq!(one, bits(2), "case {i}: 1 vs 2 threads");
            assert_eq!(one, bits(3), "case {i}: 1 vs 3 threads");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = noise(&[1, 4, 6, 6], 1);
        let ok = noise(&[4, 1, 3, 3], 2);
        assert!(depthwise_conv2d(&x, &ok, 1, [1, 1]).is_ok());
        // Weights for another channel count, a dense conv's weights, the wrong rank.
        assert!(depthwise_conv2d(&x, &noise(&[3, 1, 3, 3], 2), 1, [1, 1]).is_err());
        assert!(depthwise_conv2d(&x, &noise(&[4, 4, 3, 3], 2), 1, [1, 1]).is_err());
        assert!(depthwise_conv2d(&x, &noise(&[4, 3, 3], 2), 1, [1, 1]).is_err());
        assert!(depthwise_conv2d(&noise(&[4, 6, 6], 1), &ok, 1, [1, 1]).is_err());
        // A zero stride, a kernel larger than the padded input, an empty plane.
        assert!(depthwise_conv2d(&x, &ok, 0, [1, 1]).is_err());
        assert!(depthwise_conv2d(&x, &noise(&[4, 1, 9, 3], 2), 1, [1, 1]).is_err());
        assert!(depthwise_conv2d(&noise(&[1, 4, 0, 6], 1), &ok, 1, [2, 2]).is_err());
        assert!(depthwise_conv2d(&x, &noise(&[4, 1, 0, 3], 2), 1, [1, 1]).is_err());
        assert!(depthwise_conv2d(&x, &ok, 1, [usize::MAX / 2, 1]).is_err());
        // The same checks hold on the fallback path.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let w64 = ok.to_dtype(DType::F64).unwrap();
        assert!(depthwise_conv2d(&x64, &w64, 1, [1, 1]).is_ok());
        assert!(depthwise_conv2d(&x64, &noise(&[3, 1, 3, 3], 2), 1, [1, 1]).is_err());
        assert!(depthwise_conv2d(&x64, &ok, 1, [1, 1]).is_err());
    }

    #[test]
    fn other_dtypes_fall_back_to_candle_with_right_gradients() {
        // Unequal padding, and a leftover column but no leftover row: both need the
        // fallback's explicit padding and crop.
        for (dims, stride, pad) in [([2, 3, 7, 9], 2, [1, 1]), ([2, 3, 7, 10], 2, [1, 1])]
            .into_iter()
            .chain([([2, 3, 6, 6], 1, [0, 2])])
        {
            let x = noise(&dims, 1);
            let w = noise(&[3, 1, 3, 3], 2);
            let y_dims = candle_reference(&x, &w, stride, pad)
                .unwrap()
                .dims()
                .to_vec();
            let r = noise(&y_dims, 3);
            let conv = |x: &Tensor, w: &Tensor| depthwise_conv2d(x, w, stride, pad);
            let want = run(&x, &w, &r, conv);
            let f64s = [&x, &w, &r].map(|t| t.to_dtype(DType::F64).unwrap());
            let got = run(&f64s[0], &f64s[1], &f64s[2], conv);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.dtype(), DType::F64);
                let d = rel_diff(&g.to_dtype(DType::F32).unwrap(), w);
                assert!(d <= 1e-5, "{dims:?} s{stride} p{pad:?}: {d}");
            }
        }
    }

    #[test]
    fn whole_model_gradients_match_candle_convs() {
        let device = Device::Cpu;
        let config = crate::Config::paper();
        let vars = VarMap::new();
        let model =
            crate::MobileFaceNet::new(&config, VarBuilder::from_varmap(&vars, DType::F32, &device))
                .unwrap();
        // Deterministic He-scaled weights instead of the random ones. PReLU slopes of 1 make
        // the network smooth: with real slopes, rounding-level differences flip a few
        // activations across the kink, and even candle's own gradients then move by
        // percents when the input moves by one part in 10^7.
        let mut named: Vec<_> = vars.data().lock().unwrap().clone().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, var)) in named.iter().enumerate() {
            let t = var.as_tensor();
            if name.ends_with("_relu_gamma") {
                var.set(&t.ones_like().unwrap()).unwrap();
            } else if t.rank() > 1 {
                let fan_in = t.elem_count() / t.dim(0).unwrap();
                let gain = (if t.rank() == 4 { 2.0 } else { 1.0 } * 3.0 / fan_in as f64).sqrt();
                var.set(&(noise(t.dims(), 100 + i as u64) * gain).unwrap())
                    .unwrap();
            }
        }
        let [h, w] = config.input_size;
        let x = ((noise(&[4, 3, h, w], 40) + 1.0).unwrap() * 127.5).unwrap();
        let r = noise(&[4, config.embedding_size], 41);
        let grads = |conv: GraphConv| {
            let y = model.forward_graph_with(&x, true, conv).unwrap();
            (&y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        };
        let native = grads(GraphConv::Native);
        let candle = grads(GraphConv::Candle);
        let pairs: Vec<_> = named
            .iter()
            .filter_map(|(name, var)| {
                let t = var.as_tensor();
                match (native.get(t), candle.get(t)) {
                    (Some(g), Some(want)) => Some((name, g, want)),
                    // Running statistics are not in the graph.
                    (None, None) => None,
                    _ => panic!("{name}: a gradient on one path only"),
                }
            })
            .collect();
        // Every conv, BatchNorm and PReLU parameter, and the embedding layer's.
        assert!(pairs.len() > 100, "only {} gradients", pairs.len());
        // Train-mode BatchNorm cancels a constant shift, so the gradients of the BatchNorm
        // shifts feeding another BatchNorm are zero plus rounding noise: measure each
        // gradient against the larger of its own scale and a small fraction of the largest.
        let global = pairs
            .iter()
            .map(|(_, _, want)| max_abs(want))
            .fold(0f32, f32::max);
        for (name, g, want) in &pairs {
            let diff = max_abs(&(*g - *want).unwrap());
            let scale = max_abs(want).max(1e-2 * global);
            assert!(diff <= 1e-3 * scale, "{name}: diff {diff}, scale {scale}");
        }
    }
}
