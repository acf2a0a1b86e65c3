//! The building blocks: conv + BatchNorm + PReLU units, bottlenecks and the embedding layer.
//!
//! Every layer has two paths. `forward_graph` is the faithful graph (candle convs, or
//! [`crate::ops::depthwise_conv2d`] with its native backward for depthwise ones; BatchNorm
//! in train or eval mode; autograd), for training and as the reference. `forward` is the
//! inference path: BatchNorm is folded into the conv or FC weights when the layer is built,
//! depthwise convs use [`crate::ops::DepthwiseConv2d`], and 1x1 convs run as plain matrix
//! products with no im2col copy. On a CUDA device (with the `cuda` feature) depthwise convs
//! and the bias/PReLU epilogues run the native kernels of `mfn_model::cuda` (with the `cuda` feature), their parameters
//! kept on the device; the inference path can also run in f16 or bf16
//! ([`crate::MobileFaceNet::to_dtype`]).

use std::sync::Arc;

use candle_core::{DType, Device, ModuleT, Result, Tensor, D};
use candle_nn::{BatchNorm, Init, VarBuilder};

use crate::config::{Activation, BlockSpec, ConvSpec, EmbeddingSpec};
use crate::engine;
use crate::ops::{batch_norm_train, depthwise_conv2d, prelu, BatchStats, GraphConv};
use crate::ops::{BiasPrelu, DepthwiseConv2d};
use crate::quant::Int8Layer;

/// BatchNorm on the graph path. In train mode on the CPU it runs the fused op with its
/// native backward and updates the running statistics as candle's `BatchNorm` would
/// (`running = (1 - momentum) * running + momentum * batch`, unbiased variance).
fn batch_norm_graph(bn: &BatchNorm, y: &Tensor, train: bool) -> Result<Tensor> {
    if !train || !crate::native_device(y.device()) || y.dtype() != DType::F32 {
        return bn.forward_t(y, train);
    }
    let (gamma, beta) = bn
        .weight_and_bias()
        .ok_or_else(|| candle_core::Error::Msg("BatchNorm without affine parameters".into()))?;
    let stats = BatchStats::default();
    let out = batch_norm_train(y, gamma, beta, bn.eps(), &stats)?;
    let batch = stats.lock().ok().and_then(|mut s| s.take());
    if let Some((mean, var)) = batch {
        let m = bn.momentum();
        for (running, batch) in [(bn.running_mean(), mean), (bn.running_var(), var)] {
            let batch = Tensor::from_vec(batch, running.shape(), running.device())?;
            // The running tensors are the checkpoint's variables, so setting them in place
            // is what makes a saved model carry the statistics.
            let var = candle_core::Var::from_tensor(running)?;
            var.set(&((running * (1.0 - m))? + (batch * m)?)?)?;
        }
    }
    Ok(out)
}

/// Reads a BatchNorm in MXNet's naming: `{prefix}_gamma`, `_beta`, `_moving_mean`, `_moving_var`.
fn batch_norm(
    channels: usize,
    prefix: &str,
    eps: f64,
    fix_gamma: bool,
    vb: &VarBuilder,
) -> Result<BatchNorm> {
    let gamma = if fix_gamma {
        // MXNet ignores the stored gamma when fix_gamma is set, whatever its value.
        Tensor::ones(channels, vb.dtype(), vb.device())?
    } else {
        vb.get_with_hints(channels, &format!("{prefix}_gamma"), Init::Const(1.0))?
    };
    let beta = vb.get_with_hints(channels, &format!("{prefix}_beta"), Init::Const(0.0))?;
    let mean = vb.get_with_hints(channels, &format!("{prefix}_moving_mean"), Init::Const(0.0))?;
    let var = vb.get_with_hints(channels, &format!("{prefix}_moving_var"), Init::Const(1.0))?;
    BatchNorm::new(channels, mean, var, gamma, beta, eps)
}

/// Per-channel `(scale, shift)` such that `bn(x) = x * scale + shift` in eval mode.
fn bn_affine(bn: &BatchNorm) -> Result<(Tensor, Tensor)> {
    let (gamma, beta) = bn
        .weight_and_bias()
        .ok_or_else(|| candle_core::Error::Msg("BatchNorm without affine parameters".into()))?;
    let scale = gamma.broadcast_div(&(bn.running_var() + bn.eps())?.sqrt()?)?;
    let shift = (beta - bn.running_mean().mul(&scale)?)?;
    Ok((scale, shift))
}

fn to_arc_vec(t: &Tensor) -> Result<Arc<Vec<f32>>> {
    Ok(Arc::new(
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?,
    ))
}

/// Folded weights, folded bias and activation slopes, on the host.
type FoldedHost = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// How the folded conv runs on the inference path.
#[derive(Clone, Debug)]
enum Folded {
    /// A general conv through candle, then the bias/PReLU epilogue.
    Dense(Tensor),
    /// A 1x1 conv as `W (cout x cin) @ X (cin x HW)` per image.
    Pointwise(Tensor),
    /// The fused depthwise kernel (CPU); `Tensor` keeps the weights for other devices.
    Depthwise(DepthwiseConv2d, Tensor),
}

/// Folded parameters on a CUDA device, packed for the native kernels.
#[cfg(feature = "cuda")]
#[derive(Clone, Debug)]
struct CudaFolded {
    /// `[weights, bias, slope]` of a depthwise unit and its fused kernel.
    depthwise: Option<(Tensor, crate::cuda::FusedDepthwise)>,
    /// `[bias, slope]` and the epilogue kernel after the other convs.
    epilogue: (Tensor, crate::cuda::FusedBiasPrelu),
}

#[cfg(feature = "cuda")]
impl CudaFolded {
    fn new(
        spec: &ConvSpec,
        w: &Tensor,
        bias: &[f32],
        slope: Option<&[f32]>,
        cap: Option<f32>,
    ) -> Result<Self> {
        use crate::cuda::{params_tensor, FusedBiasPrelu, FusedDepthwise, ParamLayout};
        let device = w.device();
        let layout = |taps: usize| ParamLayout {
            channels: spec.out_channels,
            taps,
            bias: true,
            slope: slope.is_some(),
        };
        let depthwise = if spec.is_depthwise() {
            let taps = spec.kernel[0] * spec.kernel[1];
            let params = params_tensor(device, &to_arc_vec(w)?, Some(bias), slope)?;
            let op = FusedDepthwise {
                layout: layout(taps),
                cap,
                kernel: spec.kernel,
                stride: spec.stride,
                pad: spec.pad,
            };
            Some((params, op))
        } else {
            None
        };
        let epilogue = (
            params_tensor(device, &[], Some(bias), slope)?,
            FusedBiasPrelu {
                layout: layout(0),
                cap,
            },
        );
        Ok(Self {
            depthwise,
            epilogue,
        })
    }
}

/// A conv, its BatchNorm and an optional activation.
#[derive(Clone, Debug)]
pub struct ConvBnAct {
    spec: ConvSpec,
    weight: Tensor,
    bn: BatchNorm,
    /// Learned PReLU slopes.
    slope: Option<Tensor>,
    /// The slopes the fused kernels apply: the PReLU's, or zeros for ReLU and ReLU6.
    fused_slope: Option<Arc<Vec<f32>>>,
    folded: Folded,
    epilogue: BiasPrelu,
    folded_bias: Tensor,
    /// The folded parameters for the native kernels, when built on a CUDA device.
    #[cfg(feature = "cuda")]
    cuda: Option<CudaFolded>,
}

impl ConvBnAct {
    /// Builds the unit from `{name}_conv2d_weight`, `{name}_batchnorm_*` and, for PReLU,
    /// `{name}_relu_gamma`, and folds its BatchNorm for inference.
    pub fn new(spec: &ConvSpec, vb: &VarBuilder) -> Result<Self> {
        let [kh, kw] = spec.kernel;
        let fan_in = spec.in_channels / spec.groups * kh * kw;
        let weight = vb.get_with_hints(
            (spec.out_channels, spec.in_channels / spec.groups, kh, kw),
            &spec.weight_name(),
            Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_in as f64).sqrt(),
            },
        )?;
        let bn = batch_norm(spec.out_channels, &spec.bn_name(), spec.bn_eps, false, vb)?;
        let slope = if spec.has_prelu() {
            Some(vb.get_with_hints(spec.out_channels, &spec.prelu_name(), Init::Const(0.25))?)
        } else {
            None
        };
        // ReLU and ReLU6 are a PReLU with a zero slope (and a cap), so one set of fused
        // kernels serves all three.
        let fused_slope = match spec.act {
            Some(Activation::PRelu) => slope.as_ref().map(to_arc_vec).transpose()?,
            Some(Activation::Relu | Activation::Relu6) => {
                Some(Arc::new(vec![0.0; spec.out_channels]))
            }
            None => None,
        };
        let cap = spec.act.and_then(Activation::cap);
        let (scale, shift) = bn_affine(&bn)?;
        let w = weight
            .detach()
            .broadcast_mul(&scale.reshape((spec.out_channels, 1, 1, 1))?)?;
        let folded = if spec.is_depthwise() {
            let op = DepthwiseConv2d {
                weight: to_arc_vec(&w)?,
                bias: to_arc_vec(&shift)?,
                prelu: fused_slope.clone(),
                cap,
                kernel: spec.kernel,
                stride: spec.stride,
                pad: spec.pad,
            };
            Folded::Depthwise(op, w)
        } else if spec.kernel == [1, 1] && spec.stride == 1 && spec.groups == 1 {
            Folded::Pointwise(w.reshape((spec.out_channels, spec.in_channels))?)
        } else {
            Folded::Dense(w)
        };
        let epilogue = BiasPrelu {
            bias: to_arc_vec(&shift)?,
            prelu: fused_slope.clone(),
            cap,
        };
        if spec.pad[0] != spec.pad[1] {
            candle_core::bail!(
                "{}: only equal padding on both axes is supported",
                spec.name
            );
        }
        #[cfg(feature = "cuda")]
        let cuda = if weight.device().is_cuda() {
            let w = match &folded {
                Folded::Dense(w) | Folded::Pointwise(w) | Folded::Depthwise(_, w) => w,
            };
            Some(CudaFolded::new(
                spec,
                w,
                &epilogue.bias,
                fused_slope.as_deref().map(Vec::as_slice),
                cap,
            )?)
        } else {
            None
        };
        Ok(Self {
            spec: spec.clone(),
            weight,
            bn,
            slope,
            fused_slope,
            folded,
            epilogue,
            folded_bias: shift.detach(),
            #[cfg(feature = "cuda")]
            cuda,
        })
    }

    /// The unit with its inference-path weights in `dtype` (the graph path keeps its own,
    /// and the native CUDA kernels their f32 parameters).
    pub(crate) fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut unit = self.clone();
        unit.folded = match &self.folded {
            Folded::Dense(w) => Folded::Dense(w.to_dtype(dtype)?),
            Folded::Pointwise(w) => Folded::Pointwise(w.to_dtype(dtype)?),
            Folded::Depthwise(op, w) => Folded::Depthwise(op.clone(), w.to_dtype(dtype)?),
        };
        unit.folded_bias = self.folded_bias.to_dtype(dtype)?;
        Ok(unit)
    }

    /// The dtype of the inference path's weights.
    pub(crate) fn dtype(&self) -> DType {
        self.folded_bias.dtype()
    }

    /// The layer's description.
    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// Folded weights as `[cout][cin/groups][kh][kw]`, folded bias, PReLU slopes.
    fn folded_host(&self) -> Result<FoldedHost> {
        let w = match &self.folded {
            Folded::Dense(w) | Folded::Pointwise(w) | Folded::Depthwise(_, w) => w,
        };
        Ok((
            to_arc_vec(w)?.to_vec(),
            to_arc_vec(&self.folded_bias)?.to_vec(),
            self.fused_slope.as_ref().map(|a| a.to_vec()),
        ))
    }

    /// The upper clamp of the activation (ReLU6), if any.
    fn cap(&self) -> Option<f32> {
        self.spec.act.and_then(Activation::cap)
    }

    /// The activation on the graph path.
    fn activate(&self, y: Tensor) -> Result<Tensor> {
        let cap = self.cap();
        match (self.spec.act, &self.slope) {
            (None, _) => Ok(y),
            (Some(Activation::PRelu), Some(a)) => prelu(&y, a, cap),
            (Some(Activation::PRelu), None) => {
                candle_core::bail!("{}: PReLU without slopes", self.spec.name)
            }
            (Some(Activation::Relu | Activation::Relu6), _) => {
                let zero = Tensor::zeros(self.spec.out_channels, y.dtype(), y.device())?;
                prelu(&y, &zero, cap)
            }
        }
    }

    /// The unit as an NHWC dense conv for the CPU engine.
    pub(crate) fn engine_dense(&self) -> Result<engine::WindowConv> {
        let s = &self.spec;
        if s.groups != 1 {
            candle_core::bail!("{}: a dense conv needs groups = 1", s.name);
        }
        let (w, bias, slope) = self.folded_host()?;
        let [kh, kw] = s.kernel;
        let (cin, cout) = (s.in_channels, s.out_channels);
        let mut hwio = vec![0f32; w.len()];
        for o in 0..cout {
            for i in 0..cin {
                for y in 0..kh {
                    for x in 0..kw {
                        hwio[((y * kw + x) * cin + i) * cout + o] =
                            w[((o * cin + i) * kh + y) * kw + x];
                    }
                }
            }
        }
        Ok(engine::WindowConv {
            w: hwio,
            bias,
            slope,
            cap: self.cap(),
            cin,
            cout,
            kernel: s.kernel,
            stride: s.stride,
            pad: s.pad,
            depthwise: false,
        })
    }

    /// The unit as an NHWC depthwise conv for the CPU engine.
    pub(crate) fn engine_depthwise(&self) -> Result<engine::WindowConv> {
        let s = &self.spec;
        if !s.is_depthwise() {
            candle_core::bail!("{}: not a depthwise conv", s.name);
        }
        let (w, bias, slope) = self.folded_host()?;
        let [kh, kw] = s.kernel;
        let c = s.out_channels;
        let mut hwc = vec![0f32; w.len()];
        for ch in 0..c {
            for t in 0..kh * kw {
                hwc[t * c + ch] = w[ch * kh * kw + t];
            }
        }
        Ok(engine::WindowConv {
            w: hwc,
            bias,
            slope,
            cap: self.cap(),
            cin: c,
            cout: c,
            kernel: s.kernel,
            stride: s.stride,
            pad: s.pad,
            depthwise: true,
        })
    }

    /// The unit as the engine's conv after the stem: depthwise, or grouped.
    pub(crate) fn engine_spatial(&self) -> Result<engine::Spatial> {
        let s = &self.spec;
        if s.is_depthwise() {
            return Ok(engine::Spatial::Window(self.engine_depthwise()?));
        }
        if s.groups == 1 {
            return Ok(engine::Spatial::Window(self.engine_dense()?));
        }
        let (w, bias, slope) = self.folded_host()?;
        let [kh, kw] = s.kernel;
        let (cin, cout, groups) = (s.in_channels, s.out_channels, s.groups);
        let cin_g = cin / groups;
        let taps = kh * kw;
        let parts = (0..cin_g)
            .map(|ci| {
                // Tap-major depthwise weights for input channel `ci` of every group.
                let mut hwc = vec![0f32; taps * cout];
                for o in 0..cout {
                    for t in 0..taps {
                        hwc[t * cout + o] = w[(o * cin_g + ci) * taps + t];
                    }
                }
                engine::WindowConv {
                    w: hwc,
                    bias: if ci == 0 {
                        bias.clone()
                    } else {
                        vec![0.0; cout]
                    },
                    slope: None,
                    cap: None,
                    cin: cout,
                    cout,
                    kernel: s.kernel,
                    stride: s.stride,
                    pad: s.pad,
                    depthwise: true,
                }
            })
            .collect();
        Ok(engine::Spatial::Grouped(engine::GroupedConv {
            parts,
            slope,
            cap: self.cap(),
            cin,
            cout,
            groups,
        }))
    }

    /// The folded weights as the host's `[out][in * kh * kw]` values.
    pub(crate) fn folded_weight_host(&self) -> Result<Vec<f32>> {
        Ok(self.folded_host()?.0)
    }

    /// The unit as a 1x1 conv for the CPU engine, in int8 when `int8` is given.
    pub(crate) fn engine_pointwise(&self, int8: Option<&Int8Layer>) -> Result<engine::Pointwise> {
        let s = &self.spec;
        if s.kernel != [1, 1] || s.stride != 1 || s.groups != 1 || s.pad != [0, 0] {
            candle_core::bail!("{}: not a 1x1 conv", s.name);
        }
        let (w, bias, slope) = self.folded_host()?;
        let (cin, cout) = (s.in_channels, s.out_channels);
        let io = transpose(&w, cout, cin);
        let layer = engine::Pointwise::new(io, bias, slope, self.cap(), cin, cout);
        Ok(match int8 {
            Some(q) => layer.with_int8(
                transpose(&q.weight, cout, cin),
                &q.weight_scale,
                &q.input_scale,
                &q.input_zero,
            ),
            None => layer,
        })
    }

    /// Bias and activation after a folded conv, fused on the CPU (and on CUDA devices with
    /// the `cuda` feature).
    fn finish(&self, y: Tensor) -> Result<Tensor> {
        if y.device().is_cpu() && y.dtype() == DType::F32 {
            return self.epilogue.forward(&y);
        }
        #[cfg(feature = "cuda")]
        if let Some(c) = self.cuda.as_ref().filter(|_| y.device().is_cuda()) {
            return y
                .contiguous()?
                .apply_op2_no_bwd(&c.epilogue.0, &c.epilogue.1);
        }
        let y = y.broadcast_add(&self.folded_bias.reshape((1, (), 1, 1))?)?;
        self.activate(y)
    }
}

impl ConvBnAct {
    /// The inference path: folded weights and fused kernels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.folded {
            Folded::Depthwise(op, w) => {
                if x.device().is_cpu() && x.dtype() == DType::F32 {
                    return op.forward(x);
                }
                #[cfg(feature = "cuda")]
                if let Some((params, op)) = self
                    .cuda
                    .as_ref()
                    .filter(|_| x.device().is_cuda())
                    .and_then(|c| c.depthwise.as_ref())
                {
                    return x.contiguous()?.apply_op2_no_bwd(params, op);
                }
                let y = x.conv2d(w, self.spec.pad[0], self.spec.stride, 1, self.spec.groups)?;
                self.finish(y)
            }
            Folded::Pointwise(w) => {
                let (n, c, h, wd) = x.dims4()?;
                let y = w.broadcast_matmul(&x.reshape((n, c, h * wd))?)?.reshape((
                    n,
                    self.spec.out_channels,
                    h,
                    wd,
                ))?;
                self.finish(y)
            }
            Folded::Dense(w) => {
                let y = x.conv2d(w, self.spec.pad[0], self.spec.stride, 1, self.spec.groups)?;
                self.finish(y)
            }
        }
    }
}

impl ConvBnAct {
    /// The unfolded graph: candle conv, BatchNorm (batch statistics when `train`),
    /// activation.
    /// Depthwise convs run as [`crate::ops::depthwise_conv2d`] and 1x1 convs as matrix
    /// products, both with fast backward passes; the stem conv through candle's `conv2d`.
    /// In train mode on the CPU, BatchNorm and the activation are the fused ops of
    /// [`crate::ops`].
    pub fn forward_graph(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_graph_with(x, train, GraphConv::Native)
    }

    pub(crate) fn forward_graph_with(
        &self,
        x: &Tensor,
        train: bool,
        conv: GraphConv,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let pointwise = s.kernel == [1, 1] && s.stride == 1 && s.pad == [0, 0] && s.groups == 1;
        let y = if s.is_depthwise() && conv == GraphConv::Native {
            depthwise_conv2d(x, &self.weight, s.stride, s.pad)?
        } else if pointwise && conv == GraphConv::Native {
            // A 1x1 conv is a matrix product; candle's conv backward would take the slow
            // transposed-conv route for it.
            let (n, cin, h, w) = x.dims4()?;
            self.weight
                .reshape((s.out_channels, cin))?
                .broadcast_matmul(&x.reshape((n, cin, h * w))?)?
                .reshape((n, s.out_channels, h, w))?
        } else {
            x.conv2d(
                &self.weight,
                self.spec.pad[0],
                self.spec.stride,
                1,
                self.spec.groups,
            )?
        };
        let y = batch_norm_graph(&self.bn, &y, train)?;
        self.activate(y)
    }
}

/// An inverted-residual bottleneck.
#[derive(Clone, Debug)]
pub struct Bottleneck {
    expand: ConvBnAct,
    depthwise: ConvBnAct,
    project: ConvBnAct,
    residual: bool,
}

impl Bottleneck {
    /// Builds the block's three units.
    pub fn new(spec: &BlockSpec, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            expand: ConvBnAct::new(&spec.expand, vb)?,
            depthwise: ConvBnAct::new(&spec.depthwise, vb)?,
            project: ConvBnAct::new(&spec.project, vb)?,
            residual: spec.residual,
        })
    }

    /// The block with its inference-path weights in `dtype`.
    pub(crate) fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            expand: self.expand.to_dtype(dtype)?,
            depthwise: self.depthwise.to_dtype(dtype)?,
            project: self.project.to_dtype(dtype)?,
            residual: self.residual,
        })
    }

    /// The expand, depthwise and project units.
    pub fn units(&self) -> [&ConvBnAct; 3] {
        [&self.expand, &self.depthwise, &self.project]
    }

    /// The block for the CPU engine; `int8` gives the int8 half of a 1x1 conv by its
    /// weight name, if it has one.
    pub(crate) fn engine_block<'q>(
        &self,
        int8: &dyn Fn(String) -> Option<&'q Int8Layer>,
    ) -> Result<engine::Block> {
        let pointwise = |u: &ConvBnAct| u.engine_pointwise(int8(u.spec.weight_name()));
        Ok(engine::Block {
            expand: pointwise(&self.expand)?,
            depthwise: self.depthwise.engine_depthwise()?,
            project: pointwise(&self.project)?,
            residual: self.residual,
        })
    }
}

impl Bottleneck {
    /// The inference path.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self
            .project
            .forward(&self.depthwise.forward(&self.expand.forward(x)?)?)?;
        if self.residual {
            y + x
        } else {
            Ok(y)
        }
    }
}

impl Bottleneck {
    /// The unfolded graph.
    pub fn forward_graph(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_graph_with(x, train, GraphConv::Native)
    }

    pub(crate) fn forward_graph_with(
        &self,
        x: &Tensor,
        train: bool,
        conv: GraphConv,
    ) -> Result<Tensor> {
        let y = self.expand.forward_graph_with(x, train, conv)?;
        let y = self.depthwise.forward_graph_with(&y, train, conv)?;
        let y = self.project.forward_graph_with(&y, train, conv)?;
        if self.residual {
            y + x
        } else {
            Ok(y)
        }
    }
}

/// The linear embedding layer and its BatchNorm, on the flattened (NCHW) output of the
/// pooling: the GDConv's `[N, C, 1, 1]` or the reduce conv's whole map.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: BatchNorm,
    folded_weight_t: Tensor,
    folded_bias: Tensor,
}

impl Embedding {
    /// Builds the layer from `fc1_weight`, `pre_fc1_bias` and the BatchNorm `fc1`.
    pub fn new(spec: &EmbeddingSpec, vb: &VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (spec.out_features, spec.in_features),
            EmbeddingSpec::WEIGHT,
            Init::Randn {
                mean: 0.0,
                stdev: (1.0 / spec.in_features as f64).sqrt(),
            },
        )?;
        let bias = if spec.bias {
            Some(vb.get_with_hints(spec.out_features, EmbeddingSpec::BIAS, Init::Const(0.0))?)
        } else {
            None
        };
        let bn = batch_norm(
            spec.out_features,
            EmbeddingSpec::BN,
            spec.bn_eps,
            spec.fix_gamma,
            vb,
        )?;
        let (scale, shift) = bn_affine(&bn)?;
        let folded_weight_t = weight
            .detach()
            .broadcast_mul(&scale.unsqueeze(1)?)?
            .t()?
            .contiguous()?;
        let folded_bias = match &bias {
            Some(b) => (b.detach().mul(&scale)? + shift)?,
            None => shift,
        };
        Ok(Self {
            weight,
            bias,
            bn,
            folded_weight_t,
            folded_bias,
        })
    }
}

impl Embedding {
    /// The layer with its inference-path weights in `dtype`.
    pub(crate) fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut e = self.clone();
        e.folded_weight_t = self.folded_weight_t.to_dtype(dtype)?;
        e.folded_bias = self.folded_bias.to_dtype(dtype)?;
        Ok(e)
    }

    /// The layer as a product for the CPU engine, whose input is a `channels` x `hw` map
    /// in NHWC order: the weight rows, stored for an NCHW flatten (`c * hw + p`), are
    /// reordered to `p * channels + c` once here rather than the activations each call.
    pub(crate) fn engine_linear(
        &self,
        channels: usize,
        hw: usize,
        int8: Option<&Int8Layer>,
    ) -> Result<engine::Pointwise> {
        let (cin, cout) = self.folded_weight_t.dims2()?;
        if channels * hw != cin {
            candle_core::bail!(
                "the embedding layer takes {cin} features, not {channels} x {hw} from the pooling"
            );
        }
        let nchw = to_arc_vec(&self.folded_weight_t)?;
        let layer = engine::Pointwise::new(
            nhwc_rows(&nchw, channels, hw, cout),
            to_arc_vec(&self.folded_bias)?.to_vec(),
            None,
            None,
            cin,
            cout,
        );
        Ok(match int8 {
            Some(q) => layer.with_int8(
                nhwc_rows(&transpose(&q.weight, cout, cin), channels, hw, cout),
                &q.weight_scale,
                &nhwc_rows(&q.input_scale, channels, hw, 1),
                &nhwc_rows(&q.input_zero, channels, hw, 1),
            ),
            None => layer,
        })
    }

    /// The folded weights as `[out][in]` values, the source weight's order.
    pub(crate) fn folded_weight_rows(&self) -> Result<Vec<f32>> {
        let (cin, cout) = self.folded_weight_t.dims2()?;
        Ok(transpose(&to_arc_vec(&self.folded_weight_t)?, cin, cout))
    }

    /// The inference path: one matrix product with the BatchNorm folded in.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.flatten_from(1)?
            .matmul(&self.folded_weight_t)?
            .broadcast_add(&self.folded_bias)
    }
}

impl Embedding {
    /// The unfolded graph: linear layer, then BatchNorm.
    pub fn forward_graph(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = x.flatten_from(1)?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        batch_norm_graph(&self.bn, &y, train)
    }
}

/// Scales each row of a 2-d tensor to unit L2 norm; an all-zero row stays zero.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// `[rows][cols]` to `[cols][rows]`.
fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// The rows of `[channels * hw][cout]` weights, stored for an NCHW flatten (`c * hw + p`),
/// in NHWC order (`p * channels + c`), so that the engine's activations need no reorder.
fn nhwc_rows<T: Copy + Default>(nchw: &[T], channels: usize, hw: usize, cout: usize) -> Vec<T> {
    let mut w = vec![T::default(); nchw.len()];
    for c in 0..channels {
        for p in 0..hw {
            let (from, to) = ((c * hw + p) * cout, (p * channels + c) * cout);
            w[to..to + cout].copy_from_slice(&nchw[from..from + cout]);
        }
    }
    w
}
