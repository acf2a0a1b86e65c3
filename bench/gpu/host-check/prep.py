"""Rewrites kernels.cu for the host emulation: the f16 conversions written in PTX become
the compiler's _Float16 conversions. usage: prep.py kernels.cu out.inc"""
import re,sys
s=open(sys.argv[1]).read()
s=re.sub(r'__device__ __forceinline__ float to_f32\(f16 v\) \{.*?\n\}', '__device__ __forceinline__ float to_f32(f16 v) { return (float)(_Float16&)v.bits; }', s, flags=re.S)
s=re.sub(r'template <> __device__ __forceinline__ f16 from_f32<f16>\(float v\) \{.*?\n\}', 'template <> __device__ __forceinline__ f16 from_f32<f16>(float v) { f16 r; _Float16 h=(_Float16)v; memcpy(&r.bits,&h,2); return r; }', s, flags=re.S)
open(sys.argv[2],"w").write(s)
