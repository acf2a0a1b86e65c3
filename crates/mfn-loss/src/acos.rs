//! A differentiable `acos`, which candle does not provide.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

struct Acos;

impl CustomOp1 for Acos {
    fn name(&self) -> &'static str {
        "acos"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("acos: non-contiguous input".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].iter().map(|x| x.acos()).collect()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].iter().map(|x| x.acos()).collect()),
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "acos: unsupported dtype {:?}",
                    other.dtype()
                )))
            }
        };
        Ok((out, layout.shape().clone()))
    }

    /// d/dx acos(x) = -1 / sqrt(1 - x²).
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let denom = arg.sqr()?.affine(-1.0, 1.0)?.sqrt()?;
        Ok(Some(grad_res.div(&denom)?.neg()?))
    }
}

/// Element-wise `acos` with a backward pass (`-1/sqrt(1-x²)`); callers clamp the input away
/// from ±1 first. Runs on the CPU: other devices round-trip through it, and dtypes other than
/// f32/f64 go through f32 (both conversions are differentiable).
pub(crate) fn acos(x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        return acos(&x.to_dtype(DType::F32)?)?.to_dtype(dtype);
    }
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Acos)
    } else {
        x.to_device(&Device::Cpu)?
            .contiguous()?
            .apply_op1(Acos)?
            .to_device(x.device())
    }
}
