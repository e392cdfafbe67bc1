// hearth's CPU kernels (fp32), compiled at first use by engine/cpu_kernels.py and called through
// ctypes. Parallel loops run on the OpenMP runtime that PyTorch itself has loaded.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for x <= 0 (softmax inputs after the max is subtracted): Cephes-style range reduction
// and a degree-6 polynomial, written so that the compiler vectorizes it (error ~2 ulp).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

typedef float v16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// rows x [MR, K] (row stride ldx) times NV 16-column panels of the packed weight, into out
// (row stride ldo), plus bias. Each output is one fused multiply-add chain over k in order, so a
// row's result does not depend on the other rows of the batch.
template <int MR, int NV>
inline void linear_tile(const float* x, int64_t ldx, const float* panels, int64_t K,
                        const float* bias, float* out, int64_t ldo) {
  v16 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 w[NV];
    for (int j = 0; j < NV; ++j) w[j] = load16(panels + (j * K + k) * 16);
    for (int i = 0; i < MR; ++i) {
      const float a = x[i * ldx + k];
      for (int j = 0; j < NV; ++j) acc[i][j] += a * w[j];
    }
  }
  for (int j = 0; j < NV; ++j) {
    const v16 b = bias ? load16(bias + j * 16) : v16{};
    for (int i = 0; i < MR; ++i) {
      const v16 o = acc[i][j] + b;
      std::memcpy(out + i * ldo + j * 16, &o, sizeof(o));
    }
  }
}

template <int NV>
void linear_panel(const float* x, int64_t M, int64_t K, const float* panels, const float* bias,
                  float* out, int64_t N) {
  constexpr int MR = 8;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) linear_tile<MR, NV>(x + m * K, K, panels, K, bias, out + m * N, N);
  const float* xm = x + m * K;
  float* om = out + m * N;
  switch (M - m) {
    case 7: linear_tile<7, NV>(xm, K, panels, K, bias, om, N); break;
    case 6: linear_tile<6, NV>(xm, K, panels, K, bias, om, N); break;
    case 5: linear_tile<5, NV>(xm, K, panels, K, bias, om, N); break;
    case 4: linear_tile<4, NV>(xm, K, panels, K, bias, om, N); break;
    case 3: linear_tile<3, NV>(xm, K, panels, K, bias, om, N); break;
    case 2: linear_tile<2, NV>(xm, K, panels, K, bias, om, N); break;
    case 1: linear_tile<1, NV>(xm, K, panels, K, bias, om, N); break;
    default: break;
  }
}

}  // namespace

// out [M, N] = x [M, K] @ W^T + bias, W [N, K] packed as [N / 16, K, 16] (N % 16 == 0): each
// 16-column panel is one contiguous stream, read once per 8 rows of x.
extern "C" void hearth_linear_f32(const float* x, const float* packed, const float* bias,
                                  float* out, int64_t M, int64_t K, int64_t N, int threads) {
  constexpr int64_t kPanels = 3;  // 48 columns x 8 rows: 24 accumulator registers
  const int64_t chunks = N / 16;
  const int64_t tiles = (chunks + kPanels - 1) / kPanels;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t first = t * kPanels;
    const int64_t count = std::min(kPanels, chunks - first);
    const float* panels = packed + first * K * 16;
    const float* b = bias ? bias + first * 16 : nullptr;
    float* o = out + first * 16;
    if (count == 3) linear_panel<3>(x, M, K, panels, b, o, N);
    else if (count == 2) linear_panel<2>(x, M, K, panels, b, o, N);
    else linear_panel<1>(x, M, K, panels, b, o, N);
  }
}

// Decode attention over the paged KV cache, read in place: one query token per sequence.
// Each sequence's K rows are read once (scores of all H heads), then its V rows once.
// Returns 0, or -1 (and computes nothing) when a length or a block id is out of range.
extern "C" int hearth_paged_decode_f32(
    const float* q,         // [B, H, D]
    const float* k_cache,   // [N, bs, Hkv, D]
    const float* v_cache,   // [N, bs, Hkv, D]
    const int64_t* tables,  // [B, nb] block ids
    const int64_t* lens,    // [B] context lengths (>= 1)
    float* out,             // [B, H, D]
    int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t N, int64_t bs, int64_t nb,
    float scale, int threads) {
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] < 1 || lens[b] > nb * bs) return -1;
    for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; ++j) {
      if (tables[b * nb + j] < 0 || tables[b * nb + j] >= N) return -1;
    }
  }
  const int64_t group = H / Hkv;  // query heads per KV head
  const int64_t token_stride = Hkv * D;
  const int64_t block_stride = bs * token_stride;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;   // [H, n]
    std::vector<float> acc(H * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = lens[b];
      const float* qb = q + b * H * D;
      const int64_t* table = tables + b * nb;
      scores.resize(H * n);
      for (int64_t t = 0; t < n; ++t) {
        const float* kt = k_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = qb + h * D;
          const float* kh = kt + (h / group) * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * kh[d];
          scores[h * n + t] = dot * scale;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* s = scores.data() + h * n;
        float top = -INFINITY;
        for (int64_t t = 0; t < n; ++t) top = std::max(top, s[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
          s[t] = exp_nonpositive(s[t] - top);
          sum += s[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const float* vt = v_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
        for (int64_t h = 0; h < H; ++h) {
          const float p = scores[h * n + t];
          const float* vh = vt + (h / group) * D;
          float* a = acc.data() + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vh[d];
        }
      }
      std::copy(acc.begin(), acc.end(), out + b * H * D);
    }
  }
  return 0;
}
