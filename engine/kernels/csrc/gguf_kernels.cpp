// Linear layers over GGUF (ggml) weight blocks, for CPU serving of GGUF models.
//
// Block formats (ggml's ggml-common.h, block_q4_1 / block_q8_0; gguf-py's gguf/quants.py):
//   Q4_1: 32 weights along K: fp16 d, fp16 m, 16 bytes qs; weight j = d * q_j + m where
//         q_j = qs[j] & 15 for j < 16 and qs[j - 16] >> 4 for j >= 16.
//   Q8_0: 32 weights along K: fp16 d, 32 int8 q; weight j = d * q_j.
// hearth repacks them at load (engine/quantization/gguf_weights.py) into two arrays per weight [N, K]:
//   qs     uint8 [N, K/32, 16] (Q4_1) or int8 [N, K/32, 32] (Q8_0): each output row contiguous,
//   scales fp16  [N, K/32, 2] (d, m: Q4_1) or [N, K/32] (d: Q8_0),
// so the quantized bytes stream 16- or 32-byte aligned and the scales convert 8/16 at a time.
//
// Each weight is dequantized in registers exactly (d * q is exact in float32 for a 4- or
// 8-bit q, so the FMA d * q + m rounds once, like ggml's and gguf-py's dequantization) and
// multiplied with float32 activations: the result is the float32 matmul over the dequantized
// weights up to the summation order. Every output of every row is one fixed-order chain of
// FMAs (lane accumulators over alternating blocks, then a fixed reduction), the same whether the
// row is computed alone or in a tile of R rows and whichever thread computes it: a row's result
// does not depend on the batch. Built once per ISA (-mavx512f... or -mavx2 -mfma -mf16c);
// hearth_isa() names the build.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HEARTH_GGUF_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HEARTH_GGUF_ISA "avx2"
#else
#error "gguf_kernels.cpp needs -mavx2 -mfma -mf16c or -mavx512f -mavx512bw"
#endif

namespace {

constexpr int64_t kChunk = 8;  // outputs per work item: their blocks stay in cache across tiles

// Scales of `rows` outputs (fp16, `per_row` each) to float32 in `out`.
void convert_scales(const uint16_t* src, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) out[i] = _cvtsh_ss(src[i]);
}

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kTile = 4;  // rows per register tile: 4 rows x 4 accumulators = 16 zmm

inline float hsum(Vec a, Vec b, Vec c, Vec d) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

// Dequantized block b of a Q4_1 row: weights 0..15 in w[0], 16..31 in w[1].
inline void q4_1_block(const uint8_t* qs, float d, float m, Vec* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, nib);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nib);
  const Vec vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
  w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vd, vm);
  w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vd, vm);
}

inline void q8_0_block(const int8_t* qs, float d, Vec* w) {
  const Vec vd = _mm512_set1_ps(d);
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16));
  w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), vd);
  w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), vd);
}

constexpr int kParts = 2;  // vectors per block
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec zero() { return _mm512_setzero_ps(); }
#else
using Vec = __m256;
constexpr int kTile = 2;  // rows per register tile: 2 rows x 8 accumulators = 16 ymm (spills 2)

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void q4_1_block(const uint8_t* qs, float d, float m, Vec* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, nib);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nib);
  const Vec vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
}

inline void q8_0_block(const int8_t* qs, float d, Vec* w) {
  const Vec vd = _mm256_set1_ps(d);
  for (int p = 0; p < 4; ++p) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * p));
    w[p] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), vd);
  }
}

constexpr int kParts = 4;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec zero() { return _mm256_setzero_ps(); }
#endif

// Accumulators per row: kParts vectors per block; AVX-512 alternates two sets over even and
// odd blocks (4 independent FMA chains per row, as AVX2 has with its 4 parts).
#if defined(__AVX512F__)
constexpr int kSets = 2;
#else
constexpr int kSets = 1;
#endif
constexpr int kAcc = kParts * kSets;
constexpr int kWidth = 32 / kParts;  // floats per vector

inline float reduce(const Vec* acc) {
#if defined(__AVX512F__)
  return hsum(acc[0], acc[1], acc[2], acc[3]);
#else
  return hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
}

// Block b of a weight row, dequantized into w.
template <bool Q4>
inline void block(const uint8_t* qs, const float* scales, int64_t b, Vec* w) {
  if constexpr (Q4) {
    q4_1_block(qs + b * 16, scales[2 * b], scales[2 * b + 1], w);
  } else {
    q8_0_block(reinterpret_cast<const int8_t*>(qs) + b * 32, scales[b], w);
  }
}

// acc[r][set + p] += w[p] * x[r][b * 32 + p * kWidth ...]
template <int R, int Set>
inline void accumulate(Vec (*acc)[kAcc], const Vec* w, const float* x, int64_t K, int64_t b) {
  for (int r = 0; r < R; ++r) {
    const float* xb = x + r * K + b * 32;
    for (int p = 0; p < kParts; ++p)
      acc[r][Set + p] = fma(w[p], load(xb + p * kWidth), acc[r][Set + p]);
  }
}

// One output (one weight row of nb blocks) for R rows of x: out[r * ldo] = x[r] . w (+ bias).
// With two accumulator sets, even blocks go to the first and odd blocks to the second.
template <int R, bool Q4>
inline void dot_rows(const float* x, int64_t K, const uint8_t* qs, const float* scales,
                     int64_t nb, float bias, float* out, int64_t ldo) {
  Vec acc[R][kAcc];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < kAcc; ++a) acc[r][a] = zero();
  Vec w[kParts];
  int64_t b = 0;
  if constexpr (kSets == 2) {
    for (; b + 2 <= nb; b += 2) {
      block<Q4>(qs, scales, b, w);
      accumulate<R, 0>(acc, w, x, K, b);
      block<Q4>(qs, scales, b + 1, w);
      accumulate<R, kParts>(acc, w, x, K, b + 1);
    }
  }
  for (; b < nb; ++b) {
    block<Q4>(qs, scales, b, w);
    accumulate<R, 0>(acc, w, x, K, b);
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = reduce(acc[r]) + bias;
}

template <bool Q4>
void linear_blocks(const float* x, const uint8_t* qs, const uint16_t* scales, const float* bias,
                   float* out, int64_t M, int64_t K, int64_t N, int threads) {
  const int64_t nb = K / 32;
  const int64_t qs_row = nb * (Q4 ? 16 : 32);      // bytes of one output's blocks
  const int64_t sc_row = nb * (Q4 ? 2 : 1);        // fp16 scales of one output
  const int64_t chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> sc(kChunk * sc_row);  // the chunk's scales in float32
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
      convert_scales(scales + n0 * sc_row, (n1 - n0) * sc_row, sc.data());
      int64_t m = 0;
      for (; m + kTile <= M; m += kTile) {
        for (int64_t n = n0; n < n1; ++n)
          dot_rows<kTile, Q4>(x + m * K, K, qs + n * qs_row, sc.data() + (n - n0) * sc_row, nb,
                              bias ? bias[n] : 0.f, out + m * N + n, N);
      }
      for (; m < M; ++m) {
        for (int64_t n = n0; n < n1; ++n)
          dot_rows<1, Q4>(x + m * K, K, qs + n * qs_row, sc.data() + (n - n0) * sc_row, nb,
                          bias ? bias[n] : 0.f, out + m * N + n, N);
      }
    }
  }
}

}  // namespace

extern "C" const char* hearth_gguf_isa() { return HEARTH_GGUF_ISA; }

// out [M, N] = x [M, K] @ W^T (+ bias [N]), W in repacked Q4_1 blocks; K % 32 == 0.
extern "C" void hearth_linear_q4_1(const float* x, const uint8_t* qs, const uint16_t* scales,
                                   const float* bias, float* out, int64_t M, int64_t K,
                                   int64_t N, int threads) {
  linear_blocks<true>(x, qs, scales, bias, out, M, K, N, threads);
}

// out [M, N] = x [M, K] @ W^T (+ bias [N]), W in repacked Q8_0 blocks; K % 32 == 0.
extern "C" void hearth_linear_q8_0(const float* x, const uint8_t* qs, const uint16_t* scales,
                                   const float* bias, float* out, int64_t M, int64_t K,
                                   int64_t N, int threads) {
  linear_blocks<false>(x, qs, scales, bias, out, M, K, N, threads);
}
