// Fused decoder kernels: residual add + RMSNorm, and RoPE of q and k at per-row positions.
// Rust side and references: model/src/fused.rs (add_rms_norm, rope_qk).
//
// Each replaces several candle launches and reproduces the candle 0.11 kernels it replaces
// operation for operation, so that the decoder's output on CUDA stays bit-equal to the candle-op
// path: candle-kernels binary.cu `badd_*` (the dtype's own add), reduce.cu `rmsnorm` (its thread
// layout and reduction order, fma sum of squares, IEEE division, rsqrt.approx, one rounding of
// scale * x * w) and reduce.cu `rope`. The last is compiled by ptxas with its products contracted
// (seen in candle's SASS on sm_90, nvdisasm): out1 = fma(x1, c, -(x2 * s)), out2 = fma(x1, s,
// x2 * c), the inner product rounded to the dtype, in the dtype's own arithmetic (bf16 HFMA2 too).
// The intrinsics below pin those roundings, so that no contraction decision of the compiler can
// change them.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ float narrow<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }

// The dtype's own arithmetic, each operation rounded once (as candle's ops in that dtype).
__device__ __forceinline__ float add_t(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ __nv_bfloat16 add_t(__nv_bfloat16 a, __nv_bfloat16 b) {
    return __hadd_rn(a, b);
}
__device__ __forceinline__ __half add_t(__half a, __half b) { return __hadd_rn(a, b); }
__device__ __forceinline__ float mul_t(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ __nv_bfloat16 mul_t(__nv_bfloat16 a, __nv_bfloat16 b) {
    return __hmul_rn(a, b);
}
__device__ __forceinline__ __half mul_t(__half a, __half b) { return __hmul_rn(a, b); }
__device__ __forceinline__ float fma_t(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ __nv_bfloat16 fma_t(__nv_bfloat16 a, __nv_bfloat16 b,
                                               __nv_bfloat16 c) {
    return __hfma(a, b, c);
}
__device__ __forceinline__ __half fma_t(__half a, __half b, __half c) { return __hfma(a, b, c); }
__device__ __forceinline__ float neg_t(float a) { return -a; }
__device__ __forceinline__ __nv_bfloat16 neg_t(__nv_bfloat16 a) { return __hneg(a); }
__device__ __forceinline__ __half neg_t(__half a) { return __hneg(a); }

// candle's warp_reduce_sum (butterfly, offsets 16 .. 1).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o, 32);
    return x;
}

// One block per row of [rows, ncols]; blockDim.x is 32 when ncols < 1024, else 1024 (candle's
// choice, which fixes its summation order). Thread t handles columns t, t + blockDim.x, ...
// sum = x + r in T; normed = T(rsqrt(mean(sum²) + eps) · sum · w) in f32.
// out = [sum | normed], each [rows, ncols] (n = rows · ncols elements).
template <typename T>
__device__ __forceinline__ void add_rms_norm(const T *__restrict__ x, const T *__restrict__ r,
                                             const T *__restrict__ w, T *out,
                                             unsigned long long n, int ncols, float eps) {
    T *sum = out, *normed = out + n;
    const size_t base = (size_t)blockIdx.x * ncols;
    const int tid = threadIdx.x, bs = blockDim.x;
    float acc = 0.f;
    for (int col = tid; col < ncols; col += bs) {
        T s = add_t(x[base + col], r[base + col]);
        sum[base + col] = s;
        float v = widen(s);
        acc = __fmaf_rn(v, v, acc);
    }
    acc = warp_sum(acc);
    if (bs > 32) {
        __shared__ float s_sum[32];
        const int warp = tid / 32, lane = tid % 32;
        if (lane == 0) s_sum[warp] = acc;
        __syncthreads();
        acc = warp_sum(s_sum[lane]);
    }
    const float mean = __fdiv_rn(acc, (float)ncols);
    const float scale = rsqrtf(__fadd_rn(mean, eps));
    // The second pass reads back this thread's own sums (no other thread wrote them).
    for (int col = tid; col < ncols; col += bs) {
        float v = widen(sum[base + col]);
        normed[base + col] = narrow<T>(__fmul_rn(widen(w[col]), __fmul_rn(scale, v)));
    }
}

// One thread per rotated pair (i, i + hd/2) of one head of one row, over q's pairs and then k's:
// q [rows, heads, hd] and k [rows, kv_heads, hd] (contiguous) into out = [q' | k'] (the same
// layouts, k' after q'). Row r takes the angles of table row positions[r] (clamped to the table,
// so that a bad position cannot read past it): cos, sin [table_rows, hd/2].
template <typename T>
__device__ __forceinline__ void rope_qk(const T *__restrict__ q, const T *__restrict__ k,
                                        const T *__restrict__ cos, const T *__restrict__ sin,
                                        const uint32_t *__restrict__ positions,
                                        T *__restrict__ out, unsigned long long rows, int heads,
                                        int kv_heads, int hd, unsigned int table_rows) {
    const unsigned long long half = hd / 2;
    const unsigned long long q_pairs = rows * heads * half;
    const unsigned long long n_pairs = q_pairs + rows * kv_heads * half;
    const unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_pairs) return;
    const bool is_q = idx < q_pairs;
    const T *src = is_q ? q : k;
    T *dst = is_q ? out : out + 2 * q_pairs;
    const unsigned long long j = is_q ? idx : idx - q_pairs;
    const unsigned long long row_head = j / half, i = j % half;
    const unsigned long long row = row_head / (is_q ? heads : kv_heads);
    const unsigned long long p = min(positions[row], table_rows - 1);
    const T c = cos[p * half + i], s = sin[p * half + i];
    const unsigned long long i1 = row_head * hd + i, i2 = i1 + half;
    const T x1 = src[i1], x2 = src[i2];
    dst[i1] = fma_t(x1, c, neg_t(mul_t(x2, s)));
    dst[i2] = fma_t(x1, s, mul_t(x2, c));
}

#define FUSED(TY, NAME)                                                                          \
    extern "C" __global__ void add_rms_norm_##NAME(const TY *x, const TY *r, const TY *w,       \
                                                   TY *out, unsigned long long n, int ncols,     \
                                                   float eps) {                                  \
        add_rms_norm<TY>(x, r, w, out, n, ncols, eps);                                          \
    }                                                                                            \
    extern "C" __global__ void rope_qk_##NAME(                                                   \
        const TY *q, const TY *k, const TY *cos, const TY *sin, const uint32_t *positions,       \
        TY *out, unsigned long long rows, int heads, int kv_heads, int hd,                       \
        unsigned int table_rows) {                                                               \
        rope_qk<TY>(q, k, cos, sin, positions, out, rows, heads, kv_heads, hd, table_rows);      \
    }

FUSED(float, f32)
FUSED(__nv_bfloat16, bf16)
FUSED(__half, f16)
