// The decoder's element-wise and row-wise training ops for the GPU, each with its
// backward. Every kernel has a CPU twin in train/src (fused.rs, cross_entropy.rs,
// packed.rs, nf4.rs, q8.rs) that computes the same thing the same way and is tested
// against composed candle ops; the Rust side (train/src/kernels.rs) picks the launch
// shapes, which are tested on the CPU too.
//
// Activations come as f32 or bf16 (`_f32` / `_bf16` suffixes); every sum and every
// transcendental is computed in f32. Row-wise kernels run one block per row (blockDim a
// multiple of 32, at most 1024); element-wise ones one thread per element in a grid-stride
// loop.

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ float block_sum(float x, float* shared) {
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  int warps = (blockDim.x + 31) / 32;
  x = lane < warps ? shared[lane] : 0.f;
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ float block_max(float x, float* shared) {
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  int warps = (blockDim.x + 31) / 32;
  x = lane < warps ? shared[lane] : -INFINITY;
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

#define GRID_STRIDE(i, n) \
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// ---------------------------------------------------------------- RMSNorm
// y = x / sqrt(mean(x²) + eps) · w, w in f32 (Gemma's 1 + w folded in by the caller).
// With `round_first` (Llama in bf16) the normalised value is rounded to T before the
// weight multiplies it, as transformers does; otherwise one rounding at the end.
template <typename T>
__device__ void rms_norm_fwd(const T* x, const float* w, T* y, int d, float eps, int round_first) {
  __shared__ float shared[32];
  const T* xr = x + (size_t)blockIdx.x * d;
  T* yr = y + (size_t)blockIdx.x * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = to_f(xr[i]);
    ss += v * v;
  }
  float inv = rsqrtf(block_sum(ss, shared) / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float n = to_f(xr[i]) * inv;
    if (round_first) n = to_f(from_f<T>(n));
    yr[i] = from_f<T>(n * w[i]);
  }
}

// dx = inv·w·dy − x·inv³·mean(x·w·dy)  (the weight is frozen: no dw).
template <typename T>
__device__ void rms_norm_bwd(const T* x, const float* w, const T* dy, T* dx, int d, float eps) {
  __shared__ float shared[32];
  size_t base = (size_t)blockIdx.x * d;
  float ss = 0.f, dot = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = to_f(x[base + i]);
    ss += v * v;
    dot += v * w[i] * to_f(dy[base + i]);
  }
  ss = block_sum(ss, shared);
  dot = block_sum(dot, shared);
  float inv = rsqrtf(ss / d + eps);
  float k = inv * inv * inv * dot / d;
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    dx[base + i] = from_f<T>(inv * w[i] * to_f(dy[base + i]) - to_f(x[base + i]) * k);
}

// ---------------------------------------------------------------- RoPE
// Half-split rotation of x [b, h, s, d] by angles cos/sin [b, s, d/2] (f32); `sign` −1
// is the inverse rotation (the backward).
template <typename T>
__device__ void rope(const T* x, const float* cos, const float* sin, T* y, int b, int h, int s,
                     int d, float sign) {
  int half = d / 2;
  size_t n = (size_t)b * h * s * half;
  GRID_STRIDE(p, n) {
    int i = p % half;
    size_t row = p / half;  // (bi, hi, si)
    int si = row % s;
    int bi = row / ((size_t)h * s);
    size_t t = ((size_t)bi * s + si) * half + i;
    float c = cos[t], sn = sign * sin[t];
    float x1 = to_f(x[row * d + i]), x2 = to_f(x[row * d + i + half]);
    y[row * d + i] = from_f<T>(x1 * c - x2 * sn);
    y[row * d + i + half] = from_f<T>(x2 * c + x1 * sn);
  }
}

// ---------------------------------------------------------------- gated MLP
// act 0: SiLU (SwiGLU), 1: GELU tanh approximation (GeGLU, Gemma), 2: GELU erf.
__device__ __forceinline__ void act_and_grad(float g, int act, float* a, float* da) {
  if (act == 0) {
    float sig = 1.f / (1.f + __expf(-g));
    *a = g * sig;
    *da = sig * (1.f + g * (1.f - sig));
  } else if (act == 1) {
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    float inner = c * (g + 0.044715f * g * g * g);
    float th = tanhf(inner);
    *a = 0.5f * g * (1.f + th);
    *da = 0.5f * (1.f + th) + 0.5f * g * (1.f - th * th) * c * (1.f + 3.f * 0.044715f * g * g);
  } else {
    const float r2 = 0.7071067811865476f;  // 1/sqrt(2)
    *a = 0.5f * g * (1.f + erff(g * r2));
    *da = 0.5f * (1.f + erff(g * r2)) + g * 0.3989422804014327f * __expf(-0.5f * g * g);
  }
}

template <typename T>
__device__ void glu_fwd(const T* g, const T* u, T* y, size_t n, int act) {
  GRID_STRIDE(i, n) {
    float a, da;
    act_and_grad(to_f(g[i]), act, &a, &da);
    y[i] = from_f<T>(a * to_f(u[i]));
  }
}

// dg = dy·u·act'(g), du = dy·act(g), written to one [dg | du] buffer.
template <typename T>
__device__ void glu_bwd(const T* g, const T* u, const T* dy, T* out, size_t n, int act) {
  GRID_STRIDE(i, n) {
    float a, da, d = to_f(dy[i]);
    act_and_grad(to_f(g[i]), act, &a, &da);
    out[i] = from_f<T>(d * to_f(u[i]) * da);
    out[n + i] = from_f<T>(d * a);
  }
}

// ---------------------------------------------------------------- cross-entropy
// Rows of f32 logits [n, v]; optional soft-capping z = cap·tanh(x / cap) (Gemma 2's final
// logits). nll[r] = logsumexp(z_r) − z_r[target_r].
__device__ __forceinline__ float capped(float x, float cap) {
  return cap > 0.f ? cap * tanhf(x / cap) : x;
}

extern "C" __global__ void cross_entropy_fwd(const float* logits, const uint32_t* targets,
                                             float* nll, int v, float cap) {
  __shared__ float shared[32];
  const float* row = logits + (size_t)blockIdx.x * v;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < v; i += blockDim.x) m = fmaxf(m, capped(row[i], cap));
  m = block_max(m, shared);
  float s = 0.f;
  for (int i = threadIdx.x; i < v; i += blockDim.x) s += __expf(capped(row[i], cap) - m);
  s = block_sum(s, shared);
  if (threadIdx.x == 0) nll[blockIdx.x] = m + logf(s) - capped(row[targets[blockIdx.x]], cap);
}

// dlogits = g_r · (softmax(z) − onehot) · dz/dx; the row's log-sum-exp is recovered from
// the forward's result without another pass: lse = nll + z[target].
extern "C" __global__ void cross_entropy_bwd(const float* logits, const uint32_t* targets,
                                             const float* nll, const float* g, float* dlogits,
                                             int v, float cap) {
  size_t r = blockIdx.x;
  const float* row = logits + r * v;
  uint32_t t = targets[r];
  float l = nll[r] + capped(row[t], cap), gr = g[r];
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    float x = row[i], z = capped(x, cap);
    float dz = __expf(z - l) - (i == (int)t ? 1.f : 0.f);
    float dzdx = 1.f;
    if (cap > 0.f) {
      float th = tanhf(x / cap);
      dzdx = 1.f - th * th;
    }
    dlogits[r * v + i] = gr * dz * dzdx;
  }
}

// ---------------------------------------------------------------- packed weights
// NF4 (bitsandbytes' layout): two 4-bit codes per byte, high nibble first; one absmax
// per 64 values, either f32 (`absmax`) or double-quantized (`qabsmax` u8 indices into
// `dmap`, times `absmax2` per 256 blocks, plus `offset`).
__constant__ float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

template <typename T>
__device__ void nf4_dequant(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                            const float* dmap, const float* absmax2, float offset, T* out,
                            size_t n) {
  GRID_STRIDE(i, n) {
    uint8_t byte = packed[i / 2];
    int q = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
    size_t blk = i / 64;
    float scale = qabsmax ? dmap[qabsmax[blk]] * absmax2[blk / 256] + offset : absmax[blk];
    out[i] = from_f<T>(NF4[q] * scale);
  }
}

// Int8 blocks of 32 with an f32 scale each (row-major [n, k], k a multiple of 32).
template <typename T>
__device__ void q8_dequant(const int8_t* qs, const float* scales, T* out, size_t n) {
  GRID_STRIDE(i, n) out[i] = from_f<T>((float)qs[i] * scales[i / 32]);
}

// ---------------------------------------------------------------- entry points
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define ENTRIES                                                                            \
  extern "C" __global__ void CAT(rms_norm_fwd, SUF)(const T* x, const float* w, T* y, int d, \
                                                    float eps, int round_first) {           \
    rms_norm_fwd<T>(x, w, y, d, eps, round_first);                                         \
  }                                                                                        \
  extern "C" __global__ void CAT(rms_norm_bwd, SUF)(const T* x, const float* w, const T* dy, \
                                                    T* dx, int d, float eps) {              \
    rms_norm_bwd<T>(x, w, dy, dx, d, eps);                                                 \
  }                                                                                        \
  extern "C" __global__ void CAT(rope, SUF)(const T* x, const float* cos, const float* sin,  \
                                            T* y, int b, int h, int s, int d, float sign) { \
    rope<T>(x, cos, sin, y, b, h, s, d, sign);                                             \
  }                                                                                        \
  extern "C" __global__ void CAT(glu_fwd, SUF)(const T* g, const T* u, T* y, size_t n,      \
                                               int act) {                                  \
    glu_fwd<T>(g, u, y, n, act);                                                           \
  }                                                                                        \
  extern "C" __global__ void CAT(glu_bwd, SUF)(const T* g, const T* u, const T* dy, T* out, \
                                               size_t n, int act) {                        \
    glu_bwd<T>(g, u, dy, out, n, act);                                                     \
  }                                                                                        \
  extern "C" __global__ void CAT(nf4_dequant, SUF)(                                        \
      const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* dmap, \
      const float* absmax2, float offset, T* out, size_t n) {                              \
    nf4_dequant<T>(packed, absmax, qabsmax, dmap, absmax2, offset, out, n);                \
  }                                                                                        \
  extern "C" __global__ void CAT(q8_dequant, SUF)(const int8_t* qs, const float* scales,    \
                                                  T* out, size_t n) {                      \
    q8_dequant<T>(qs, scales, out, n);                                                     \
  }

#define T float
#define SUF f32
ENTRIES
#undef T
#undef SUF
#define T __nv_bfloat16
#define SUF bf16
ENTRIES
#undef T
#undef SUF
