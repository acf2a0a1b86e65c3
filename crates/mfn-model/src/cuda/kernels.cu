// mfn-model's CUDA kernels, compiled at run time with NVRTC (see `mod.rs`).
//
// All tensors are contiguous NCHW. Element-wise kernels use one thread per output value
// with a grid-stride loop; reductions use one block of REDUCE_THREADS threads per output
// value and a fixed tree, so every result is the same from run to run. Arithmetic is in
// f32 (reductions in f64) whatever the storage type. No headers are included, so the
// f16/bf16 conversions are written out here.

#define REDUCE_THREADS 256
#define HAS_BIAS 1
#define HAS_SLOPE 2
#define HAS_CAP 4

typedef long long i64;

struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16 v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    // Round to nearest even; NaN stays a (quiet) NaN.
    unsigned int u = __float_as_uint(v);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x40u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
    return r;
}

__device__ __forceinline__ i64 first_index() {
    return (i64)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ i64 grid_stride() {
    return (i64)blockDim.x * gridDim.x;
}

// Sum of `v` over the block (blockDim.x == REDUCE_THREADS), in a fixed order. Every thread
// gets the sum.
template <typename A> __device__ A block_sum(A v, A* buf) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = REDUCE_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    A r = buf[0];
    __syncthreads();
    return r;
}

// Shape of a depthwise conv: input [n, c, h, w], kernel [c, 1, kh, kw], output [n, c, oh, ow].
struct DwShape {
    int n, c, h, w, oh, ow, kh, kw, stride, ph, pw;
};

// ---- Depthwise conv forward, with an optional fused bias, PReLU and upper clamp ----------

template <typename T>
__device__ void dw_forward(const T* x, const float* wt, const float* bias, const float* slope,
                           T* y, DwShape s, int flags, float cap) {
    const i64 total = (i64)s.n * s.c * s.oh * s.ow;
    for (i64 i = first_index(); i < total; i += grid_stride()) {
        const int ox = (int)(i % s.ow);
        i64 t = i / s.ow;
        const int oy = (int)(t % s.oh);
        t /= s.oh;  // the plane: image * c + channel
        const int ch = (int)(t % s.c);
        const T* xp = x + t * s.h * s.w;
        const float* k = wt + (i64)ch * s.kh * s.kw;
        float acc = (flags & HAS_BIAS) ? bias[ch] : 0.0f;
        const int iy0 = oy * s.stride - s.ph;
        const int ix0 = ox * s.stride - s.pw;
        for (int ky = 0; ky < s.kh; ++ky) {
            const int iy = iy0 + ky;
            if (iy < 0 || iy >= s.h) continue;
            for (int kx = 0; kx < s.kw; ++kx) {
                const int ix = ix0 + kx;
                if (ix < 0 || ix >= s.w) continue;
                acc += k[ky * s.kw + kx] * to_f32(xp[(i64)iy * s.w + ix]);
            }
        }
        if ((flags & HAS_SLOPE) && acc < 0.0f) acc *= slope[ch];
        if (flags & HAS_CAP) acc = fminf(acc, cap);
        y[i] = from_f32<T>(acc);
    }
}

#define DW_FORWARD(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const T* x, const float* wt, const float* bias,          \
                                    const float* slope, T* y, DwShape s, int flags,          \
                                    float cap) {                                              \
        dw_forward<T>(x, wt, bias, slope, y, s, flags, cap);                                  \
    }
DW_FORWARD(dw_forward_f32, float)
DW_FORWARD(dw_forward_f16, f16)
DW_FORWARD(dw_forward_bf16, bf16)

// ---- Depthwise conv input gradient: a transposed depthwise conv, one thread per input ----

extern "C" __global__ void dw_input_grad_f32(const float* g, const float* wt, float* dx,
                                             DwShape s) {
    const i64 total = (i64)s.n * s.c * s.h * s.w;
    for (i64 i = first_index(); i < total; i += grid_stride()) {
        const int ix = (int)(i % s.w);
        i64 t = i / s.w;
        const int iy = (int)(t % s.h);
        t /= s.h;
        const int ch = (int)(t % s.c);
        const float* gp = g + t * s.oh * s.ow;
        const float* k = wt + (i64)ch * s.kh * s.kw;
        float acc = 0.0f;
        for (int ky = 0; ky < s.kh; ++ky) {
            const int ny = iy + s.ph - ky;
            if (ny < 0 || ny % s.stride != 0) continue;
            const int oy = ny / s.stride;
            if (oy >= s.oh) continue;
            for (int kx = 0; kx < s.kw; ++kx) {
                const int nx = ix + s.pw - kx;
                if (nx < 0 || nx % s.stride != 0) continue;
                const int ox = nx / s.stride;
                if (ox >= s.ow) continue;
                acc += k[ky * s.kw + kx] * gp[(i64)oy * s.ow + ox];
            }
        }
        dx[i] = acc;
    }
}

// ---- Depthwise conv weight gradient: one block per (channel, tap) -------------------------

extern "C" __global__ void dw_weight_grad_f32(const float* g, const float* x, float* dw,
                                              DwShape s) {
    __shared__ float buf[REDUCE_THREADS];
    const int taps = s.kh * s.kw;
    const int ch = blockIdx.x / taps;
    const int tap = blockIdx.x % taps;
    const int ky = tap / s.kw;
    const int kx = tap % s.kw;
    const i64 per_image = (i64)s.oh * s.ow;
    const i64 count = (i64)s.n * per_image;
    float acc = 0.0f;
    for (i64 j = threadIdx.x; j < count; j += REDUCE_THREADS) {
        const i64 img = j / per_image;
        const int o = (int)(j % per_image);
        const int oy = o / s.ow;
        const int ox = o % s.ow;
        const int iy = oy * s.stride - s.ph + ky;
        const int ix = ox * s.stride - s.pw + kx;
        if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) continue;
        const i64 plane = img * s.c + ch;
        acc += g[plane * per_image + o] * x[plane * s.h * s.w + (i64)iy * s.w + ix];
    }
    const float sum = block_sum(acc, buf);
    if (threadIdx.x == 0) dw[blockIdx.x] = sum;
}

// ---- Per-channel bias, PReLU and upper clamp (the epilogue of folded convs) --------------

template <typename T>
__device__ void bias_prelu(const T* x, const float* bias, const float* slope, T* y, i64 total,
                           int c, i64 plane, int flags, float cap) {
    for (i64 i = first_index(); i < total; i += grid_stride()) {
        const int ch = (int)((i / plane) % c);
        float v = to_f32(x[i]);
        if (flags & HAS_BIAS) v += bias[ch];
        if ((flags & HAS_SLOPE) && v < 0.0f) v *= slope[ch];
        if (flags & HAS_CAP) v = fminf(v, cap);
        y[i] = from_f32<T>(v);
    }
}

#define BIAS_PRELU(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const T* x, const float* bias, const float* slope, T* y, \
                                    i64 total, int c, i64 plane, int flags, float cap) {     \
        bias_prelu<T>(x, bias, slope, y, total, c, plane, flags, cap);                        \
    }
BIAS_PRELU(bias_prelu_f32, float)
BIAS_PRELU(bias_prelu_f16, f16)
BIAS_PRELU(bias_prelu_bf16, bf16)

// ---- PReLU for training: min(max(x, 0) + a * min(x, 0), cap) and its gradients ----------

extern "C" __global__ void prelu_forward_f32(const float* x, const float* slope, float* y,
                                             i64 total, int c, i64 plane, float cap) {
    for (i64 i = first_index(); i < total; i += grid_stride()) {
        const float a = slope[(i / plane) % c];
        const float v = x[i];
        y[i] = fminf(fmaxf(v, 0.0f) + a * fminf(v, 0.0f), cap);
    }
}

// dx: dy where 0 < x < cap, 0 where the cap clips, a * dy where x <= 0.
extern "C" __global__ void prelu_input_grad_f32(const float* x, const float* dy,
                                                const float* slope, float* dx, i64 total,
                                                int c, i64 plane, float cap) {
    for (i64 i = first_index(); i < total; i += grid_stride()) {
        const float a = slope[(i / plane) % c];
        const float v = x[i];
        const float d = dy[i];
        dx[i] = v > 0.0f ? (v < cap ? d : 0.0f) : a * d;
    }
}

// dslope[c] = sum of dy * x where x < 0, one block per channel.
extern "C" __global__ void prelu_slope_grad_f32(const float* x, const float* dy, float* da,
                                                int n, int c, i64 plane) {
    __shared__ double buf[REDUCE_THREADS];
    const int ch = blockIdx.x;
    const i64 count = (i64)n * plane;
    double acc = 0.0;
    for (i64 j = threadIdx.x; j < count; j += REDUCE_THREADS) {
        const i64 idx = ((j / plane) * c + ch) * plane + j % plane;
        const float v = x[idx];
        if (v < 0.0f) acc += (double)(dy[idx] * v);
    }
    const double sum = block_sum(acc, buf);
    if (threadIdx.x == 0) da[ch] = (float)sum;
}

// ---- BatchNorm with batch statistics ------------------------------------------------------

// One block per channel: the mean and biased variance (two passes, in f64) into
// stats[ch] and stats[c + ch], and when `gamma` is given the affine map
// y = x * affine[ch] + affine[c + ch] (f64, then rounded).
extern "C" __global__ void bn_stats_f32(const float* x, const float* gamma, const float* beta,
                                        float* stats, float* affine, int n, int c, i64 plane,
                                        double eps, int with_affine) {
    __shared__ double buf[REDUCE_THREADS];
    const int ch = blockIdx.x;
    const i64 count = (i64)n * plane;
    double acc = 0.0;
    for (i64 j = threadIdx.x; j < count; j += REDUCE_THREADS) {
        acc += (double)x[((j / plane) * c + ch) * plane + j % plane];
    }
    const double mean = block_sum(acc, buf) / (double)count;
    acc = 0.0;
    for (i64 j = threadIdx.x; j < count; j += REDUCE_THREADS) {
        const double d = (double)x[((j / plane) * c + ch) * plane + j % plane] - mean;
        acc += d * d;
    }
    const double var = block_sum(acc, buf) / (double)count;
    if (threadIdx.x == 0) {
        stats[ch] = (float)mean;
        stats[c + ch] = (float)var;
        if (with_affine) {
            const double scale = (double)gamma[ch] / sqrt(var + eps);
            affine[ch] = (float)scale;
            affine[c + ch] = (float)((double)beta[ch] - mean * scale);
        }
    }
}

extern "C" __global__ void bn_apply_f32(const float* x, const float* affine, float* y,
                                        i64 total, int c, i64 plane) {
    for (i64 i = first_index(); i < total; i += grid_stride()) {
        const int ch = (int)((i / plane) % c);
        y[i] = x[i] * affine[ch] + affine[c + ch];
    }
}

// One block per channel: dbeta = sum(dy) and dgamma = sum(dy * xhat) into
// out[len + ch] (dgamma) and out[len + c + ch] (dbeta), and the coefficients of
// dx = k * dy - kb - kg * (x - mean) into coef[4 * ch ..].
extern "C" __global__ void bn_grad_sums_f32(const float* x, const float* dy, const float* gamma,
                                            const float* stats, float* out, float* coef,
                                            int n, int c, i64 plane, double eps) {
    __shared__ double buf[REDUCE_THREADS];
    const int ch = blockIdx.x;
    const i64 count = (i64)n * plane;
    const i64 len = count * c;
    const double mean = (double)stats[ch];
    const double inv = 1.0 / sqrt((double)stats[c + ch] + eps);
    double db = 0.0, dg = 0.0;
    for (i64 j = threadIdx.x; j < count; j += REDUCE_THREADS) {
        const i64 idx = ((j / plane) * c + ch) * plane + j % plane;
        const double d = (double)dy[idx];
        db += d;
        dg += d * ((double)x[idx] - mean) * inv;
    }
    db = block_sum(db, buf);
    dg = block_sum(dg, buf);
    if (threadIdx.x == 0) {
        const double m = (double)count;
        const double k = (double)gamma[ch] * inv;
        out[len + ch] = (float)dg;
        out[len + c + ch] = (float)db;
        coef[4 * ch] = (float)k;
        coef[4 * ch + 1] = (float)(k * db / m);
        coef[4 * ch + 2] = (float)(k * dg * inv / m);
        coef[4 * ch + 3] = (float)mean;
    }
}

extern "C" __global__ void bn_grad_input_f32(const float* x, const float* dy, const float* coef,
                                             float* dx, i64 total, int c, i64 plane) {
    for (i64 i = first_index(); i < total; i += grid_stride()) {
        const int ch = (int)((i / plane) % c);
        const float k = coef[4 * ch], kb = coef[4 * ch + 1], kg = coef[4 * ch + 2];
        const float mean = coef[4 * ch + 3];
        dx[i] = k * dy[i] - kb - kg * (x[i] - mean);
    }
}
