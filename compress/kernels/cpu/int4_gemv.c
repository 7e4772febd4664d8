/* INT4 weight-only GEMV / small-batch GEMM for x86 CPUs, fp32 activations and accumulation.
 *
 * Compiled at run time by compress/kernels/cpu_native.py with the host's compiler and
 * -march=native, so the #if blocks pick AVX-512, AVX2 or plain C for the CPU it runs on. No torch
 * headers: the Python side passes data pointers through ctypes.
 *
 * Weights: codes q in [0, 15] (any bits <= 4), groups of G adjacent columns (act-order columns are
 * sorted by group at load and x gathered with `perm`), per row and group an fp32 scale s and the
 * fp32 product sz = s * z of scale and zero point: w = (q - z) * s = q * s - sz. Codes are packed
 * two per byte in 16-code chunks (8 bytes); the order of codes inside a chunk is the one the vector
 * unpack below produces (c4_pack writes it).
 *
 * AVX-512 unpack, per 16 codes: one 64-bit broadcast load, one variable rotate that brings code i
 * to bits 19..22 of lane i, one ternary-logic op that masks it and ORs in the exponent of 1.0f. Lane
 * i then holds the float 1 + q_i / 16 exactly, with no int->float conversion. So per group
 *     sum_k w_k x_k = s * sum_k q_k x_k - sz * xsum = 16 s * acc - (16 s + sz) * xsum,
 * where acc = sum_k (1 + q_k / 16) x_k and xsum = sum_k x_k over the group (computed once per call).
 * That is 3 vector ops per 16 weights, all on ports 0/5. The vector loop accumulates s * acc; the
 * xsum term is one short dot product per row after it (UNPACK_SCALE, UNPACK_BIAS below).
 *
 * AVX2 / plain C: code j of a chunk sits in nibble j (low nibble first); shift, mask, convert.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* unaligned loads without breaking aliasing rules (compiled to one mov) */
static inline long long load64(const uint8_t *p) { long long v; memcpy(&v, p, 8); return v; }
static inline int load32(const uint8_t *p) { int v; memcpy(&v, p, 4); return v; }

/* Software prefetch of the codes PF_BLOCKS row blocks ahead: on weights streaming from L3/DRAM it
 * took a 16384x1536 layer from 2.3 to 1.3 ms (one thread, the hardware prefetchers alone lag) */
#ifndef PF_BLOCKS
#define PF_BLOCKS 2
#endif
#define MT 4        /* activation rows per pass over a weight row */
#define ROW_BLOCK 8 /* weight rows per OpenMP work item */

#if defined(__AVX512F__)
#define UNPACK_SCALE 16.f /* the unpacked value is 1 + q / 16 */
#define UNPACK_BIAS 16.f
#else
#define UNPACK_SCALE 1.f /* the unpacked value is q */
#define UNPACK_BIAS 0.f
#endif

int c4_isa(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

/* Nibble position of code i (0..15) inside its 64-bit chunk. */
static inline int chunk_pos(int i) {
#if defined(__AVX512F__)
    /* qword broadcast: dword lane i reads dword (i & 1); the rotate takes nibble i >> 1 of it */
    return 8 * (i & 1) + (i >> 1);
#else
    return i;
#endif
}

/* codes [N, K] uint8 (values < 16) -> packed [N, K / 2] bytes; K % 16 == 0. */
void c4_pack(const uint8_t *codes, uint8_t *out, int64_t n, int64_t k) {
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *c = codes + r * k;
        uint8_t *o = out + r * (k / 2);
        memset(o, 0, (size_t)(k / 2));
        for (int64_t base = 0; base < k; base += 16)
            for (int i = 0; i < 16; i++) {
                int p = chunk_pos(i);
                o[base / 2 + p / 2] |= (uint8_t)((c[base + i] & 15) << (4 * (p & 1)));
            }
    }
}

/* The inverse of c4_pack. */
void c4_unpack(const uint8_t *packed, uint8_t *codes, int64_t n, int64_t k) {
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *p = packed + r * (k / 2);
        uint8_t *c = codes + r * k;
        for (int64_t base = 0; base < k; base += 16)
            for (int i = 0; i < 16; i++) {
                int pos = chunk_pos(i);
                c[base + i] = (p[base / 2 + pos / 2] >> (4 * (pos & 1))) & 15;
            }
    }
}

/* rows_dot: nr weight rows (row r at p + r * k / 2, its scales at s + r * ng) times mt activation
 * rows (x + m * k); out[r * MT + m] = sum over groups of s * (sum of unpacked values * x). nr and mt are constants
 * at every call site, so the compiler unrolls the r and m loops and keeps the accumulators in
 * registers. Several rows at once give independent FMA chains (one row alone waits on FMA latency)
 * and share each activation load. */
#if defined(__AVX512F__)
#define RMAX 4
static inline int rows_for(int mt) { return mt == 1 ? 4 : 2; }

/* [sum(a), sum(b), sum(c), sum(d)] */
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    const __m256 ab = _mm256_hadd_ps(HALVES(a), HALVES(b)), cd = _mm256_hadd_ps(HALVES(c), HALVES(d));
#undef HALVES
    const __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline __m512 unpack16(const uint8_t *p, __m512i rot, __m512i mask, __m512i one) {
    __m512i b = _mm512_set1_epi64(load64(p));
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_rolv_epi32(b, rot), mask, one, 0xEA));
}

/* 16 weights q * s - b of one chunk to o */
static inline void dequant16(const uint8_t *p, float s, float b, float *o) {
    const __m512i rot = _mm512_set_epi32(23, 23, 27, 27, 31, 31, 3, 3, 7, 7, 11, 11, 15, 15, 19, 19);
    const __m512 v = unpack16(p, rot, _mm512_set1_epi32(0x00780000), _mm512_set1_epi32(0x3F800000));
    _mm512_storeu_ps(o, _mm512_fmadd_ps(v, _mm512_set1_ps(16.f * s), _mm512_set1_ps(-(16.f * s + b))));
}

static inline __attribute__((always_inline)) void rows_dot(const uint8_t *p, const float *s, int64_t k,
                                                           const float *x, int64_t ng, int64_t g, int nr, int mt,
                                                           float *out) {
    const __m512i rot = _mm512_set_epi32(23, 23, 27, 27, 31, 31, 3, 3, 7, 7, 11, 11, 15, 15, 19, 19);
    const __m512i mask = _mm512_set1_epi32(0x00780000), one = _mm512_set1_epi32(0x3F800000);
    const int64_t rb = k / 2;
    __m512 tot[RMAX][MT];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mt; m++) tot[r][m] = _mm512_setzero_ps();
    /* FMA latency: fewer than 4 (row, activation row) pairs take two accumulator chains each (more
     * chains measured no faster at 4 pairs: the unpack, not the FMA latency, bounds it there) */
    const int two = nr * mt < 4;
    for (int64_t grp = 0; grp < ng; grp++) {
        __m512 a0[RMAX][MT], a1[RMAX][MT];
        for (int r = 0; r < nr; r++)
            for (int m = 0; m < mt; m++) { a0[r][m] = _mm512_setzero_ps(); a1[r][m] = _mm512_setzero_ps(); }
        const int64_t k0 = grp * g;
        int64_t c = 0;
        for (; c + 32 <= g; c += 32) {
            __m512 w0[RMAX], w1[RMAX];
            if (((k0 + c) & 127) == 0)  /* once per 64-byte line: the same line PF_BLOCKS row blocks on */
                for (int r = 0; r < nr; r++)
                    _mm_prefetch((const char *)(p + (r + PF_BLOCKS * nr) * rb + (k0 + c) / 2), _MM_HINT_T0);
            for (int r = 0; r < nr; r++) {
                w0[r] = unpack16(p + r * rb + (k0 + c) / 2, rot, mask, one);
                w1[r] = unpack16(p + r * rb + (k0 + c) / 2 + 8, rot, mask, one);
            }
            for (int m = 0; m < mt; m++) {
                const __m512 x0 = _mm512_loadu_ps(x + m * k + k0 + c), x1 = _mm512_loadu_ps(x + m * k + k0 + c + 16);
                for (int r = 0; r < nr; r++) {
                    a0[r][m] = _mm512_fmadd_ps(w0[r], x0, a0[r][m]);
                    if (two) a1[r][m] = _mm512_fmadd_ps(w1[r], x1, a1[r][m]);
                    else a0[r][m] = _mm512_fmadd_ps(w1[r], x1, a0[r][m]);
                }
            }
        }
        for (; c < g; c += 16)
            for (int r = 0; r < nr; r++) {
                const __m512 w0 = unpack16(p + r * rb + (k0 + c) / 2, rot, mask, one);
                for (int m = 0; m < mt; m++)
                    a0[r][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * k + k0 + c), a0[r][m]);
            }
        for (int r = 0; r < nr; r++) {
            const __m512 sv = _mm512_set1_ps(s[r * ng + grp]);
            for (int m = 0; m < mt; m++)
                tot[r][m] = _mm512_fmadd_ps(two ? _mm512_add_ps(a0[r][m], a1[r][m]) : a0[r][m], sv, tot[r][m]);
        }
    }
    /* horizontal sums four at a time (accumulator i is row i / mt, activation row i % mt) */
    const int cnt = nr * mt;
    int i = 0;
    for (; i + 4 <= cnt; i += 4) {
        float v[4];
        _mm_storeu_ps(v, reduce4(tot[i / mt][i % mt], tot[(i + 1) / mt][(i + 1) % mt],
                                 tot[(i + 2) / mt][(i + 2) % mt], tot[(i + 3) / mt][(i + 3) % mt]));
        for (int j = 0; j < 4; j++) out[((i + j) / mt) * MT + (i + j) % mt] = v[j];
    }
    for (; i < cnt; i++) out[(i / mt) * MT + i % mt] = _mm512_reduce_add_ps(tot[i / mt][i % mt]);
}

#elif defined(__AVX2__) && defined(__FMA__)
#define RMAX 2
static inline int rows_for(int mt) { return mt == 1 ? 2 : 1; }

static inline void dequant16(const uint8_t *p, float s, float b, float *o) {
    const __m256i sh = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0), mask = _mm256_set1_epi32(15);
    const __m256 sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(-b);
    for (int h = 0; h < 2; h++) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(load32(p + 4 * h)), sh), mask));
        _mm256_storeu_ps(o + 8 * h, _mm256_fmadd_ps(q, sv, bv));
    }
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

static inline __attribute__((always_inline)) void rows_dot(const uint8_t *p, const float *s, int64_t k,
                                                           const float *x, int64_t ng, int64_t g, int nr, int mt,
                                                           float *out) {
    const __m256i sh = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
    const __m256i mask = _mm256_set1_epi32(15);
    const int64_t rb = k / 2;
    __m256 tot[RMAX][MT];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mt; m++) tot[r][m] = _mm256_setzero_ps();
    for (int64_t grp = 0; grp < ng; grp++) {
        __m256 a0[RMAX][MT], a1[RMAX][MT];
        for (int r = 0; r < nr; r++)
            for (int m = 0; m < mt; m++) { a0[r][m] = _mm256_setzero_ps(); a1[r][m] = _mm256_setzero_ps(); }
        const int64_t k0 = grp * g;
        for (int64_t c = 0; c < g; c += 16) {
            __m256 w0[RMAX], w1[RMAX];
            if (((k0 + c) & 127) == 0)
                for (int r = 0; r < nr; r++)
                    _mm_prefetch((const char *)(p + (r + PF_BLOCKS * nr) * rb + (k0 + c) / 2), _MM_HINT_T0);
            for (int r = 0; r < nr; r++) {
                const uint8_t *pp = p + r * rb + (k0 + c) / 2;
                w0[r] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(load32(pp)), sh), mask));
                w1[r] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(load32(pp + 4)), sh), mask));
            }
            for (int m = 0; m < mt; m++) {
                const __m256 x0 = _mm256_loadu_ps(x + m * k + k0 + c), x1 = _mm256_loadu_ps(x + m * k + k0 + c + 8);
                for (int r = 0; r < nr; r++) {
                    a0[r][m] = _mm256_fmadd_ps(w0[r], x0, a0[r][m]);
                    a1[r][m] = _mm256_fmadd_ps(w1[r], x1, a1[r][m]);
                }
            }
        }
        for (int r = 0; r < nr; r++) {
            const __m256 sv = _mm256_set1_ps(s[r * ng + grp]);
            for (int m = 0; m < mt; m++) tot[r][m] = _mm256_fmadd_ps(_mm256_add_ps(a0[r][m], a1[r][m]), sv, tot[r][m]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mt; m++) out[r * MT + m] = hsum(tot[r][m]);
}

#else
#define RMAX 1
static inline int rows_for(int mt) { (void)mt; return 1; }

static inline void dequant16(const uint8_t *p, float s, float b, float *o) {
    for (int i = 0; i < 16; i++) o[i] = (float)((p[i / 2] >> (4 * (i & 1))) & 15) * s - b;
}

static inline void rows_dot(const uint8_t *p, const float *s, int64_t k, const float *x, int64_t ng, int64_t g,
                            int nr, int mt, float *out) {
    (void)nr;
    for (int m = 0; m < mt; m++) {
        float tot = 0.f;
        for (int64_t grp = 0; grp < ng; grp++) {
            float acc = 0.f;
            for (int64_t c = grp * g; c < (grp + 1) * g; c++)
                acc += (float)((p[c / 2] >> (4 * (c & 1))) & 15) * x[m * k + c];
            tot += s[grp] * acc;
        }
        out[m] = tot;
    }
}
#endif

/* packed -> float32 weights [N, K] in the packed (group-sorted) column order: the dense prefill
 * path multiplies them with the activations gathered alike. */
void c4_dequant(const uint8_t *packed, const float *scales, const float *sz, int64_t n, int64_t k, int64_t g,
                float *w, int nthreads) {
    const int64_t ng = k / g;
    if (nthreads > 1 && n * k < (1 << 17)) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        for (int64_t base = 0; base < k; base += 16) {
            const int64_t i = r * ng + base / g;
            dequant16(packed + r * (k / 2) + base / 2, scales[i], sz[i], w + r * k + base);
        }
}

/* One call of rows_dot with nr and mt as constants (the switch is what makes them constants). */
static inline void dispatch(const uint8_t *p, const float *s, int64_t k, const float *x, int64_t ng, int64_t g,
                            int nr, int mt, float *out) {
#define CASE(R, M) \
    if (nr == R && mt == M) { rows_dot(p, s, k, x, ng, g, R, M, out); return; }
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4)
#if RMAX >= 2
    CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
#endif
#if RMAX >= 4
    CASE(4, 1)
#endif
#undef CASE
    for (int r = 0; r < nr; r++)  /* not reached: rows_for only asks for the cases above */
        rows_dot(p + r * (k / 2), s + r * ng, k, x, ng, g, 1, mt, out + r * MT);
}

/* Rows r0..r1 of y; xs: group sums of x. The xsum term per row: sum_g (UNPACK_BIAS * s + sz) * xs. */
static void row_block(const uint8_t *packed, const float *scales, const float *sz, const float *x,
                      int64_t m, int64_t k, int64_t g, const float *xs, const float *bias, float *y,
                      int64_t n, int64_t r0, int64_t r1) {
    const int64_t ng = k / g;
    float out[RMAX * MT];
    for (int64_t m0 = 0; m0 < m; m0 += MT) {
        const int mt = (int)(m - m0 < MT ? m - m0 : MT);
        const int want = rows_for(mt);
        for (int64_t r = r0; r < r1;) {
            const int nr = r1 - r >= want ? want : 1;
            dispatch(packed + r * (k / 2), scales + r * ng, k, x + m0 * k, ng, g, nr, mt, out);
            for (int i = 0; i < nr; i++) {
                const float *si = scales + (r + i) * ng, *zi = sz + (r + i) * ng;
                for (int j = 0; j < mt; j++) {
                    const float *xj = xs + (m0 + j) * ng;
                    float off = 0.f;
                    for (int64_t grp = 0; grp < ng; grp++) off += (UNPACK_BIAS * si[grp] + zi[grp]) * xj[grp];
                    y[(m0 + j) * n + r + i] = UNPACK_SCALE * out[i * MT + j] - off + (bias ? bias[r + i] : 0.f);
                }
            }
            r += nr;
        }
    }
}

/* y [M, N] = x [M, K] @ W.T (+ bias). x is read in the original column order; with perm (int64,
 * the group-sorted order) it is gathered first. Returns 0, or -1 when out of memory. */
int c4_gemm(const float *x, int64_t m, int64_t k, const uint8_t *packed, const float *scales,
            const float *sz, int64_t n, int64_t g, const int64_t *perm, const float *bias, float *y,
            int nthreads) {
    const int64_t ng = k / g;
    float *buf = NULL;
    const float *xp = x;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(m * ng + (perm ? m * k : 0)));
    if (!xs) return -1;
    if (perm) {
        buf = xs + m * ng;
        for (int64_t i = 0; i < m; i++)
            for (int64_t c = 0; c < k; c++) buf[i * k + c] = x[i * k + perm[c]];
        xp = buf;
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t grp = 0; grp < ng; grp++) {
            float acc = 0.f;
            for (int64_t c = grp * g; c < (grp + 1) * g; c++) acc += xp[i * k + c];
            xs[i * ng + grp] = acc;
        }
    const int64_t blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
    /* small layers: a parallel region costs more than it saves */
    if (nthreads > 1 && n * k * (m < MT ? m : MT) < (1 << 17)) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t r0 = blk * ROW_BLOCK, r1 = r0 + ROW_BLOCK < n ? r0 + ROW_BLOCK : n;
        row_block(packed, scales, sz, xp, m, k, g, xs, bias, y, n, r0, r1);
    }
    free(xs);
    return 0;
}
