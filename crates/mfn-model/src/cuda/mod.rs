//! Native CUDA kernels for the ops candle runs slowly or not at all on a GPU: depthwise
//! convs (candle runs a grouped conv one group at a time, forward and backward), the fused
//! bias/PReLU epilogue of folded convs, and the training graph's BatchNorm and PReLU.
//!
//! The kernels (`kernels.cu`) are compiled once per device at run time with NVRTC, straight
//! to machine code for the device's architecture (a CUBIN, which a driver of the same CUDA
//! major version loads whatever the toolkit's minor version), or to PTX when NVRTC does not
//! know the architecture. Element-wise kernels run one thread per output value; reductions
//! one block per output value with a fixed summation tree, so results are the same from run
//! to run. Inference kernels store f32, f16 or bf16 and compute in f32; training kernels are
//! f32 only.

use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys, Ptx};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Threads per block of the reduction kernels (`REDUCE_THREADS` in the source).
const REDUCE_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

/// Flags of the fused kernels (`HAS_*` in the source).
const HAS_BIAS: i32 = 1;
const HAS_SLOPE: i32 = 2;
const HAS_CAP: i32 = 4;

/// What [`compile`] produced.
#[derive(Clone, Debug)]
pub enum Compiled {
    /// Machine code for one architecture, `sm_XY`.
    Cubin(Vec<u8>),
    /// PTX for a virtual architecture, compiled by the driver when loaded.
    Ptx(String),
}

/// The NVRTC version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| candle_core::Error::Cuda(format!("nvrtcVersion: {e:?}").into()))?;
    Ok((major, minor))
}

/// Compiles [`SOURCE`] for compute capability `major.minor`: to a CUBIN, or to PTX with
/// `ptx`. Needs only NVRTC, not a GPU.
pub fn compile(major: i32, minor: i32, ptx: bool) -> Result<Compiled> {
    let err = |what: &str, e: nvrtc_result::NvrtcError| {
        candle_core::Error::Cuda(format!("NVRTC {what}: {e:?}").into())
    };
    let src = CString::new(SOURCE).map_err(candle_core::Error::wrap)?;
    let name = c"mfn_kernels.cu";
    let prog = nvrtc_result::create_program(&src, Some(name)).map_err(|e| err("create", e))?;
    let arch = if ptx {
        format!("--gpu-architecture=compute_{major}{minor}")
    } else {
        format!("--gpu-architecture=sm_{major}{minor}")
    };
    let options = [arch, "--std=c++17".to_string()];
    // SAFETY: `prog` is a live program until destroyed below; every buffer is sized by NVRTC.
    let out = unsafe {
        let compiled = nvrtc_result::compile_program(prog, &options);
        let out = match compiled {
            Err(e) => {
                let log = nvrtc_result::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> = l
                            .iter()
                            .take_while(|&&c| c != 0)
                            .map(|&c| c as u8)
                            .collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(candle_core::Error::Cuda(
                    format!("NVRTC could not compile the kernels ({options:?}): {e:?}\n{log}")
                        .into(),
                ))
            }
            Ok(()) if ptx => nvrtc_result::get_ptx(prog)
                .map(|p| {
                    let bytes: Vec<u8> = p
                        .iter()
                        .take_while(|&&c| c != 0)
                        .map(|&c| c as u8)
                        .collect();
                    Compiled::Ptx(String::from_utf8_lossy(&bytes).into_owned())
                })
                .map_err(|e| err("get PTX", e)),
            Ok(()) => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| err("CUBIN size", e))
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char)
                            .result()
                            .map_err(|e| err("get CUBIN", e))?;
                        Ok(Compiled::Cubin(cubin))
                    })
            }
        };
        let _ = nvrtc_result::destroy_program(prog);
        out
    };
    out
}

/// The name and compute capability of a CUDA device and the NVRTC version the kernels are
/// compiled with, as in `NVIDIA H100 80GB HBM3 (sm_90, NVRTC 13.0)`; `None` for other
/// devices.
pub fn describe(device: &candle_core::Device) -> Option<String> {
    let dev = device.as_cuda_device().ok()?;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let name = ctx.name().ok()?;
    let (major, minor) = ctx.compute_capability().ok()?;
    let nvrtc = nvrtc_version()
        .map(|(a, b)| format!(", NVRTC {a}.{b}"))
        .unwrap_or_default();
    Some(format!("{name} (sm_{major}{minor}{nvrtc})"))
}

/// Loaded modules, one per device.
static MODULES: Mutex<Vec<(DeviceId, Arc<CudaModule>)>> = Mutex::new(Vec::new());

/// The kernels on `dev`, compiled and loaded on first use.
fn module(dev: &CudaDevice) -> Result<Arc<CudaModule>> {
    let mut modules = MODULES.lock().map_err(|_| {
        candle_core::Error::Cuda("the CUDA kernel cache is poisoned".to_string().into())
    })?;
    if let Some((_, m)) = modules.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(m.clone());
    }
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability().w()?;
    // Machine code first: it loads on any driver of the same major version. PTX newer than
    // the driver would not load, so it is only the fallback for architectures NVRTC lacks.
    let image = match compile(major, minor, false) {
        Ok(Compiled::Cubin(c)) => Ptx::from_binary(c),
        Ok(Compiled::Ptx(p)) => Ptx::from_src(p),
        Err(cubin_err) => match compile(major, minor, true) {
            Ok(Compiled::Ptx(p)) => Ptx::from_src(p),
            Ok(Compiled::Cubin(c)) => Ptx::from_binary(c),
            Err(e) => bail!("{cubin_err}; as PTX: {e}"),
        },
    };
    let m = ctx.load_module(image).w()?;
    modules.push((dev.id(), m.clone()));
    Ok(m)
}

/// Launches kernel `$name` on `$dev` with `$grid` blocks of `$block` threads and the
/// arguments (references) in the kernel's order.
macro_rules! launch {
    ($dev:expr, $name:expr, $grid:expr, $block:expr; $($arg:expr),* $(,)?) => {{
        let func = module($dev)?.load_function($name).w()?;
        let stream = $dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        $( builder.arg($arg); )*
        let cfg = LaunchConfig {
            grid_dim: (($grid as u32).max(1), 1, 1),
            block_dim: ($block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are pushed in the kernel's order and types, and every buffer
        // holds the elements its shape arguments say.
        unsafe { builder.launch(cfg) }.w()?;
    }};
}

/// Blocks for an element-wise kernel over `total` values (grid-stride loops cover the rest).
fn grid_for(total: usize) -> u32 {
    total.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32
}

/// The contiguous elements of a storage argument.
fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => bail!("{op}: inputs must be contiguous"),
    }
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(v) => view(v, l, op),
        _ => bail!("{op}: only f32 is supported, got {:?}", s.dtype()),
    }
}

fn i32_arg(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} is out of range")))
}

/// The shape of a depthwise conv, as the kernels take it (`DwShape`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DwShape {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    oh: i32,
    ow: i32,
    kh: i32,
    kw: i32,
    stride: i32,
    ph: i32,
    pw: i32,
}

// SAFETY: a plain `repr(C)` struct of `i32`s, laid out as the kernels' `DwShape`.
unsafe impl DeviceRepr for DwShape {}

impl DwShape {
    /// Input `[n, c, h, w]`, kernel `[kh, kw]`, output `[oh, ow]`.
    pub(crate) fn new(
        [n, c, h, w]: [usize; 4],
        [kh, kw]: [usize; 2],
        [oh, ow]: [usize; 2],
        stride: usize,
        [ph, pw]: [usize; 2],
    ) -> Result<Self> {
        // Flat indexes are 64-bit; each dimension and one plane must fit an i32.
        i32_arg(h * w, "input plane")?;
        Ok(Self {
            n: i32_arg(n, "batch")?,
            c: i32_arg(c, "channels")?,
            h: i32_arg(h, "height")?,
            w: i32_arg(w, "width")?,
            oh: i32_arg(oh, "output height")?,
            ow: i32_arg(ow, "output width")?,
            kh: i32_arg(kh, "kernel height")?,
            kw: i32_arg(kw, "kernel width")?,
            stride: i32_arg(stride, "stride")?,
            ph: i32_arg(ph, "padding")?,
            pw: i32_arg(pw, "padding")?,
        })
    }

    fn input_len(&self) -> usize {
        [self.n, self.c, self.h, self.w]
            .iter()
            .map(|&v| v as usize)
            .product()
    }

    fn output_len(&self) -> usize {
        [self.n, self.c, self.oh, self.ow]
            .iter()
            .map(|&v| v as usize)
            .product()
    }

    fn taps(&self) -> usize {
        (self.kh * self.kw) as usize
    }
}

/// Per-channel epilogue of the fused kernels: bias, PReLU slope, upper clamp. The views
/// point into one f32 parameter buffer; absent parts take any valid view.
struct Epilogue<'a> {
    bias: Option<CudaView<'a, f32>>,
    slope: Option<CudaView<'a, f32>>,
    cap: Option<f32>,
}

impl Epilogue<'_> {
    fn flags(&self) -> i32 {
        let mut f = 0;
        if self.bias.is_some() {
            f |= HAS_BIAS;
        }
        if self.slope.is_some() {
            f |= HAS_SLOPE;
        }
        if self.cap.is_some() {
            f |= HAS_CAP;
        }
        f
    }
}

/// Where the fused kernels find their parameters in one f32 buffer:
/// `[weights (taps per channel, absent for the epilogue alone), bias, slope]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ParamLayout {
    pub(crate) channels: usize,
    pub(crate) taps: usize,
    pub(crate) bias: bool,
    pub(crate) slope: bool,
}

impl ParamLayout {
    pub(crate) fn len(&self) -> usize {
        self.channels * (self.taps + self.bias as usize + self.slope as usize)
    }

    /// The weights, bias and slope views of `params`.
    fn split<'a>(
        &self,
        params: &'a CudaView<'a, f32>,
        cap: Option<f32>,
        op: &str,
    ) -> Result<(CudaView<'a, f32>, Epilogue<'a>)> {
        if params.len() != self.len() {
            bail!(
                "{op}: {} parameters, expected {} for {} channels",
                params.len(),
                self.len(),
                self.channels
            );
        }
        let c = self.channels;
        let w = self.taps * c;
        let b_end = w + if self.bias { c } else { 0 };
        let weights = params.slice(0..w.max(1).min(params.len()));
        Ok((
            weights,
            Epilogue {
                bias: self.bias.then(|| params.slice(w..b_end)),
                slope: self.slope.then(|| params.slice(b_end..b_end + c)),
                cap,
            },
        ))
    }
}

/// Packs host weights, bias and slopes as a [`ParamLayout`] buffer.
pub(crate) fn pack_params(
    weights: &[f32],
    bias: Option<&[f32]>,
    slope: Option<&[f32]>,
) -> Vec<f32> {
    let mut v = weights.to_vec();
    v.extend(bias.unwrap_or(&[]));
    v.extend(slope.unwrap_or(&[]));
    v
}

// ---- Depthwise conv ---------------------------------------------------------------------

/// The depthwise forward kernel on any of the three float types, `y` allocated here.
fn dw_forward_any(
    dev: &CudaDevice,
    x: &CudaStorage,
    xl: &Layout,
    weights: &CudaView<'_, f32>,
    epi: &Epilogue<'_>,
    shape: DwShape,
    op: &str,
) -> Result<CudaStorage> {
    if weights.len() != shape.c as usize * shape.taps() {
        bail!("{op}: weights do not match {} channels", shape.c);
    }
    let len = shape.output_len();
    let flags = epi.flags();
    let cap = epi.cap.unwrap_or(f32::INFINITY);
    let bias = epi.bias.as_ref().unwrap_or(weights);
    let slope = epi.slope.as_ref().unwrap_or(weights);
    macro_rules! run {
        ($src:expr, $variant:ident, $name:literal) => {{
            let src = view($src, xl, op)?;
            if src.len() != shape.input_len() {
                bail!("{op}: input has {} values, expected {}", src.len(), shape.input_len());
            }
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc(len)? };
            launch!(dev, $name, grid_for(len), THREADS; &src, weights, bias, slope, &out, &shape, &flags, &cap);
            CudaStorage {
                slice: CudaStorageSlice::$variant(out),
                device: dev.clone(),
            }
        }};
    }
    Ok(match &x.slice {
        CudaStorageSlice::F32(s) => run!(s, F32, "dw_forward_f32"),
        CudaStorageSlice::F16(s) => run!(s, F16, "dw_forward_f16"),
        CudaStorageSlice::BF16(s) => run!(s, BF16, "dw_forward_bf16"),
        _ => bail!(
            "{op}: only f32, f16 and bf16 are supported, got {:?}",
            x.dtype()
        ),
    })
}

/// The training forward pass: `x` `[n, c, h, w]` and `w` `[c, 1, kh, kw]`, both f32.
pub(crate) fn depthwise_forward(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    shape: DwShape,
    op: &str,
) -> Result<CudaStorage> {
    if x.dtype() != DType::F32 {
        bail!("{op}: only f32 is supported, got {:?}", x.dtype());
    }
    let weights = f32_view(w, wl, op)?;
    let epi = Epilogue {
        bias: None,
        slope: None,
        cap: None,
    };
    dw_forward_any(&x.device, x, xl, &weights, &epi, shape, op)
}

/// The input gradient of a depthwise conv: `g` `[n, c, oh, ow]` and `w` to `[n, c, h, w]`.
pub(crate) fn depthwise_input_grad(
    g: &CudaStorage,
    gl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    shape: DwShape,
    op: &str,
) -> Result<CudaStorage> {
    let dev = &g.device;
    let gv = f32_view(g, gl, op)?;
    let wv = f32_view(w, wl, op)?;
    if gv.len() != shape.output_len() || wv.len() != shape.c as usize * shape.taps() {
        bail!("{op}: gradient or weights do not match the conv's shape");
    }
    let len = shape.input_len();
    // SAFETY: every element is written by the kernel.
    let dx = unsafe { dev.alloc::<f32>(len)? };
    launch!(dev, "dw_input_grad_f32", grid_for(len), THREADS; &gv, &wv, &dx, &shape);
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

/// The weight gradient of a depthwise conv: `g` `[n, c, oh, ow]` and `x` to `[c, 1, kh, kw]`.
pub(crate) fn depthwise_weight_grad(
    g: &CudaStorage,
    gl: &Layout,
    x: &CudaStorage,
    xl: &Layout,
    shape: DwShape,
    op: &str,
) -> Result<CudaStorage> {
    let dev = &g.device;
    let gv = f32_view(g, gl, op)?;
    let xv = f32_view(x, xl, op)?;
    if gv.len() != shape.output_len() || xv.len() != shape.input_len() {
        bail!("{op}: gradient or input do not match the conv's shape");
    }
    let len = shape.c as usize * shape.taps();
    // SAFETY: one block per element, each writes its own.
    let dw = unsafe { dev.alloc::<f32>(len)? };
    launch!(dev, "dw_weight_grad_f32", len as u32, REDUCE_THREADS; &gv, &xv, &dw, &shape);
    Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
}

/// The inference depthwise conv with its fused epilogue, parameters packed on the device
/// as a [`ParamLayout`].
pub(crate) fn depthwise_fused(
    x: &CudaStorage,
    xl: &Layout,
    params: &CudaView<'_, f32>,
    layout: ParamLayout,
    cap: Option<f32>,
    shape: DwShape,
    op: &str,
) -> Result<CudaStorage> {
    let (weights, epi) = layout.split(params, cap, op)?;
    dw_forward_any(&x.device, x, xl, &weights, &epi, shape, op)
}

/// Bias, PReLU and clamp per channel (dim 1) of a contiguous tensor of any float type,
/// parameters packed as a [`ParamLayout`] without weights.
pub(crate) fn bias_prelu(
    x: &CudaStorage,
    xl: &Layout,
    params: &CudaView<'_, f32>,
    layout: ParamLayout,
    cap: Option<f32>,
    op: &str,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (n, c, plane) = crate::ops::nc_plane(xl.shape(), op)?;
    if c != layout.channels || layout.taps != 0 {
        bail!("{op}: {c} channels, parameters for {}", layout.channels);
    }
    let (weights, epi) = layout.split(params, cap, op)?;
    let flags = epi.flags();
    let cap = epi.cap.unwrap_or(f32::INFINITY);
    let bias = epi.bias.as_ref().unwrap_or(&weights);
    let slope = epi.slope.as_ref().unwrap_or(&weights);
    let total = n * c * plane;
    let (total_arg, c_arg, plane_arg) = (total as i64, i32_arg(c, "channels")?, plane as i64);
    macro_rules! run {
        ($src:expr, $variant:ident, $name:literal) => {{
            let src = view($src, xl, op)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc(total)? };
            launch!(dev, $name, grid_for(total), THREADS; &src, bias, slope, &out, &total_arg, &c_arg, &plane_arg, &flags, &cap);
            CudaStorage {
                slice: CudaStorageSlice::$variant(out),
                device: dev.clone(),
            }
        }};
    }
    Ok(match &x.slice {
        CudaStorageSlice::F32(s) => run!(s, F32, "bias_prelu_f32"),
        CudaStorageSlice::F16(s) => run!(s, F16, "bias_prelu_f16"),
        CudaStorageSlice::BF16(s) => run!(s, BF16, "bias_prelu_bf16"),
        _ => bail!(
            "{op}: only f32, f16 and bf16 are supported, got {:?}",
            x.dtype()
        ),
    })
}

/// The inference path's depthwise conv on a CUDA tensor: `x` NCHW of any float type,
/// `params` an f32 tensor on the same device packed as a [`ParamLayout`].
#[derive(Clone, Debug)]
pub(crate) struct FusedDepthwise {
    pub(crate) layout: ParamLayout,
    pub(crate) cap: Option<f32>,
    pub(crate) kernel: [usize; 2],
    pub(crate) stride: usize,
    pub(crate) pad: [usize; 2],
}

impl CustomOp2 for FusedDepthwise {
    fn name(&self) -> &'static str {
        "mfn-depthwise-conv2d-fused"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ps: &CudaStorage,
        pl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let [kh, kw] = self.kernel;
        let out = |size: usize, k: usize, p: usize| {
            (size + 2 * p)
                .checked_sub(k)
                .map(|v| v / self.stride.max(1) + 1)
        };
        let (Some(oh), Some(ow)) = (out(h, kh, self.pad[0]), out(w, kw, self.pad[1])) else {
            bail!("{}: kernel larger than the padded input", self.name());
        };
        let shape = DwShape::new([n, c, h, w], self.kernel, [oh, ow], self.stride, self.pad)?;
        if c != self.layout.channels {
            bail!(
                "{}: input has {c} channels, parameters are for {}",
                self.name(),
                self.layout.channels
            );
        }
        let params = f32_view(ps, pl, self.name())?;
        let y = depthwise_fused(xs, xl, &params, self.layout, self.cap, shape, self.name())?;
        Ok((y, Shape::from((n, c, oh, ow))))
    }
}

/// The inference path's bias/PReLU/clamp epilogue on a CUDA tensor, with its parameters
/// as an f32 tensor on the same device.
#[derive(Clone, Debug)]
pub(crate) struct FusedBiasPrelu {
    pub(crate) layout: ParamLayout,
    pub(crate) cap: Option<f32>,
}

impl CustomOp2 for FusedBiasPrelu {
    fn name(&self) -> &'static str {
        "mfn-bias-prelu-fused"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("{}: CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ps: &CudaStorage,
        pl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let params = f32_view(ps, pl, self.name())?;
        let y = bias_prelu(xs, xl, &params, self.layout, self.cap, self.name())?;
        Ok((y, xl.shape().clone()))
    }
}

/// Copies host parameters to `dev` for one call of a CPU-parameter op.
pub(crate) fn upload(dev: &CudaDevice, v: &[f32]) -> Result<CudaSlice<f32>> {
    dev.clone_htod(v)
}

// ---- PReLU (training) ---------------------------------------------------------------------

/// `min(max(x, 0) + a * min(x, 0), cap)` per channel, f32.
pub(crate) fn prelu_forward(
    x: &CudaStorage,
    xl: &Layout,
    a: &CudaStorage,
    al: &Layout,
    cap: Option<f32>,
    op: &str,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (n, c, plane) = crate::ops::nc_plane(xl.shape(), op)?;
    let xv = f32_view(x, xl, op)?;
    let av = f32_view(a, al, op)?;
    if av.len() != c {
        bail!("{op}: {c} channels, {} slopes", av.len());
    }
    let total = n * c * plane;
    let args = (total as i64, i32_arg(c, "channels")?, plane as i64);
    let cap = cap.unwrap_or(f32::INFINITY);
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<f32>(total)? };
    launch!(dev, "prelu_forward_f32", grid_for(total), THREADS; &xv, &av, &y, &args.0, &args.1, &args.2, &cap);
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The PReLU backward: `[dx..., dslope (c)]` in one f32 buffer.
pub(crate) fn prelu_grad(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    a: (&CudaStorage, &Layout),
    cap: Option<f32>,
    op: &str,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (n, c, plane) = crate::ops::nc_plane(x.1.shape(), op)?;
    let xv = f32_view(x.0, x.1, op)?;
    let dv = f32_view(dy.0, dy.1, op)?;
    let av = f32_view(a.0, a.1, op)?;
    let total = n * c * plane;
    if dv.len() != total || av.len() != c {
        bail!("{op}: shapes disagree");
    }
    let (total_arg, c_arg, plane_arg) = (total as i64, i32_arg(c, "channels")?, plane as i64);
    let n_arg = i32_arg(n, "batch")?;
    let cap = cap.unwrap_or(f32::INFINITY);
    // SAFETY: the two kernels write every element between them.
    let mut out = unsafe { dev.alloc::<f32>(total + c)? };
    {
        let mut dx = out.slice_mut(0..total);
        launch!(dev, "prelu_input_grad_f32", grid_for(total), THREADS; &xv, &dv, &av, &mut dx, &total_arg, &c_arg, &plane_arg, &cap);
    }
    {
        let mut da = out.slice_mut(total..total + c);
        launch!(dev, "prelu_slope_grad_f32", c as u32, REDUCE_THREADS; &xv, &dv, &mut da, &n_arg, &c_arg, &plane_arg);
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

// ---- BatchNorm with batch statistics (training) --------------------------------------------

/// BatchNorm of `x` over the batch and spatial axes with `gamma` and `beta`; returns `y`
/// and, copied to the host, the batch mean and biased variance per channel.
pub(crate) fn batch_norm_forward(
    x: (&CudaStorage, &Layout),
    gamma: (&CudaStorage, &Layout),
    beta: (&CudaStorage, &Layout),
    eps: f64,
    op: &str,
) -> Result<(CudaStorage, Vec<f32>, Vec<f32>)> {
    let dev = &x.0.device;
    let (n, c, plane) = crate::ops::nc_plane(x.1.shape(), op)?;
    let xv = f32_view(x.0, x.1, op)?;
    let gv = f32_view(gamma.0, gamma.1, op)?;
    let bv = f32_view(beta.0, beta.1, op)?;
    if gv.len() != c || bv.len() != c {
        bail!(
            "{op}: {c} channels, but gamma/beta have {}/{}",
            gv.len(),
            bv.len()
        );
    }
    let total = n * c * plane;
    let (total_arg, c_arg, plane_arg) = (total as i64, i32_arg(c, "channels")?, plane as i64);
    let n_arg = i32_arg(n, "batch")?;
    let stats = dev.alloc_zeros::<f32>(2 * c)?;
    let affine = dev.alloc_zeros::<f32>(2 * c)?;
    let with_affine = 1i32;
    launch!(dev, "bn_stats_f32", c as u32, REDUCE_THREADS; &xv, &gv, &bv, &stats, &affine, &n_arg, &c_arg, &plane_arg, &eps, &with_affine);
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<f32>(total)? };
    launch!(dev, "bn_apply_f32", grid_for(total), THREADS; &xv, &affine, &y, &total_arg, &c_arg, &plane_arg);
    let host = dev.clone_dtoh(&stats)?;
    let (mean, var) = host.split_at(c);
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        mean.to_vec(),
        var.to_vec(),
    ))
}

/// The BatchNorm backward: `[dx..., dgamma (c), dbeta (c)]` in one f32 buffer.
pub(crate) fn batch_norm_grad(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    gamma: (&CudaStorage, &Layout),
    eps: f64,
    op: &str,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (n, c, plane) = crate::ops::nc_plane(x.1.shape(), op)?;
    let xv = f32_view(x.0, x.1, op)?;
    let dv = f32_view(dy.0, dy.1, op)?;
    let gv = f32_view(gamma.0, gamma.1, op)?;
    let total = n * c * plane;
    if dv.len() != total || gv.len() != c {
        bail!("{op}: shapes disagree");
    }
    let (total_arg, c_arg, plane_arg) = (total as i64, i32_arg(c, "channels")?, plane as i64);
    let n_arg = i32_arg(n, "batch")?;
    let stats = dev.alloc_zeros::<f32>(2 * c)?;
    let coef = dev.alloc_zeros::<f32>(4 * c)?;
    let no_affine = 0i32;
    // gamma and coef stand in for the unused beta and affine buffers.
    launch!(dev, "bn_stats_f32", c as u32, REDUCE_THREADS; &xv, &gv, &gv, &stats, &coef, &n_arg, &c_arg, &plane_arg, &eps, &no_affine);
    // SAFETY: the two kernels write every element between them.
    let mut out = unsafe { dev.alloc::<f32>(total + 2 * c)? };
    launch!(dev, "bn_grad_sums_f32", c as u32, REDUCE_THREADS; &xv, &dv, &gv, &stats, &out, &coef, &n_arg, &c_arg, &plane_arg, &eps);
    {
        let mut dx = out.slice_mut(0..total);
        launch!(dev, "bn_grad_input_f32", grid_for(total), THREADS; &xv, &dv, &coef, &mut dx, &total_arg, &c_arg, &plane_arg);
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Packs folded inference parameters as an f32 tensor on `device` (see [`ParamLayout`]).
pub(crate) fn params_tensor(
    device: &candle_core::Device,
    weights: &[f32],
    bias: Option<&[f32]>,
    slope: Option<&[f32]>,
) -> Result<Tensor> {
    let v = pack_params(weights, bias, slope);
    let n = v.len();
    Tensor::from_vec(v, n, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC compiles the kernels for the GPUs the project targets; needs the NVRTC library
    /// (the CUDA toolkit), not a GPU.
    #[test]
    #[ignore = "needs libnvrtc on the library path"]
    fn kernels_compile_with_nvrtc() {
        for (major, minor) in [(8, 0), (8, 9), (9, 0)] {
            match compile(major, minor, false).unwrap() {
                Compiled::Cubin(c) => assert!(c.len() > 1000, "sm_{major}{minor}: tiny CUBIN"),
                Compiled::Ptx(_) => panic!("asked for a CUBIN"),
            }
        }
        match compile(9, 0, true).unwrap() {
            Compiled::Ptx(p) => {
                for name in [
                    "dw_forward_f32",
                    "dw_forward_f16",
                    "dw_forward_bf16",
                    "dw_input_grad_f32",
                    "dw_weight_grad_f32",
                    "bias_prelu_f32",
                    "bias_prelu_f16",
                    "bias_prelu_bf16",
                    "prelu_forward_f32",
                    "prelu_input_grad_f32",
                    "prelu_slope_grad_f32",
                    "bn_stats_f32",
                    "bn_apply_f32",
                    "bn_grad_sums_f32",
                    "bn_grad_input_f32",
                ] {
                    assert!(p.contains(&format!(".entry {name}(")), "{name} missing");
                }
            }
            Compiled::Cubin(_) => panic!("asked for PTX"),
        }
        let (major, _) = nvrtc_version().unwrap();
        assert!(major >= 12);
    }

    #[test]
    fn param_layout_lengths() {
        let l = ParamLayout {
            channels: 4,
            taps: 9,
            bias: true,
            slope: false,
        };
        assert_eq!(l.len(), 40);
        assert_eq!(pack_params(&[1.0; 36], Some(&[2.0; 4]), None).len(), 40);
    }
}
