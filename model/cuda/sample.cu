// Sampling of a decode step's rows on the device (model/src/device_sampling.rs has the algorithm
// in words and its Rust model, `reference_row`). One block per row; every reduction has a fixed
// order (warp shuffles, then warp 0 over the warps' partials), so a row gives the same bits on
// every run. Arithmetic in f32.
//
// Output per row (OUT_COLS floats): id, logprob, then MAX_TOP (id, logprob) pairs; the id is -1
// for a NaN or +inf logit and -2 when no logit is finite.
#ifdef TGA_HOST_EMULATION
#include "host_emulation.h"  // the tests' host build (f32 only)
#else
#include "common.cuh"
#endif

#ifndef THREADS
#define THREADS 512  // threads per row; the host emulation also builds with fewer
#endif
#define WARPS (THREADS / 32)
#define MAX_TOP 20
#define OUT_COLS (2 + 2 * MAX_TOP)
#define PARAM_COLS 6
#define GREEDY_EPS 1e-5f

// The logit's bits as an unsigned key ordered as the floats (f32::total_cmp's order).
__device__ __forceinline__ unsigned key_of(float x) {
    unsigned b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float from_key(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// (key, id) packed so that the larger value comes first in the order key descending, id
// ascending: one u64 max finds the argmax with the lowest id on ties.
__device__ __forceinline__ unsigned long long pack(unsigned key, int id) {
    return ((unsigned long long)key << 32) | (unsigned long long)(0xffffffffu - (unsigned)id);
}
__device__ __forceinline__ int unpack_id(unsigned long long p) {
    return (int)(0xffffffffu - (unsigned)(p & 0xffffffffu));
}

// Block reductions: lane 0 of each warp holds its warp's shuffle-tree result, warp 0 reduces the
// WARPS partials the same way, and every thread reads the result from shared memory. The leading
// barrier lets consecutive calls reuse `sh`.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, V identity, V *sh, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < WARPS ? sh[lane] : identity;
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
        if (lane == 0) sh[WARPS] = v;
    }
    __syncthreads();
    return sh[WARPS];
}

struct Sum {
    template <typename V> __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
    __device__ __forceinline__ unsigned long long operator()(unsigned long long a,
                                                             unsigned long long b) const {
        return a > b ? a : b;
    }
};

struct Scratch {
    float f[WARPS + 1];
    unsigned u[WARPS + 1];
    unsigned long long l[WARPS + 1];
    float chunk[THREADS];  // each thread's kept mass, for the draw
    int owner, pick;  // the thread whose chunk the draw falls in, and the id it picks
    float owner_before, target;
};

template <typename T>
__device__ void sample_row(const T *x, const double *p, float *out, int limit) {
    __shared__ Scratch s;
    const int tid = threadIdx.x;
    for (int c = tid; c < OUT_COLS; c += THREADS) out[c] = 0.f;

    // Pass 1: bad logits and the argmax.
    unsigned bad = 0;
    unsigned long long best = 0;
    for (int i = tid; i < limit; i += THREADS) {
        const float v = widen(x[i]);
        if (isnan(v) || v == INFINITY) bad = 1;
        const unsigned long long pk = pack(key_of(v), i);
        best = pk > best ? pk : best;
    }
    bad = block_reduce(bad, 0u, s.u, Sum());
    best = block_reduce(best, 0ull, s.l, Max());
    const int arg = unpack_id(best);
    const float mx = from_key((unsigned)(best >> 32));
    if (bad || mx == -INFINITY) {
        if (tid == 0) out[0] = bad ? -1.f : -2.f;
        return;
    }

    // Pass 2: the log normaliser.
    float z = 0.f;
    for (int i = tid; i < limit; i += THREADS) z += expf(widen(x[i]) - mx);
    z = block_reduce(z, 0.f, s.f, Sum());
    const float log_z = mx + logf(z);

    // The top alternatives: each round the first token after the previous one.
    int n = (int)p[4];
    n = min(min(n, MAX_TOP), limit);
    unsigned long long prev = ~0ull;
    for (int j = 0; j < n; ++j) {
        unsigned long long next = 0;
        for (int i = tid; i < limit; i += THREADS) {
            const unsigned long long pk = pack(key_of(widen(x[i])), i);
            if (pk < prev && pk > next) next = pk;
        }
        next = block_reduce(next, 0ull, s.l, Max());
        if (tid == 0) {
            const int id = unpack_id(next);
            out[2 + 2 * j] = (float)id;
            out[3 + 2 * j] = widen(x[id]) - log_z;
        }
        prev = next;
    }

    const float temperature = (float)p[0], top_p = (float)p[2], min_p = (float)p[3];
    const long long top_k = (long long)p[1];
    int chosen = arg;
    if (!(temperature < GREEDY_EPS || top_k == 1)) {
        // top-k: the largest key with at least k logits at or above it.
        unsigned k_key = 0;
        if (top_k > 0 && top_k < limit) {
            for (int bit = 31; bit >= 0; --bit) {
                const unsigned c = k_key | (1u << bit);
                unsigned cnt = 0;
                for (int i = tid; i < limit; i += THREADS) cnt += key_of(widen(x[i])) >= c;
                cnt = block_reduce(cnt, 0u, s.u, Sum());
                if (cnt >= (unsigned long long)top_k) k_key = c;
            }
        }
#define IN_K(v) ((v) > -INFINITY && key_of(v) >= k_key)
#define WEIGHT(v) expf(((v) - mx) / temperature)
        // top-p: the largest key τ whose tokens at or above it carry the target mass, and of
        // the tokens tied at τ the lowest ids, as many as the mass still needs.
        unsigned tau = 0, bound = 0xffffffffu;
        if (top_p < 1.f) {
            float total = 0.f;
            for (int i = tid; i < limit; i += THREADS) {
                const float v = widen(x[i]);
                if (IN_K(v)) total += WEIGHT(v);
            }
            total = block_reduce(total, 0.f, s.f, Sum());
            const float target = top_p * total;
            for (int bit = 31; bit >= 0; --bit) {
                const unsigned c = tau | (1u << bit);
                float m = 0.f;
                unsigned cnt = 0;
                for (int i = tid; i < limit; i += THREADS) {
                    const float v = widen(x[i]);
                    if (IN_K(v) && key_of(v) >= c) {
                        m += WEIGHT(v);
                        ++cnt;
                    }
                }
                m = block_reduce(m, 0.f, s.f, Sum());
                cnt = block_reduce(cnt, 0u, s.u, Sum());
                if (m >= target && cnt >= 1) tau = c;
            }
            float above = 0.f;
            unsigned ties = 0;
            for (int i = tid; i < limit; i += THREADS) {
                const float v = widen(x[i]);
                if (!IN_K(v)) continue;
                const unsigned kv = key_of(v);
                if (kv > tau) above += WEIGHT(v);
                ties += kv == tau;
            }
            above = block_reduce(above, 0.f, s.f, Sum());
            ties = block_reduce(ties, 0u, s.u, Sum());
            const float need_f = ceilf((target - above) / WEIGHT(from_key(tau)));
            unsigned need = ties;
            if (isfinite(need_f)) need = (unsigned)fminf(fmaxf(need_f, 1.f), (float)ties);
            if (need < ties) {
                unsigned b = 0;
                for (int bit = 31; bit >= 0; --bit) {
                    const unsigned c = b | (1u << bit);
                    unsigned cnt = 0;
                    for (int i = tid; i < limit; i += THREADS) {
                        const float v = widen(x[i]);
                        cnt += IN_K(v) && key_of(v) == tau && (unsigned)i < c;
                    }
                    cnt = block_reduce(cnt, 0u, s.u, Sum());
                    if (cnt < need) b = c;
                }
                bound = b;
            }
        }
#define KEPT(i, v)                                                                           \
    (IN_K(v) && (key_of(v) > tau || (key_of(v) == tau && (unsigned)(i) <= bound)) &&         \
     (min_p <= 0.f || WEIGHT(v) >= min_p))
        // The draw in id order: each thread's contiguous chunk of ids, thread 0 finding the
        // chunk the target falls in by a sequential sum, its thread walking it.
        const int chunk = (limit + THREADS - 1) / THREADS;
        const int lo = min(tid * chunk, limit), hi = min(lo + chunk, limit);
        float mine = 0.f;
        int last = -1;
        for (int i = lo; i < hi; ++i) {
            const float v = widen(x[i]);
            if (KEPT(i, v)) {
                mine += WEIGHT(v);
                last = i;
            }
        }
        s.chunk[tid] = mine;
        const unsigned long long last_kept =
            block_reduce(last >= 0 ? (unsigned long long)last + 1 : 0ull, 0ull, s.l, Max());
        if (tid == 0) {
            float total = 0.f;
            for (int t = 0; t < THREADS; ++t) total += s.chunk[t];
            const float target = (float)(p[5] * (double)total);
            float before = 0.f;
            s.owner = -1;
            s.target = target;
            for (int t = 0; t < THREADS; ++t) {
                if (s.chunk[t] > 0.f && target < before + s.chunk[t]) {
                    s.owner = t;
                    s.owner_before = before;
                    break;
                }
                before += s.chunk[t];
            }
        }
        __syncthreads();
        // The target at the very top (rounding) falls to the last kept token.
        chosen = last_kept > 0 ? (int)last_kept - 1 : arg;
        const int owner = s.owner;
        if (owner >= 0) {
            if (tid == owner) {
                float cumulative = s.owner_before;
                int pick = last;  // rounding within the chunk: its last kept token
                for (int i = lo; i < hi; ++i) {
                    const float v = widen(x[i]);
                    if (!KEPT(i, v)) continue;
                    cumulative += WEIGHT(v);
                    if (s.target < cumulative) {
                        pick = i;
                        break;
                    }
                }
                s.pick = pick;
            }
            __syncthreads();
            chosen = s.pick;
        }
#undef KEPT
#undef WEIGHT
#undef IN_K
    }
    if (tid == 0) {
        out[0] = (float)chosen;
        out[1] = widen(x[chosen]) - log_z;
    }
}

#define SAMPLE(NAME, TY)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                      \
        sample_rows_##NAME(const TY *logits, const double *params, float *out, int vocab,      \
                           int limit) {                                                        \
        const size_t r = blockIdx.x;                                                           \
        sample_row<TY>(logits + r * (size_t)vocab, params + r * PARAM_COLS, out + r * OUT_COLS, \
                       limit);                                                                 \
    }

SAMPLE(f32, float)
#ifndef TGA_HOST_EMULATION
SAMPLE(bf16, __nv_bfloat16)
SAMPLE(f16, __half)
#endif
