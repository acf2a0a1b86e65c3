//! CPU kernels for inference with BatchNorm already folded into the weights.
//!
//! candle runs a conv with `groups > 1` as one convolution per group and concatenates the
//! results, which makes depthwise convs orders of magnitude slower than they need to be.
//! These kernels work on a whole NCHW tensor at once, one channel plane per rayon task.
//! With the `cuda` feature both ops also run on CUDA devices (f32, f16 or bf16 storage,
//! f32 arithmetic), copying their parameters to the device on each call; the network's
//! own layers keep theirs on the device instead. Other devices fall back to candle's own
//! ops, so results are the same everywhere.

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

    /// One output plane: accumulate each kernel tap over whole rows, which keeps the inner
    /// loop a plain strided multiply-add the compiler vectorises.
    fn plane(&self, c: usize, src: &[f32], h: usize, w: usize, dst: &mut [f32], ow: usize) {
        let [kh, kw] = self.kernel;
        let [ph, pw] = self.pad;
        let s = self.stride;
        let taps = &self.weight[c * kh * kw..(c + 1) * kh * kw];
        dst.fill(self.bias[c]);
        for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
            for ky in 0..kh {
                let iy = (oy * s + ky) as isize - ph as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let in_row = &src[iy as usize * w..(iy as usize + 1) * w];
                for kx in 0..kw {
                    let tap = taps[ky * kw + kx];
                    // Output columns whose input column `ox*s + kx - pw` is inside the row.
                    let first = pw.saturating_sub(kx).div_ceil(s);
                    let Some(reach) = (w + pw).checked_sub(kx + 1) else {
                        continue;
                    };
                    let last = (reach / s).min(ow - 1);
                    if first > last {
                        continue;
                    }
                    let start = first * s + kx - pw;
                    if s == 1 {
                        let n = last - first + 1;
                        for (o, i) in out_row[first..=last]
                            .iter_mut()
                            .zip(&in_row[start..start + n])
                        {
                            *o += tap * *i;
                        }
                    } else {
                        for (o, i) in out_row[first..=last]
                            .iter_mut()
                            .zip(in_row[start..].iter().step_by(s))
                        {
                            *o += tap * *i;
                        }
                    }
                }
            }
        }
        if let Some(slope) = &self.prelu {
            let a = slope[c];
            for v in dst.iter_mut() {
                if *v < 0.0 {
                    *v *= a;
                }
            }
        }
        if let Some(cap) = self.cap {
            dst.iter_mut().for_each(|v| *v = v.min(cap));
        }
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
        let [oh, ow] = self.out_hw(h, w);
        let mut dst = vec![0f32; n * c * oh * ow];
        dst.par_chunks_mut(oh * ow)
            .zip(src.par_chunks(h * w))
            .enumerate()
            .for_each(|(i, (out, inp))| self.plane(i % c, inp, h, w, out, ow));
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

/// Adds a per-channel bias and applies an optional per-channel PReLU and upper clamp, in
/// one pass.
#[derive(Clone, Debug)]
pub struct BiasPrelu {
    /// One bias per channel.
    pub bias: Arc<Vec<f32>>,
    /// One PReLU slope per channel, or `None` for bias only. ReLU is a zero slope.
    pub prelu: Option<Arc<Vec<f32>>>,
    /// An upper clamp after the activation (6 for ReLU6), or `None`.
    pub cap: Option<f32>,
}

impl BiasPrelu {
    /// Applies the op to a tensor whose dim 1 is the channel axis.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for BiasPrelu {
    fn name(&self) -> &'static str {
        "mfn-bias-prelu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        if dims.len() < 2 || dims[1] != self.bias.len() {
            candle_core::bail!(
                "bias/prelu: input shape {dims:?} does not have {} channels in dim 1",
                self.bias.len()
            );
        }
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((a, b))) => &data[a..b],
            (CpuStorage::F32(_), None) => {
                candle_core::bail!("bias/prelu: input must be contiguous")
            }
            _ => candle_core::bail!("bias/prelu: only f32 is supported"),
        };
        let c = dims[1];
        let plane = dims[2..].iter().product::<usize>().max(1);
        let mut dst = src.to_vec();
        dst.par_chunks_mut(plane).enumerate().for_each(|(i, p)| {
            let b = self.bias[i % c];
            match &self.prelu {
                Some(slope) => {
                    let a = slope[i % c];
                    for v in p.iter_mut() {
                        let y = *v + b;
                        *v = if y < 0.0 { y * a } else { y };
                    }
                }
                None => p.iter_mut().for_each(|v| *v += b),
            }
            if let Some(cap) = self.cap {
                p.iter_mut().for_each(|v| *v = v.min(cap));
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let c = self.bias.len();
        if self.prelu.as_ref().is_some_and(|a| a.len() != c) {
            candle_core::bail!(
                "bias/prelu: {c} biases, {} slopes",
                self.prelu.as_ref().map_or(0, |a| a.len())
            );
        }
        let params = crate::cuda::pack_params(
            &[],
            Some(&self.bias),
            self.prelu.as_deref().map(|v| v.as_slice()),
        );
        let params = crate::cuda::upload(&storage.device, &params)?;
        let layout_p = crate::cuda::ParamLayout {
            channels: c,
            taps: 0,
            bias: true,
            slope: self.prelu.is_some(),
        };
        let y = crate::cuda::bias_prelu(
            storage,
            layout,
            &params.slice(..),
            layout_p,
            self.cap,
            self.name(),
        )?;
        Ok((y, layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

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
    }

    #[test]
    fn bias_prelu_applies_per_channel() {
        let op = BiasPrelu {
            bias: Arc::new(vec![1.0, -1.0]),
            prelu: Some(Arc::new(vec![0.5, 0.25])),
            cap: None,
        };
        let x = Tensor::new(&[[[0.5f32, -3.0]], [[0.5, 2.0]]], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 2))
            .unwrap();
        let y = op.forward(&x).unwrap();
        assert_eq!(
            y.i((0, 0, 0)).unwrap().to_vec1::<f32>().unwrap(),
            [1.5, -1.0]
        );
        assert_eq!(
            y.i((0, 1, 0)).unwrap().to_vec1::<f32>().unwrap(),
            [-0.125, 1.0]
        );
    }

    #[test]
    fn bias_relu6_clamps_both_ends() {
        let op = BiasPrelu {
            bias: Arc::new(vec![1.0]),
            prelu: Some(Arc::new(vec![0.0])),
            cap: Some(6.0),
        };
        let x = Tensor::new(&[-4.0f32, 2.0, 9.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 3))
            .unwrap();
        let y = op.forward(&x).unwrap().flatten_all().unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [0.0, 3.0, 6.0]);
    }
}
