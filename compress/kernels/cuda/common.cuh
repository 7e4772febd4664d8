// Shared by the CUDA sources of compress.kernels (prepended to each by cuda_launch.cuda_source,
// after the #defines of the specialization: BF16 picks the 16-bit activation type).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
struct __align__(16) V4 { u32 a, b, c, d; };

// Programmatic dependent launch (sm_90+): a kernel launched with the programmatic-serialization
// attribute may start while the previous kernel in the stream is still running. Everything before
// GRID_WAIT must not read what earlier kernels write (the weights, scales and zero points are
// written once, at load); GRID_WAIT blocks until the previous grid has finished and its writes are
// visible. GRID_LAUNCH lets the next kernel start early; it comes after GRID_WAIT so that at most
// two grids overlap. Both are no-ops on older GPUs and for plain launches.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GRID_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define GRID_LAUNCH() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define GRID_WAIT()
#define GRID_LAUNCH()
#endif

// 16-bit activation <-> float32 (round to nearest even).
__device__ __forceinline__ float to_float(u32 h16) {
  float f;
#if BF16
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.bf16 %0, t; }" : "=f"(f) : "r"(h16));
#else
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "r"(h16));
#endif
  return f;
}
__device__ __forceinline__ u16 to_out(float f) {
  u16 h;
#if BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}
