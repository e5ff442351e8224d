// Paged decode attention (flash-decoding): one new query row per sequence over its paged KV cache.
// Rust side and reference: model/src/paged.rs (PagedDecode, paged_decode_attention).
//
// Grid (B, kv_heads, splits), WARPS warps per block. A block handles the `groups` query heads that
// share one KV head, over one contiguous partition of the visible keys: reading each K/V row once
// serves all of them (GQA). Warp w takes keys start+w, start+w+WARPS, ... (UNROLL at a time so
// their loads are in flight together); lane l holds head_dim elements l*VPT .. l*VPT+VPT-1.
// Each warp keeps an online softmax (running max m, sum l, accumulator acc) per query head; the
// warps are merged through shared memory. With splits == 1 the block writes the normalised output;
// otherwise it writes (m, l, acc[hd]) partials and paged_merge_* combines them.
// All arithmetic is f32 on inputs widened to f32; the output is cast once.

#include "common.cuh"

#define WARPS 4
#define UNROLL 4


__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// T: element type; VPT: head_dim elements per lane (head_dim <= 32 * VPT); G: query heads per
// KV head the instance has room for (groups <= G, the rest masked off).
template <typename T, int VPT, int G>
__device__ __forceinline__ void paged_decode(
    const T *__restrict__ q,                // [B, kv_heads * groups, hd], contiguous
    const T *__restrict__ k_pool,           // [n_slots, kv_heads, hd], contiguous
    const T *__restrict__ v_pool,           // [n_slots, kv_heads, hd], contiguous
    const uint32_t *__restrict__ tables,    // [B, max_blocks]
    const uint32_t *__restrict__ lens,      // [B]
    T *__restrict__ out,                    // [B, heads, hd] (splits == 1)
    float *__restrict__ partial,            // [B, heads, splits, hd + 2] (splits > 1)
    int kv_heads, int groups, int hd, int max_blocks, int block_size, unsigned long long n_slots,
    int window, float scale, int splits) {
    constexpr int HDP = 32 * VPT;
    __shared__ float s_m[WARPS][G];
    __shared__ float s_l[WARPS][G];
    __shared__ float s_acc[WARPS][G][HDP];

    const int b = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int heads = kv_heads * groups;

    // Visible keys lo..len (the window hides j <= p - w for p = len - 1); lens[b] beyond the
    // table is clamped so that a bad length cannot read past the table.
    int len = (int)min(lens[b], (uint32_t)(max_blocks * block_size));
    int lo = (window > 0 && len > window) ? len - window : 0;
    int n = len - lo;
    int chunk = (n + splits - 1) / splits;
    int start = lo + split * chunk;
    int end = min(len, start + chunk);

    float qr[G][VPT];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const T *qrow = q + ((size_t)b * heads + (size_t)kvh * groups + g) * hd;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            int d = lane * VPT + i;
            qr[g][i] = (g < groups && d < hd) ? widen(qrow[d]) : 0.f;
        }
    }
    float m[G], l[G], acc[G][VPT];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < VPT; ++i) acc[g][i] = 0.f;
    }

    const uint32_t *table = tables + (size_t)b * max_blocks;
    for (int j0 = start + warp; j0 < end; j0 += WARPS * UNROLL) {
        float kv[UNROLL][VPT], vv[UNROLL][VPT];
        bool ok[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int j = j0 + u * WARPS;
            unsigned long long slot = 0;
            ok[u] = j < end;
            if (ok[u]) {
                slot = (unsigned long long)table[j / block_size] * block_size + j % block_size;
                ok[u] = slot < n_slots;  // a corrupt table entry must not fault the context
            }
            const size_t row = ((size_t)slot * kv_heads + kvh) * hd;
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                int d = lane * VPT + i;
                bool in = ok[u] && d < hd;
                kv[u][i] = in ? widen(k_pool[row + d]) : 0.f;
                vv[u][i] = in ? widen(v_pool[row + d]) : 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (!ok[u]) continue;  // warp-uniform
#pragma unroll
            for (int g = 0; g < G; ++g) {
                if (g >= groups) continue;
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < VPT; ++i) s = fmaf(qr[g][i], kv[u][i], s);
                s = warp_sum(s) * scale;
                float mn = fmaxf(m[g], s);
                float c = expf(m[g] - mn);  // 0 on the first key (m = -inf)
                float p = expf(s - mn);
                l[g] = l[g] * c + p;
#pragma unroll
                for (int i = 0; i < VPT; ++i) acc[g][i] = fmaf(p, vv[u][i], acc[g][i] * c);
                m[g] = mn;
            }
        }
    }

#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (lane == 0) {
            s_m[warp][g] = m[g];
            s_l[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < VPT; ++i) s_acc[warp][g][lane * VPT + i] = acc[g][i];
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < groups * hd; idx += blockDim.x) {
        int g = idx / hd, d = idx % hd;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w)
            if (s_l[w][g] > 0.f) mx = fmaxf(mx, s_m[w][g]);
        float sum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            if (s_l[w][g] > 0.f) {  // a warp without keys has m = -inf: no weight, no NaN
                float c = expf(s_m[w][g] - mx);
                sum = fmaf(s_l[w][g], c, sum);
                a = fmaf(s_acc[w][g][d], c, a);
            }
        }
        size_t h = (size_t)b * heads + (size_t)kvh * groups + g;
        if (splits == 1) {
            out[h * hd + d] = narrow<T>(a / sum);
        } else {
            float *p = partial + (h * splits + split) * (size_t)(hd + 2);
            if (d == 0) {
                p[0] = mx;
                p[1] = sum;  // 0 for a partition without keys
            }
            p[2 + d] = a;
        }
    }
}

// Grid (B, heads), one thread per head_dim element: merge the splits' partials.
template <typename T>
__device__ __forceinline__ void paged_merge(const float *__restrict__ partial, T *__restrict__ out,
                                            int hd, int splits) {
    size_t h = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
    const float *p = partial + h * splits * (size_t)(hd + 2);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float mx = -INFINITY;
        for (int s = 0; s < splits; ++s)
            if (p[s * (hd + 2) + 1] > 0.f) mx = fmaxf(mx, p[s * (hd + 2)]);
        float sum = 0.f, a = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float *ps = p + s * (hd + 2);
            if (ps[1] > 0.f) {
                float c = expf(ps[0] - mx);
                sum = fmaf(ps[1], c, sum);
                a = fmaf(ps[2 + d], c, a);
            }
        }
        out[h * hd + d] = narrow<T>(a / sum);
    }
}

#define DECODE(TY, NAME, VPT, G)                                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                      \
        paged_decode_##NAME##_v##VPT##_g##G(                                                      \
            const TY *q, const TY *k_pool, const TY *v_pool, const uint32_t *tables,              \
            const uint32_t *lens, TY *out, float *partial, int kv_heads, int groups, int hd,      \
            int max_blocks, int block_size, unsigned long long n_slots, int window, float scale,  \
            int splits) {                                                                         \
        paged_decode<TY, VPT, G>(q, k_pool, v_pool, tables, lens, out, partial, kv_heads, groups, \
                                 hd, max_blocks, block_size, n_slots, window, scale, splits);     \
    }

#define DECODE_G(TY, NAME, VPT) \
    DECODE(TY, NAME, VPT, 1)    \
    DECODE(TY, NAME, VPT, 2)    \
    DECODE(TY, NAME, VPT, 4)    \
    DECODE(TY, NAME, VPT, 8)

#define ALL(TY, NAME)                                                                           \
    DECODE_G(TY, NAME, 1)                                                                       \
    DECODE_G(TY, NAME, 2)                                                                       \
    DECODE_G(TY, NAME, 4)                                                                       \
    extern "C" __global__ void paged_merge_##NAME(const float *partial, TY *out, int hd,        \
                                                  int splits) {                                 \
        paged_merge<TY>(partial, out, hd, splits);                                              \
    }

ALL(float, f32)
ALL(__nv_bfloat16, bf16)
ALL(__half, f16)
