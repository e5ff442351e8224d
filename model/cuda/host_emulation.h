// Runs a kernel of this folder on the host, for the tests on a machine without a GPU
// (model/tests/sample_kernel_emulated.rs): one POSIX thread per CUDA thread, one block at a time;
// __syncthreads is a barrier of the block's threads, __shfl_down_sync an exchange through memory
// between two barriers of the warp's 32 threads, __shared__ variables are function statics (one
// block runs at a time). A barrier that some threads of a block (or warp) never reach hangs here
// as it would on the GPU, so the test's timeout catches divergent barriers. Only f32 and the
// intrinsics the emulated kernels use.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

using std::isfinite;
using std::isnan;
using std::max;
using std::min;

struct Dim3 {
    unsigned x;
};
extern thread_local Dim3 threadIdx;
extern Dim3 blockIdx;
extern pthread_barrier_t emu_block_barrier;
extern pthread_barrier_t emu_warp_barrier[32];
extern unsigned long long emu_lanes[32][32];

inline void __syncthreads() { pthread_barrier_wait(&emu_block_barrier); }

template <typename V> inline V __shfl_down_sync(unsigned, V v, int offset) {
    static_assert(sizeof(V) <= sizeof(unsigned long long), "shuffled value too wide");
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    emu_lanes[warp][lane] = bits;
    pthread_barrier_wait(&emu_warp_barrier[warp]);
    V out = v;
    if (lane + offset < 32) std::memcpy(&out, &emu_lanes[warp][lane + offset], sizeof(V));
    pthread_barrier_wait(&emu_warp_barrier[warp]);
    return out;
}

inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}
inline float widen(float x) { return x; }
