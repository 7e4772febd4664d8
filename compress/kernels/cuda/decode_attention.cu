// The decode attention kernel of compress.kernels.decode_attention (compiled at run time with NVRTC;
// the module prepends the #defines of each specialization).

struct __align__(8) V2 { u32 a, b; };  // (u32, u16, V4, GRID_WAIT, to_float / to_out: common.cuh)

#define EPL (HD / 32)   /* elements of a head vector per lane */
#define MAX_SPLITS 256  /* slices per head the combine takes (split() keeps to it) */
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2.approx(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float ldcg(const float* p) {  // load from L2 (not a stale L1 line)
  float f;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(f) : "l"(p));
  return f;
}

#if CLUSTER
// Thread block clusters (sm_90): the CLUSTER blocks of a head share their partials through
// distributed shared memory instead of global memory and an arrival counter.
__device__ __forceinline__ void cluster_sync() {  // every thread of every block of the cluster
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ float ld_cluster(const float* p, u32 rank) {  // *p in block `rank`'s shared memory
  u32 a, ra;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(ra) : "memory");
  return v;
}
#define CLUSTER_DIMS __cluster_dims__(CLUSTER, 1, 1)
#else
#define CLUSTER_DIMS
#endif

// EPL consecutive 16-bit elements of a row, one vector load.
struct Row { u32 w[EPL / 2]; };
__device__ __forceinline__ Row ld_row(const u16* p) {
  Row r;
#if EPL == 2
  r.w[0] = *reinterpret_cast<const u32*>(p);
#elif EPL == 4
  const V2 t = *reinterpret_cast<const V2*>(p); r.w[0] = t.a; r.w[1] = t.b;
#else
  const V4 t = *reinterpret_cast<const V4*>(p); r.w[0] = t.a; r.w[1] = t.b; r.w[2] = t.c; r.w[3] = t.d;
#endif
  return r;
}

__device__ __forceinline__ float elem(const Row& r, int e) {
  return to_float(e & 1 ? r.w[e >> 1] >> 16 : r.w[e >> 1] & 0xFFFFu);
}

// grid (splits, B * H), WARPS warps; block (s, bh) covers cache positions [s * P, min(L, s * P + P)).
extern "C" __global__ void CLUSTER_DIMS __launch_bounds__(WARPS * 32)
decode_attn(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
            const void* __restrict__ mask, u16* __restrict__ out, float* __restrict__ ws,
            unsigned* __restrict__ counters, int H, int group, int L, int P,
            int sqb, int sqh, int skb, int skh, int skl, int svb, int svh, int svl,
            int smb, int smh, int sml, float scale_log2) {
  const int s = blockIdx.x, S = gridDim.x, bh = blockIdx.y;
  const int b = bh / H, h = bh - b * H, hk = h / group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  GRID_WAIT();    // q and the cache were written by the kernels just before
  GRID_LAUNCH();
  float qf[EPL];
  {
    const Row r = ld_row(q + (size_t)b * sqb + (size_t)h * sqh + lane * EPL);
#pragma unroll
    for (int e = 0; e < EPL; ++e) qf[e] = elem(r, e) * scale_log2;
  }
  const u16* kb = k + (size_t)b * skb + (size_t)hk * skh + lane * EPL;
  const u16* vb = v + (size_t)b * svb + (size_t)hk * svh + lane * EPL;
  const int p0 = s * P, p1 = min(L, p0 + P);
  float m = NEG_INF, l = 0.f, acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  for (int base = p0 + warp * T; base < p1; base += WARPS * T) {
    Row kr[T], vr[T];
    float sc[T];
    bool ok[T];
    // all loads of the step first (one memory latency for T rows of K and V and their mask bits)
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const int p = base + t;
      ok[t] = p < p1;
      if (ok[t]) {
        kr[t] = ld_row(kb + (size_t)p * skl);
        vr[t] = ld_row(vb + (size_t)p * svl);
      }
      sc[t] = 0.f;
#if MASK == 1
      if (ok[t]) ok[t] = reinterpret_cast<const unsigned char*>(mask)[(size_t)b * smb + (size_t)h * smh + (size_t)p * sml] != 0;
#elif MASK == 2
      if (ok[t]) sc[t] = reinterpret_cast<const float*>(mask)[(size_t)b * smb + (size_t)h * smh + (size_t)p * sml] * 1.4426950408889634f;
#endif
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float d = 0.f;
      if (ok[t]) {
#pragma unroll
        for (int e = 0; e < EPL; ++e) d = fmaf(qf[e], elem(kr[t], e), d);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xFFFFFFFFu, d, o);
      sc[t] = ok[t] ? d + sc[t] : NEG_INF;
    }
    float mn = m;
#pragma unroll
    for (int t = 0; t < T; ++t) mn = fmaxf(mn, sc[t]);
    if (mn == NEG_INF) continue;  // nothing unmasked yet (uniform across the warp)
    const float corr = ex2(m - mn);  // 0 while m is -inf
    l *= corr;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] *= corr;
#pragma unroll
    for (int t = 0; t < T; ++t) {
      if (!ok[t] || sc[t] == NEG_INF) continue;  // a masked slot's values may be anything: never used
      const float pt = ex2(sc[t] - mn);
      l += pt;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[e] = fmaf(pt, elem(vr[t], e), acc[e]);
    }
    m = mn;
  }
  // the block's warps -> one partial (max, sum, weighted values) for this slice
  __shared__ float sm_m[WARPS], sm_l[WARPS], sm_acc[WARPS][HD];
  __shared__ int sm_last;
#pragma unroll
  for (int e = 0; e < EPL; ++e) sm_acc[warp][lane * EPL + e] = acc[e];
  if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
  __syncthreads();
  float M = NEG_INF;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm_m[w]);
  float Lsum = 0.f, f[WARPS];
#pragma unroll
  for (int w = 0; w < WARPS; ++w) { f[w] = M == NEG_INF ? 0.f : ex2(sm_m[w] - M); Lsum += sm_l[w] * f[w]; }
  u16* o = out + (size_t)bh * HD;
#if CLUSTER
  // The block's partial into its shared memory; then rank r combines the cluster's partials for
  // columns [r HD / CLUSTER, (r + 1) HD / CLUSTER) of the output.
  __shared__ float cl_ml[2], cl_acc[HD];
  for (int d = threadIdx.x; d < HD; d += WARPS * 32) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) a += sm_acc[w][d] * f[w];
    cl_acc[d] = a;
  }
  if (threadIdx.x == 0) { cl_ml[0] = M; cl_ml[1] = Lsum; }
  cluster_sync();
  {
    const u32 rank = cluster_rank();
    float mr[CLUSTER], fr[CLUSTER], Mc = NEG_INF, Lc = 0.f;
#pragma unroll
    for (int r = 0; r < CLUSTER; ++r) { mr[r] = ld_cluster(&cl_ml[0], r); Mc = fmaxf(Mc, mr[r]); }
#pragma unroll
    for (int r = 0; r < CLUSTER; ++r) {
      fr[r] = mr[r] == NEG_INF ? 0.f : ex2(mr[r] - Mc);
      Lc += fr[r] == 0.f ? 0.f : ld_cluster(&cl_ml[1], r) * fr[r];
    }
    constexpr int DC = HD / CLUSTER;
    for (int d = rank * DC + threadIdx.x; d < (rank + 1) * DC; d += WARPS * 32) {
      float a = 0.f;
#pragma unroll
      for (int r = 0; r < CLUSTER; ++r) a += fr[r] == 0.f ? 0.f : ld_cluster(&cl_acc[d], r) * fr[r];
      o[d] = to_out(Lc > 0.f ? a / Lc : 0.f);
    }
  }
  cluster_sync();  // no block leaves while another may still read its shared memory
  return;
#endif
  if (S == 1) {
    for (int d = threadIdx.x; d < HD; d += WARPS * 32) {
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) a += sm_acc[w][d] * f[w];
      o[d] = to_out(Lsum > 0.f ? a / Lsum : 0.f);
    }
    return;
  }
  float* part = ws + ((size_t)bh * S + s) * (HD + 2);
  for (int d = threadIdx.x; d < HD; d += WARPS * 32) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) a += sm_acc[w][d] * f[w];
    part[2 + d] = a;
  }
  if (threadIdx.x == 0) { part[0] = M; part[1] = Lsum; }
  __threadfence();  // this block's partial is visible before its arrival is counted
  __syncthreads();
  if (threadIdx.x == 0) sm_last = atomicInc(counters + bh, S - 1) == (unsigned)(S - 1);  // wraps to 0
  __syncthreads();
  if (!sm_last) return;
  __threadfence();
  // The last block of this head combines the S partials (L2 loads: other blocks wrote them). All
  // maxima and sums are loaded at once, into shared memory, then each thread's S values per column.
  const float* wsh = ws + (size_t)bh * S * (HD + 2);
  __shared__ float sm_f[MAX_SPLITS], sm_s[MAX_SPLITS];
  for (int i = threadIdx.x; i < S; i += WARPS * 32) {
    sm_f[i] = ldcg(wsh + (size_t)i * (HD + 2));
    sm_s[i] = ldcg(wsh + (size_t)i * (HD + 2) + 1);
  }
  __syncthreads();
  M = NEG_INF;
  for (int i = 0; i < S; ++i) M = fmaxf(M, sm_f[i]);
  Lsum = 0.f;
  for (int i = 0; i < S; ++i) Lsum += sm_f[i] == NEG_INF ? 0.f : sm_s[i] * ex2(sm_f[i] - M);
  for (int d = threadIdx.x; d < HD; d += WARPS * 32) {
    float a = 0.f;
#pragma unroll 8
    for (int i = 0; i < S; ++i)
      if (sm_f[i] != NEG_INF) a += ldcg(wsh + (size_t)i * (HD + 2) + 2 + d) * ex2(sm_f[i] - M);
    o[d] = to_out(Lsum > 0.f ? a / Lsum : 0.f);
  }
}
