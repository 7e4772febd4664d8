// The W4A16 matmul kernels of compress.kernels.cuda_w4a16 (compiled at run time with NVRTC;
// the module prepends the #defines of each specialization).

// (GRID_WAIT / GRID_LAUNCH, to_float / to_out and the types: common.cuh)

#if BF16
#define MAGIC 0x4300u   /* bf16 128.0 */
#define MMA_T "bf16"
#else
#define MAGIC 0x6400u   /* fp16 1024.0 */
#define MMA_T "f16"
#endif

__device__ __forceinline__ u32 word(const V4& v, int q) {
  return q == 0 ? v.a : q == 1 ? v.b : q == 2 ? v.c : v.d;
}
// A 16-byte load predicated inside the asm (zeros when off): a C++ `pred ? load : 0` becomes a
// branch around the load in PTX, and branches stop ptxas from moving loads up.
__device__ __forceinline__ V4 ld_x_if(const u32* p, bool pred) {  // activations: L1-cached
  V4 v;
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
      : "=r"(v.a), "=r"(v.b), "=r"(v.c), "=r"(v.d) : "l"(p), "r"((int)pred));
  return v;
}
// The pair of columns at bits (0..3, 16..19) of v as the floats (MAGIC + q): one lop3.
__device__ __forceinline__ u32 pair_lo(u32 v) {
  u32 r;
  asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xea;" : "=r"(r) : "r"(v), "n"(MAGIC * 0x10001u));
  return r;
}
// Exact q - z for the pair (MAGIC + q): zz holds (MAGIC + z) (fp16) or -(MAGIC + z) (bf16).
__device__ __forceinline__ u32 sub_zero(u32 h, u32 zz) {
  u32 d;
#if BF16
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(h), "r"(0x3F803F80u), "r"(zz));  // sm_80: no sub.bf16x2
#else
  asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(h), "r"(zz));
#endif
  return d;
}
__device__ __forceinline__ u32 zero_pair(u32 z) {
#if BF16
  return (0xC300u + z) * 0x10001u;
#else
  return (MAGIC + z) * 0x10001u;
#endif
}
// The four pairs of one word as exact (q - z): pairs p = 0..3 hold columns 2p, 2p + 1 at shifts
// 4p and 16 + 4p (layout.PLANE_SHIFT). fp16: pairs 1 and 3 are read in place as 1024 + 16q and
// one fma by (1/16, -(64 + z)) both scales and subtracts (exact: powers of two and small integers).
__device__ __forceinline__ void unpack4(u32 v, u32 zz, u32 zz16, u32* h) {
#if BF16
  h[0] = sub_zero(pair_lo(v), zz);
  h[1] = sub_zero(pair_lo(v >> 4), zz);
  h[2] = sub_zero(pair_lo(v >> 8), zz);
  h[3] = sub_zero(pair_lo(v >> 12), zz);
#else
  const u32 v8 = v >> 8;
  u32 t1, t3;
  asm("lop3.b32 %0, %1, 0x00F000F0, %2, 0xea;" : "=r"(t1) : "r"(v), "n"(MAGIC * 0x10001u));
  asm("lop3.b32 %0, %1, 0x00F000F0, %2, 0xea;" : "=r"(t3) : "r"(v8), "n"(MAGIC * 0x10001u));
  h[0] = sub_zero(pair_lo(v), zz);
  h[2] = sub_zero(pair_lo(v8), zz);
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(h[1]) : "r"(t1), "r"(0x2C002C00u), "r"(zz16));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(h[3]) : "r"(t3), "r"(0x2C002C00u), "r"(zz16));
#endif
}
__device__ __forceinline__ u32 zero_pair16(u32 z) {  // fp16 pair -(64 + z) for unpack4
  return (0xD400u + 16u * z) * 0x10001u;  // -(64 + z): exponent of 64, mantissa z / 64 (10 bits)
}
__device__ __forceinline__ u32 scale_pair(u32 h, u32 ss) {  // h * s, rounded once
  u32 d;
#if BF16
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(h), "r"(ss), "r"(0x80008000u));
#else
  asm("mul.f16x2 %0, %1, %2;" : "=r"(d) : "r"(h), "r"(ss));
#endif
  return d;
}
// d (+)= A (16 x 16, 4 regs) * B (16 x 8, 2 regs), fp32 accumulators.
__device__ __forceinline__ void mma(float* d, const u32* a, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma0(float* d, const u32* a, u32 b0, u32 b1) {  // d = A * B
  asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

// Epilogue helpers. silu(v) = v / (1 + e^-v); ex2.approx gives e^-v within 2 ulp (+inf for very
// negative v, where the quotient is -0 as it should be).
__device__ __forceinline__ float silu(float v) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-1.4426950408889634f * v));
  return v / (1.f + e);
}
__device__ __forceinline__ float rsqrt_approx(float v) {
  float r;
  asm("rsqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
// Sum of the squares of the 8 activations of a 16-byte load, in fp32 (the RMSNorm prologue).
__device__ __forceinline__ float sumsq8(const V4& v) {
  float s = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const u32 w = word(v, q);
    const float lo = to_float(w & 0xFFFFu), hi = to_float(w >> 16);
    s = fmaf(lo, lo, fmaf(hi, hi, s));
  }
  return s;
}
__device__ __forceinline__ V4 mul8(const V4& x, const V4& y) {  // elementwise, rounded once
  V4 r;
  r.a = scale_pair(x.a, y.a);
  r.b = scale_pair(x.b, y.b);
  r.c = scale_pair(x.c, y.c);
  r.d = scale_pair(x.d, y.d);
  return r;
}

#if !DEQUANT
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
// Asynchronous 16-byte global -> shared copy, issued only when `issue` (predicated in the asm:
// no branch); `live` false copies nothing and zero-fills. No registers are held while in flight,
// and ptxas keeps copies in program order (register loads it would sink next to their first use).
__device__ __forceinline__ void cp16(u32 dst, const void* src, bool issue, bool live) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n"
               " @p cp.async.cg.shared.global [%0], [%1], 16, %3;\n}\n"
               :: "r"(dst), "l"(src), "r"((int)issue), "r"(live ? 16 : 0));
}
#if EVF
// The weight copies with an L2 evict-first policy (streamed once: leave L2 to x and the outputs).
__device__ __forceinline__ unsigned long long evict_first_policy() {
  unsigned long long p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ void cp16w(u32 dst, const void* src, bool issue, bool live, unsigned long long pol) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n"
               " @p cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %3, %4;\n}\n"
               :: "r"(dst), "l"(src), "r"((int)issue), "r"(live ? 16 : 0), "l"(pol));
}
#define CPW(d, s, i, l) cp16w(d, s, i, l, pol)
#else
#define CPW(d, s, i, l) cp16(d, s, i, l)
#endif
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N_>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N_)); }

// One warp's pipeline stage, per 16-row tile: the step's KC x 4 chunks of each row, stored as
// w[kc][row][t] so that compute lane (g, t) reads rows g and g + 8 of chunk 4kc + t from 512
// contiguous bytes (no bank conflicts); the 16 scales and zero points of the tile for the group
// of each chunk.
struct __align__(16) Stage {
  V4 w[NT][KC][16][4];
  u16 s[NT][KC][4][16];
  u8 z[NT][KC][4][16];
#if NORM
  V4 gam[KC][4][4];  // the norm's weights for the step's columns: chunk 4 kc + t, 8 columns each
#endif
};
#define STEP_COLS (128 * KC)

// y[M, N] = x[M, K] @ W[N, K]^T (+ bias), 1 <= M <= 16, as D^T = W x^T on the tensor cores:
// A = 16 weight rows (lane (g, t) = (lane / 4, lane % 4) dequantizes rows g and g + 8 of a tile),
// B = 8 activation rows (lane (g, t) loads row g; rows g + 8 too when MROWS2). In step i a lane
// computes with chunks 4 KC i + 4 kc + t (32 consecutive columns each); its column pairs are the
// logical k (2t, 2t + 1) and (2t + 8, 2t + 9) of 8 products per chunk: any fixed assignment of
// columns to logical k works since the products sum over K, as long as A and B follow the same
// one (they do: both by t). Copies use another lane mapping than compute: each copy instruction
// moves 32 / (4 KC) rows x 64 KC contiguous bytes, so KC = 2 reads whole 128-byte lines.
// w: int32 [N, KP / 8] (layout.pack_chunked, KP a multiple of 128 KC); sc: [G, N] scales in the
// activation dtype; zp: [G, N] uint8 (unused when SYMMETRIC); N % 16 == 0; ldx, ldo: row strides
// in elements.
// Fusions with the decoder block around the matmul (compress.kernels.fused_block says why):
// NORM: x is the RMSNorm's input h: the product runs on h * gam (rounded once, as the layer's
//   activation dtype) and row m of the result is scaled by 1 / sqrt(mean(h_m^2) + eps) (each block
//   reads all of K, so it sums the squares itself; its warps add theirs in the final reduction).
// EPI == 1 (SiLU-gated MLP): the rows come in pairs of 8 (tile rows 0-7 gate, 8-15 up, so lane (g, t)
//   holds gate and up of the same output); out [M, N / 2] = silu(gate) * up.
// RESID: out = result + res (res [M, N], row stride ldr), the residual connection.
#if MINB > 0
#define BOUNDS __launch_bounds__(KW * 32, MINB)
#else
#define BOUNDS __launch_bounds__(KW * 32)
#endif
extern "C" __global__ void BOUNDS
w4a16_mma(const u32* __restrict__ x, const u32* __restrict__ w, const u16* __restrict__ sc,
          const u8* __restrict__ zp, const float* __restrict__ bias, u16* __restrict__ out,
          int M, int N, int K, int KP, int ldx, int ldo,
          const u16* __restrict__ res, int ldr, const u32* __restrict__ gam, float eps) {
  // Dynamic shared memory (KW * STAGES stages, sized by the launch), so that a block may hold more
  // than the 48 KB of static shared memory (on the H100 two tiles x 8 warps x 256 columns, 78 KB,
  // wins on 4096^2; deeper pipelines did not: docs/design/cuda-w4a16.md).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Stage (*stages)[STAGES] = reinterpret_cast<Stage (*)[STAGES]>(smem_raw);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wk = threadIdx.x >> 5;
  const int n0 = blockIdx.x * (16 * NT);
  const int nsteps = KP / STEP_COLS;
  const int per = (nsteps + KW - 1) / KW;
  const int sb = wk * per;
  const int se = min(nsteps, sb + per);
  const int gmax = ((K - 1) / CHUNK_COLS) / GCH;
  Stage* st = stages[wk];
  int tile[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) tile[nt] = min(n0 + nt * 16, N - 16);  // past N: repeat the last
  // Copy lane mapping: copy u of this lane moves chunk j of tile row rr (f = lane + 32u over the
  // 16 x 4KC chunks of a tile, row-major), into w[j / 4][rr][j % 4].
  constexpr int CPR = 4 * KC;          // chunks per row and step
  constexpr int NCP = 16 * CPR / 32;   // copies per lane, tile and step (2 KC)
#if TILED
  // Tile-major codes (layout.tile_major): [N / 16][KP / 256][2 halves][16 rows][4 chunks] x 16
  // bytes, so one step of a tile is one contiguous 1 KB (KC = 1) or 2 KB (KC = 2) region. Copy u
  // of a lane lies 32 / CPR rows (512 / CPR words) after its copy 0: one pointer per tile.
  const u32* wsrc[NT][1];
  constexpr int W_STEP = 256 * KC;  // words per tile and step
#define W_SRC(nt, u) (wsrc[nt][0] + (512 / CPR) * (u))
#else
  const u32* wsrc[NT][NCP];
  constexpr int W_STEP = 4 * CPR;
#define W_SRC(nt, u) (wsrc[nt][u])
#endif
  u32 wdst[NCP];
  int wj[NCP];
#pragma unroll
  for (int u = 0; u < NCP; ++u) {
    const int f = lane + 32 * u, rr = f / CPR, j = f % CPR;
    wj[u] = j;
    wdst[u] = smem_addr(&st[0].w[0][j >> 2][rr][j & 3]);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#if TILED
      if (u == 0) wsrc[nt][0] = w + (size_t)(tile[nt] >> 4) * (2 * KP) + 256 * (j >> 2) + 16 * rr + 4 * (j & 3);
#else
      wsrc[nt][u] = w + (size_t)(tile[nt] + rr) * (KP >> 3) + 4 * j;
#endif
  }
#if SZT
  // Tile-major scales and zero points (layout.tile_groups): [N / 16][G][16], a tile's groups
  // contiguous; one pointer per tile, 16 values per group.
  const u16* sbase[NT];
  const u8* zbase[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    sbase[nt] = sc + (size_t)(tile[nt] >> 4) * (gmax + 1) * 16;
    zbase[nt] = zp + (size_t)(tile[nt] >> 4) * (gmax + 1) * 16;
  }
#define S_AT(nt, g) (sbase[nt] + 16 * (g))
#define Z_AT(nt, g) (zbase[nt] + 16 * (g))
#else
#define S_AT(nt, g) (sc + (size_t)(g) * N + tile[nt])
#define Z_AT(nt, g) (zp + (size_t)(g) * N + tile[nt])
#endif
  // Scales: lanes 0 .. 8 KC - 1 copy 8 of a (kc, t) group's 16; zero points: lanes 16 .. 16 + 4 KC - 1.
  const int s_kc = lane >> 3, s_t = (lane >> 1) & 3, s_half = lane & 1;
  const int z_kc = (lane - 16) >> 2, z_t = (lane - 16) & 3;
  const bool s_on = lane < 8 * KC, z_on = lane >= 16 && lane < 16 + 4 * KC;
  const u32 s_dst = smem_addr(&st[0].s[0][s_on ? s_kc : 0][s_t][8 * s_half]);
  const u32 z_dst = smem_addr(&st[0].z[0][z_on ? z_kc : 0][z_on ? z_t : 0][0]);
#if NORM
  const u32 g_dst = smem_addr(&st[0].gam[(lane >> 4) & (KC - 1)][(lane >> 2) & 3][lane & 3]);
#endif
  constexpr u32 W_NT = KC * 16 * 4 * 16, S_NT = KC * 4 * 16 * 2, Z_NT = KC * 4 * 16;  // bytes per tile
  (void)Z_NT;
  // Copies of step i into stage i % STAGES (one commit group per step, empty past the slice so
  // that the wait count stays exact). Chunks past K are not read (zero-filled).
#if EVF
  const unsigned long long pol = evict_first_policy();
#endif
  auto issue = [&](int i) {
    const bool live = i < se;
    const u32 off = (u32)(i & (STAGES - 1)) * (u32)sizeof(Stage);
    const int ic = min(i, nsteps - 1);  // addresses stay valid when nothing is copied
    const int sg = min((CPR * ic + 4 * s_kc + s_t) / GCH, gmax);
    const int zg = min((CPR * ic + (z_on ? 4 * z_kc + z_t : 0)) / GCH, gmax);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int u = 0; u < NCP; ++u)
        CPW(wdst[u] + off + nt * W_NT, W_SRC(nt, u) + W_STEP * ic, true,
             live && CHUNK_COLS * (CPR * ic + wj[u]) < K);
      cp16(s_dst + off + nt * S_NT, S_AT(nt, sg) + 8 * s_half, s_on, live);
#if !SYMMETRIC
      cp16(z_dst + off + nt * Z_NT, Z_AT(nt, zg), z_on, live);
#endif
    }
#if NORM
    // The norm's weights (constant, like the codes: copied with them): lane f < 16 KC copies 16
    // bytes, columns 8 (f % 4) of chunk 4 (f / 16) + (f / 4) % 4 of the step.
    {
      const int gk = lane >> 4, gt = (lane >> 2) & 3, gq = lane & 3, gc = CPR * ic + 4 * gk + gt;
      cp16(g_dst + off, gam + 16 * gc + 4 * gq, lane < 16 * KC, live && CHUNK_COLS * gc + 8 * gq < K);
    }
#endif
    cp_commit();
  };
  const bool a_ok = g < M;
  const u32* xa = x + (size_t)(a_ok ? g : 0) * (ldx >> 1);
#if MROWS2
  const bool b_ok = g + 8 < M;
  const u32* xb = x + (size_t)(b_ok ? g + 8 : 0) * (ldx >> 1);
#endif
  // Activations of step i for this lane: rows g (and g + 8) of chunks CPR i + 4 kc + t.
  auto load_x = [&](int i, V4 (*va)[4], V4 (*vb)[4]) {
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const int c = CPR * i + 4 * kc + t;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const bool in_k = i < se && CHUNK_COLS * c + 8 * q < K;
        va[kc][q] = ld_x_if(xa + 16 * c + 4 * q, a_ok && in_k);
#if MROWS2
        vb[kc][q] = ld_x_if(xb + 16 * c + 4 * q, b_ok && in_k);
#endif
      }
    }
  };
  constexpr int MH = MROWS2 ? 2 : 1;  // halves of the activation rows (8 each)
  // acc[nt][mh]: (row g, x rows 2t, 2t + 1), (row g + 8, x rows 2t, 2t + 1) of tile nt, half mh.
  float acc[NT][MH][4];
#if !SCALE_AFTER
  float acc2[NT][MH][4];  // columns 8q + 4..7: a second chain of dependent mma
#endif
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mh = 0; mh < MH; ++mh)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[nt][mh][e] = 0.f;
#if !SCALE_AFTER
        acc2[nt][mh][e] = 0.f;
#endif
      }

#pragma unroll
  for (int j = 0; j < STAGES - 1; ++j) issue(sb + j);  // weights only: may overlap the previous kernel
  GRID_WAIT();    // x (and the memory `out` reuses) belong to earlier kernels from here on
  GRID_LAUNCH();
  V4 va[KC][4], vb[KC][4];
#if NORM
  float sq_a = 0.f, sq_b = 0.f;  // this lane's sums of squares of rows g and g + 8
#endif
  load_x(sb, va, vb);
  for (int i = sb; i < se; ++i) {
    cp_wait<STAGES - 2>();  // this lane's copies of step i have landed
    __syncwarp();           // ... and the other lanes', and all lanes are done with step i - 1
    issue(i + STAGES - 1);  // into the stage step i - 1 used
    V4 na[KC][4], nb[KC][4];
    load_x(i + 1, na, nb);
    const Stage& S = st[i & (STAGES - 1)];
#if NORM
    // x of this step (loaded during the previous one): square, then scale by the norm's weights
    // (each column of a row is loaded by exactly one lane of the block, so the lanes' sums add up
    // to the row's; the 8 lanes of a column group read the same 16 bytes: a broadcast).
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const V4 gv = S.gam[kc][t][q];
        sq_a += sumsq8(va[kc][q]);
        va[kc][q] = mul8(va[kc][q], gv);
#if MROWS2
        sq_b += sumsq8(vb[kc][q]);
        vb[kc][q] = mul8(vb[kc][q], gv);
#endif
      }
#endif
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        const V4 w0 = S.w[nt][kc][g][t], w1 = S.w[nt][kc][g + 8][t];
        const u32 s0 = S.s[nt][kc][t][g], s1 = S.s[nt][kc][t][g + 8];
#if SYMMETRIC
        const u32 z0 = 8u, z1 = 8u;
#else
        const u32 z0 = S.z[nt][kc][t][g], z1 = S.z[nt][kc][t][g + 8];
#endif
        const u32 zz0 = zero_pair(z0), zz1 = zero_pair(z1);
        const u32 zy0 = zero_pair16(z0), zy1 = zero_pair16(z1);
        (void)zy0; (void)zy1;
#if SCALE_AFTER
        float part[MH][2][4];  // this chunk's products, scaled once below (one group per 128 columns)
#endif
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          u32 h0[4], h1[4];
          unpack4(word(w0, q), zz0, zy0, h0);
          unpack4(word(w1, q), zz1, zy1, h1);
#if !SCALE_AFTER
          const u32 ss0 = s0 | (s0 << 16), ss1 = s1 | (s1 << 16);
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            h0[p] = scale_pair(h0[p], ss0);
            h1[p] = scale_pair(h1[p], ss1);
          }
#endif
          // A rows g / g + 8: logical k (2t, 2t+1) <- pair 0 (columns 8q, 8q+1), (2t+8, 2t+9) <- pair 1;
          // the second product takes pairs 2 and 3. B: the same columns of the activations.
          const u32 a01[4] = {h0[0], h1[0], h0[1], h1[1]};
          const u32 a23[4] = {h0[2], h1[2], h0[3], h1[3]};
#pragma unroll
          for (int mh = 0; mh < MH; ++mh) {
            const V4& xv = mh ? vb[kc][q] : va[kc][q];
#if SCALE_AFTER
            if (q == 0) {
              mma0(part[mh][0], a01, xv.a, xv.b);
              mma0(part[mh][1], a23, xv.c, xv.d);
            } else {
              mma(part[mh][0], a01, xv.a, xv.b);
              mma(part[mh][1], a23, xv.c, xv.d);
            }
#else
            mma(acc[nt][mh], a01, xv.a, xv.b);
            mma(acc2[nt][mh], a23, xv.c, xv.d);
#endif
          }
        }
#if SCALE_AFTER
        const float f0 = to_float(s0), f1 = to_float(s1);
#pragma unroll
        for (int mh = 0; mh < MH; ++mh) {
          acc[nt][mh][0] += (part[mh][0][0] + part[mh][1][0]) * f0;
          acc[nt][mh][1] += (part[mh][0][1] + part[mh][1][1]) * f0;
          acc[nt][mh][2] += (part[mh][0][2] + part[mh][1][2]) * f1;
          acc[nt][mh][3] += (part[mh][0][3] + part[mh][1][3]) * f1;
        }
#endif
      }
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        va[kc][q] = na[kc][q];
#if MROWS2
        vb[kc][q] = nb[kc][q];
#endif
      }
  }
#if !SCALE_AFTER
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mh = 0; mh < MH; ++mh)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][mh][e] += acc2[nt][mh][e];
#endif
  cp_wait<0>();  // no copy may still be writing when the block exits or the stages are reused
#if NORM
  // The four lanes t of a row group hold disjoint columns: every lane gets the warp's row sums.
  sq_a += __shfl_xor_sync(0xFFFFFFFFu, sq_a, 1);
  sq_a += __shfl_xor_sync(0xFFFFFFFFu, sq_a, 2);
#if MROWS2
  sq_b += __shfl_xor_sync(0xFFFFFFFFu, sq_b, 1);
  sq_b += __shfl_xor_sync(0xFFFFFFFFu, sq_b, 2);
#endif
#endif
  constexpr int NACC = NT * MH * 4;  // reduction slots: the accumulators, then (NORM) the row sums
  (void)NACC;
#if KW > 1
  // Partial sums of warps 1.. meet warp 0's in the (now idle) pipeline stages.
  typedef float Red[NACC + (NORM ? MH : 0)][32];
  Red* red = reinterpret_cast<Red*>(smem_raw);
  static_assert(sizeof(Red) * (KW - 1) <= sizeof(Stage) * KW * STAGES, "reduction buffer larger than the stages");
  __syncthreads();  // every warp is done reading its stages
  if (wk > 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mh = 0; mh < MH; ++mh)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[wk - 1][(nt * MH + mh) * 4 + e][lane] = acc[nt][mh][e];
#if NORM
    red[wk - 1][NACC][lane] = sq_a;
#if MROWS2
    red[wk - 1][NACC + 1][lane] = sq_b;
#endif
#endif
  }
  __syncthreads();
  if (wk != 0) return;
#pragma unroll
  for (int j = 0; j < KW - 1; ++j)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mh = 0; mh < MH; ++mh)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][mh][e] += red[j][(nt * MH + mh) * 4 + e][lane];
#if NORM
#pragma unroll
  for (int j = 0; j < KW - 1; ++j) {
    sq_a += red[j][NACC][lane];
#if MROWS2
    sq_b += red[j][NACC + 1][lane];
#endif
  }
#endif
#endif
  // Scale of activation row 8 mh + 2 t + d: 1 / rms of the row, whose sum lane (2 t + d, 0) holds.
  float rr[MH][2];
#pragma unroll
  for (int mh = 0; mh < MH; ++mh)
#pragma unroll
    for (int d = 0; d < 2; ++d) {
#if NORM
      const float s = __shfl_sync(0xFFFFFFFFu, mh ? sq_b : sq_a, 4 * (2 * t + d));
      rr[mh][d] = rsqrt_approx(s / (float)K + eps);
#else
      rr[mh][d] = 1.f;
#endif
    }
  (void)res; (void)ldr; (void)eps;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int n = n0 + nt * 16 + g;
    (void)n;
    if (n0 + nt * 16 >= N) continue;  // N % 16 == 0: rows n and n + 8 exist
    float b0 = 0.f, b1 = 0.f;
#if HAS_BIAS
    b0 = bias[n];
    b1 = bias[n + 8];
#endif
#pragma unroll
    for (int mh = 0; mh < MH; ++mh)
#pragma unroll
      for (int d = 0; d < 2; ++d) {  // activation row m; acc[d]: output row n, acc[2 + d]: row n + 8
        const int m = 8 * mh + 2 * t + d;
        if (m >= M) continue;
        const float v0 = acc[nt][mh][d] * rr[mh][d] + b0, v1 = acc[nt][mh][2 + d] * rr[mh][d] + b1;
#if EPI == 1
        out[(size_t)m * ldo + ((n0 + nt * 16) >> 1) + g] = to_out(silu(v0) * v1);  // gate n, up n + 8
#elif RESID
        out[(size_t)m * ldo + n] = to_out(v0 + to_float(res[(size_t)m * ldr + n]));
        out[(size_t)m * ldo + n + 8] = to_out(v1 + to_float(res[(size_t)m * ldr + n + 8]));
#else
        out[(size_t)m * ldo + n] = to_out(v0);
        out[(size_t)m * ldo + n + 8] = to_out(v1);
#endif
      }
  }
}

#else
// W [N, K] in the activation dtype (columns in group order). One int32 word (8 consecutive columns)
// per thread: a warp reads 128 contiguous bytes of one row and writes 512 contiguous bytes (the
// first version, one 32-column chunk per thread, wrote 16 bytes per lane 64 bytes apart and ran at
// about half the copy bandwidth). grid (N, ceil(K / 8 / blockDim.x)).
extern "C" __global__ void w4a16_dequant(const u32* __restrict__ w, const u16* __restrict__ sc,
                                         const u8* __restrict__ zp, u32* __restrict__ out,
                                         int N, int K, int KP) {
  const int n = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;  // word j: columns 8j .. 8j + 7
  if (8 * j >= K) return;
#if TILED  // layout.tile_major: [N / 16][KP / 256][2][16 rows][4 chunks][4 words]
  const int c = j >> 2;
  const u32 v = w[(size_t)(n >> 4) * (2 * KP) + 512 * (c >> 3) + 256 * ((c >> 2) & 1) + 16 * (n & 15) + 4 * (c & 3) + (j & 3)];
#else
  const u32 v = w[(size_t)n * (KP >> 3) + j];
#endif
  const int g = (j >> 2) / GCH;  // 4 words per chunk
#if SZT  // layout.tile_groups: [N / 16][G][16]
  const size_t at = ((size_t)(n >> 4) * (((K - 1) / CHUNK_COLS) / GCH + 1) + g) * 16 + (n & 15);
#else
  const size_t at = (size_t)g * N + n;
#endif
  const u32 s16 = sc[at];
  const u32 ss = s16 | (s16 << 16);
#if SYMMETRIC
  const u32 z = 8u;
#else
  const u32 z = zp[at];
#endif
  u32 h[4];
  unpack4(v, zero_pair(z), zero_pair16(z), h);
  V4 o;
  o.a = scale_pair(h[0], ss);
  o.b = scale_pair(h[1], ss);
  o.c = scale_pair(h[2], ss);
  o.d = scale_pair(h[3], ss);
  *reinterpret_cast<V4*>(out + ((size_t)n * K + 8 * j) / 2) = o;  // K % 8 == 0: 16-byte aligned
}
#endif
