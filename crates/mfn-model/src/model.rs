//! The MobileFaceNet network.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Config, Plan, PoolSpec};
use std::sync::{Arc, Mutex};

use crate::engine::{CpuEngine, LayerTimes, Pool};
use crate::layers::{l2_normalize, Bottleneck, ConvBnAct, Embedding};
use crate::ops::GraphConv;
use crate::quant::{product_layers, Int8, Precision};
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
    units: Units,
    engine: Arc<CpuEngine>,
    /// The int8 half the CPU engine runs its matrix products with, if quantised.
    int8: Option<Arc<Int8>>,
    /// The dtype [`Self::forward_layers`] computes in, when set by [`Self::to_dtype`]: the
    /// input is cast to it after normalisation and the output back to f32.
    dtype: Option<DType>,
}

/// The network's layers, which every path runs.
#[derive(Clone, Debug)]
struct Units {
    stem: ConvBnAct,
    stem_dw: Option<ConvBnAct>,
    stem_pw: Option<ConvBnAct>,
    blocks: Vec<Bottleneck>,
    last: ConvBnAct,
    /// The global depthwise conv or the reduce conv (see [`crate::Pooling`]).
    pool: ConvBnAct,
    embedding: Embedding,
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
        let units = Units {
            stem,
            stem_dw,
            stem_pw,
            blocks,
            last,
            pool,
            embedding,
        };
        Ok(Self {
            engine: Arc::new(units.build_engine(config, None)?),
            config: config.clone(),
            norm_mean: norm(config.input_norm.mean)?,
            norm_scale: norm(config.input_norm.scale)?,
            units,
            int8: None,
            dtype: None,
        })
    }

    /// The network with the CPU engine's matrix products that `int8` names running in int8
    /// (see [`crate::quant`]); every other path is unchanged. `int8` must fit the config
    /// ([`Int8::check`]).
    pub fn quantized(&self, int8: &Int8) -> Result<Self> {
        int8.check(&self.config, std::path::Path::new("(int8 layers)"))?;
        let mut model = self.clone();
        model.engine = Arc::new(self.units.build_engine(&self.config, Some(int8))?);
        model.int8 = Some(Arc::new(int8.clone()));
        Ok(model)
    }

    /// The network with the f32 engine again.
    pub fn dequantized(&self) -> Result<Self> {
        let mut model = self.clone();
        if model.int8.take().is_some() {
            model.engine = Arc::new(self.units.build_engine(&self.config, None)?);
        }
        Ok(model)
    }

    /// What the CPU engine computes its matrix products in.
    pub fn precision(&self) -> Precision {
        if self.int8.is_some() {
            Precision::Int8
        } else {
            Precision::F32
        }
    }

    /// The int8 half, when quantised.
    pub fn int8(&self) -> Option<&Int8> {
        self.int8.as_deref()
    }

    /// Runs `x` through the f32 engine, showing `observe` each matrix product's input
    /// (numbered as [`product_layers`] lists them).
    pub(crate) fn observe_products(
        &self,
        x: &Tensor,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()> {
        self.check_input(x)?;
        let n = x.dim(0)?;
        let data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let engine = match self.int8 {
            Some(_) => Arc::new(self.units.build_engine(&self.config, None)?),
            None => self.engine.clone(),
        };
        engine.observe(&data, n, observe);
        Ok(())
    }

    /// How far each int8 matrix product is from its f32 one on `faces` (`[N, 3, H, W]` RGB
    /// in `0..=255`), each fed the same f32 input: the root-mean-square difference of the
    /// outputs over the f32 outputs' root mean square, by weight name, in the order the
    /// products run. Empty for a model that is not quantised.
    pub fn int8_layer_errors(&self, faces: &Tensor) -> Result<Vec<(String, f32)>> {
        if self.int8.is_none() {
            return Ok(Vec::new());
        }
        self.check_input(faces)?;
        let n = faces.dim(0)?;
        let data = faces.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let reference = self.units.build_engine(&self.config, None)?;
        let (f32s, int8s) = (reference.products(), self.engine.products());
        let names = product_layers(&self.config);
        let mut errors = vec![(0f64, 0f64); names.len()];
        let (mut a, mut b, mut q) = (Vec::new(), Vec::new(), Vec::new());
        reference.observe(&data, n, &mut |i, x| {
            let (f, p) = (f32s[i], int8s[i]);
            let m = x.len() / f.cin;
            f.run(x, m, None, &mut a, &mut q, false);
            p.run(x, m, None, &mut b, &mut q, false);
            let n = m * f.cout;
            for (u, v) in a[..n].iter().zip(&b[..n]) {
                errors[i].0 += ((u - v) as f64).powi(2);
                errors[i].1 += (*u as f64).powi(2);
            }
        });
        Ok(names
            .into_iter()
            .zip(errors)
            .map(|(l, (diff, norm))| (l.weight, (diff / norm.max(f64::MIN_POSITIVE)).sqrt() as f32))
            .collect())
    }

    /// The embedding layer's input as (channels, positions per channel) of the pooled map.
    pub(crate) fn head_input_layout(&self) -> (usize, usize) {
        let plan = self.config.plan();
        let channels = plan.pool.conv().out_channels;
        (channels, plan.embedding.in_features / channels.max(1))
    }

    /// The folded f32 weights of each matrix product, `[out][in]` in the source weight's
    /// order, as [`product_layers`] lists them.
    pub(crate) fn folded_products(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        let mut unit = |u: &ConvBnAct| -> Result<()> {
            out.push(u.folded_weight_host()?);
            Ok(())
        };
        if let Some(u) = &self.units.stem_pw {
            unit(u)?;
        }
        for b in &self.units.blocks {
            let [expand, _, project] = b.units();
            unit(expand)?;
            unit(project)?;
        }
        unit(&self.units.last)?;
        if matches!(self.config.plan().pool, PoolSpec::ConvReduce(_)) {
            unit(&self.units.pool)?;
        }
        out.push(self.units.embedding.folded_weight_rows()?);
        debug_assert_eq!(out.len(), product_layers(&self.config).len());
        Ok(out)
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
            units: Units {
                stem: unit(&self.units.stem)?,
                stem_dw: opt(&self.units.stem_dw)?,
                stem_pw: opt(&self.units.stem_pw)?,
                blocks: self
                    .units
                    .blocks
                    .iter()
                    .map(|b| b.to_dtype(dtype))
                    .collect::<candle_core::Result<_>>()?,
                last: unit(&self.units.last)?,
                pool: unit(&self.units.pool)?,
                embedding: self.units.embedding.to_dtype(dtype)?,
            },
            engine: self.engine.clone(),
            int8: self.int8.clone(),
            dtype: Some(dtype),
        })
    }

    /// The dtype of the folded inference path (see [`Self::to_dtype`]).
    pub fn dtype(&self) -> DType {
        self.dtype.unwrap_or_else(|| self.units.stem.dtype())
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
        let mut y = self.units.stem.forward(&x)?;
        for unit in self.units.stem_dw.iter().chain(&self.units.stem_pw) {
            y = unit.forward(&y)?;
        }
        for b in &self.units.blocks {
            y = b.forward(&y)?;
        }
        let y = self
            .units
            .embedding
            .forward(&self.units.pool.forward(&self.units.last.forward(&y)?)?)?;
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
            .units
            .stem
            .forward_graph_with(&self.normalize_input(x)?, train, conv)?;
        for unit in self.units.stem_dw.iter().chain(&self.units.stem_pw) {
            y = unit.forward_graph_with(&y, train, conv)?;
        }
        for b in &self.units.blocks {
            y = b.forward_graph_with(&y, train, conv)?;
        }
        let y = self.units.last.forward_graph_with(&y, train, conv)?;
        let y = self.units.pool.forward_graph_with(&y, train, conv)?;
        Ok(self.units.embedding.forward_graph(&y, train)?)
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

impl Units {
    /// The CPU engine over this network's folded units, with the matrix products that
    /// `int8` names in int8.
    fn build_engine(&self, config: &Config, int8: Option<&Int8>) -> Result<CpuEngine> {
        let plan: Plan = config.plan();
        let q = |name: String| int8.and_then(|i| i.layers.get(&name));
        let pointwise = |u: &ConvBnAct| u.engine_pointwise(q(u.spec().weight_name()));
        let [h, w] = config.gdconv_kernel();
        let (engine_pool, pooled_hw) = match &plan.pool {
            PoolSpec::GdConv(_) => (Pool::GdConv(self.pool.engine_depthwise()?), 1),
            PoolSpec::ConvReduce(_) => (Pool::Reduce(pointwise(&self.pool)?), h * w),
        };
        let head_q = q(crate::config::EmbeddingSpec::WEIGHT.to_string());
        Ok(CpuEngine {
            input_hw: config.input_size,
            mean: config.input_norm.mean,
            scale: config.input_norm.scale,
            stem: self.stem.engine_dense()?,
            stem_dw: self
                .stem_dw
                .as_ref()
                .map(ConvBnAct::engine_spatial)
                .transpose()?,
            stem_pw: self.stem_pw.as_ref().map(pointwise).transpose()?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.engine_block(&q))
                .collect::<candle_core::Result<_>>()?,
            last: pointwise(&self.last)?,
            pool: engine_pool,
            head: self
                .embedding
                .engine_linear(plan.pool.conv().out_channels, pooled_hw, head_q)?,
            workspaces: Mutex::new(Vec::new()),
        })
    }
}
