#!/usr/bin/env python3
"""Emulates model/cuda/paged_prefill.cu on the CPU (pure Python, no GPU, no numpy), as a check by
construction of what a machine without a GPU cannot run:

1. fragments: the tensor-core kernel's index algebra for one warp and key tile (Q fragments,
   ldmatrix.x4 of K, S accumulators repacked as P fragments, ldmatrix.x4.trans of V) against
   plain matrix products, with mma.m16n8k16 and ldmatrix modelled on the PTX ISA's fragment
   layouts;
2. tiles: both kernels at block level (grid order, row mapping, key ranges, tiles, the
   tensor-core kernel's unmasked fast path, masks, online softmax, bf16 rounding of P) against
   dense attention, within model::paged_prefill::tolerance.

Run: python3 tools/sim_paged_prefill.py (a few seconds). It checks the algorithm as written, not
the compiled kernel: tests/kernels.rs on a GPU does that.
"""
import math
import random
import struct


def fragments():
    HD, BK, LDS = 128, 32, 128 + 8
    random.seed(1)
    Q = [[random.randint(-3, 3) for _ in range(HD)] for _ in range(16)]
    K = [[random.randint(-3, 3) for _ in range(HD)] for _ in range(BK)]
    V = [[random.randint(-3, 3) for _ in range(HD)] for _ in range(BK)]
    P = [[random.randint(-3, 3) for _ in range(BK)] for _ in range(16)]
    # shared memory as flat arrays [key][LDS]
    s_k = [0] * (BK * LDS); s_v = [0] * (BK * LDS)
    for j in range(BK):
        for d in range(HD):
            s_k[j * LDS + d] = K[j][d]; s_v[j * LDS + d] = V[j][d]

    def mma(c, a, b0, b1):
        # c[lane][4], a[lane][4] of (lo, hi) pairs, b0/b1[lane] pairs. Documented layouts.
        A = [[None] * 16 for _ in range(16)]; B = [[None] * 8 for _ in range(16)]
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for (reg, r, col) in [(0, g, 2 * t), (1, g + 8, 2 * t), (2, g, 2 * t + 8), (3, g + 8, 2 * t + 8)]:
                A[r][col], A[r][col + 1] = a[lane][reg]
            B[2 * t][g], B[2 * t + 1][g] = b0[lane]
            B[2 * t + 8][g], B[2 * t + 9][g] = b1[lane]
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for e in range(4):
                r = g + 8 * (e >> 1); col = 2 * t + (e & 1)
                c[lane][e] += sum(A[r][k] * B[k][col] for k in range(16))

    def ldsm_x4(smem, addr, trans):
        # addr[lane] = element index of a 16-byte row; matrix i's rows from lanes 8i..8i+7
        out = [[None] * 4 for _ in range(32)]
        for i in range(4):
            rows = [[smem[addr[8 * i + r] + c] for c in range(8)] for r in range(8)]
            for lane in range(32):
                if not trans:
                    r, c = lane // 4, 2 * (lane % 4); out[lane][i] = (rows[r][c], rows[r][c + 1])
                else:
                    r, c = 2 * (lane % 4), lane // 4; out[lane][i] = (rows[r][c], rows[r + 1][c])
        for lane in range(32):
            for i in range(4): assert out[lane][i] is not None
            for i in range(4): assert addr[lane] % 8 == 0  # 16-byte aligned rows
        return out

    # Q fragments as the kernel loads them: qa[ks][2h + i] = pair(row gq + 8i, col ks*16 + 8h + 2tq)
    qa = [[[None] * 4 for _ in range(HD // 16)] for _ in range(32)]
    for lane in range(32):
        gq, tq = lane >> 2, lane & 3
        for ks in range(HD // 16):
            for h in range(2):
                d = ks * 16 + 8 * h + 2 * tq
                for i in range(2):
                    qa[lane][ks][2 * h + i] = (Q[gq + 8 * i][d], Q[gq + 8 * i][d + 1])
    # S
    s = [[[0] * 4 for _ in range(32)] for _ in range(BK // 8)]
    for nt in range(BK // 8):
        for kp in range(HD // 32):
            addr = [(nt * 8 + (lane & 7)) * LDS + (lane >> 3) * 8 + kp * 32 for lane in range(32)]
            b = ldsm_x4(s_k, addr, False)
            mma(s[nt], [qa[l][2 * kp] for l in range(32)], [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
            mma(s[nt], [qa[l][2 * kp + 1] for l in range(32)], [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    for nt in range(BK // 8):
        for lane in range(32):
            gq, tq = lane >> 2, lane & 3
            for e in range(4):
                r = gq + 8 * (e >> 1); j = nt * 8 + 2 * tq + (e & 1)
                assert s[nt][lane][e] == sum(Q[r][d] * K[j][d] for d in range(HD)), (nt, lane, e)
    print("S = Q K^T ok")
    # P as the S accumulators: put P values in s's layout, then pack as the kernel does
    for nt in range(BK // 8):
        for lane in range(32):
            gq, tq = lane >> 2, lane & 3
            for e in range(4):
                s[nt][lane][e] = P[gq + 8 * (e >> 1)][nt * 8 + 2 * tq + (e & 1)]
    o = [[[0] * 4 for _ in range(32)] for _ in range(HD // 8)]
    for kk in range(BK // 16):
        pa = [[(s[2 * kk][l][0], s[2 * kk][l][1]), (s[2 * kk][l][2], s[2 * kk][l][3]),
               (s[2 * kk + 1][l][0], s[2 * kk + 1][l][1]), (s[2 * kk + 1][l][2], s[2 * kk + 1][l][3])] for l in range(32)]
        for np_ in range(HD // 16):
            addr = [(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + (lane >> 4) * 8 + np_ * 16 for lane in range(32)]
            b = ldsm_x4(s_v, addr, True)
            mma(o[2 * np_], pa, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
            mma(o[2 * np_ + 1], pa, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    for nt in range(HD // 8):
        for lane in range(32):
            gq, tq = lane >> 2, lane & 3
            for i in range(2):
                for c in range(2):
                    r, d = gq + 8 * i, nt * 8 + 2 * tq + c
                    assert o[nt][lane][2 * i + c] == sum(P[r][j] * V[j][d] for j in range(BK)), (nt, lane)
    print("O = P V ok")
def bf16(x):  # round to nearest even, as __float2bfloat16_rn
    b = struct.unpack('<I', struct.pack('<f', x))[0]
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return struct.unpack('<f', struct.pack('<I', b))[0]

def case(seed, start, n, bs, kvh, groups, hd):
    rnd = random.Random(seed)
    used = -(-(start + n) // bs); total = 2 * used + 3
    blocks = list(range(total)); rnd.shuffle(blocks)
    table = blocks[:used] + [2**32 - 1]
    slots = total * bs
    heads = kvh * groups
    q = [[[rnd.uniform(-2, 2) for _ in range(hd)] for _ in range(heads)] for _ in range(n)]
    k = [[[rnd.uniform(-2, 2) for _ in range(hd)] for _ in range(kvh)] for _ in range(slots)]
    v = [[[rnd.uniform(-2, 2) for _ in range(hd)] for _ in range(kvh)] for _ in range(slots)]
    return q, k, v, table, slots

def slot_of(table, j, bs, n_slots):
    b = j // bs
    if b >= len(table): return -1
    s = table[b] * bs + j % bs
    return s if s < n_slots else -1

def dense(q, k, v, table, slots, start, bs, kvh, groups, window, scale):
    n, heads, hd = len(q), len(q[0]), len(q[0][0])
    out = [[None] * heads for _ in range(n)]
    for i in range(n):
        p = start + i
        lo = max(0, p + 1 - window) if window else 0
        for h in range(heads):
            ks = [slot_of(table, j, bs, slots) for j in range(lo, p + 1)]
            sc = [sum(a * b for a, b in zip(q[i][h], k[s][h // groups])) * scale for s in ks]
            m = max(sc); e = [math.exp(x - m) for x in sc]; z = sum(e)
            out[i][h] = [sum(w * v[s][h // groups][d] for w, s in zip(e, ks)) / z for d in range(hd)]
    return out

# Tiles the tensor-core kernel took unmasked (the fast path), to see that the cases reach it.
FULL = [0]


def mma_kernel(q, k, v, table, slots, start, bs, kvh, groups, window, scale, R=64, BK=32):
    n, heads, hd = len(q), len(q[0]), len(q[0][0])
    bq = R // groups
    out = [[None] * heads for _ in range(n)]
    grid_x = -(-n // bq)
    sl2 = scale * 1.4426950408889634
    for bx in range(grid_x):
        for kh in range(kvh):
            q0 = (grid_x - 1 - bx) * bq
            rows = bq * groups
            p_first = start + q0; p_last = start + min(n, q0 + bq) - 1
            kbeg = p_first + 1 - window if (window > 0 and p_first + 1 > window) else 0
            kend = p_last + 1
            R_ = [];
            for r in range(R):
                qi, g = r // groups, r % groups
                live = r < rows and q0 + qi < n
                R_.append((live, start + q0 + qi, [bf16(x) for x in q[q0 + qi][kh * groups + g]] if live else [0.0] * hd, qi, g))
            m = [-math.inf] * R; l = [0.0] * R; o = [[0.0] * hd for _ in range(R)]
            tiles = (kend - kbeg + BK - 1) // BK
            for t in range(tiles):
                kt = kbeg + t * BK
                sl = [slot_of(table, kt + jj, bs, slots) if kt + jj < kend else -1 for jj in range(BK)]
                ok = [s >= 0 for s in sl]
                all_ok = all(ok)
                K = [[bf16(x) for x in k[s][kh]] if s >= 0 else [0.0] * hd for s in sl]
                V = [[bf16(x) for x in v[s][kh]] if s >= 0 else [0.0] * hd for s in sl]
                full = all_ok and kt + BK - 1 <= p_first and (window <= 0 or p_last - kt < window)
                FULL[0] += full
                for r in range(R):
                    live, p, qr, _, _ = R_[r]
                    srow = []
                    for jj in range(BK):
                        x = sum(a * b for a, b in zip(qr, K[jj])) * sl2
                        if not full:
                            j = kt + jj
                            vis = ok[jj] and j <= p and (window <= 0 or p - j < window)
                            x = x if vis else -math.inf
                        srow.append(x)
                    mn = max(m[r], max(srow))
                    mu = 0.0 if mn == -math.inf else mn
                    corr = 2.0 ** (m[r] - mu) if m[r] != -math.inf else 0.0
                    m[r] = mn; l[r] *= corr
                    ps = [2.0 ** (x - mu) if x != -math.inf else 0.0 for x in srow]
                    l[r] += sum(ps)
                    pb = [bf16(x) for x in ps]
                    o[r] = [o[r][d] * corr + sum(pb[jj] * V[jj][d] for jj in range(BK)) for d in range(hd)]
            for r in range(R):
                live, p, _, qi, g = R_[r]
                if not live: continue
                inv = 1.0 / l[r] if l[r] > 0 else 0.0
                assert out[q0 + qi][kh * groups + g] is None
                out[q0 + qi][kh * groups + g] = [x * inv for x in o[r]]
    return out

def fma_kernel(q, k, v, table, slots, start, bs, kvh, groups, window, scale, R=32, BK=32):
    n, heads, hd = len(q), len(q[0]), len(q[0][0])
    bq = R // groups
    out = [[None] * heads for _ in range(n)]
    grid_x = -(-n // bq)
    for bx in range(grid_x):
        for kh in range(kvh):
            q0 = (grid_x - 1 - bx) * bq
            rows = bq * groups
            p_first = start + q0; p_last = start + min(n, q0 + bq) - 1
            kbeg = p_first + 1 - window if (window > 0 and p_first + 1 > window) else 0
            kend = p_last + 1
            sq = []
            for r in range(R):
                qi, g = r // groups, r % groups
                sq.append(q[q0 + qi][kh * groups + g] if (r < rows and q0 + qi < n) else [0.0] * hd)
            pos = [start + q0 + r // groups for r in range(R)]
            m = [-math.inf] * R; l = [0.0] * R; acc = [[0.0] * hd for _ in range(R)]
            for kt in range(kbeg, kend, BK):
                sl = [slot_of(table, kt + jj, bs, slots) if kt + jj < kend else -1 for jj in range(BK)]
                for r in range(R):
                    s = []
                    for jj in range(BK):
                        j = kt + jj
                        x = sum(a * b for a, b in zip(sq[r], k[sl[jj]][kh])) if sl[jj] >= 0 else 0.0
                        vis = sl[jj] >= 0 and j <= pos[r] and (window <= 0 or pos[r] - j < window)
                        s.append(x * scale if vis else -math.inf)
                    mn = max(m[r], max(s)); mu = 0.0 if mn == -math.inf else mn
                    p = [math.exp(x - mu) if x != -math.inf else 0.0 for x in s]
                    c = math.exp(m[r] - mu) if m[r] != -math.inf else 0.0
                    l[r] = l[r] * c + sum(p); m[r] = mn
                    acc[r] = [acc[r][d] * c + sum(p[jj] * (v[sl[jj]][kh][d] if sl[jj] >= 0 else 0.0) for jj in range(BK)) for d in range(hd)]
            for r in range(R):
                qi, g = r // groups, r % groups
                if r >= rows or q0 + qi >= n: continue
                assert out[q0 + qi][kh * groups + g] is None
                out[q0 + qi][kh * groups + g] = [x / l[r] for x in acc[r]]
    return out


def tiles():
    worst = {}
    for (start, n, bs, groups, window) in [(0, 1, 16, 4, 0), (0, 37, 5, 4, 0), (23, 45, 5, 3, 20), (40, 17, 1, 2, 7),
                                           (0, 70, 16, 4, 20), (37, 1, 16, 4, 0), (100, 29, 16, 3, 1), (5, 70, 16, 1, 40), (100, 40, 16, 4, 0), (200, 16, 16, 4, 64), (150, 3, 5, 2, 64)]:
        kvh, hd = 2, 16
        q, k, v, table, slots = case(start * 31 + n, start, n, bs, kvh, groups, hd)
        scale = 1 / math.sqrt(hd)
        # the reference sees the bf16-rounded inputs, as check_against_reference does
        qb = [[[bf16(x) for x in r] for r in row] for row in q]
        kb = [[[bf16(x) for x in r] for r in row] for row in k]
        vb = [[[bf16(x) for x in r] for r in row] for row in v]
        want = dense(qb, kb, vb, table, slots, start, bs, kvh, groups, window, scale)
        wabs = dense(qb, kb, [[[abs(x) for x in r] for r in row] for row in vb], table, slots, start, bs, kvh, groups, window, scale)
        for name, kern in [("mma", mma_kernel), ("fma", fma_kernel)]:
            got = kern(q if name == "mma" else qb, kb if name == "fma" else k, vb if name == "fma" else v, table, slots, start, bs, kvh, groups, window, scale)
            e = 0.0
            for i in range(n):
                for h in range(kvh * groups):
                    for d in range(hd):
                        g, w, wa = got[i][h][d], want[i][h][d], wabs[i][h][d]
                        err = abs(g - w)
                        tol = (abs(w) + wa) / 256 + 1e-5 if name == "mma" else 1e-9 * (1 + abs(w))
                        assert err <= tol, (name, start, n, bs, groups, window, i, h, d, g, w)
                        e = max(e, err)
            worst[name] = max(worst.get(name, 0), e)
        print(f"start {start:3} n {n:3} bs {bs:2} groups {groups} window {window:3}: ok")
    print("max |diff|", worst, "full tiles", FULL[0])


if __name__ == "__main__":
    fragments()
    tiles()
