//! Network descriptions: the knobs that define a MobileFaceNet, named presets, the layer
//! plan they expand to, and the parameter / multiply-add counts of that plan.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The caps [`Config::validate`] enforces: well above every published MobileFaceNet (the
/// largest preset, `mbf_large`, has 6.3M parameters, 1.8G multiply-adds and feature maps of
/// at most 0.8M values at 112x112), low enough that no config read from a file can make
/// building or running the network take unbounded memory or time: the weights stay under
/// 200 MiB in `f32` and each image's activations under 4 x 32 MiB.
pub mod limits {
    /// Smallest input height or width, in pixels.
    pub const MIN_INPUT: usize = 8;
    /// Largest input height or width, in pixels (the feature-map cap binds first for
    /// most networks: the paper's fits up to 448x448).
    pub const MAX_INPUT: usize = 1024;
    /// Most channels of any layer (stem, bottleneck inner and output widths, the conv
    /// before the pooling, the reduce conv), and the largest embedding size.
    pub const MAX_CHANNELS: usize = 8192;
    /// Most bottleneck blocks, all table rows together (the presets have 15 to 29).
    pub const MAX_BLOCKS: usize = 256;
    /// Most learnable parameters, as [`crate::Config::complexity`] counts them: eight
    /// times `mbf_large`.
    pub const MAX_PARAMS: u64 = 50_000_000;
    /// Most multiply-adds of one forward pass on one face: eleven times `mbf_large`.
    pub const MAX_MACS: u64 = 20_000_000_000;
    /// Most values in one feature map of one face (channels x height x width, the input
    /// included): 32 MiB of `f32`, ten times `mbf_large`'s largest.
    pub const MAX_ACTIVATION: u64 = 1 << 23;
}

/// How raw RGB pixels in `0..=255` become the network's input: `(x - mean[c]) * scale[c]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputNorm {
    /// Per-channel (R, G, B) offset subtracted first.
    pub mean: [f32; 3],
    /// Per-channel (R, G, B) factor applied after the offset.
    pub scale: [f32; 3],
}

impl InputNorm {
    /// insightface's MXNet models: `(x - 127.5) * 0.0078125`.
    pub fn insightface() -> Self {
        Self {
            mean: [127.5; 3],
            scale: [0.0078125; 3],
        }
    }

    /// The identity: the network takes raw `0..=255` pixels.
    pub fn identity() -> Self {
        Self {
            mean: [0.0; 3],
            scale: [1.0; 3],
        }
    }

    /// insightface arcface_torch's models: `(x - 127.5) / 127.5`.
    pub fn arcface_torch() -> Self {
        Self {
            mean: [127.5; 3],
            scale: [1.0 / 127.5; 3],
        }
    }

    /// torchvision's ImageNet statistics: `(x / 255 - mean) / std`.
    pub fn imagenet() -> Self {
        const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
        const STD: [f32; 3] = [0.229, 0.224, 0.225];
        Self {
            mean: MEAN.map(|m| m * 255.0),
            scale: STD.map(|s| 1.0 / (255.0 * s)),
        }
    }

    /// Names [`InputNorm::parse`] accepts.
    pub const NAMES: &'static [&'static str] = &["mxnet", "torch", "imagenet", "none"];

    /// A normalisation by name (`mxnet`: insightface's MXNet models, `torch`:
    /// arcface_torch, `imagenet`, `none`), or as `MEAN,SCALE` numbers applied to every
    /// channel. `None` when the text is neither.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "mxnet" => Some(Self::insightface()),
            "torch" => Some(Self::arcface_torch()),
            "imagenet" => Some(Self::imagenet()),
            "none" => Some(Self::identity()),
            _ => {
                let (m, s) = text.split_once(',')?;
                let (m, s) = (m.trim().parse::<f32>().ok()?, s.trim().parse::<f32>().ok()?);
                (m.is_finite() && s.is_finite() && s != 0.0).then_some(Self {
                    mean: [m; 3],
                    scale: [s; 3],
                })
            }
        }
    }
}

/// The nonlinearity after a conv and its BatchNorm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(x, 0) + a * min(x, 0)` with a learned slope `a` per channel, stored as
    /// `{name}_relu_gamma`. The paper and insightface use it.
    #[default]
    PRelu,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`, as in MobileNetV2 and foamliu's MobileFaceNet.
    Relu6,
}

impl Activation {
    /// The upper clamp of the activation, if it has one.
    pub fn cap(self) -> Option<f32> {
        match self {
            Activation::Relu6 => Some(6.0),
            Activation::PRelu | Activation::Relu => None,
        }
    }
}

/// What follows the 3x3 stride-2 stem conv, before the bottlenecks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StemKind {
    /// One 3x3 conv: depthwise as in the paper, or grouped (see [`Config::stem_groups`]).
    #[default]
    Depthwise,
    /// A depthwise separable conv: 3x3 depthwise then 1x1 pointwise, each with BatchNorm
    /// and the given activation (foamliu's `dw_conv`, which uses ReLU).
    Separable(Activation),
    /// Nothing: the bottlenecks start right after the stem conv (insightface's
    /// `mbf_large`, whose first table row is a pair of stride-1 bottlenecks).
    ConvOnly,
}

/// One row of the paper's bottleneck table: expansion `t`, output channels `c`, repeats `n`,
/// stride `s` of the first repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bottleneck {
    /// Expansion factor of the 1x1 conv that opens each block; ignored when `hidden` is set.
    pub t: usize,
    /// Output channels of each block.
    pub c: usize,
    /// How many blocks the row holds.
    pub n: usize,
    /// Stride of the first block; the others use stride 1.
    pub s: usize,
    /// Channels inside each block, when they are not `t` times the block's input: insightface
    /// arcface_torch sets them directly, and `mbf_large` narrows (256 -> 128 -> 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
}

impl Bottleneck {
    /// A row `(t, c, n, s)`.
    pub const fn new(t: usize, c: usize, n: usize, s: usize) -> Self {
        Self {
            t,
            c,
            n,
            s,
            hidden: None,
        }
    }

    /// A row whose blocks have `hidden` channels inside, whatever their input.
    pub const fn with_hidden(hidden: usize, c: usize, n: usize, s: usize) -> Self {
        Self {
            t: 0,
            c,
            n,
            s,
            hidden: Some(hidden),
        }
    }

    /// Channels inside a block of this row that takes `cin` channels.
    pub fn hidden_channels(&self, cin: usize) -> usize {
        self.hidden.unwrap_or(cin * self.t)
    }
}

/// How the last feature map (`last_channels` x the final map size) is turned into the
/// embedding layer's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// A linear global depthwise conv whose kernel covers the whole map (GDConv, the
    /// paper's head): one feature per channel.
    #[default]
    #[serde(rename = "gdconv")]
    GdConv,
    /// A 1x1 conv to `channels`, with BatchNorm and the network's activation, then the
    /// whole map flattened in NCHW order (`index = c * h * w + y * w + x`): `channels * h *
    /// w` features. insightface's `w600k_mbf` reduces to 64 channels, 64 x 7 x 7 = 3136.
    ConvReduce {
        /// Output channels of the 1x1 conv.
        channels: usize,
    },
}

/// The head: what pools the last feature map, and the embedding layer after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// What comes between the 1x1 conv to `last_channels` and the embedding layer. Files
    /// written before it existed hold no such key and mean [`Pooling::GdConv`].
    #[serde(default)]
    pub pool: Pooling,
    /// Whether the linear layer to the embedding has a bias (insightface's `pre_fc1` has one).
    pub fc_bias: bool,
    /// MXNet's `fix_gamma`: the final BatchNorm's scale is pinned to 1, whatever is stored.
    pub fix_gamma: bool,
    /// eps of the final BatchNorm.
    pub bn_eps: f64,
}

/// Everything that defines a MobileFaceNet variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Short name of the preset or variant, informative only.
    pub name: String,
    /// Input height and width in pixels.
    pub input_size: [usize; 2],
    /// The mapping from raw RGB pixels to the network input, applied inside `forward`.
    pub input_norm: InputNorm,
    /// Channels of the 3x3 stride-2 stem conv and of the conv after it.
    pub stem_channels: usize,
    /// What follows the stem conv.
    #[serde(default)]
    pub stem: StemKind,
    /// Groups of the 3x3 conv after the stem; `None` makes it depthwise (one group per
    /// channel), as in the paper. insightface's `mbf` uses 64 groups of 2 channels.
    #[serde(default)]
    pub stem_groups: Option<usize>,
    /// The bottleneck table.
    pub blocks: Vec<Bottleneck>,
    /// Channels of the 1x1 conv before the global depthwise conv.
    pub last_channels: usize,
    /// Size of the output embedding.
    pub embedding_size: usize,
    /// The embedding layer.
    pub head: Head,
    /// eps of every BatchNorm in the body (MXNet's default is 1e-3).
    pub bn_eps: f64,
    /// The nonlinearity of every non-linear conv unit (the stem's separable conv may
    /// override it, see [`StemKind::Separable`]).
    #[serde(default)]
    pub activation: Activation,
}

impl Config {
    /// The paper's Table 1 (Chen et al., CCBR 2018): about 1.0M parameters and 221M MACs
    /// at 112x112, with a linear 1x1 conv (no bias) and BatchNorm as the embedding layer.
    pub fn paper() -> Self {
        Self {
            name: "paper".into(),
            input_size: [112, 112],
            input_norm: InputNorm::insightface(),
            stem_channels: 64,
            stem: StemKind::Depthwise,
            stem_groups: None,
            blocks: vec![
                Bottleneck::new(2, 64, 5, 2),
                Bottleneck::new(4, 128, 1, 2),
                Bottleneck::new(2, 128, 6, 1),
                Bottleneck::new(4, 128, 1, 2),
                Bottleneck::new(2, 128, 2, 1),
            ],
            last_channels: 512,
            embedding_size: 128,
            head: Head {
                pool: Pooling::GdConv,
                fc_bias: false,
                fix_gamma: false,
                bn_eps: 1e-3,
            },
            bn_eps: 1e-3,
            activation: Activation::PRelu,
        }
    }

    /// insightface's MXNet MobileFaceNet "y1": the paper's body, then FC 512 -> 128 with
    /// bias and a BatchNorm `fc1` with a fixed gamma and eps 2e-5.
    pub fn y1() -> Self {
        Self {
            name: "y1".into(),
            head: Head {
                pool: Pooling::GdConv,
                fc_bias: true,
                fix_gamma: true,
                bn_eps: 2e-5,
            },
            ..Self::paper()
        }
    }

    /// insightface arcface_torch's `mbf` (`get_mbf`: blocks (1, 4, 6, 2), scale 2), the
    /// architecture of its public `w600k_mbf` model: a 128-channel stem, a grouped 3x3 conv
    /// (64 groups of 2 channels) instead of a depthwise one, 512-d embeddings, BatchNorm
    /// eps 1e-5 and input `(x - 127.5) / 127.5`.
    pub fn mbf() -> Self {
        Self {
            name: "mbf".into(),
            input_size: [112, 112],
            input_norm: InputNorm::arcface_torch(),
            stem_channels: 128,
            stem: StemKind::Depthwise,
            stem_groups: Some(64),
            blocks: vec![
                Bottleneck::new(1, 128, 5, 2),
                Bottleneck::new(2, 256, 1, 2),
                Bottleneck::new(1, 256, 6, 1),
                Bottleneck::new(2, 256, 1, 2),
                Bottleneck::new(1, 256, 2, 1),
            ],
            last_channels: 512,
            embedding_size: 512,
            head: Head {
                pool: Pooling::GdConv,
                fc_bias: false,
                fix_gamma: false,
                bn_eps: 1e-5,
            },
            bn_eps: 1e-5,
            activation: Activation::PRelu,
        }
    }

    /// insightface arcface_torch's `mbf_large` (`get_mbf_large`: blocks (2, 8, 12, 4),
    /// scale 4): a 256-channel stem followed directly by two stride-1 bottlenecks, blocks
    /// whose inner width is set per stage (128, 256, 512 at the downsampling ones), 512-d
    /// embeddings.
    pub fn mbf_large() -> Self {
        Self {
            name: "mbf_large".into(),
            stem_channels: 256,
            stem: StemKind::ConvOnly,
            stem_groups: None,
            blocks: vec![
                Bottleneck::with_hidden(128, 256, 2, 1),
                Bottleneck::with_hidden(128, 256, 9, 2),
                Bottleneck::with_hidden(256, 512, 1, 2),
                Bottleneck::with_hidden(256, 512, 12, 1),
                Bottleneck::with_hidden(512, 512, 1, 2),
                Bottleneck::with_hidden(256, 512, 4, 1),
            ],
            ..Self::mbf()
        }
    }

    /// insightface's public `w600k_mbf` (the recognition model of its `buffalo_s` and
    /// `buffalo_sc` packs): the [`Config::mbf`] body with another head. After the 1x1 conv
    /// to 512 channels come a 1x1 conv to 64 channels with BatchNorm and PReLU, a flatten
    /// of the 64 x 7 x 7 map (3136 features), FC 3136 -> 512 with bias and a BatchNorm
    /// (eps 1e-5, learned gamma).
    pub fn w600k_mbf() -> Self {
        Self {
            name: "w600k_mbf".into(),
            head: Head {
                pool: Pooling::ConvReduce { channels: 64 },
                fc_bias: true,
                fix_gamma: false,
                bn_eps: 1e-5,
            },
            ..Self::mbf()
        }
    }

    /// foamliu/MobileFaceNet's PyTorch model: the paper's table with ReLU6 instead of
    /// PReLU, a depthwise separable conv with ReLU after the stem, a 1x1 conv 512 -> 128
    /// with bias and a BatchNorm as the embedding layer, BatchNorm eps 1e-5, and input
    /// `(x / 255 - mean) / std` with ImageNet's mean and std.
    pub fn foamliu() -> Self {
        Self {
            name: "foamliu".into(),
            input_norm: InputNorm::imagenet(),
            stem: StemKind::Separable(Activation::Relu),
            head: Head {
                pool: Pooling::GdConv,
                fc_bias: true,
                fix_gamma: false,
                bn_eps: 1e-5,
            },
            bn_eps: 1e-5,
            activation: Activation::Relu6,
            ..Self::paper()
        }
    }

    /// This network with every channel count (stem, bottlenecks, the conv before the
    /// pooling, the channels of [`Pooling::ConvReduce`]) scaled by `mult` and rounded to a
    /// multiple of 8 (at least 8), as MobileNets' width multiplier; the embedding size
    /// stays. `mult` of 0.25 to 0.5 gives networks that train in minutes on a CPU.
    ///
    /// A `mult` so large that the widths pass [`limits::MAX_CHANNELS`] gives a config that
    /// [`Config::validate`] (and so [`crate::MobileFaceNet::new`]) refuses.
    pub fn with_width(&self, mult: f64) -> Self {
        // `as` saturates (NaN gives 0, infinity usize::MAX), and so does the product.
        let scale = |c: usize| {
            (((c as f64 * mult) / 8.0).round() as usize)
                .saturating_mul(8)
                .max(8)
        };
        let mut c = self.clone();
        c.name = format!("{}-x{mult}", self.name);
        c.stem_channels = scale(self.stem_channels);
        if let Some(g) = self.stem_groups {
            // Keep the channels per group; fewer groups.
            let per_group = self.stem_channels / g.max(1);
            c.stem_groups = Some((c.stem_channels / per_group.max(1)).max(1));
        }
        c.blocks = self
            .blocks
            .iter()
            .map(|b| Bottleneck {
                c: scale(b.c),
                hidden: b.hidden.map(scale),
                ..*b
            })
            .collect();
        c.last_channels = scale(self.last_channels);
        if let Pooling::ConvReduce { channels } = self.head.pool {
            c.head.pool = Pooling::ConvReduce {
                channels: scale(channels),
            };
        }
        c
    }

    /// Checks that the config describes a network this crate can build and run within
    /// bounded memory and time, before anything is sized from it: every width, group count,
    /// expansion, repeat count and the embedding size non-zero; strides 1 or 2; the groups
    /// after the stem dividing its channels; the input size within
    /// [`limits::MIN_INPUT`]`..=`[`limits::MAX_INPUT`]; finite, positive BatchNorm eps;
    /// a finite input normalisation with non-zero scales; and the caps of [`limits`] on
    /// channels, blocks, parameters, multiply-adds and feature-map size, computed with
    /// checked arithmetic so that no count overflows or allocates on the way.
    ///
    /// Configs read from files are checked when they are read ([`crate::Checkpoint::load`]
    /// and the importers), and [`crate::MobileFaceNet::new`] checks every config it builds.
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let bad = |message: String| Error::Config {
            path: None,
            message,
        };
        let width = |field: &str, v: usize| {
            if v == 0 || v > MAX_CHANNELS {
                Err(bad(format!("`{field}` is {v}, not in 1..={MAX_CHANNELS}")))
            } else {
                Ok(())
            }
        };
        for (i, d) in self.input_size.iter().enumerate() {
            if !(MIN_INPUT..=MAX_INPUT).contains(d) {
                return Err(bad(format!(
                    "`input_size[{i}]` is {d}, not in {MIN_INPUT}..={MAX_INPUT}"
                )));
            }
        }
        for i in 0..3 {
            let (m, s) = (self.input_norm.mean[i], self.input_norm.scale[i]);
            if !m.is_finite() {
                return Err(bad(format!("`input_norm.mean[{i}]` is {m}, not finite")));
            }
            if !s.is_finite() || s == 0.0 {
                return Err(bad(format!(
                    "`input_norm.scale[{i}]` is {s}, not a finite non-zero number"
                )));
            }
        }
        for (field, eps) in [("bn_eps", self.bn_eps), ("head.bn_eps", self.head.bn_eps)] {
            if !(eps.is_finite() && eps > 0.0) {
                return Err(bad(format!(
                    "`{field}` is {eps}, not a finite positive number"
                )));
            }
        }
        width("stem_channels", self.stem_channels)?;
        if let Some(g) = self.stem_groups {
            if g == 0 || !self.stem_channels.is_multiple_of(g) {
                return Err(bad(format!(
                    "`stem_groups` is {g}, which does not divide `stem_channels` {}",
                    self.stem_channels
                )));
            }
        }
        let mut total = 0usize;
        let mut cin = self.stem_channels;
        for (i, row) in self.blocks.iter().enumerate() {
            if row.n == 0 || row.n > MAX_BLOCKS {
                return Err(bad(format!(
                    "`blocks[{i}].n` is {}, not in 1..={MAX_BLOCKS}",
                    row.n
                )));
            }
            total += row.n;
            if total > MAX_BLOCKS {
                return Err(bad(format!(
                    "the bottleneck table holds more than {MAX_BLOCKS} blocks"
                )));
            }
            width(&format!("blocks[{i}].c"), row.c)?;
            if row.s != 1 && row.s != 2 {
                return Err(bad(format!("`blocks[{i}].s` is {}, not 1 or 2", row.s)));
            }
            match row.hidden {
                Some(h) => width(&format!("blocks[{i}].hidden"), h)?,
                None => {
                    // The first block expands the row's input, the others its output.
                    let widest = if row.n > 1 { cin.max(row.c) } else { cin };
                    match widest.checked_mul(row.t) {
                        Some(h) if h > 0 && h <= MAX_CHANNELS => {}
                        _ => {
                            return Err(bad(format!(
                                "`blocks[{i}].t` is {}: {widest} x {} inner channels is not in 1..={MAX_CHANNELS}",
                                row.t, row.t
                            )))
                        }
                    }
                }
            }
            cin = row.c;
        }
        width("last_channels", self.last_channels)?;
        if self.embedding_size == 0 || self.embedding_size > MAX_CHANNELS {
            return Err(bad(format!(
                "`embedding_size` is {}, not in 1..={MAX_CHANNELS}",
                self.embedding_size
            )));
        }
        if let Pooling::ConvReduce { channels } = self.head.pool {
            width("head.pool.conv_reduce.channels", channels)?;
        }
        let [h, w] = self.gdconv_kernel();
        if h == 0 || w == 0 {
            return Err(bad(format!(
                "input {:?} leaves an empty {h}x{w} map for the head",
                self.input_size
            )));
        }
        // Everything above bounds the plan: at most MAX_BLOCKS blocks of bounded widths.
        let totals = self.checked_totals().ok_or_else(|| {
            bad(format!(
                "the network is too large to count (over {MAX_PARAMS} parameters)"
            ))
        })?;
        if totals.params > MAX_PARAMS {
            return Err(bad(format!(
                "{} parameters, more than the cap of {MAX_PARAMS}",
                totals.params
            )));
        }
        if totals.macs > MAX_MACS {
            return Err(bad(format!(
                "{} multiply-adds per face, more than the cap of {MAX_MACS}",
                totals.macs
            )));
        }
        if totals.activation > MAX_ACTIVATION {
            return Err(bad(format!(
                "a feature map of {} values, more than the cap of {MAX_ACTIVATION}",
                totals.activation
            )));
        }
        Ok(())
    }

    /// Parameters, multiply-adds and the largest feature map, `None` on overflow. Only
    /// called once the widths and block count are bounded, so the plan itself is small.
    fn checked_totals(&self) -> Option<Totals> {
        let plan = self.plan();
        let mut t = Totals {
            params: 0,
            macs: 0,
            activation: 3u64
                .checked_mul(self.input_size[0] as u64)?
                .checked_mul(self.input_size[1] as u64)?,
        };
        let mut hw = self.input_size;
        for conv in plan.convs() {
            if conv.groups == 0
                || conv.stride == 0
                || conv.in_channels % conv.groups != 0
                || conv.out_channels % conv.groups != 0
            {
                return None;
            }
            hw = [
                conv_out(hw[0], conv.kernel[0], conv.stride, conv.pad[0]),
                conv_out(hw[1], conv.kernel[1], conv.stride, conv.pad[1]),
            ];
            let pixels = (hw[0] as u64).checked_mul(hw[1] as u64)?;
            let weights = (conv.out_channels as u64)
                .checked_mul((conv.in_channels / conv.groups) as u64)?
                .checked_mul(conv.kernel[0] as u64)?
                .checked_mul(conv.kernel[1] as u64)?;
            t.macs = t.macs.checked_add(weights.checked_mul(pixels)?)?;
            let per_channel = if conv.has_prelu() { 3 } else { 2 };
            t.params = t
                .params
                .checked_add(weights)?
                .checked_add(per_channel * conv.out_channels as u64)?;
            t.activation = t
                .activation
                .max((conv.out_channels as u64).checked_mul(pixels)?);
        }
        let e = &plan.embedding;
        let fc = (e.in_features as u64).checked_mul(e.out_features as u64)?;
        t.macs = t.macs.checked_add(fc)?;
        let per_feature = if e.bias { 3 } else { 2 };
        t.params = t
            .params
            .checked_add(fc)?
            .checked_add(per_feature * e.out_features as u64)?;
        Some(t)
    }

    /// A preset by name: one of [`Config::PRESETS`].
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(Self::paper()),
            "y1" => Some(Self::y1()),
            "mbf" => Some(Self::mbf()),
            "mbf_large" => Some(Self::mbf_large()),
            "foamliu" => Some(Self::foamliu()),
            "w600k_mbf" => Some(Self::w600k_mbf()),
            _ => None,
        }
    }

    /// Names of the presets [`Config::preset`] knows.
    pub const PRESETS: &'static [&'static str] =
        &["paper", "y1", "mbf", "mbf_large", "foamliu", "w600k_mbf"];

    /// The feature-map size that reaches the head: the kernel of the global depthwise
    /// conv, and the map that [`Pooling::ConvReduce`] flattens.
    pub fn gdconv_kernel(&self) -> [usize; 2] {
        let mut hw = self.input_size.map(|d| conv_out(d, 3, 2, 1));
        for b in &self.blocks {
            if b.n > 0 {
                hw = hw.map(|d| conv_out(d, 3, b.s, 1));
            }
        }
        hw
    }

    /// The network expanded into its layers, in graph order, with checkpoint names.
    pub fn plan(&self) -> Plan {
        let unit = |name: &str, cin: usize, cout: usize, k: usize, stride: usize, groups: usize| {
            ConvSpec {
                name: name.into(),
                in_channels: cin,
                out_channels: cout,
                kernel: [k, k],
                stride,
                pad: [k / 2, k / 2],
                groups,
                act: Some(self.activation),
                bn_eps: self.bn_eps,
            }
        };
        let c = self.stem_channels;
        let stem = unit("conv_1", 3, c, 3, 2, 1);
        let (stem_dw, stem_pw) = match self.stem {
            StemKind::Depthwise => (
                Some(unit("conv_2_dw", c, c, 3, 1, self.stem_groups.unwrap_or(c))),
                None,
            ),
            StemKind::Separable(act) => (
                Some(ConvSpec {
                    act: Some(act),
                    ..unit("conv_2_dw", c, c, 3, 1, c)
                }),
                Some(ConvSpec {
                    act: Some(act),
                    ..unit("conv_2_pw", c, c, 1, 1, 1)
                }),
            ),
            StemKind::ConvOnly => (None, None),
        };
        // insightface names a stage after its downsampling: `dconv_23` moves from stage 2 to
        // 3, and the stride-1 blocks that follow are `res_3_block0..`, whichever table row
        // they come from. Following that keeps checkpoint names unchanged.
        let mut blocks = Vec::new();
        let mut stage = 2usize;
        let mut res_index = 0usize;
        let mut cin = c;
        for row in &self.blocks {
            for i in 0..row.n {
                let stride = if i == 0 { row.s } else { 1 };
                let name = if stride != 1 || (i == 0 && blocks.is_empty()) {
                    stage += 1;
                    res_index = 0;
                    format!("dconv_{}{}", stage - 1, stage)
                } else {
                    res_index += 1;
                    format!("res_{}_block{}", stage, res_index - 1)
                };
                let hidden = row.hidden_channels(cin);
                blocks.push(BlockSpec {
                    expand: unit(&format!("{name}_conv_sep"), cin, hidden, 1, 1, 1),
                    depthwise: unit(
                        &format!("{name}_conv_dw"),
                        hidden,
                        hidden,
                        3,
                        stride,
                        hidden,
                    ),
                    project: ConvSpec {
                        act: None,
                        ..unit(&format!("{name}_conv_proj"), hidden, row.c, 1, 1, 1)
                    },
                    residual: stride == 1 && cin == row.c,
                });
                cin = row.c;
            }
        }
        let last = unit("conv_6sep", cin, self.last_channels, 1, 1, 1);
        let [h, w] = self.gdconv_kernel();
        let (pool, in_features) = match self.head.pool {
            Pooling::GdConv => (
                PoolSpec::GdConv(ConvSpec {
                    kernel: [h, w],
                    pad: [0, 0],
                    act: None,
                    ..unit(
                        "conv_6dw7_7",
                        self.last_channels,
                        self.last_channels,
                        1,
                        1,
                        self.last_channels,
                    )
                }),
                self.last_channels,
            ),
            Pooling::ConvReduce { channels } => (
                PoolSpec::ConvReduce(unit("conv_6_reduce", self.last_channels, channels, 1, 1, 1)),
                channels * h * w,
            ),
        };
        Plan {
            stem,
            stem_dw,
            stem_pw,
            blocks,
            last,
            pool,
            embedding: EmbeddingSpec {
                in_features,
                out_features: self.embedding_size,
                bias: self.head.fc_bias,
                fix_gamma: self.head.fix_gamma,
                bn_eps: self.head.bn_eps,
            },
        }
    }

    /// Learnable parameters and multiply-adds of one forward pass on one face.
    pub fn complexity(&self) -> Complexity {
        let plan = self.plan();
        let mut total = Complexity::default();
        let mut hw = self.input_size;
        for conv in plan.convs() {
            hw = [
                conv_out(hw[0], conv.kernel[0], conv.stride, conv.pad[0]),
                conv_out(hw[1], conv.kernel[1], conv.stride, conv.pad[1]),
            ];
            let weights = conv.out_channels
                * (conv.in_channels / conv.groups)
                * conv.kernel[0]
                * conv.kernel[1];
            total.macs += (weights * hw[0] * hw[1]) as u64;
            // BatchNorm gamma and beta, and one PReLU slope per channel.
            total.params += (weights + 2 * conv.out_channels) as u64;
            if conv.has_prelu() {
                total.params += conv.out_channels as u64;
            }
        }
        let e = &plan.embedding;
        let fc = e.in_features * e.out_features;
        total.macs += fc as u64;
        total.params += (fc + if e.bias { e.out_features } else { 0 }) as u64;
        // gamma counts even when fix_gamma pins it, as in insightface's own count.
        total.params += 2 * e.out_features as u64;
        total
    }
}

/// What [`Config::validate`] bounds.
struct Totals {
    params: u64,
    macs: u64,
    /// Values in the largest feature map (the input included) of one face.
    activation: u64,
}

/// Output size of a convolution along one axis.
pub(crate) fn conv_out(size: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad).saturating_sub(kernel) / stride.max(1) + 1
}

/// Learnable parameters and multiply-adds of a network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complexity {
    /// Learnable parameters: conv and FC weights, biases, BatchNorm gamma and beta, PReLU
    /// slopes. Running statistics are not counted.
    pub params: u64,
    /// Multiply-adds of the convolutions and the FC layer for one input.
    pub macs: u64,
}

/// A conv followed by BatchNorm and, optionally, PReLU: the unit the whole body is made of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvSpec {
    /// Checkpoint name prefix: weights are `{name}_conv2d_weight`, `{name}_batchnorm_*`
    /// and `{name}_relu_gamma`.
    pub name: String,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding along height and width.
    pub pad: [usize; 2],
    /// Convolution groups; `groups == in_channels == out_channels` is depthwise.
    pub groups: usize,
    /// The activation after the BatchNorm; `None` makes the unit linear.
    pub act: Option<Activation>,
    /// eps of the BatchNorm.
    pub bn_eps: f64,
}

impl ConvSpec {
    /// Whether this conv is depthwise (one filter per channel).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }

    /// Whether the unit has learned PReLU slopes.
    pub fn has_prelu(&self) -> bool {
        self.act == Some(Activation::PRelu)
    }

    /// Checkpoint name of the conv weight.
    pub fn weight_name(&self) -> String {
        format!("{}_conv2d_weight", self.name)
    }

    /// Checkpoint name prefix of the BatchNorm.
    pub fn bn_name(&self) -> String {
        format!("{}_batchnorm", self.name)
    }

    /// Checkpoint name of the PReLU slopes.
    pub fn prelu_name(&self) -> String {
        format!("{}_relu_gamma", self.name)
    }
}

/// An inverted-residual bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockSpec {
    /// The 1x1 expansion conv.
    pub expand: ConvSpec,
    /// The 3x3 depthwise conv, which carries the block's stride.
    pub depthwise: ConvSpec,
    /// The linear 1x1 projection.
    pub project: ConvSpec,
    /// Whether the block's input is added to its output.
    pub residual: bool,
}

/// The unit between the 1x1 conv to `last_channels` and the embedding layer, whose output
/// is flattened (NCHW order) into the embedding layer's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PoolSpec {
    /// The global depthwise conv (GDConv), linear, kernel the whole map: `[N, C, 1, 1]` out.
    /// Checkpoint name `conv_6dw7_7`.
    GdConv(ConvSpec),
    /// The 1x1 conv of [`Pooling::ConvReduce`], with BatchNorm and activation; the map
    /// keeps its size. Checkpoint name `conv_6_reduce`.
    ConvReduce(ConvSpec),
}

impl PoolSpec {
    /// The conv unit, whichever kind.
    pub fn conv(&self) -> &ConvSpec {
        match self {
            PoolSpec::GdConv(c) | PoolSpec::ConvReduce(c) => c,
        }
    }

    /// The global depthwise conv, if that is the pooling.
    pub fn gdconv(&self) -> Option<&ConvSpec> {
        match self {
            PoolSpec::GdConv(c) => Some(c),
            PoolSpec::ConvReduce(_) => None,
        }
    }

    /// The reduce conv, if that is the pooling.
    pub fn reduce(&self) -> Option<&ConvSpec> {
        match self {
            PoolSpec::ConvReduce(c) => Some(c),
            PoolSpec::GdConv(_) => None,
        }
    }
}

/// The linear embedding layer and its BatchNorm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingSpec {
    /// Input features: the pooling's flattened output (channels of the global depthwise
    /// conv, or channels x height x width of the reduce conv).
    pub in_features: usize,
    /// Embedding size.
    pub out_features: usize,
    /// Whether the linear layer has a bias.
    pub bias: bool,
    /// Whether the BatchNorm's gamma is pinned to 1.
    pub fix_gamma: bool,
    /// eps of the BatchNorm.
    pub bn_eps: f64,
}

impl EmbeddingSpec {
    /// Checkpoint name of the linear weight (insightface calls it `fc1_weight`).
    pub const WEIGHT: &'static str = "fc1_weight";
    /// Checkpoint name of the linear bias.
    pub const BIAS: &'static str = "pre_fc1_bias";
    /// Checkpoint name prefix of the BatchNorm.
    pub const BN: &'static str = "fc1";
}

/// A [`Config`] expanded into its layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// 3x3 stride-2 stem conv.
    pub stem: ConvSpec,
    /// 3x3 depthwise (or grouped) conv after the stem, unless [`StemKind::ConvOnly`].
    pub stem_dw: Option<ConvSpec>,
    /// 1x1 conv after that, for [`StemKind::Separable`].
    pub stem_pw: Option<ConvSpec>,
    /// The bottlenecks in order.
    pub blocks: Vec<BlockSpec>,
    /// 1x1 conv to `last_channels`.
    pub last: ConvSpec,
    /// What pools the last map for the embedding layer (see [`Pooling`]).
    pub pool: PoolSpec,
    /// The embedding layer.
    pub embedding: EmbeddingSpec,
}

impl Plan {
    /// Every conv unit in graph order.
    pub fn convs(&self) -> impl Iterator<Item = &ConvSpec> {
        std::iter::once(&self.stem)
            .chain(self.stem_dw.as_ref())
            .chain(self.stem_pw.as_ref())
            .chain(
                self.blocks
                    .iter()
                    .flat_map(|b| [&b.expand, &b.depthwise, &b.project]),
            )
            .chain([&self.last, self.pool.conv()])
    }

    /// For each conv of [`Plan::convs`], whether a residual Add follows it.
    pub fn residual_after(&self) -> Vec<bool> {
        let stem = 1 + usize::from(self.stem_dw.is_some()) + usize::from(self.stem_pw.is_some());
        std::iter::repeat_n(false, stem)
            .chain(self.blocks.iter().flat_map(|b| [false, false, b.residual]))
            .chain([false, false])
            .collect()
    }
}

impl Plan {
    /// Every tensor a checkpoint must hold for this plan, with its shape, in graph order.
    pub fn weights(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for conv in self.convs() {
            let [kh, kw] = conv.kernel;
            out.push((
                conv.weight_name(),
                vec![conv.out_channels, conv.in_channels / conv.groups, kh, kw],
            ));
            for part in ["gamma", "beta", "moving_mean", "moving_var"] {
                out.push((
                    format!("{}_{part}", conv.bn_name()),
                    vec![conv.out_channels],
                ));
            }
            if conv.has_prelu() {
                out.push((conv.prelu_name(), vec![conv.out_channels]));
            }
        }
        let e = &self.embedding;
        out.push((
            EmbeddingSpec::WEIGHT.into(),
            vec![e.out_features, e.in_features],
        ));
        if e.bias {
            out.push((EmbeddingSpec::BIAS.into(), vec![e.out_features]));
        }
        for part in ["gamma", "beta", "moving_mean", "moving_var"] {
            if part == "gamma" && e.fix_gamma {
                continue;
            }
            out.push((
                format!("{}_{part}", EmbeddingSpec::BN),
                vec![e.out_features],
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_preset_matches_the_paper_counts() {
        let c = Config::paper().complexity();
        assert!(
            (990_000..=1_010_000).contains(&c.params),
            "params {}",
            c.params
        );
        let macs = c.macs as f64 / 1e6;
        assert!((macs - 221.0).abs() <= 221.0 * 0.005, "MACs {macs}M");
    }

    #[test]
    fn y1_counts_its_fc_bias_and_fixed_gamma() {
        // 1,003,264 parameters is what insightface reports for y1.
        assert_eq!(Config::y1().complexity().params, 1_003_264);
        assert_eq!(
            Config::y1().complexity().macs,
            Config::paper().complexity().macs
        );
    }

    #[test]
    fn plan_uses_insightface_names_and_gdconv_covers_the_map() {
        let plan = Config::y1().plan();
        let names: Vec<_> = plan.blocks.iter().map(|b| b.expand.name.clone()).collect();
        assert_eq!(names[0], "dconv_23_conv_sep");
        assert_eq!(names[1], "res_3_block0_conv_sep");
        assert_eq!(names[5], "dconv_34_conv_sep");
        assert_eq!(names[6], "res_4_block0_conv_sep");
        assert_eq!(names[12], "dconv_45_conv_sep");
        assert_eq!(names[14], "res_5_block1_conv_sep");
        assert_eq!(plan.blocks.len(), 15);
        assert_eq!(plan.pool.gdconv().unwrap().kernel, [7, 7]);
        assert!(!plan.blocks[0].residual && plan.blocks[1].residual);
        assert!(plan.blocks[6].residual, "res_4_block0 keeps 128 channels");
        assert_eq!(plan.blocks[5].expand.out_channels, 256);
    }

    fn refused(c: &Config, what: &str) {
        match c.validate() {
            Err(Error::Config {
                path: None,
                message,
            }) => {
                assert!(message.contains(what), "{what}: {message}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }

    #[test]
    fn validate_accepts_the_presets_and_their_widths() {
        for name in Config::PRESETS {
            let c = Config::preset(name).unwrap();
            c.validate().unwrap();
            c.with_width(0.25).validate().unwrap();
            let t = c.checked_totals().unwrap();
            assert_eq!(t.params, c.complexity().params, "{name}");
            assert_eq!(t.macs, c.complexity().macs, "{name}");
        }
    }

    #[test]
    fn validate_refuses_before_anything_is_sized() {
        // Each of these would divide by zero, overflow or allocate without bound in
        // `plan`, `weights` or `complexity`.
        let mut c = Config::y1();
        c.blocks[0].n = usize::MAX;
        refused(&c, "`blocks[0].n`");
        let mut c = Config::y1();
        c.blocks[2].t = usize::MAX;
        refused(&c, "`blocks[2].t`");
        let mut c = Config::mbf();
        c.stem_groups = Some(0);
        refused(&c, "`stem_groups`");
        let mut c = Config::mbf_large();
        c.blocks[0].hidden = Some(0);
        refused(&c, "`blocks[0].hidden`");
        let mut c = Config::y1();
        c.blocks = vec![Bottleneck::new(1, 8, limits::MAX_BLOCKS, 1); 2];
        refused(&c, "more than 256 blocks");
        let mut c = Config::y1();
        c.input_norm.scale[2] = f32::INFINITY;
        refused(&c, "`input_norm.scale[2]`");
        c.input_norm.scale[2] = 1.0;
        c.input_norm.mean[0] = f32::NAN;
        refused(&c, "`input_norm.mean[0]`");
        let mut c = Config::y1();
        c.head.bn_eps = f64::NAN;
        refused(&c, "`head.bn_eps`");
        let mut c = Config::y1();
        c.input_size = [7, 112];
        refused(&c, "`input_size[0]`");
    }

    #[test]
    fn validate_caps_parameters_work_and_feature_maps() {
        let mut c = Config::y1();
        c.embedding_size = limits::MAX_CHANNELS;
        c.last_channels = limits::MAX_CHANNELS;
        c.head.pool = Pooling::ConvReduce {
            channels: limits::MAX_CHANNELS,
        };
        refused(&c, "parameters");
        // A wide stem on a large input: few parameters, a huge first map.
        let mut c = Config::paper();
        c.input_size = [1024, 1024];
        c.stem = StemKind::ConvOnly;
        c.stem_channels = 512;
        c.blocks = vec![Bottleneck::with_hidden(8, 8, 1, 2)];
        c.last_channels = 8;
        refused(&c, "feature map");
        c.input_size = [256, 256];
        c.stem_channels = 64;
        c.validate().unwrap();
        // The paper's network fits up to 448x448, then its maps are too large.
        let mut c = Config::paper();
        c.input_size = [448, 448];
        c.validate().unwrap();
        c.input_size = [limits::MAX_INPUT; 2];
        refused(&c, "feature map");
        // Six times wider at 224x224: within the parameter cap, past the work cap.
        let mut c = Config::paper().with_width(6.0);
        c.input_size = [224, 224];
        refused(&c, "multiply-adds");
    }

    #[test]
    fn input_norm_parses_names_and_numbers() {
        assert_eq!(InputNorm::parse("torch"), Some(InputNorm::arcface_torch()));
        assert_eq!(
            InputNorm::parse("127.5, 0.0078125"),
            Some(InputNorm::insightface())
        );
        for bad in ["", "1", "1,0", "a,b", "nan,1", "imagenet2"] {
            assert_eq!(InputNorm::parse(bad), None, "{bad}");
        }
        for name in InputNorm::NAMES {
            assert!(InputNorm::parse(name).is_some());
        }
    }

    #[test]
    fn config_round_trips_through_json() {
        for c in [Config::y1(), Config::w600k_mbf()] {
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Config>(&s).unwrap(), c);
        }
    }

    #[test]
    fn config_json_without_a_pooling_means_gdconv() {
        let mut json = serde_json::to_value(Config::y1()).unwrap();
        let head = json["head"].as_object_mut().unwrap();
        assert_eq!(head.remove("pool"), Some(serde_json::json!("gdconv")));
        let c: Config = serde_json::from_value(json).unwrap();
        assert_eq!(c, Config::y1());
        let reduce = serde_json::to_value(Config::w600k_mbf()).unwrap();
        assert_eq!(
            reduce["head"]["pool"],
            serde_json::json!({"conv_reduce": {"channels": 64}})
        );
    }

    #[test]
    fn w600k_mbf_counts_match_the_onnx_file() {
        // From `w600k_mbf.onnx`'s initializers: 3,400,448 values, of which 1,024 are the
        // final BatchNorm's running statistics. Its 49 convs have BatchNorm folded into
        // a bias (our beta); our count adds the gamma that folding removed, one per output
        // channel of every conv: 10,944 in all.
        let c = Config::w600k_mbf().complexity();
        assert_eq!(c.params, 3_400_448 - 1_024 + 10_944);
        // Conv weights times output pixels, from the graph's inferred shapes, plus the
        // FC's 3136 x 512.
        assert_eq!(c.macs, 440_444_928);
        assert_eq!(
            c.macs - Config::mbf().complexity().macs,
            (512 * 64 * 49 + 3136 * 512 - 512 * 49 - 512 * 512) as u64
        );
    }

    #[test]
    fn w600k_mbf_plan_has_the_reduce_head() {
        let c = Config::w600k_mbf();
        let plan = c.plan();
        assert_eq!(plan.blocks, Config::mbf().plan().blocks);
        let reduce = plan.pool.reduce().expect("a reduce conv");
        assert!(plan.pool.gdconv().is_none());
        assert_eq!(reduce.name, "conv_6_reduce");
        assert_eq!(
            (reduce.in_channels, reduce.out_channels, reduce.kernel),
            (512, 64, [1, 1])
        );
        assert_eq!(reduce.act, Some(Activation::PRelu));
        assert_eq!(plan.embedding.in_features, 3136);
        assert!(plan.embedding.bias && !plan.embedding.fix_gamma);
        let weights = plan.weights();
        let names: Vec<&str> = weights.iter().map(|(n, _)| n.as_str()).collect();
        for name in [
            "conv_6_reduce_conv2d_weight",
            "conv_6_reduce_batchnorm_gamma",
            "conv_6_reduce_batchnorm_moving_var",
            "conv_6_reduce_relu_gamma",
            "fc1_weight",
            "pre_fc1_bias",
            "fc1_gamma",
        ] {
            assert!(names.contains(&name), "{name}");
        }
        assert!(!names.iter().any(|n| n.starts_with("conv_6dw7_7")));
        let fc = weights.iter().find(|(n, _)| n == "fc1_weight").unwrap();
        assert_eq!(fc.1, [512, 3136]);
        assert_eq!(plan.convs().count(), plan.residual_after().len());
        assert_eq!(plan.convs().last(), Some(reduce));
        // The width multiplier narrows the reduce conv too.
        let narrow = c.with_width(0.5);
        assert_eq!(narrow.head.pool, Pooling::ConvReduce { channels: 32 });
        assert_eq!(narrow.plan().embedding.in_features, 32 * 49);
        assert_eq!(Config::preset("w600k_mbf"), Some(c));
    }
}
