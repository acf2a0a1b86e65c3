// Just enough of CUDA's execution model to run simple kernels on the CPU: see run.sh.
#include <barrier>
#include <thread>
#include <vector>
#include <cstring>
#include <cmath>
#include <functional>
struct dim3 { unsigned x=1,y=1,z=1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::barrier<>* g_bar;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local_shared
#define thread_local_shared
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f,&u,4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u,&f,4); return u; }
// Runs the kernel: blocks one after another, each block's threads concurrently.
template <typename F> void launch(unsigned grid, unsigned block, F f) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block); g_bar = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t) ts.emplace_back([=]{ blockIdx.x=b; threadIdx.x=t; f(); });
        for (auto& t: ts) t.join();
    }
}
