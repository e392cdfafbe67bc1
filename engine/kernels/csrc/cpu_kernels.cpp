// hearth's CPU kernels (fp32), compiled at first use by engine/kernels/cpu_kernels.py and called through
// ctypes. Parallel loops run on the OpenMP runtime that PyTorch itself has loaded.
//
// One source, one build per instruction set (engine/kernels/cpu_kernels.py VARIANTS); the compiler flags
// pick the vector code below through the predefined macros:
//   __AVX512F__            "avx512": 16-float zmm vectors, 32 registers: 8-row x 48-column tiles
//   __AVX2__ && __FMA__    "avx2":   8-float ymm vectors, 16 registers: 6-row x 16-column tiles
//   neither                "generic": 4-float vectors of the compiler's baseline ISA, 2 x 16
// The packed weight layout [N/16, K, 16] is the same in every build, and in the avx512 and avx2
// builds every matmul output is the same fused multiply-add chain over k in order: the two give
// bit-identical results, and a row's result never depends on the other rows of the batch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
typedef __m512 vf;
constexpr int kLanes = 16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vbroadcast(float a) { return _mm512_set1_ps(a); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c, one rounding
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
// A tile is 8 rows x 3 panels (48 columns): 24 accumulators + 3 weights + 1 broadcast of 32 zmm.
constexpr int kRows = 8;
constexpr int kGroup = 3;        // panels per parallel task
constexpr int kTilePanels = 3;   // panels per tile of kRows rows
constexpr int kNarrowRows = 8;   // up to this many rows, a tile spans the whole group
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
typedef __m256 vf;
constexpr int kLanes = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vbroadcast(float a) { return _mm256_set1_ps(a); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c, one rounding
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
// A tile is 6 rows x 1 panel (16 columns, 2 ymm): 12 accumulators + 2 weights + 1 broadcast of
// 16 ymm. Up to 2 rows, a tile spans both panels of the group (8 accumulators): more independent
// FMA chains for a single decode row.
constexpr int kRows = 6;
constexpr int kGroup = 2;
constexpr int kTilePanels = 1;
constexpr int kNarrowRows = 2;
#else
constexpr const char* kIsa = "generic";
typedef float vf __attribute__((vector_size(16)));  // 4 floats: SSE2 xmm, NEON q
constexpr int kLanes = 4;
inline vf vzero() { return vf{}; }
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vbroadcast(float a) { return vf{} + a; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }  // fused or not, as the compiler chooses
inline vf vadd(vf a, vf b) { return a + b; }
// 2 rows x 1 panel: 8 accumulators + 4 weights + 1 broadcast, within SSE2's 16 registers.
constexpr int kRows = 2;
constexpr int kGroup = 1;
constexpr int kTilePanels = 1;
constexpr int kNarrowRows = 2;
#endif

constexpr int kPanelVectors = 16 / kLanes;  // vectors per 16-column panel
// A tile that reads a single panel prefetches its weight stream this many k steps (64-byte
// lines) ahead: one sequential stream alone leaves memory idle (avx2: 6 x 16 tiles ran 1.4x
// faster at 8 rows). Tiles over 2+ panels read as many streams, which the hardware prefetcher
// keeps up with (prefetching there was slower).
constexpr int64_t kPrefetch = 16;
static_assert(kRows <= 8 && kGroup <= 3 && kTilePanels <= kGroup && kNarrowRows <= kRows);

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

// rows x [MR, K] (row stride ldx) times NV 16-column panels of the packed weight, into out
// (row stride ldo), plus bias. Each output is one fused multiply-add chain over k in order, so a
// row's result does not depend on the other rows of the batch, nor on the tile shape.
template <int MR, int NV>
inline void linear_tile(const float* x, int64_t ldx, const float* panels, int64_t K,
                        const float* bias, float* out, int64_t ldo) {
  constexpr int V = NV * kPanelVectors;  // vectors across the tile's 16 * NV columns
  vf acc[MR][V];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    vf w[V];
    if constexpr (NV == 1) __builtin_prefetch(panels + (k + kPrefetch) * 16);
    for (int p = 0; p < NV; ++p)
      for (int u = 0; u < kPanelVectors; ++u)
        w[p * kPanelVectors + u] = vload(panels + (p * K + k) * 16 + u * kLanes);
    for (int i = 0; i < MR; ++i) {
      const vf a = vbroadcast(x[i * ldx + k]);
      for (int j = 0; j < V; ++j) acc[i][j] = vfma(a, w[j], acc[i][j]);
    }
  }
  for (int j = 0; j < V; ++j) {
    const vf b = bias ? vload(bias + j * kLanes) : vzero();
    for (int i = 0; i < MR; ++i) vstore(out + i * ldo + j * kLanes, vadd(acc[i][j], b));
  }
}

// rows (1..kRows) x NV panels.
template <int NV>
inline void linear_rows(int64_t rows, const float* x, int64_t K, const float* panels,
                        const float* bias, float* out, int64_t N) {
  switch (rows) {
#define HEARTH_ROWS(r) \
  case r: if constexpr (r <= kRows) linear_tile<r, NV>(x, K, panels, K, bias, out, N); break;
    HEARTH_ROWS(8) HEARTH_ROWS(7) HEARTH_ROWS(6) HEARTH_ROWS(5)
    HEARTH_ROWS(4) HEARTH_ROWS(3) HEARTH_ROWS(2) HEARTH_ROWS(1)
#undef HEARTH_ROWS
    default: break;
  }
}

// rows (1..kRows) x count (1..kGroup) panels.
inline void linear_span(int64_t rows, int64_t count, const float* x, int64_t K,
                        const float* panels, const float* bias, float* out, int64_t N) {
  if constexpr (kGroup >= 3) {
    if (count == 3) return linear_rows<3>(rows, x, K, panels, bias, out, N);
  }
  if constexpr (kGroup >= 2) {
    if (count == 2) return linear_rows<2>(rows, x, K, panels, bias, out, N);
  }
  linear_rows<1>(rows, x, K, panels, bias, out, N);
}

// All M rows times one group of count (<= kGroup) panels: the group's panels stay in cache
// while the row tiles pass over them.
void linear_group(const float* x, int64_t M, int64_t K, const float* panels, int64_t count,
                  const float* bias, float* out, int64_t N) {
  for (int64_t m = 0; m < M; m += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, M - m);
    const float* xm = x + m * K;
    float* om = out + m * N;
    if (rows <= kNarrowRows) {
      linear_span(rows, count, xm, K, panels, bias, om, N);
      continue;
    }
    for (int64_t p = 0; p < count; p += kTilePanels) {
      linear_span(rows, std::min<int64_t>(kTilePanels, count - p), xm, K, panels + p * K * 16,
                  bias ? bias + p * 16 : nullptr, om + p * 16, N);
    }
  }
}

}  // namespace

// The instruction set this build was compiled for: "avx512", "avx2" or "generic".
extern "C" const char* hearth_isa() { return kIsa; }

// out [M, N] = x [M, K] @ W^T + bias, W [N, K] packed as [N / 16, K, 16] (N % 16 == 0): each
// 16-column panel is one contiguous stream, read from memory once per call.
extern "C" void hearth_linear_f32(const float* x, const float* packed, const float* bias,
                                  float* out, int64_t M, int64_t K, int64_t N, int threads) {
  const int64_t chunks = N / 16;
  const int64_t groups = (chunks + kGroup - 1) / kGroup;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * kGroup;
    linear_group(x, M, K, packed + first * K * 16, std::min<int64_t>(kGroup, chunks - first),
                 bias ? bias + first * 16 : nullptr, out + first * 16, N);
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
