// Matrix-vector products for decoding (1-8 input rows) that read the weights near the memory floor.
//
// At batch 1 a linear layer is a stream of weight bytes: the work per byte is tiny, so the kernel's only
// job is to keep that stream going, which PyTorch's bf16 F.linear does at ~15 GB/s on a 2-core
// AVX512-BF16 CPU. bf16 weights: AVX512-BF16 dot products. int8 weights: converted to bf16 in registers
// (exact for |q| <= 127), then the same dot products (fp32 input rows: converted to fp32 instead). One
// input row runs two independent chains per weight row, or four weight rows at a time when it is wide;
// several input rows share each loaded and converted weight vector. Accumulation is fp32 throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t kSlice = 32;  // weight rows per parallel task (at least)
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

// One weight row against M input rows. M == 1 keeps two chains of dot products in flight; with more
// rows each row's chain is independent, and each weight vector is loaded once for all of them.
template <int M>
void bf16_row(const uint16_t* X, int64_t K, const uint16_t* wr, float* out, int64_t stride) {
  const int64_t K32 = K / 32 * 32;
  __m512 acc[M];
  __m512 extra = _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  if (M == 1) {
    for (; k + 64 <= K32; k += 64) {
      acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(wr + k), (__m512bh)_mm512_loadu_si512(X + k));
      extra = _mm512_dpbf16_ps(extra, (__m512bh)_mm512_loadu_si512(wr + k + 32),
                               (__m512bh)_mm512_loadu_si512(X + k + 32));
    }
  }
  for (; k < K32; k += 32) {
    __m512bh w = (__m512bh)_mm512_loadu_si512(wr + k);
    for (int m = 0; m < M; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_loadu_si512(X + m * K + k));
  }
  acc[0] = _mm512_add_ps(acc[0], extra);
  for (int m = 0; m < M; ++m) {
    float total = _mm512_reduce_add_ps(acc[m]);
    for (int64_t j = K32; j < K; ++j) total += bf16_to_float(wr[j]) * bf16_to_float(X[m * K + j]);
    out[m * stride] = total;
  }
}

template <int M>
void int8_row(const float* X, int64_t K, const int8_t* wr, float scale, float* out, int64_t stride) {
  // 256-bit lanes: on CPUs that split 512-bit ops in two (Zen 4) the int8 -> fp32 conversions are the
  // bottleneck, and independent chains keep both vector ports busy. Each weight is converted once.
  __m256 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k));
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * K + k), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * K + k + 8), acc[m][1]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float total = reduce256(_mm256_add_ps(acc[m][0], acc[m][1]));
    for (int64_t j = k; j < K; ++j) total += X[m * K + j] * static_cast<float>(wr[j]);
    out[m * stride] = total * scale;
  }
}


// int8 weights against bf16 rows: each 32 weights converted once to bf16 (exact for |q| <= 127), then
// one AVX512-BF16 dot product per input row.
template <int M>
void int8_bf16_row(const uint16_t* X, int64_t K, const int8_t* wr, float scale, float* out, int64_t stride) {
  __m512 acc[M];
  __m512 extra = _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  if (M == 1) {  // two independent chains
    for (; k + 64 <= K; k += 64) {
      __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + 32));
      __m512bh w0 = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b0, 1))),
                                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b0))));
      __m512bh w1 = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b1, 1))),
                                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b1))));
      acc[0] = _mm512_dpbf16_ps(acc[0], w0, (__m512bh)_mm512_loadu_si512(X + k));
      extra = _mm512_dpbf16_ps(extra, w1, (__m512bh)_mm512_loadu_si512(X + k + 32));
    }
  }
  for (; k + 32 <= K; k += 32) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);
    for (int m = 0; m < M; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_loadu_si512(X + m * K + k));
  }
  acc[0] = _mm512_add_ps(acc[0], extra);
  for (int m = 0; m < M; ++m) {
    float total = _mm512_reduce_add_ps(acc[m]);
    for (int64_t j = k; j < K; ++j) total += bf16_to_float(X[m * K + j]) * static_cast<float>(wr[j]);
    out[m * stride] = total * scale;
  }
}


// One input row against four weight rows at once: four independent dot-product chains and one load of
// x per step (at Bloom-176B width a single chain leaves the int8 conversions waiting on its latency).
void int8_bf16_four(const uint16_t* X, int64_t K, const int8_t* w0, const float* S, float* out) {
  __m512 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv = (__m512bh)_mm512_loadu_si512(X + k);
    for (int r = 0; r < 4; ++r) {
      __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + r * K + k));
      __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      acc[r] = _mm512_dpbf16_ps(acc[r], _mm512_cvtne2ps_pbh(hi, lo), xv);
    }
  }
  for (int r = 0; r < 4; ++r) {
    float total = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = k; j < K; ++j) total += bf16_to_float(X[j]) * static_cast<float>(w0[r * K + j]);
    out[r] = total * S[r];
  }
}

void bf16_four(const uint16_t* X, int64_t K, const uint16_t* w0, float* out) {
  __m512 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv = (__m512bh)_mm512_loadu_si512(X + k);
    for (int r = 0; r < 4; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w0 + r * K + k), xv);
  }
  for (int r = 0; r < 4; ++r) {
    float total = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = k; j < K; ++j) total += bf16_to_float(X[j]) * bf16_to_float(w0[r * K + j]);
    out[r] = total;
  }
}

// Rows [0, N) in groups of four (the rest one by one), for a single input row.
template <typename Four, typename One>
void over_rows_by_four(int64_t N, const Four& four, const One& one) {
  at::parallel_for(0, (N + 3) / 4, kSlice / 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = 4 * g;
      if (n + 4 <= N) four(n);
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

}  // namespace

// y [M, N] (x's dtype) = x [M, K] (bf16) @ w [N, K].T (bf16)
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 x and w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xc = x.contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const uint16_t* X = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* Y = out.data_ptr<float>();
#define SLOWLLM_BF16(R) over_rows(N, [&](int64_t n) { bf16_row<R>(X, K, W + n * K, Y + n, N); })
  if (M == 1 && K >= kFourRowsMinK) {
    over_rows_by_four(N, [&](int64_t n) { bf16_four(X, K, W + n * K, Y + n); },
                      [&](int64_t n) { bf16_row<1>(X, K, W + n * K, Y + n, N); });
  } else {
    SLOWLLM_DISPATCH(M, SLOWLLM_BF16)
  }
  return out.to(x.scalar_type());
}

// y [M, N] (x's dtype) = (x [M, K] @ q [N, K].T) * scale [N]; q int8, x bf16/fp16/fp32
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  check(x, q);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.numel() == q.size(0), "int8 q and one scale per row");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto xf = x.to(torch::kFloat).contiguous();
  auto sf = scale.to(torch::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const float* X = xf.data_ptr<float>();
  const int8_t* Q = q.data_ptr<int8_t>();
  const float* S = sf.data_ptr<float>();
  float* Y = out.data_ptr<float>();
#define SLOWLLM_INT8(R) over_rows(N, [&](int64_t n) { int8_row<R>(X, K, Q + n * K, S[n], Y + n, N); })
  SLOWLLM_DISPATCH(M, SLOWLLM_INT8)
  return out.to(x.scalar_type());
}
// y [M, N] (bf16) = (x [M, K] (bf16) @ q [N, K].T) * scale [N]; q int8
torch::Tensor int8_bf16_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  check(x, q);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kChar, "bf16 x, int8 q");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto xc = x.contiguous();
  auto sf = scale.to(torch::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const uint16_t* X = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const int8_t* Q = q.data_ptr<int8_t>();
  const float* S = sf.data_ptr<float>();
  float* Y = out.data_ptr<float>();
#define SLOWLLM_INT8BF(R) over_rows(N, [&](int64_t n) { int8_bf16_row<R>(X, K, Q + n * K, S[n], Y + n, N); })
  if (M == 1 && K >= kFourRowsMinK) {
    over_rows_by_four(N, [&](int64_t n) { int8_bf16_four(X, K, Q + n * K, S + n, Y + n); },
                      [&](int64_t n) { int8_bf16_row<1>(X, K, Q + n * K, S[n], Y + n, N); });
  } else {
    SLOWLLM_DISPATCH(M, SLOWLLM_INT8BF)
  }
  return out.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "bf16 x [M, K] @ bf16 w [N, K].T, fp32 accumulation");
  m.def("int8_bf16_gemv", &int8_bf16_gemv, "bf16 x [M, K] @ (int8 q [N, K] * scale [N]).T, fp32 accumulation");
  m.def("int8_gemv", &int8_gemv, "fp32 x [M, K] @ (int8 q [N, K] * scale [N]).T, fp32 accumulation");
}
