//! Activations: the inference [`BiasPrelu`] (bias, PReLU and ReLU6 clamp in one pass,
//! forward only) and the training [`prelu`] (PReLU, ReLU, ReLU6) with its native backward.
//!
//! Both run on CUDA devices with the `cuda` feature; other devices and dtypes fall back to
//! candle's ops.

use std::sync::Arc;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::{host_f32, nc_plane, GradInputs};

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

struct Prelu {
    cap: Option<f32>,
}

/// `min(max(x, 0) + a * min(x, 0), cap)` with one slope `a` per channel (dim 1),
/// differentiable in `x` and `slope`. ReLU is a zero slope that takes no gradient; pass
/// `cap = Some(6.0)` for ReLU6.
pub fn prelu(x: &Tensor, slope: &Tensor, cap: Option<f32>) -> Result<Tensor> {
    if crate::native_device(x.device()) && x.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2_arc(&slope.contiguous()?, Arc::new(Box::new(Prelu { cap })));
    }
    let mut shape = vec![1; x.rank()];
    shape[1] = slope.elem_count();
    // The folded inference path may run in f16/bf16 with f32 slopes.
    let a = slope.reshape(shape)?.to_dtype(x.dtype())?;
    let y = (x.relu()? + x.minimum(0f32)?.broadcast_mul(&a)?)?;
    match cap {
        Some(c) => y.minimum(c),
        None => Ok(y),
    }
}

impl CustomOp2 for Prelu {
    fn name(&self) -> &'static str {
        "mfn-prelu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, plane) = nc_plane(xl.shape(), "prelu")?;
        let x = host_f32(xs, xl, "prelu")?;
        let a = host_f32(ss, sl, "prelu")?;
        if a.len() != c {
            bail!("prelu: {c} channels, {} slopes", a.len());
        }
        let cap = self.cap.unwrap_or(f32::INFINITY);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (o, xi))| {
                let a = a[i % c];
                for (o, &v) in o.iter_mut().zip(xi) {
                    *o = (v.max(0.0) + a * v.min(0.0)).min(cap);
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::prelu_forward(xs, xl, ss, sl, self.cap, "prelu")?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        slope: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = slope.elem_count();
        let packed =
            x.apply_op3_no_bwd(&grad.contiguous()?, slope, &PreluGrad { cap: self.cap })?;
        let len = x.elem_count();
        Ok((
            Some(packed.narrow(0, 0, len)?.reshape(x.shape())?),
            Some(packed.narrow(0, len, c)?),
        ))
    }
}

/// The backward of [`Prelu`]: `[dx..., dslope (C)]`.
struct PreluGrad {
    cap: Option<f32>,
}

impl CustomOp3 for PreluGrad {
    fn name(&self) -> &'static str {
        "mfn-prelu-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let GradInputs {
            n,
            c,
            plane,
            x,
            dy,
            per_channel: a,
        } = GradInputs::read("prelu grad", xs, xl, ds, dl, ss, sl)?;
        let cap = self.cap.unwrap_or(f32::INFINITY);
        let mut out = vec![0f32; x.len() + c];
        let (dx, da) = out.split_at_mut(x.len());
        dx.par_chunks_mut(plane)
            .zip(dy.par_chunks(plane).zip(x.par_chunks(plane)))
            .enumerate()
            .for_each(|(i, (o, (d, v)))| {
                let a = a[i % c];
                for ((o, &d), &v) in o.iter_mut().zip(d).zip(v) {
                    // Zero gradient where the cap clips, as PyTorch's ReLU6.
                    *o = if v > 0.0 {
                        if v < cap {
                            d
                        } else {
                            0.0
                        }
                    } else {
                        a * d
                    };
                }
            });
        let sums: Vec<f32> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mut s = 0f64;
                for i in 0..n {
                    let r = (i * c + ch) * plane..(i * c + ch + 1) * plane;
                    for (&d, &v) in dy[r.clone()].iter().zip(&x[r]) {
                        if v < 0.0 {
                            s += (d * v) as f64;
                        }
                    }
                }
                s as f32
            })
            .collect();
        da.copy_from_slice(&sums);
        Ok((CpuStorage::F32(out), Shape::from(x.len() + c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, c, _) = nc_plane(xl.shape(), "prelu grad")?;
        let out = crate::cuda::prelu_grad((xs, xl), (ds, dl), (ss, sl), self.cap, "prelu grad")?;
        Ok((out, Shape::from(xl.shape().elem_count() + c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

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
