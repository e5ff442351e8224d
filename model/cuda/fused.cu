// Fused decoder kernels: residual add + RMSNorm, RoPE of q and k at per-row positions (with v
// carried along from a stacked q|k|v projection), and SwiGLU's silu(gate) * up.
// Rust side and references: model/src/fused.rs (add_rms_norm, rope_qk, rope_qkv, silu_mul).
//
// Each replaces several candle launches and reproduces the candle 0.11 kernels it replaces
// operation for operation, so that the decoder's output on CUDA stays bit-equal to the candle-op
// path: candle-kernels binary.cu `badd_*` and `bmul_*` (the dtype's own add and product),
// unary.cu `usilu_*` (see silu_t), reduce.cu `rmsnorm` (its thread layout and reduction order,
// fma sum of squares, IEEE division, rsqrt.approx, one rounding of scale * x * w) and reduce.cu
// `rope`. The last is compiled by ptxas with its products contracted (seen in candle's SASS on
// sm_90, nvdisasm): out1 = fma(x1, c, -(x2 * s)), out2 = fma(x1, s, x2 * c), the inner product
// rounded to the dtype, in the dtype's own arithmetic (bf16 HFMA2 too). The intrinsics below pin
// those roundings, so that no contraction decision of the compiler can change them.

#include "common.cuh"


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

// One thread per rotated pair (i, i + hd/2) of one head of one row, over q's pairs, then k's,
// then (when v is given) v's, which are copied unrotated: q [rows, heads, hd], k and v
// [rows, kv_heads, hd], each row's heads contiguous and rows q_stride, k_stride, v_stride
// elements apart (views of one [q | k | v] projection, or contiguous tensors), into the
// contiguous out = [q' | k' | v] (k' after q', v after k'). Row r takes the angles of table row
// positions[r] (clamped to the table, so that a bad position cannot read past it): cos, sin
// [table_rows, hd/2].
template <typename T>
__device__ __forceinline__ void rope_qkv(const T *__restrict__ q, const T *__restrict__ k,
                                         const T *__restrict__ v, const T *__restrict__ cos,
                                         const T *__restrict__ sin,
                                         const uint32_t *__restrict__ positions,
                                         T *__restrict__ out, unsigned long long rows, int heads,
                                         int kv_heads, int hd, unsigned int table_rows,
                                         unsigned long long q_stride, unsigned long long k_stride,
                                         unsigned long long v_stride) {
    const unsigned long long half = hd / 2;
    const unsigned long long q_pairs = rows * heads * half;
    const unsigned long long k_pairs = rows * kv_heads * half;
    const unsigned long long n_pairs = q_pairs + k_pairs + (v != nullptr ? k_pairs : 0);
    const unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_pairs) return;
    const int part = idx < q_pairs ? 0 : (idx < q_pairs + k_pairs ? 1 : 2);
    const T *src = part == 0 ? q : (part == 1 ? k : v);
    const unsigned long long stride = part == 0 ? q_stride : (part == 1 ? k_stride : v_stride);
    const int nh = part == 0 ? heads : kv_heads;
    const unsigned long long first = part == 0 ? 0 : (part == 1 ? q_pairs : q_pairs + k_pairs);
    T *dst = out + 2 * first;
    const unsigned long long j = idx - first;
    const unsigned long long row_head = j / half, i = j % half;
    const unsigned long long row = row_head / nh, h = row_head % nh;
    const unsigned long long s1 = row * stride + h * hd + i, s2 = s1 + half;
    const unsigned long long d1 = row_head * hd + i, d2 = d1 + half;
    const T x1 = src[s1], x2 = src[s2];
    if (part == 2) {
        dst[d1] = x1;
        dst[d2] = x2;
        return;
    }
    const unsigned long long p = min(positions[row], table_rows - 1);
    const T c = cos[p * half + i], s = sin[p * half + i];
    dst[d1] = fma_t(x1, c, neg_t(mul_t(x2, s)));
    dst[d2] = fma_t(x1, s, mul_t(x2, c));
}

// candle 0.11's silu (unary.cu): f32 `x / (1 + expf(-x))`; bf16 the same in f32, rounded once
// (its vectorised usilu_bf16); f16 in half arithmetic (`silu_fwd<__half>`, hexp). Written as
// candle writes them and compiled with its flags (-O3, no fast math), so the same instructions.
__device__ __forceinline__ float silu_t(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ __nv_bfloat16 silu_t(__nv_bfloat16 x) {
    const float xf = __bfloat162float(x);
    return __float2bfloat16(xf / (1.0f + expf(-xf)));
}
__device__ __forceinline__ __half silu_t(__half x) {
    return x / (static_cast<__half>(1) + hexp(-x));
}

// out [rows, inter] = silu(gate) * up for gate_up [rows, 2 * inter] = [gate | up] per row, one
// thread per output: candle's silu rounded to T, then its mul (the dtype's product, rounded once).
template <typename T>
__device__ __forceinline__ void silu_mul(const T *__restrict__ gate_up, T *__restrict__ out,
                                         unsigned long long n, unsigned long long inter) {
    const unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const unsigned long long row = idx / inter, col = idx % inter;
    const T g = gate_up[row * 2 * inter + col], u = gate_up[row * 2 * inter + inter + col];
    out[idx] = mul_t(silu_t(g), u);
}

#define FUSED(TY, NAME)                                                                          \
    extern "C" __global__ void add_rms_norm_##NAME(const TY *x, const TY *r, const TY *w,       \
                                                   TY *out, unsigned long long n, int ncols,     \
                                                   float eps) {                                  \
        add_rms_norm<TY>(x, r, w, out, n, ncols, eps);                                          \
    }                                                                                            \
    extern "C" __global__ void rope_qkv_##NAME(                                                  \
        const TY *q, const TY *k, const TY *v, const TY *cos, const TY *sin,                     \
        const uint32_t *positions, TY *out, unsigned long long rows, int heads, int kv_heads,    \
        int hd, unsigned int table_rows, unsigned long long q_stride,                            \
        unsigned long long k_stride, unsigned long long v_stride) {                              \
        rope_qkv<TY>(q, k, v, cos, sin, positions, out, rows, heads, kv_heads, hd, table_rows,   \
                     q_stride, k_stride, v_stride);                                              \
    }                                                                                            \
    extern "C" __global__ void silu_mul_##NAME(const TY *gate_up, TY *out, unsigned long long n, \
                                               unsigned long long inter) {                       \
        silu_mul<TY>(gate_up, out, n, inter);                                                    \
    }

FUSED(float, f32)
FUSED(__nv_bfloat16, bf16)
FUSED(__half, f16)
