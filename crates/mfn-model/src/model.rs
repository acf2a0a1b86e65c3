//! The MobileFaceNet network.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Config, Plan, PoolSpec};
use std::sync::{Arc, Mutex};

use crate::engine::{CpuEngine, LayerTimes, Pool};
use crate::layers::{l2_normalize, Bottleneck, ConvBnAct, Embedding};
use crate::ops::GraphConv;
use crate::{Error, Result};

/// MobileFaceNet: raw RGB faces in, embeddings out.
///
/// Input is an `f32` NCHW tensor of RGB pixels in `0..=255` at the config's input size; the
/// network applies its own [`crate::InputNorm`]. The output is the raw (not normalised)
/// embedding, `[N, embedding_size]`.
#[derive(Clone, Debug)]
pub struct MobileFaceNet {
    config: Config,
    norm_mean: Tensor,
    norm_scale: Tensor,
    stem: ConvBnAct,
    stem_dw: Option<ConvBnAct>,
    stem_pw: Option<ConvBnAct>,
    blocks: Vec<Bottleneck>,
    last: ConvBnAct,
    /// The global depthwise conv or the reduce conv (see [`crate::Pooling`]).
    pool: ConvBnAct,
    embedding: Embedding,
    engine: Arc<CpuEngine>,
    /// The dtype [`Self::forward_layers`] computes in, when set by [`Self::to_dtype`]: the
    /// input is cast to it after normalisation and the output back to f32.
    dtype: Option<DType>,
}

impl MobileFaceNet {
    /// Builds the network, reading weights by their checkpoint names from `vb`. A
    /// `VarBuilder` over a fresh `VarMap` gives a randomly initialised, trainable network.
    /// The config must pass [`Config::validate`].
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let plan: Plan = config.plan();
        let device = vb.device().clone();
        let norm = |v: [f32; 3]| Tensor::from_slice(&v, (1, 3, 1, 1), &device);
        let stem = ConvBnAct::new(&plan.stem, &vb)?;
        let unit = |spec: &Option<crate::ConvSpec>| {
            spec.as_ref().map(|s| ConvBnAct::new(s, &vb)).transpose()
        };
        let stem_dw = unit(&plan.stem_dw)?;
        let stem_pw = unit(&plan.stem_pw)?;
        let blocks: Vec<Bottleneck> = plan
            .blocks
            .iter()
            .map(|b| Bottleneck::new(b, &vb))
            .collect::<candle_core::Result<_>>()?;
        let last = ConvBnAct::new(&plan.last, &vb)?;
        let pool = ConvBnAct::new(plan.pool.conv(), &vb)?;
        let embedding = Embedding::new(&plan.embedding, &vb)?;
        let [h, w] = config.gdconv_kernel();
        let (engine_pool, pooled_hw) = match &plan.pool {
            PoolSpec::GdConv(_) => (Pool::GdConv(pool.engine_depthwise()?), 1),
            PoolSpec::ConvReduce(_) => (Pool::Reduce(pool.engine_pointwise()?), h * w),
        };
        let engine = CpuEngine {
            input_hw: config.input_size,
            mean: config.input_norm.mean,
            scale: config.input_norm.scale,
            stem: stem.engine_dense()?,
            stem_dw: stem_dw
                .as_ref()
                .map(ConvBnAct::engine_spatial)
                .transpose()?,
            stem_pw: stem_pw
                .as_ref()
                .map(ConvBnAct::engine_pointwise)
                .transpose()?,
            blocks: blocks
                .iter()
                .map(Bottleneck::engine_block)
                .collect::<candle_core::Result<_>>()?,
            last: last.engine_pointwise()?,
            pool: engine_pool,
            head: embedding.engine_linear(plan.pool.conv().out_channels, pooled_hw)?,
            workspaces: Mutex::new(Vec::new()),
        };
        Ok(Self {
            config: config.clone(),
            norm_mean: norm(config.input_norm.mean)?,
            norm_scale: norm(config.input_norm.scale)?,
            stem,
            stem_dw,
            stem_pw,
            blocks,
            last,
            pool,
            embedding,
            engine: Arc::new(engine),
            dtype: None,
        })
    }

    /// The network with its folded inference path in `dtype`: f32, f16 or bf16. The
    /// weights are folded in f32 when the network is built and cast here once; the input
    /// is still f32 RGB, normalised in f32 and then cast, and the output is f32.
    ///
    /// [`Self::forward_layers`] honours it on every device, and so does [`Self::forward`]
    /// on a GPU; on the CPU [`Self::forward`] always runs the f32 engine. With the `cuda`
    /// feature, depthwise convs and the bias/PReLU epilogues run native kernels in f16/bf16
    /// storage (f32 arithmetic); the 1x1 convs, the stem conv, the residual additions and
    /// the embedding layer run through candle's ops (cuBLAS) in `dtype`. The unfolded
    /// graph ([`Self::forward_graph`], training) is unaffected.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(candle_core::Error::Msg(format!(
                "inference dtype {dtype:?}: expected f32, f16 or bf16"
            ))
            .into());
        }
        let unit = |u: &ConvBnAct| u.to_dtype(dtype);
        let opt = |u: &Option<ConvBnAct>| u.as_ref().map(unit).transpose();
        Ok(Self {
            config: self.config.clone(),
            norm_mean: self.norm_mean.clone(),
            norm_scale: self.norm_scale.clone(),
            stem: unit(&self.stem)?,
            stem_dw: opt(&self.stem_dw)?,
            stem_pw: opt(&self.stem_pw)?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.to_dtype(dtype))
                .collect::<candle_core::Result<_>>()?,
            last: unit(&self.last)?,
            pool: unit(&self.pool)?,
            embedding: self.embedding.to_dtype(dtype)?,
            engine: self.engine.clone(),
            dtype: Some(dtype),
        })
    }

    /// The dtype of the folded inference path (see [`Self::to_dtype`]).
    pub fn dtype(&self) -> DType {
        self.dtype.unwrap_or_else(|| self.stem.dtype())
    }

    /// The config the network was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.norm_mean.device()
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let [h, w] = self.config.input_size;
        let ok =
            matches!(x.dims(), &[_, 3, xh, xw] if xh == h && xw == w) && x.dtype() == DType::F32;
        if ok {
            Ok(())
        } else {
            Err(Error::InputShape {
                found: x.dims().to_vec(),
                expected: format!("f32 [N, 3, {h}, {w}] RGB in 0..=255, got {:?}", x.dtype()),
            })
        }
    }

    fn normalize_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_sub(&self.norm_mean)?
            .broadcast_mul(&self.norm_scale)
    }

    /// Raw embeddings on the inference path: BatchNorm folded into the weights, fused
    /// kernels; on the CPU, the NHWC engine with reused buffers.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        if x.device().is_cpu() {
            return self.forward_engine(x, None);
        }
        self.forward_layers(x)
    }

    /// [`Self::forward`] on the CPU that also reports the wall time spent in each kind of
    /// layer.
    pub fn forward_timed(&self, x: &Tensor) -> Result<(Tensor, LayerTimes)> {
        self.check_input(x)?;
        let mut times = LayerTimes::new();
        let x = x.to_device(&Device::Cpu)?;
        let y = self.forward_engine(&x, Some(&mut times))?;
        Ok((y, times))
    }

    fn forward_engine(&self, x: &Tensor, times: Option<&mut LayerTimes>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let out = self.engine.forward(&data, n, times);
        Ok(Tensor::from_vec(
            out,
            (n, self.config.embedding_size),
            x.device(),
        )?)
    }

    /// The folded path layer by layer through candle ops, for devices other than the CPU
    /// and as a second reference.
    pub fn forward_layers(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let mut x = self.normalize_input(x)?;
        if let Some(dtype) = self.dtype {
            x = x.to_dtype(dtype)?;
        }
        let mut y = self.stem.forward(&x)?;
        for unit in self.stem_dw.iter().chain(&self.stem_pw) {
            y = unit.forward(&y)?;
        }
        for b in &self.blocks {
            y = b.forward(&y)?;
        }
        let y = self
            .embedding
            .forward(&self.pool.forward(&self.last.forward(&y)?)?)?;
        Ok(match self.dtype {
            Some(_) => y.to_dtype(DType::F32)?,
            None => y,
        })
    }

    /// Raw embeddings through the unfolded graph: candle convs (depthwise ones through
    /// [`crate::depthwise_conv2d`], whose backward pass is native), BatchNorm with batch
    /// statistics when `train` (running statistics otherwise), autograd throughout. With
    /// `train == false` it is the reference that [`Self::forward`] is tested against.
    pub fn forward_graph(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_graph_with(x, train, GraphConv::Native)
    }

    pub(crate) fn forward_graph_with(
        &self,
        x: &Tensor,
        train: bool,
        conv: GraphConv,
    ) -> Result<Tensor> {
        self.check_input(x)?;
        let mut y = self
            .stem
            .forward_graph_with(&self.normalize_input(x)?, train, conv)?;
        for unit in self.stem_dw.iter().chain(&self.stem_pw) {
            y = unit.forward_graph_with(&y, train, conv)?;
        }
        for b in &self.blocks {
            y = b.forward_graph_with(&y, train, conv)?;
        }
        let y = self.last.forward_graph_with(&y, train, conv)?;
        let y = self.pool.forward_graph_with(&y, train, conv)?;
        Ok(self.embedding.forward_graph(&y, train)?)
    }

    /// Training mode runs [`Self::forward_graph`]; inference runs [`Self::forward`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_graph(x, true)
        } else {
            self.forward(x)
        }
    }

    /// Unit-length embeddings for verification.
    ///
    /// With `flip`, the embedding is `normalise(normalise(f(x)) + normalise(f(hflip(x))))`,
    /// insightface's flip test; both halves run as one batch.
    pub fn embed(&self, x: &Tensor, flip: bool) -> Result<Tensor> {
        if !flip {
            return Ok(l2_normalize(&self.forward(x)?)?);
        }
        self.check_input(x)?;
        let n = x.dim(0)?;
        let both = Tensor::cat(&[x, &hflip(x)?], 0)?;
        let y = l2_normalize(&self.forward(&both)?)?;
        let sum = (y.narrow(0, 0, n)? + y.narrow(0, n, n)?)?;
        Ok(l2_normalize(&sum)?)
    }
}

/// Mirrors an NCHW batch left to right.
pub fn hflip(x: &Tensor) -> candle_core::Result<Tensor> {
    let w = x.dim(3)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::from_vec(idx, w, x.device())?;
    x.index_select(&idx, 3)
}

// `ModuleT` rather than `Module`: candle's blanket `ModuleT for Module` would drop the
// train flag and run the folded inference path during training.
impl ModuleT for MobileFaceNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        MobileFaceNet::forward_t(self, x, train).map_err(candle_core::Error::wrap)
    }
}
