// Tiled attention with recomputation for the GPU: the same recurrence as
// train/src/attention.rs (its CPU twin, tested against composed attention).
//
// Layouts (contiguous f32): q, o, dq [b, h, s, d]; k, v, dk, dv [b, kvh, t, d];
// mask [b, s, t] additive (0 or -inf); lse [b, h, s].
// One warp per query row; lane l holds elements l, l+32, ... of the row (d <= 256).
// Keys stream through in order with a running max and sum, so no [s, t] buffer exists.

#define WARP 32
#define MAX_PER_LANE 8

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = WARP / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Scaled, optionally capped score and its derivative with respect to the raw dot.
__device__ __forceinline__ void score(float raw, float scale, float cap, float* sc, float* dsc) {
  if (cap > 0.f) {
    float th = tanhf(raw * scale / cap);
    *sc = cap * th;
    *dsc = scale * (1.f - th * th);
  } else {
    *sc = raw * scale;
    *dsc = scale;
  }
}

extern "C" __global__ void tiled_attention_fwd(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ mask, float* __restrict__ out, float* __restrict__ lse,
    int b, int h, int kvh, int s, int t, int d, float scale, float cap) {
  int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= b * h * s) return;
  int i = row % s, bh = row / s, bi = bh / h, hi = bh % h;
  int rep = h / kvh;
  const float* qr = q + (size_t)row * d;
  const float* kg = k + (size_t)(bi * kvh + hi / rep) * t * d;
  const float* vg = v + (size_t)(bi * kvh + hi / rep) * t * d;
  const float* mr = mask + (size_t)(bi * s + i) * t;
  float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
  int n = 0;
  for (int e = lane; e < d; e += WARP, ++n) {
    qv[n] = qr[e];
    acc[n] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j < t; ++j) {
    if (mr[j] == -INFINITY) continue;
    float part = 0.f;
    for (int c = 0, e = lane; e < d; e += WARP, ++c) part += qv[c] * kg[(size_t)j * d + e];
    float sc, dsc;
    score(warp_sum(part), scale, cap, &sc, &dsc);
    sc += mr[j];
    float new_m = fmaxf(m, sc);
    float corr = __expf(m - new_m);
    float p = __expf(sc - new_m);
    l = l * corr + p;
    for (int c = 0, e = lane; e < d; e += WARP, ++c)
      acc[c] = acc[c] * corr + p * vg[(size_t)j * d + e];
    m = new_m;
  }
  float inv = l > 0.f ? 1.f / l : 0.f;
  for (int c = 0, e = lane; e < d; e += WARP, ++c) out[(size_t)row * d + e] = acc[c] * inv;
  if (lane == 0) lse[row] = l > 0.f ? m + logf(l) : -INFINITY;
}

// dq rows directly; dk, dv accumulated with atomics (rows of a KV head's query heads
// write the same key rows).
extern "C" __global__ void tiled_attention_bwd(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ mask, const float* __restrict__ o, const float* __restrict__ dout,
    const float* __restrict__ lse, float* __restrict__ dq, float* __restrict__ dk,
    float* __restrict__ dv, int b, int h, int kvh, int s, int t, int d, float scale, float cap) {
  int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= b * h * s) return;
  float lr = lse[row];
  if (!isfinite(lr)) return;
  int i = row % s, bh = row / s, bi = bh / h, hi = bh % h;
  int rep = h / kvh;
  size_t kv = (size_t)(bi * kvh + hi / rep) * t * d;
  const float* mr = mask + (size_t)(bi * s + i) * t;
  float qv[MAX_PER_LANE], dov[MAX_PER_LANE], dqv[MAX_PER_LANE];
  float delta_part = 0.f;
  for (int c = 0, e = lane; e < d; e += WARP, ++c) {
    qv[c] = q[(size_t)row * d + e];
    dov[c] = dout[(size_t)row * d + e];
    dqv[c] = 0.f;
    delta_part += dov[c] * o[(size_t)row * d + e];
  }
  float delta = warp_sum(delta_part);
  for (int j = 0; j < t; ++j) {
    if (mr[j] == -INFINITY) continue;
    float qk = 0.f, dov_v = 0.f;
    for (int c = 0, e = lane; e < d; e += WARP, ++c) {
      qk += qv[c] * k[kv + (size_t)j * d + e];
      dov_v += dov[c] * v[kv + (size_t)j * d + e];
    }
    float sc, dsc;
    score(warp_sum(qk), scale, cap, &sc, &dsc);
    float p = __expf(sc + mr[j] - lr);
    float ds = p * (warp_sum(dov_v) - delta) * dsc;
    for (int c = 0, e = lane; e < d; e += WARP, ++c) {
      atomicAdd(&dv[kv + (size_t)j * d + e], p * dov[c]);
      atomicAdd(&dk[kv + (size_t)j * d + e], ds * qv[c]);
      dqv[c] += ds * k[kv + (size_t)j * d + e];
    }
  }
  for (int c = 0, e = lane; e < d; e += WARP, ++c) dq[(size_t)row * d + e] = dqv[c];
}
