// Matrix products for decoding (a few input rows: one per sequence, or per drafted position) that read
// the weights near the memory floor.
//
// At batch 1 a linear layer is a stream of weight bytes: the work per byte is tiny, so the kernel's only
// job is to keep that stream going, which PyTorch's bf16 F.linear does at ~15 GB/s on a 2-core
// AVX512-BF16 CPU. bf16 weights: AVX512-BF16 dot products. int8 weights: converted to bf16 in registers
// (exact for |q| <= 127), then the same dot products (fp32 input rows: converted to fp32 instead). One
// input row runs two independent chains per weight row, or four weight rows at a time when it is wide;
// several input rows run in tiles of R weight rows x M input rows (R x M chains, each weight vector
// loaded and converted once per tile, each input vector once per R rows). Accumulation is fp32 throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t kSlice = 32;  // weight rows per parallel task (at least)
constexpr int64_t kMaxTileRows = 8;  // input rows per tile; more run in groups of 8
// One input row of at least this many values (24 KB in bf16) no longer stays in L1 beside the streaming
// weights: then four weight rows share each load of it (measured, int8 at Bloom-176B shapes: 24 GB/s
// instead of 14). Below it one row at a time with two chains is faster (29 GB/s instead of 12 at K=2048).
constexpr int64_t kFourRowsMinK = 12288;

float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void check(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x [M, K], w [N, K]");
  TORCH_CHECK(w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(), "contiguous CPU tensors");
}

float reduce256(__m256 a) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  r = _mm_hadd_ps(r, r);
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(r);
}

// int8 weights are converted to bf16 in registers, 32 at a time (exact for |q| <= 127), then go through
// the same AVX512-BF16 dot products as bf16 weights.
__m512bh int8_to_bf16(const int8_t* w) {
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1))),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b))));
}

// How a weight type is read: 32 weights as bf16 for the dot products (`load`), 16 as two fp32 vectors
// for fp32 input rows (`load16`: exact for both types; a bf16 value is the top half of the fp32 with the
// same value), one as a float (the tails); and how many weight rows a bf16 tile takes for M input rows
// (measured at 1b7 shapes, 2 cores: the best of 2-8; beyond R x M = 32 the accumulators no longer fit the
// 32 vector registers).
struct Bf16Weights {
  using T = uint16_t;
  static __m512bh load(const T* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static void load16(const T* w, __m256& w0, __m256& w1) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(b)), 16));
    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(b, 1)), 16));
  }
  static float value(T w) { return bf16_to_float(w); }
  static constexpr int rows_per_tile(int M) { return M == 1 ? 4 : M <= 4 ? 8 : 4; }
};
struct Int8Weights {
  using T = int8_t;
  static __m512bh load(const T* w) { return int8_to_bf16(w); }
  static void load16(const T* w, __m256& w0, __m256& w1) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  }
  static float value(T w) { return static_cast<float>(w); }
  static constexpr int rows_per_tile(int M) { return M == 1 ? 4 : M <= 3 ? 6 : 4; }
};

// One weight row against one input row, two chains of dot products in flight (at small K this beats
// four weight rows at once: 29 GB/s instead of 12 at K=2048, measured). S: the row's scale, or null.
template <typename Weights>
void row(const uint16_t* X, int64_t K, const typename Weights::T* wr, const float* S, float* out) {
  __m512 acc = _mm512_setzero_ps(), extra = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    acc = _mm512_dpbf16_ps(acc, Weights::load(wr + k), (__m512bh)_mm512_loadu_si512(X + k));
    extra = _mm512_dpbf16_ps(extra, Weights::load(wr + k + 32), (__m512bh)_mm512_loadu_si512(X + k + 32));
  }
  for (; k + 32 <= K; k += 32)
    acc = _mm512_dpbf16_ps(acc, Weights::load(wr + k), (__m512bh)_mm512_loadu_si512(X + k));
  float total = _mm512_reduce_add_ps(_mm512_add_ps(acc, extra));
  for (int64_t j = k; j < K; ++j) total += bf16_to_float(X[j]) * Weights::value(wr[j]);
  *out = S ? total * *S : total;
}

// fp32 input rows (fp32 activations on int8 blocks; the LM head's fp32 hidden states, where logits must
// not see bf16 rounding) against bf16 or int8 weights, converted to fp32 in registers (exact for both):
// the same numbers as converting the matrix and a dense fp32 GEMM, up to summation order, without
// writing and re-reading a float copy of it (Bloom's head: 2 GB at hidden 2048, 14 GB at 14336).
// 256-bit lanes: on CPUs that split 512-bit ops in two (Zen 4) the conversions are the bottleneck, and
// independent chains keep both vector ports busy. Each weight is converted once per M input rows.
template <int M, typename Weights>
void fp32_row(const float* X, int64_t K, const typename Weights::T* wr, const float* S, float* out, int64_t stride) {
  __m256 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 w0, w1;
    Weights::load16(wr + k, w0, w1);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * K + k), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * K + k + 8), acc[m][1]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float total = reduce256(_mm256_add_ps(acc[m][0], acc[m][1]));
    for (int64_t j = k; j < K; ++j) total += X[m * K + j] * Weights::value(wr[j]);
    out[m * stride] = S ? total * *S : total;
  }
}

// R weight rows against M input rows: R x M independent chains; each weight vector is loaded once for
// the M rows and each input vector once for the R weight rows. With several input rows the dot products,
// not the memory, are the limit (Zen 4: one 512-bit bf16 dot product per 2 cycles), and R x M chains
// keep them all busy: at 1b7 shapes, 4 rows went from 35 to 17 ms per 600M weights, 8 rows from 50 to
// 27 (MKL's F.linear: 33 and 38). int8 weights are converted once per tile; at one input row and
// Bloom-176B width, four weight rows per input load keep the conversions from waiting on one chain's
// latency (int8: 14 -> 24 GB/s).
// y[m, r] = x[m] . w[r] (times S[r] when scales are given), for R weight rows and M input rows
template <int M, int R, typename Weights>
void tile(const uint16_t* X, int64_t K, const typename Weights::T* W, const float* S, float* Y, int64_t stride) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh w[R];
    for (int r = 0; r < R; ++r) w[r] = Weights::load(W + r * K + k);
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(X + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w[r], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float total = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = k; j < K; ++j) total += bf16_to_float(X[m * K + j]) * Weights::value(W[r * K + j]);
      Y[m * stride + r] = S ? total * S[r] : total;
    }
}

// Rows [0, N) in tiles of R (the rest one by one), a parallel task per kSlice rows at least.
template <int R, typename Tile, typename One>
void over_tiles(int64_t N, const Tile& whole, const One& one) {
  at::parallel_for(0, (N + R - 1) / R, std::max<int64_t>(1, kSlice / R), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = R * g;
      if (n + R <= N) whole(n);
      else for (int64_t r = n; r < N; ++r) one(r);
    }
  });
}

template <typename Row>
void over_rows(int64_t N, const Row& row) {
  at::parallel_for(0, N, kSlice, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) row(n);
  });
}

#define SLOWLLM_DISPATCH(M, CALL)                                  \
  switch (M) {                                                     \
    case 1: CALL(1); break; case 2: CALL(2); break;                \
    case 3: CALL(3); break; case 4: CALL(4); break;                \
    case 5: CALL(5); break; case 6: CALL(6); break;                \
    case 7: CALL(7); break; case 8: CALL(8); break;                \
    default: TORCH_CHECK(false, "at most 8 input rows");           \
  }

// body(X, Y, rows) for each group of up to kMaxTileRows input rows of X0 [M, K] and their outputs Y0 [M, N]
template <typename In, typename Body>
void in_row_groups(const In* X0, int64_t M, int64_t K, float* Y0, int64_t N, const Body& body) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTileRows)
    body(X0 + m0 * K, Y0 + m0 * N, std::min<int64_t>(kMaxTileRows, M - m0));
}

// Y [M, N] = X [M, K] (bf16) @ W [N, K].T (times S[n] when scales are given), 8 input rows at a time:
// tiles of Weights::rows_per_tile weight rows, the rest row by row.
template <typename Weights>
void matmul(const uint16_t* X0, int64_t M, int64_t K, const typename Weights::T* W, const float* S, float* Y0,
            int64_t N) {
  in_row_groups(X0, M, K, Y0, N, [&](const uint16_t* X, float* Y, int64_t rows) {
    auto one = [&](int64_t n) {
      const float* s = S ? S + n : nullptr;
      if (rows == 1) row<Weights>(X, K, W + n * K, s, Y + n);
      else for (int64_t m = 0; m < rows; ++m) tile<1, 1, Weights>(X + m * K, K, W + n * K, s, Y + m * N + n, N);
    };
    if (rows == 1 && K < kFourRowsMinK) {
      over_tiles<1>(N, one, one);
    } else {
#define SLOWLLM_TILES(R) over_tiles<Weights::rows_per_tile(R)>(N, [&](int64_t n) { \
        tile<R, Weights::rows_per_tile(R), Weights>(X, K, W + n * K, S ? S + n : nullptr, Y + n, N); }, one)
      SLOWLLM_DISPATCH(rows, SLOWLLM_TILES)
    }
  });
}

// Y [M, N] = X [M, K] (fp32) @ W [N, K].T (times S[n] when scales are given), 8 input rows at a time.
template <typename Weights>
void fp32_matmul(const float* X0, int64_t M, int64_t K, const typename Weights::T* W, const float* S, float* Y0,
                 int64_t N) {
  in_row_groups(X0, M, K, Y0, N, [&](const float* X, float* Y, int64_t rows) {
#define SLOWLLM_FP32(R) over_rows(N, [&](int64_t n) { \
      fp32_row<R, Weights>(X, K, W + n * K, S ? S + n : nullptr, Y + n, N); })
    SLOWLLM_DISPATCH(rows, SLOWLLM_FP32)
  });
}

}  // namespace

// y [M, N] (x's dtype) = x [M, K] (bf16) @ w [N, K].T (bf16); more than 8 rows run 8 at a time
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 x and w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xc = x.contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  matmul<Bf16Weights>(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K,
                      reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), nullptr, out.data_ptr<float>(), N);
  return out.to(x.scalar_type());
}

// y [M, N] (x's dtype) = (x [M, K] @ q [N, K].T) * scale [N]; q int8, x bf16/fp16/fp32, 8 rows at a time
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  check(x, q);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.numel() == q.size(0), "int8 q and one scale per row");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto xf = x.to(torch::kFloat).contiguous();
  auto sf = scale.to(torch::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  fp32_matmul<Int8Weights>(xf.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), sf.data_ptr<float>(), out.data_ptr<float>(), N);
  return out.to(x.scalar_type());
}

// y [M, N] (fp32) = x [M, K] (fp32) @ w [N, K].T (bf16), each weight exact in fp32; 8 rows at a time
torch::Tensor bf16_fp32_gemv(torch::Tensor x, torch::Tensor w) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kBFloat16, "fp32 x, bf16 w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xc = x.contiguous();
  auto out = torch::empty({M, N}, x.options());
  fp32_matmul<Bf16Weights>(xc.data_ptr<float>(), M, K, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                        nullptr, out.data_ptr<float>(), N);
  return out;
}

// y [M, N] (bf16) = (x [M, K] (bf16) @ q [N, K].T) * scale [N]; q int8; more than 8 rows run 8 at a
// time (still faster than converting the weight for a dense GEMM up to ~32 rows: 47 vs 101 ms at 16)
torch::Tensor int8_bf16_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  check(x, q);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kChar, "bf16 x, int8 q");
  TORCH_CHECK(scale.numel() == q.size(0), "one scale per row");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto xc = x.contiguous();
  auto sf = scale.to(torch::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  matmul<Int8Weights>(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K, q.data_ptr<int8_t>(),
                      sf.data_ptr<float>(), out.data_ptr<float>(), N);
  return out.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "bf16 x [M, K] @ bf16 w [N, K].T, fp32 accumulation");
  m.def("int8_bf16_gemv", &int8_bf16_gemv, "bf16 x [M, K] @ (int8 q [N, K] * scale [N]).T, fp32 accumulation");
  m.def("int8_gemv", &int8_gemv, "fp32 x [M, K] @ (int8 q [N, K] * scale [N]).T, fp32 accumulation");
  m.def("bf16_fp32_gemv", &bf16_fp32_gemv, "fp32 x [M, K] @ bf16 w [N, K].T, fp32 throughout");
}
