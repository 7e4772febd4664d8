/* INT4 (and INT8) weight-only GEMV / small-batch GEMM for x86 CPUs, fp32 activations and accumulation.
 *
 * Compiled at run time by compress/kernels/cpu_native.py with the host's compiler and
 * -march=native, so the #if blocks pick AVX-512, AVX2 or plain C for the CPU it runs on. No torch
 * headers: the Python side passes data pointers through ctypes.
 *
 * Weights: codes q in [0, 15] (any bits <= 4), groups of G adjacent columns (act-order columns are
 * sorted by group at load and x gathered with `perm`), per row and group an fp32 scale s and the
 * fp32 product sz = s * z of scale and zero point: w = (q - z) * s = q * s - sz.
 *
 * Layout (outer product): output rows in blocks of 16 ("channels"); for block b and column k one
 * 8-byte chunk holds the 16 channels' codes, chunks of a block stored along k. So one vector holds
 * 16 channels at one column and y += w * broadcast(x[k]): no horizontal sums, and every activation
 * row reuses the unpacked vector. Scales are stored per block and group as 16 floats (sc), and so
 * is the zero-point term (cz, below). N is padded to a multiple of 16 (zero scales).
 *
 * AVX-512 unpack, per 16 codes: one 64-bit broadcast load, one variable rotate that brings code i
 * to bits 19..22 of lane i, one ternary-logic op that masks it and ORs in the exponent of 1.0f. Lane
 * i then holds the float v = 1 + q_i / 16 exactly, with no int->float conversion. Per group
 *     sum_k w_k x_k = s * sum_k q_k x_k - sz * xsum = 16 * (s * acc - cz * xsum),
 * with acc = sum_k v_k x_k, xsum = sum_k x_k over the group (once per call) and cz = s + sz / 16.
 * AVX2 / plain C: code i of a chunk sits in nibble i (low nibble first); shift, mask, convert; the
 * unpacked value is q, and cz = sz, UNPACK_SCALE = 1.
 *
 * 8-bit codes (`bits` = 8 in the entry points; codes of 5..8 bits): the same layout with 16-byte
 * chunks, code i in byte i; every ISA zero-extends and converts (2 vector ops per 16 weights), so
 * the unpacked value is q and cz = sz. Used for W8 layers and a runtime INT8 lm_head, whose fp32
 * GEMV is the largest single read of a small model's decode step.
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

/* bytes per chunk (16 channels at one column): 8 for codes of up to 4 bits, 16 for 8-bit codes */
static inline int64_t chunk_bytes(int bits) { return bits == 8 ? 16 : 8; }

#define MT 4 /* activation rows per pass over the weights */
/* Software prefetch distance, in bytes of a block's code stream (256 columns of 4-bit codes); past a
 * block's end it reaches into the next block, which is where the stream goes next. The hardware
 * prefetchers alone lagged on weights streaming from L3/DRAM (one thread). */
#ifndef PF_BYTES
#define PF_BYTES 2048
#endif

#if defined(__AVX512F__)
#define UNPACK_SCALE 16.f /* the unpacked value is 1 + q / 16 */
#define ISA 512
#elif defined(__AVX2__) && defined(__FMA__)
#define UNPACK_SCALE 1.f
#define ISA 256
#else
#define UNPACK_SCALE 1.f
#define ISA 0
#endif

int c4_isa(void) { return ISA; }

/* Nibble position of channel i (0..15) inside its chunk. */
static inline int chunk_pos(int i) {
#if ISA == 512
    /* qword broadcast: dword lane i reads dword (i & 1); the rotate takes nibble i >> 1 of it */
    return 8 * (i & 1) + (i >> 1);
#else
    return i;
#endif
}

/* codes [N, K] uint8 (values < 2^bits; N % 16 == 0) -> packed [N / 16][K][chunk_bytes(bits)]. */
void c4_pack(const uint8_t *codes, uint8_t *out, int64_t n, int64_t k, int bits) {
    const int64_t cb = chunk_bytes(bits);
    memset(out, 0, (size_t)(n * k * cb / 16));
    for (int64_t r = 0; r < n; r++) {
        if (bits == 8) {
            uint8_t *o = out + (r / 16) * k * 16 + (r & 15);
            for (int64_t c = 0; c < k; c++) o[c * 16] = codes[r * k + c];
            continue;
        }
        const int p = chunk_pos((int)(r & 15));
        uint8_t *o = out + (r / 16) * k * 8 + p / 2;
        for (int64_t c = 0; c < k; c++) o[c * 8] |= (uint8_t)((codes[r * k + c] & 15) << (4 * (p & 1)));
    }
}

/* The inverse of c4_pack. */
void c4_unpack(const uint8_t *packed, uint8_t *codes, int64_t n, int64_t k, int bits) {
    for (int64_t r = 0; r < n; r++) {
        if (bits == 8) {
            const uint8_t *o = packed + (r / 16) * k * 16 + (r & 15);
            for (int64_t c = 0; c < k; c++) codes[r * k + c] = o[c * 16];
            continue;
        }
        const int p = chunk_pos((int)(r & 15));
        const uint8_t *o = packed + (r / 16) * k * 8 + p / 2;
        for (int64_t c = 0; c < k; c++) codes[r * k + c] = (o[c * 8] >> (4 * (p & 1))) & 15;
    }
}

/* The per-channel coefficient of xsum: cz = s + sz / 16 (4-bit codes on AVX-512) or sz. */
void c4_zero_term(const float *s, const float *sz, float *cz, int64_t count, int bits) {
    for (int64_t i = 0; i < count; i++) cz[i] = ISA == 512 && bits != 8 ? s[i] + sz[i] / 16.f : sz[i];
}

#if ISA == 512
#define NBMAX 4
static inline int blocks_for(int mt) { return mt <= 2 ? 4 : 2; }

static inline __m512 unpack16(const uint8_t *p) {
    const __m512i rot = _mm512_set_epi32(23, 23, 27, 27, 31, 31, 3, 3, 7, 7, 11, 11, 15, 15, 19, 19);
    const __m512i b = _mm512_set1_epi64(load64(p));
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_rolv_epi32(b, rot), _mm512_set1_epi32(0x00780000),
                                                         _mm512_set1_epi32(0x3F800000), 0xEA));
}

/* 16 8-bit codes (one 16-byte chunk) -> their values as floats */
static inline __m512 unpack16_8(const uint8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* the chunk at p unpacked: 1 + q / 16 (4-bit codes) or q (8-bit); bits is a constant at call sites */
static inline __attribute__((always_inline)) __m512 unpack_bits(const uint8_t *p, int bits) {
    return bits == 8 ? unpack16_8(p) : unpack16(p);
}

/* 16 weights (one chunk: 16 channels, one column) to o[0..15] */
static inline void dequant16(const uint8_t *p, const float *s, const float *cz, float *o, int bits) {
    const __m512 f = _mm512_set1_ps(bits == 8 ? 1.f : 16.f);
    const __m512 sv = _mm512_mul_ps(_mm512_loadu_ps(s), f);
    _mm512_storeu_ps(o, _mm512_fmsub_ps(unpack_bits(p, bits), sv, _mm512_mul_ps(_mm512_loadu_ps(cz), f)));
}

/* nb channel blocks (block j: codes p + j * k * cb, scales / cz sc + j * ng * 16) times mt activation
 * rows (x + m * k, group sums xs + m * ng) -> y + m * ldy + 16 j (16 channels each, bias added).
 * nb, mt and bits are constants at every call site (see run_blocks), so the loops unroll into
 * registers; with one or two activation rows, even and odd columns take separate accumulators (FMA
 * latency). */
static inline __attribute__((always_inline)) void blocks_dot(const uint8_t *p, const float *sc, const float *cz,
                                                             const float *x, const float *xs, const float *bias,
                                                             int64_t k, int64_t ng, int64_t g, int nb, int mt,
                                                             int bits, float *y, int64_t ldy) {
    __m512 tot[NBMAX][MT];
    const int two = mt <= 2;
    const int64_t cb = chunk_bytes(bits);
    const float unpack_scale = bits == 8 ? 1.f : UNPACK_SCALE;
    for (int j = 0; j < nb; j++)
        for (int m = 0; m < mt; m++) tot[j][m] = _mm512_setzero_ps();
    for (int64_t grp = 0; grp < ng; grp++) {
        __m512 a0[NBMAX][MT], a1[NBMAX][MT];
        for (int j = 0; j < nb; j++)
            for (int m = 0; m < mt; m++) { a0[j][m] = _mm512_setzero_ps(); a1[j][m] = _mm512_setzero_ps(); }
        const int64_t k0 = grp * g;
        for (int64_t c = k0; c < k0 + g; c += 2) {
            __m512 w0[NBMAX], w1[NBMAX];
            if (((c * cb) & 63) == 0)  /* once per 64-byte line of each block's stream: the line PF_BYTES on */
                for (int j = 0; j < nb; j++) _mm_prefetch((const char *)(p + (j * k + c) * cb + PF_BYTES), _MM_HINT_T0);
            for (int j = 0; j < nb; j++) {
                w0[j] = unpack_bits(p + (j * k + c) * cb, bits);
                w1[j] = unpack_bits(p + (j * k + c + 1) * cb, bits);
            }
            for (int m = 0; m < mt; m++) {
                const __m512 x0 = _mm512_set1_ps(x[m * k + c]), x1 = _mm512_set1_ps(x[m * k + c + 1]);
                for (int j = 0; j < nb; j++) {
                    a0[j][m] = _mm512_fmadd_ps(w0[j], x0, a0[j][m]);
                    if (two) a1[j][m] = _mm512_fmadd_ps(w1[j], x1, a1[j][m]);
                    else a0[j][m] = _mm512_fmadd_ps(w1[j], x1, a0[j][m]);
                }
            }
        }
        for (int j = 0; j < nb; j++) {
            const __m512 s = _mm512_loadu_ps(sc + (j * ng + grp) * 16), z = _mm512_loadu_ps(cz + (j * ng + grp) * 16);
            for (int m = 0; m < mt; m++) {
                const __m512 a = two ? _mm512_add_ps(a0[j][m], a1[j][m]) : a0[j][m];
                tot[j][m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(xs[m * ng + grp]), _mm512_fmadd_ps(a, s, tot[j][m]));
            }
        }
    }
    for (int j = 0; j < nb; j++) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps();
        for (int m = 0; m < mt; m++)
            _mm512_storeu_ps(y + m * ldy + 16 * j, _mm512_fmadd_ps(tot[j][m], _mm512_set1_ps(unpack_scale), b));
    }
}

#elif ISA == 256
#define NBMAX 2
static inline int blocks_for(int mt) { return mt <= 2 ? 2 : 1; }

static inline __m256 unpack8(const uint8_t *p) {
    const __m256i sh = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(load32(p)), sh), _mm256_set1_epi32(15)));
}

/* 8 channels' codes, as floats: half h of a chunk (4 bytes of nibbles, or 8 bytes of 8-bit codes) */
static inline __attribute__((always_inline)) __m256 unpack_half(const uint8_t *p, int h, int bits) {
    if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h))));
    return unpack8(p + 4 * h);
}

static inline void dequant16(const uint8_t *p, const float *s, const float *cz, float *o, int bits) {
    for (int h = 0; h < 2; h++)
        _mm256_storeu_ps(o + 8 * h, _mm256_fmsub_ps(unpack_half(p, h, bits), _mm256_loadu_ps(s + 8 * h), _mm256_loadu_ps(cz + 8 * h)));
}

static inline __attribute__((always_inline)) void blocks_dot(const uint8_t *p, const float *sc, const float *cz,
                                                             const float *x, const float *xs, const float *bias,
                                                             int64_t k, int64_t ng, int64_t g, int nb, int mt,
                                                             int bits, float *y, int64_t ldy) {
    __m256 tot[NBMAX][2][MT];  /* [block][half of the 16 channels][activation row] */
    const int64_t cb = chunk_bytes(bits);
    for (int j = 0; j < nb; j++)
        for (int h = 0; h < 2; h++)
            for (int m = 0; m < mt; m++) tot[j][h][m] = _mm256_setzero_ps();
    for (int64_t grp = 0; grp < ng; grp++) {
        __m256 a[NBMAX][2][MT];
        for (int j = 0; j < nb; j++)
            for (int h = 0; h < 2; h++)
                for (int m = 0; m < mt; m++) a[j][h][m] = _mm256_setzero_ps();
        const int64_t k0 = grp * g;
        for (int64_t c = k0; c < k0 + g; c++) {
            __m256 w[NBMAX][2];
            if (((c * cb) & 63) == 0)
                for (int j = 0; j < nb; j++) _mm_prefetch((const char *)(p + (j * k + c) * cb + PF_BYTES), _MM_HINT_T0);
            for (int j = 0; j < nb; j++)
                for (int h = 0; h < 2; h++) w[j][h] = unpack_half(p + (j * k + c) * cb, h, bits);
            for (int m = 0; m < mt; m++) {
                const __m256 xv = _mm256_set1_ps(x[m * k + c]);
                for (int j = 0; j < nb; j++)
                    for (int h = 0; h < 2; h++) a[j][h][m] = _mm256_fmadd_ps(w[j][h], xv, a[j][h][m]);
            }
        }
        for (int j = 0; j < nb; j++)
            for (int h = 0; h < 2; h++) {
                const __m256 s = _mm256_loadu_ps(sc + (j * ng + grp) * 16 + 8 * h);
                const __m256 z = _mm256_loadu_ps(cz + (j * ng + grp) * 16 + 8 * h);
                for (int m = 0; m < mt; m++)
                    tot[j][h][m] = _mm256_fnmadd_ps(z, _mm256_set1_ps(xs[m * ng + grp]), _mm256_fmadd_ps(a[j][h][m], s, tot[j][h][m]));
            }
    }
    for (int j = 0; j < nb; j++)
        for (int h = 0; h < 2; h++) {
            const __m256 b = bias ? _mm256_loadu_ps(bias + 16 * j + 8 * h) : _mm256_setzero_ps();
            for (int m = 0; m < mt; m++) _mm256_storeu_ps(y + m * ldy + 16 * j + 8 * h, _mm256_add_ps(tot[j][h][m], b));
        }
}

#else
#define NBMAX 1
static inline int blocks_for(int mt) { (void)mt; return 1; }

/* code of channel i in the chunk at p */
static inline int code_at(const uint8_t *p, int i, int bits) {
    return bits == 8 ? p[i] : (p[i / 2] >> (4 * (i & 1))) & 15;
}

static inline void dequant16(const uint8_t *p, const float *s, const float *cz, float *o, int bits) {
    for (int i = 0; i < 16; i++) o[i] = (float)code_at(p, i, bits) * s[i] - cz[i];
}

static inline void blocks_dot(const uint8_t *p, const float *sc, const float *cz, const float *x, const float *xs,
                              const float *bias, int64_t k, int64_t ng, int64_t g, int nb, int mt, int bits,
                              float *y, int64_t ldy) {
    (void)nb;
    const int64_t cb = chunk_bytes(bits);
    for (int m = 0; m < mt; m++)
        for (int i = 0; i < 16; i++) {
            float tot = 0.f;
            for (int64_t grp = 0; grp < ng; grp++) {
                float acc = 0.f;
                for (int64_t c = grp * g; c < (grp + 1) * g; c++) acc += (float)code_at(p + c * cb, i, bits) * x[m * k + c];
                tot += sc[grp * 16 + i] * acc - cz[grp * 16 + i] * xs[m * ng + grp];
            }
            y[m * ldy + i] = tot + (bias ? bias[i] : 0.f);
        }
}
#endif

/* One blocks_dot call with nb, mt and bits as constants (the switch is what makes them constants). */
static void run_blocks(const uint8_t *p, const float *sc, const float *cz, const float *x, const float *xs,
                       const float *bias, int64_t k, int64_t ng, int64_t g, int nb, int mt, int bits, float *y,
                       int64_t ldy) {
#define CASE(B, M)                                                                                        \
    if (nb == B && mt == M) {                                                                             \
        if (bits == 8) blocks_dot(p, sc, cz, x, xs, bias, k, ng, g, B, M, 8, y, ldy);                     \
        else blocks_dot(p, sc, cz, x, xs, bias, k, ng, g, B, M, 4, y, ldy);                               \
        return;                                                                                           \
    }
    CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4)
#if NBMAX >= 2
    CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
#endif
#if NBMAX >= 4
    CASE(4, 1) CASE(4, 2)
#endif
#undef CASE
    const int64_t cb = chunk_bytes(bits);
    for (int j = 0; j < nb; j++)  /* not reached: blocks_for only asks for the cases above */
        blocks_dot(p + j * k * cb, sc + j * ng * 16, cz + j * ng * 16, x, xs, bias ? bias + 16 * j : NULL, k, ng, g,
                   1, mt, bits, y + 16 * j, ldy);
}

/* packed -> float32 weights, transposed: w[c * ldw + r] for rows r < n (n % 16 == 0) and columns c
 * in the packed (group-sorted) order; x @ w is then the layer's product (the dense prefill path). */
void c4_dequant_t(const uint8_t *packed, const float *sc, const float *cz, int64_t n, int64_t k, int64_t g,
                  float *w, int64_t ldw, int nthreads, int bits) {
    const int64_t ng = k / g, nblk = n / 16, cb = chunk_bytes(bits);
    if (nthreads > 1 && n * k < (1 << 17)) nthreads = 1;
    /* tiles of 8 columns: 8 chunks of each block's codes in (one 64-byte line of 4-bit codes), 8
     * output rows written along (block-major order wrote one line per output row and page per
     * store: 50x slower) */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c0 = 0; c0 < k; c0 += 8)
        for (int64_t b = 0; b < nblk; b++)
            for (int64_t c = c0; c < c0 + 8 && c < k; c++) {
                const int64_t i = (b * ng + c / g) * 16;
                dequant16(packed + (b * k + c) * cb, sc + i, cz + i, w + c * ldw + 16 * b, bits);
            }
}

/* y [M, N] = x [M, K] @ W.T (+ bias), N % 16 == 0 (the caller pads); bits: 4 (codes of up to 4
 * bits) or 8. x is read in the original column order; with perm (int64, the group-sorted order) it
 * is gathered first. Returns 0, or -1 when out of memory. */
int c4_gemm(const float *x, int64_t m, int64_t k, const uint8_t *packed, const float *sc, const float *cz,
            int64_t n, int64_t g, const int64_t *perm, const float *bias, float *y, int nthreads, int bits) {
    const int64_t ng = k / g, cb = chunk_bytes(bits);
    float *xs = (float *)malloc(sizeof(float) * (size_t)(m * ng + (perm ? m * k : 0)));
    if (!xs) return -1;
    const float *xp = x;
    if (perm) {
        float *buf = xs + m * ng;
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
    const int64_t nblk = n / 16, step = NBMAX;
    const int64_t items = (nblk + step - 1) / step;
    /* small layers: a parallel region costs more than it saves */
    if (nthreads > 1 && n * k * (m < MT ? m : MT) < (1 << 17)) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t it = 0; it < items; it++) {
        const int64_t b1 = (it + 1) * step < nblk ? (it + 1) * step : nblk;
        for (int64_t m0 = 0; m0 < m; m0 += MT) {
            const int mt = (int)(m - m0 < MT ? m - m0 : MT);
            const int want = blocks_for(mt);
            for (int64_t b = it * step; b < b1;) {
                const int nb = b1 - b >= want ? want : 1;
                run_blocks(packed + b * k * cb, sc + b * ng * 16, cz + b * ng * 16, xp + m0 * k, xs + m0 * ng,
                           bias ? bias + 16 * b : NULL, k, ng, g, nb, mt, bits, y + m0 * n + 16 * b, n);
                b += nb;
            }
        }
    }
    free(xs);
    return 0;
}
