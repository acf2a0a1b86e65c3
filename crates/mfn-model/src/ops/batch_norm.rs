//! BatchNorm with batch statistics for the training graph, with its native backward.
//!
//! candle builds BatchNorm in train mode from about a dozen broadcast ops, each allocating
//! and walking a whole activation tensor, forward and backward; this does one or two passes
//! over NCHW planes instead. Reductions run per channel in a fixed order, so results do not
//! depend on the number of threads. With the `cuda` feature the same op runs on CUDA
//! devices as native kernels (one block per channel for the reductions). Other devices and
//! dtypes fall back to candle's ops.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{host_f32, nc_plane, GradInputs};

/// Per-channel mean and biased variance, accumulated in f64 over images in order.
fn channel_stats(x: &[f32], n: usize, c: usize, plane: usize) -> Vec<(f64, f64)> {
    let m = (n * plane) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || (0..n).map(move |i| &x[(i * c + ch) * plane..(i * c + ch + 1) * plane]);
            let sum: f64 = planes()
                .map(|p| p.iter().map(|&v| v as f64).sum::<f64>())
                .sum();
            let mean = sum / m;
            let sq: f64 = planes()
                .map(|p| p.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
                .sum();
            (mean, sq / m)
        })
        .collect()
}

/// Batch statistics of the last forward pass: per-channel mean and unbiased variance,
/// for the running averages.
pub type BatchStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

struct BatchNormTrain {
    eps: f64,
    stats: BatchStats,
}

/// BatchNorm over the batch and spatial axes of `x` (`[N, C, ...]`), scaled by `gamma` and
/// shifted by `beta` (`[C]`), differentiable in all three. `stats` receives the batch mean
/// and unbiased variance for the running averages.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    stats: &BatchStats,
) -> Result<Tensor> {
    let op = BatchNormTrain {
        eps,
        stats: stats.clone(),
    };
    if crate::native_device(x.device()) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op3_arc(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            Arc::new(Box::new(op)),
        );
    }
    // Elsewhere: candle's ops, statistics included.
    let c = x.dim(1)?;
    let mut axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
    axes.sort();
    let mut shape = vec![1; x.rank()];
    shape[1] = c;
    let mean = x.mean_keepdim(axes.clone())?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(axes)?;
    let m = (x.elem_count() / c) as f64;
    let mean_v: Vec<f32> = mean.flatten_all()?.to_vec1()?;
    let var_v: Vec<f32> = (var.flatten_all()? * (m / (m - 1.0).max(1.0)))?.to_vec1()?;
    if let Ok(mut s) = stats.lock() {
        *s = Some((mean_v, var_v));
    }
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "mfn-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, plane) = nc_plane(xl.shape(), "batch norm")?;
        let x = host_f32(xs, xl, "batch norm")?;
        let (g, b) = (
            host_f32(gs, gl, "batch norm")?,
            host_f32(bs, bl, "batch norm")?,
        );
        if g.len() != c || b.len() != c {
            bail!(
                "batch norm: {c} channels, but gamma/beta have {}/{}",
                g.len(),
                b.len()
            );
        }
        let stats = channel_stats(x, n, c, plane);
        let m = (n * plane) as f64;
        if let Ok(mut s) = self.stats.lock() {
            *s = Some((
                stats.iter().map(|s| s.0 as f32).collect(),
                stats
                    .iter()
                    .map(|s| (s.1 * m / (m - 1.0).max(1.0)) as f32)
                    .collect(),
            ));
        }
        let affine: Vec<(f32, f32)> = stats
            .iter()
            .zip(g.iter().zip(b))
            .map(|(&(mean, var), (&g, &b))| {
                let scale = g as f64 / (var + self.eps).sqrt();
                (scale as f32, (b as f64 - mean * scale) as f32)
            })
            .collect();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, (o, xi))| {
                let (s, t) = affine[i % c];
                for (o, &v) in o.iter_mut().zip(xi) {
                    *o = v * s + t;
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, _, plane) = nc_plane(xl.shape(), "batch norm")?;
        let (y, mean, var) =
            crate::cuda::batch_norm_forward((xs, xl), (gs, gl), (bs, bl), self.eps, "batch norm")?;
        let m = (n * plane) as f64;
        if let Ok(mut s) = self.stats.lock() {
            let unbiased = var
                .iter()
                .map(|&v| (v as f64 * m / (m - 1.0).max(1.0)) as f32)
                .collect();
            *s = Some((mean, unbiased));
        }
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = gamma.elem_count();
        let packed =
            x.apply_op3_no_bwd(&grad.contiguous()?, gamma, &BatchNormGrad { eps: self.eps })?;
        let len = x.elem_count();
        let dx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, len, c)?;
        let dbeta = packed.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward of [`BatchNormTrain`]: `[dx..., dgamma (C), dbeta (C)]` in one buffer.
struct BatchNormGrad {
    eps: f64,
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "mfn-batch-norm-train-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let GradInputs {
            n,
            c,
            plane,
            x,
            dy,
            per_channel: g,
        } = GradInputs::read("batch norm grad", xs, xl, ds, dl, gs, gl)?;
        let stats = channel_stats(x, n, c, plane);
        let m = (n * plane) as f64;
        // Per channel: dbeta = sum(dy), dgamma = sum(dy * xhat).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, var) = stats[ch];
                let inv = 1.0 / (var + self.eps).sqrt();
                let (mut db, mut dg) = (0f64, 0f64);
                for i in 0..n {
                    let r = (i * c + ch) * plane..(i * c + ch + 1) * plane;
                    for (&d, &v) in dy[r.clone()].iter().zip(&x[r]) {
                        db += d as f64;
                        dg += d as f64 * (v as f64 - mean) * inv;
                    }
                }
                (db, dg)
            })
            .collect();
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, tail) = out.split_at_mut(x.len());
        // dx = gamma * inv / M * (M dy - dbeta - xhat * dgamma)
        let coef: Vec<(f32, f32, f32, f32)> = (0..c)
            .map(|ch| {
                let (mean, var) = stats[ch];
                let inv = 1.0 / (var + self.eps).sqrt();
                let (db, dg) = sums[ch];
                let k = g[ch] as f64 * inv;
                (
                    k as f32,
                    (k * db / m) as f32,
                    (k * dg * inv / m) as f32,
                    mean as f32,
                )
            })
            .collect();
        dx.par_chunks_mut(plane)
            .zip(dy.par_chunks(plane).zip(x.par_chunks(plane)))
            .enumerate()
            .for_each(|(i, (o, (d, v)))| {
                let (k, kb, kg, mean) = coef[i % c];
                for ((o, &d), &v) in o.iter_mut().zip(d).zip(v) {
                    *o = k * d - kb - kg * (v - mean);
                }
            });
        for ch in 0..c {
            tail[ch] = sums[ch].1 as f32;
            tail[c + ch] = sums[ch].0 as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, c, _) = nc_plane(xl.shape(), "batch norm grad")?;
        let out = crate::cuda::batch_norm_grad(
            (xs, xl),
            (ds, dl),
            (gs, gl),
            self.eps,
            "batch norm grad",
        )?;
        Ok((out, Shape::from(xl.shape().elem_count() + 2 * c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::prelu;
    use candle_core::{Device, Var};

    fn ramp(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.731 + seed).sin() * 2.3).fract() * 3.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
            / scale
    }

    /// candle's own BatchNorm (train mode) and PReLU, as the reference.
    fn reference(x: &Tensor, g: &Tensor, b: &Tensor, a: &Tensor, cap: Option<f32>) -> Tensor {
        let c = g.elem_count();
        let axes = vec![0, 2, 3];
        let mean = x.mean_keepdim(axes.clone()).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(axes).unwrap();
        let y = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&g.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        let a = a.reshape((1, c, 1, 1)).unwrap();
        let y = (y.relu().unwrap() + y.minimum(0f32).unwrap().broadcast_mul(&a).unwrap()).unwrap();
        match cap {
            Some(cap) => y.minimum(cap).unwrap(),
            None => y,
        }
    }

    #[test]
    fn forward_and_gradients_match_candle() {
        for (shape, cap) in [
            ([4, 3, 5, 6], None),
            ([2, 5, 7, 7], Some(1.0f32)),
            ([3, 4, 1, 1], None),
        ] {
            let c = shape[1];
            let x = Var::from_tensor(&ramp(&shape, 0.3)).unwrap();
            let g = Var::from_tensor(&(ramp(&[c], 1.0) + 1.5).unwrap()).unwrap();
            let b = Var::from_tensor(&ramp(&[c], 2.0)).unwrap();
            let a = Var::from_tensor(&(ramp(&[c], 3.0) * 0.1).unwrap()).unwrap();
            let weights = ramp(&shape, 4.0);
            let stats: BatchStats = Default::default();
            let ours = prelu(
                &batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, &stats)
                    .unwrap(),
                a.as_tensor(),
                cap,
            )
            .unwrap();
            let theirs = reference(
                x.as_tensor(),
                g.as_tensor(),
                b.as_tensor(),
                a.as_tensor(),
                cap,
            );
            assert!(max_rel(&ours, &theirs) < 1e-5, "{shape:?} forward");
            let go = (&ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gt = (&theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b), ("slope", &a)] {
                let (p, q) = (go.get(v).unwrap(), gt.get(v).unwrap());
                assert!(max_rel(p, q) < 1e-4, "{shape:?} d{name}: {}", max_rel(p, q));
            }
            let (mean, var) = stats.lock().unwrap().clone().unwrap();
            assert_eq!((mean.len(), var.len()), (c, c));
        }
    }

    #[test]
    fn shapes_that_disagree_are_errors() {
        let x = ramp(&[2, 3, 4, 4], 0.0);
        let bad = ramp(&[4], 0.0);
        let stats: BatchStats = Default::default();
        assert!(batch_norm_train(&x, &bad, &bad, 1e-5, &stats).is_err());
        assert!(prelu(&x, &bad, None).is_err());
    }
}
