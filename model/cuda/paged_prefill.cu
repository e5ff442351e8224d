// Paged prefill attention: the n query rows of one prompt chunk (positions start..start+n of one
// sequence) over keys 0..start+n read straight from the paged KV pool, causal and within the
// sliding window. Rust side and reference: model/src/paged_prefill.rs (PagedPrefill).
//
// Flash-attention-2 style: a block holds a tile of query rows and walks the key tiles its rows
// can see (tiles wholly before the window or after the causal edge are never loaded), keeping an
// online softmax (running max m, sum l, accumulator o) per row; scores never leave the chip.
// GQA: a block's rows are the `groups` query heads of one KV head at bq consecutive positions
// (row r = query (r / groups), head (r % groups)), so each K/V tile is loaded once for all of
// them. Grid (query tiles, kv_heads); the query tiles run last-first, as the causal ones at the
// end have the most keys (a shorter tail).
//
// Two kernels:
// - paged_prefill_<dtype>_v<VPT>: CUDA cores, any dtype and head_dim <= 32 * VPT; f32 math
//   throughout (the exact parity mode's kernel).
// - paged_prefill_mma_<dtype>_h<HD>: bf16/f16 tensor cores (mma.sync m16n8k16, f32
//   accumulators), head_dim 64 or 128. Scores, softmax and accumulation are f32; the
//   probabilities are rounded to the input dtype for P·V, as flash-attention does and as the
//   candle-ops path (probabilities cast back to the compute dtype) does.
// A pool slot outside the pool (a corrupt table entry) is skipped, never read, as in the decode
// kernel. tools/sim_paged_prefill.py emulates both kernels' index algebra and tiling on the CPU.

#include "common.cuh"


// The pool slot of position j, or -1 when the table maps it outside the pool.
__device__ __forceinline__ long long slot_of(const uint32_t *__restrict__ table, int j,
                                             int max_blocks, int block_size,
                                             unsigned long long n_slots) {
    int b = j / block_size;
    if (b >= max_blocks) return -1;
    unsigned long long s = (unsigned long long)table[b] * block_size + j % block_size;
    return s < n_slots ? (long long)s : -1;
}

// Keys a block's query positions p_first..p_last can see: kbeg..kend.
__device__ __forceinline__ void key_range(int p_first, int p_last, int window, int &kbeg,
                                          int &kend) {
    kbeg = (window > 0 && p_first + 1 > window) ? p_first + 1 - window : 0;
    kend = p_last + 1;
}

// ---------------------------------------------------------------------------------------------
// CUDA-core kernel. 4 warps × 8 rows = 32 rows per block; key tiles of 32 keys. Scores: lane =
// key (Q rows broadcast from shared memory); P·V: lane = head_dim elements lane + 32 i, the
// probabilities broadcast by shuffles. K and V take turns in one shared buffer (49 KB would not
// fit both with Q under the 48 KB static limit).

#define F_WARPS 4
#define F_ROWS 8  // per warp
#define F_R (F_WARPS * F_ROWS)
#define F_BK 32

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <typename T, int VPT>
__device__ __forceinline__ void paged_prefill_fma(
    const T *__restrict__ q,              // [n, kv_heads * groups, hd], contiguous
    const T *__restrict__ k_pool,         // [n_slots, kv_heads, hd], contiguous
    const T *__restrict__ v_pool,         // [n_slots, kv_heads, hd], contiguous
    const uint32_t *__restrict__ table,   // [max_blocks]
    T *__restrict__ out,                  // [n, heads, hd]
    int n, int start, int kv_heads, int groups, int hd, int bq, int max_blocks, int block_size,
    unsigned long long n_slots, int window, float scale) {
    constexpr int HDP = 32 * VPT;
    __shared__ float s_q[F_R][HDP];
    __shared__ float s_kv[F_BK][HDP + 1];  // +1: lane-per-key reads of K rows hit distinct banks
    __shared__ long long s_slot[F_BK];

    const int kvh = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * bq;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int heads = kv_heads * groups;
    const int rows = bq * groups;  // <= F_R
    const int p_first = start + q0;
    const int p_last = start + min(n, q0 + bq) - 1;
    int kbeg, kend;
    key_range(p_first, p_last, window, kbeg, kend);

    for (int idx = threadIdx.x; idx < F_R * HDP; idx += blockDim.x) {
        int r = idx / HDP, d = idx % HDP;
        int qi = r / groups, g = r % groups;
        bool in = r < rows && q0 + qi < n && d < hd;
        s_q[r][d] = in ? widen(q[((size_t)(q0 + qi) * heads + kvh * groups + g) * hd + d]) : 0.f;
    }

    // Row warp * F_ROWS + i; its query position (rows past the chunk compute, unwritten).
    int pos[F_ROWS];
    float m[F_ROWS], l[F_ROWS], acc[F_ROWS][VPT];
#pragma unroll
    for (int i = 0; i < F_ROWS; ++i) {
        pos[i] = start + q0 + (warp * F_ROWS + i) / groups;
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int e = 0; e < VPT; ++e) acc[i][e] = 0.f;
    }

    for (int kt = kbeg; kt < kend; kt += F_BK) {
        __syncthreads();  // the previous tile's V reads (and, first time, s_q) are done
        if (threadIdx.x < F_BK) {
            int j = kt + threadIdx.x;
            s_slot[threadIdx.x] = j < kend ? slot_of(table, j, max_blocks, block_size, n_slots) : -1;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < F_BK * HDP; idx += blockDim.x) {
            int jj = idx / HDP, d = idx % HDP;
            long long s = s_slot[jj];
            s_kv[jj][d] = (s >= 0 && d < hd) ? widen(k_pool[((size_t)s * kv_heads + kvh) * hd + d])
                                             : 0.f;
        }
        __syncthreads();

        const int j = kt + lane;
        const bool key_ok = s_slot[lane] >= 0;
        float p[F_ROWS], c[F_ROWS];
#pragma unroll
        for (int i = 0; i < F_ROWS; ++i) {
            const float *qr = s_q[warp * F_ROWS + i];
            float s = 0.f;
#pragma unroll 4
            for (int d = 0; d < HDP; ++d) s = fmaf(qr[d], s_kv[lane][d], s);
            bool vis = key_ok && j <= pos[i] && (window <= 0 || pos[i] - j < window);
            s = vis ? s * scale : -INFINITY;
            float mn = fmaxf(m[i], warp_max(s));
            float mu = mn == -INFINITY ? 0.f : mn;  // no key seen yet: keep p = c = 0, not NaN
            p[i] = expf(s - mu);
            c[i] = expf(m[i] - mu);
            l[i] = l[i] * c[i] + warp_sum(p[i]);
            m[i] = mn;
        }
        __syncthreads();  // K reads done: V takes the buffer
        for (int idx = threadIdx.x; idx < F_BK * HDP; idx += blockDim.x) {
            int jj = idx / HDP, d = idx % HDP;
            long long s = s_slot[jj];
            s_kv[jj][d] = (s >= 0 && d < hd) ? widen(v_pool[((size_t)s * kv_heads + kvh) * hd + d])
                                             : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < F_ROWS; ++i) {
#pragma unroll
            for (int e = 0; e < VPT; ++e) acc[i][e] *= c[i];
        }
        for (int jj = 0; jj < F_BK; ++jj) {
            float v[VPT];
#pragma unroll
            for (int e = 0; e < VPT; ++e) v[e] = s_kv[jj][lane + 32 * e];
#pragma unroll
            for (int i = 0; i < F_ROWS; ++i) {
                float pj = __shfl_sync(0xffffffffu, p[i], jj);
#pragma unroll
                for (int e = 0; e < VPT; ++e) acc[i][e] = fmaf(pj, v[e], acc[i][e]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < F_ROWS; ++i) {
        int r = warp * F_ROWS + i;
        int qi = r / groups, g = r % groups;
        if (r >= rows || q0 + qi >= n) continue;
        T *o = out + ((size_t)(q0 + qi) * heads + kvh * groups + g) * hd;
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;  // l = 0 only when every slot was corrupt
#pragma unroll
        for (int e = 0; e < VPT; ++e) {
            int d = lane + 32 * e;
            if (d < hd) o[d] = narrow<T>(acc[i][e] * inv);
        }
    }
}

#define FMA_KERNEL(TY, NAME, VPT)                                                                \
    extern "C" __global__ void __launch_bounds__(F_WARPS * 32) paged_prefill_##NAME##_v##VPT(    \
        const TY *q, const TY *k_pool, const TY *v_pool, const uint32_t *table, TY *out, int n,  \
        int start, int kv_heads, int groups, int hd, int bq, int max_blocks, int block_size,     \
        unsigned long long n_slots, int window, float scale) {                                   \
        paged_prefill_fma<TY, VPT>(q, k_pool, v_pool, table, out, n, start, kv_heads, groups,   \
                                   hd, bq, max_blocks, block_size, n_slots, window, scale);     \
    }

#define FMA_ALL(TY, NAME) \
    FMA_KERNEL(TY, NAME, 1) \
    FMA_KERNEL(TY, NAME, 2) \
    FMA_KERNEL(TY, NAME, 4)

FMA_ALL(float, f32)
FMA_ALL(__nv_bfloat16, bf16)
FMA_ALL(__half, f16)

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16/f16): 4 warps × 16 rows = 64 rows per block; key tiles of 32 keys,
// double-buffered in shared memory (cp.async: tile t + 1 loads while tile t computes; 35 KB and
// 163 registers at head_dim 128, so three blocks fit an SM).
// mma.sync.m16n8k16 fragments (PTX ISA, "Matrix fragments for mma.m16n8k16"), with gq = lane / 4
// and tq = lane % 4: A (16×16, row-major) a0 = (gq, 2tq..2tq+1), a1 = (gq+8, 2tq..), a2 = (gq,
// 2tq+8..), a3 = (gq+8, 2tq+8..); B (16×8, column-major) b0 = (k 2tq..2tq+1, n gq), b1 = (k
// 2tq+8..2tq+9, n gq); C (16×8, f32) c0,c1 = (gq, 2tq..2tq+1), c2,c3 = (gq+8, 2tq..). So a warp's
// S = Q·Kᵀ accumulators over keys 16kk..16kk+15 (two n-tiles) are exactly the A fragment of P for
// P·V, and each thread holds two rows (gq, gq+8) of S and O: the softmax needs no shared memory,
// only shuffles within the four threads of a row.

#define M_WARPS 4
#define M_R (M_WARPS * 16)
#define M_BK 32

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// ldmatrix.x4 (PTX ISA, "ldmatrix"): lanes 8i..8i+7 give the row addresses (16 bytes each) of
// 8×8 matrix i, and every lane receives register i = its fragment of matrix i: elements (row
// lane / 4, columns 2 (lane % 4) and + 1), or with .trans (rows 2 (lane % 4) and + 1, column
// lane / 4). The first is a B fragment of K stored [key][d], the second of V stored [key][d].
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t *p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");  // ordered with the tile's stores and barriers
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t *p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");  // ordered with the tile's stores and barriers
}

// 16 bytes global → shared without registers (sm_80+), the bytes past src_bytes zero-filled.
__device__ __forceinline__ void cp_async16(uint16_t *smem, const uint16_t *gmem, int src_bytes) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two 16-bit elements as one fragment register, the first in the low half.
__device__ __forceinline__ uint32_t pair(uint16_t lo, uint16_t hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}

// T selects the mma; the data are handled as raw 16-bit elements.
template <typename T, int HD>
__device__ __forceinline__ void paged_prefill_mma(
    const uint16_t *__restrict__ q,       // [n, kv_heads * groups, HD], contiguous
    const uint16_t *__restrict__ k_pool,  // [n_slots, kv_heads, HD], contiguous
    const uint16_t *__restrict__ v_pool,  // [n_slots, kv_heads, HD], contiguous
    const uint32_t *__restrict__ table,   // [max_blocks]
    T *__restrict__ out,                  // [n, heads, HD]
    int n, int start, int kv_heads, int groups, int bq, int max_blocks, int block_size,
    unsigned long long n_slots, int window, float scale) {
    // Row stride in elements: rows stay 16-byte aligned (ldmatrix, uint4 stores), and the 8 rows
    // an ldmatrix phase reads hit 32 distinct banks (stride HD + 8 = 4 banks more per row).
    constexpr int LDS = HD + 8;
    constexpr int CH = HD / 8;  // 16-byte pieces per row
    __shared__ __align__(16) uint16_t s_k[2][M_BK][LDS];
    __shared__ __align__(16) uint16_t s_v[2][M_BK][LDS];
    __shared__ bool s_ok[2][M_BK];

    const int kvh = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * bq;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gq = lane >> 2, tq = lane & 3;
    const int heads = kv_heads * groups;
    const int rows = bq * groups;  // <= M_R
    const int p_first = start + q0;
    const int p_last = start + min(n, q0 + bq) - 1;
    int kbeg, kend;
    key_range(p_first, p_last, window, kbeg, kend);
    // Scores in log2 units: exp2(s·scale·log2 e - m) is exp(s·scale - m').
    const float sl2 = scale * 1.4426950408889634f;

    // This thread's rows gq and gq + 8 of the warp's 16: query positions, and whether they are
    // rows of the chunk (the others compute on zeros and are not written).
    int pos[2];
    bool live[2];
    const uint16_t *qrow[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int r = warp * 16 + gq + 8 * i;
        int qi = r / groups, g = r % groups;
        live[i] = r < rows && q0 + qi < n;
        pos[i] = start + q0 + qi;
        qrow[i] = live[i] ? q + ((size_t)(q0 + qi) * heads + kvh * groups + g) * HD : q;
    }
    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // columns 2tq (h = 0) and 2tq + 8 (h = 1)
            int d = ks * 16 + 8 * h + 2 * tq;
#pragma unroll
            for (int i = 0; i < 2; ++i)
                qa[ks][2 * h + i] = live[i] ? pair(qrow[i][d], qrow[i][d + 1]) : 0u;
        }
    }

    float o[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    // 16-byte loads need 16-byte aligned pools (rows are: HD·2 bytes is a multiple of 16).
    const bool vec = (((uintptr_t)k_pool | (uintptr_t)v_pool) & 15) == 0;

    // Issues key tile t's K and V rows into buffer b (cp.async; zeros for keys past kend or
    // at corrupt slots, whose V must be finite); returns whether this thread's keys were all
    // readable. Unaligned pools take plain loads.
    auto issue = [&](int t, int b) -> bool {
        bool ok = true;
        for (int idx = threadIdx.x; idx < M_BK * CH; idx += M_WARPS * 32) {
            int jj = idx / CH, c = idx % CH, j = kbeg + t * M_BK + jj;
            long long sl = j < kend ? slot_of(table, j, max_blocks, block_size, n_slots) : -1;
            bool in = sl >= 0;
            ok = ok && in;
            if (c == 0) s_ok[b][jj] = in;
            size_t off = in ? ((size_t)sl * kv_heads + kvh) * HD + c * 8 : 0;
            if (vec) {
                cp_async16(&s_k[b][jj][c * 8], k_pool + off, in ? 16 : 0);
                cp_async16(&s_v[b][jj][c * 8], v_pool + off, in ? 16 : 0);
            } else {
                uint4 kx = make_uint4(0, 0, 0, 0), vx = make_uint4(0, 0, 0, 0);
                if (in) {
                    const uint16_t *kp = k_pool + off, *vp = v_pool + off;
                    kx = make_uint4(pair(kp[0], kp[1]), pair(kp[2], kp[3]), pair(kp[4], kp[5]),
                                    pair(kp[6], kp[7]));
                    vx = make_uint4(pair(vp[0], vp[1]), pair(vp[2], vp[3]), pair(vp[4], vp[5]),
                                    pair(vp[6], vp[7]));
                }
                *reinterpret_cast<uint4 *>(&s_k[b][jj][c * 8]) = kx;
                *reinterpret_cast<uint4 *>(&s_v[b][jj][c * 8]) = vx;
            }
        }
        cp_async_commit();
        return ok;
    };

    // Double buffering: tile t + 1 loads while tile t computes.
    const int tiles = (kend - kbeg + M_BK - 1) / M_BK;
    bool ok_cur = issue(0, 0);
    for (int t = 0; t < tiles; ++t) {
        const int b = t & 1, kt = kbeg + t * M_BK;
        bool ok_next = true;
        if (t + 1 < tiles) {
            ok_next = issue(t + 1, b ^ 1);  // buffer b ^ 1's last reads ended at the barrier below
            cp_async_wait<1>();             // this thread's copies of tile t have landed
        } else {
            cp_async_wait<0>();
        }
        // Everyone's copies visible; every key of the tile readable (and before kend): the fast
        // path below may skip masks.
        const bool all_ok = __syncthreads_and(ok_cur);
        ok_cur = ok_next;
        const uint16_t(*s_kb)[LDS] = s_k[b];
        const uint16_t(*s_vb)[LDS] = s_v[b];
        const bool *s_okb = s_ok[b];

        // S = Q·Kᵀ: n-tile nt covers keys kt + 8nt .. kt + 8nt + 7. One ldmatrix.x4 gives the B
        // fragments (b0, b1) of two k-steps: matrices of keys 8nt.. at d = 32kp + 8 (lane / 8).
        float s[M_BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < M_BK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
            const uint16_t *kr = &s_kb[nt * 8 + (lane & 7)][(lane >> 3) * 8];
#pragma unroll
            for (int kp = 0; kp < HD / 32; ++kp) {
                uint32_t bk[4];
                ldsm_x4(bk, kr + kp * 32);
                Mma<T>::mma(s[nt], qa[2 * kp], bk[0], bk[1]);
                Mma<T>::mma(s[nt], qa[2 * kp + 1], bk[2], bk[3]);
            }
        }
        // Every row sees every key of the tile: no masks to apply.
        const bool full =
            all_ok && kt + M_BK - 1 <= p_first && (window <= 0 || p_last - kt < window);
#pragma unroll
        for (int nt = 0; nt < M_BK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * sl2;
                if (!full) {
                    int jj = nt * 8 + 2 * tq + (e & 1), j = kt + jj, p = pos[e >> 1];
                    bool vis = s_okb[jj] && j <= p && (window <= 0 || p - j < window);
                    x = vis ? x : -INFINITY;
                }
                s[nt][e] = x;
            }
        }

        // Online softmax of rows gq (i = 0) and gq + 8 (i = 1); a row's four threads share it.
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < M_BK / 8; ++nt) {
            mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
        }
        float mu[2], corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float mn = fmaxf(m[i], mx[i]);
            mu[i] = mn == -INFINITY ? 0.f : mn;  // no key seen yet: keep p = corr = 0, not NaN
            corr[i] = exp2f(m[i] - mu[i]);
            m[i] = mn;
            l[i] *= corr[i];  // this thread's share of the row sum; the shares add up at the end
        }
#pragma unroll
        for (int nt = 0; nt < M_BK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2f(s[nt][e] - mu[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        }
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[nt][e] *= corr[e >> 1];
        }

        // O += P·V over the tile's keys, 16 at a time.
#pragma unroll
        for (int kk = 0; kk < M_BK / 16; ++kk) {
            const uint32_t pa[4] = {
                Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            // One ldmatrix.x4.trans gives the B fragments of two n-tiles: matrices of keys
            // 16kk.. and 16kk + 8.. (b0, b1) at d = 16np and 16np + 8.
            const uint16_t *vr = &s_vb[kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][(lane >> 4) * 8];
#pragma unroll
            for (int np = 0; np < HD / 16; ++np) {
                uint32_t bv[4];
                ldsm_x4_trans(bv, vr + np * 16);
                Mma<T>::mma(o[2 * np], pa, bv[0], bv[1]);
                Mma<T>::mma(o[2 * np + 1], pa, bv[2], bv[3]);
            }
        }
        __syncthreads();  // buffer b's reads done before tile t + 2 is issued into it
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (!live[i]) continue;
        int r = warp * 16 + gq + 8 * i;
        T *orow = out + ((size_t)(q0 + r / groups) * heads + kvh * groups + r % groups) * HD;
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;  // l = 0 only when every slot was corrupt
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            orow[nt * 8 + 2 * tq] = narrow<T>(o[nt][2 * i] * inv);
            orow[nt * 8 + 2 * tq + 1] = narrow<T>(o[nt][2 * i + 1] * inv);
        }
    }
}

// mma.sync with bf16, ldmatrix and cp.async need sm_80: built for an older GPU, the kernel does
// nothing, fails the decoder's start-up check, and the CUDA-core kernel serves.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define MMA_BODY(...) __VA_ARGS__
#else
#define MMA_BODY(...)
#endif

#define MMA_KERNEL(TY, NAME, HD)                                                                 \
    extern "C" __global__ void __launch_bounds__(M_WARPS * 32) paged_prefill_mma_##NAME##_h##HD( \
        const uint16_t *q, const uint16_t *k_pool, const uint16_t *v_pool,                       \
        const uint32_t *table, TY *out, int n, int start, int kv_heads, int groups, int bq,      \
        int max_blocks, int block_size, unsigned long long n_slots, int window, float scale) {   \
        MMA_BODY(paged_prefill_mma<TY, HD>(q, k_pool, v_pool, table, out, n, start, kv_heads,   \
                                           groups, bq, max_blocks, block_size, n_slots, window, \
                                           scale));                                             \
    }

MMA_KERNEL(__nv_bfloat16, bf16, 64)
MMA_KERNEL(__nv_bfloat16, bf16, 128)
MMA_KERNEL(__half, f16, 64)
MMA_KERNEL(__half, f16, 128)
