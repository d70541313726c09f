// bf16 and fp32 weights: the weight types (Bf16Weights, Fp32Weights) and the products that read them.
// - fp32 input rows (fp32_matmul): one at a time (fp32_one_row_tile), several in 512-bit tiles (fp32_tile)
//   on the AVX-512 builds or in _rows_avx2.h's tiles on the AVX2 ones. Every input row of the AVX2 builds
//   comes this way (bf16 rows widened to fp32 once per call); on the others, fp32 rows (the LM head's).
// - bf16 input rows on the AVX-512 builds (bf16_matmul): AVX512-BF16 dot products (AMX tiles: _amx.h).
// Included by _kernels.cpp inside its anonymous namespace, after the tile walk (_walk.h).
#pragma once

// How a weight type is read: 16 as two fp32 vectors (`load16`: exact for both types; a bf16 value is the
// top half of the fp32 with the same value; kEvenOdd: in which order), one as a float (the tails), and on avx512bf16 32 as bf16
// for the dot products (`load`), with how many weight rows a tile takes for M input rows (measured at 1b7
// shapes, 2 cores: the best of 2-8; beyond R x M = 32 the accumulators no longer fit the 32 registers).
struct Bf16Weights {
  using T = uint16_t;
  // 16 weights in one load: the 32-bit lane i holds weights 2i (low half) and 2i+1 (high half); a shift
  // and a mask make them two fp32 vectors without a shuffle (shuffles share one port with the loads'
  // conversions on most x86 cores). The input rows are stored in the same even/odd order (kEvenOdd).
  static constexpr bool kEvenOdd = true;
  static __m256 half8(__m256i b, int half) {  // (0: the even weights, 1: the odd ones, as fp32)
    return _mm256_castsi256_ps(half ? _mm256_and_si256(b, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))
                                    : _mm256_slli_epi32(b, 16));
  }
  static void load16(const T* w, __m256& even, __m256& odd) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    even = half8(b, 0);
    odd = half8(b, 1);
  }
  // load16's vector `half` alone: for tiles that hold one of them at a time (_rows_avx2.h)
  static __m256 load8(const T* w, int half) {
    return half8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), half);
  }
  static float value(T w) { return bf16_to_float(w); }
#if defined(SLOWLLM_AVX512BF16)
  static __m512 wide16(const T* w) {  // 16 weights as fp32, in order (a bf16 is the top half of its fp32)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(w))), 16));
  }
  static __m512bh load(const T* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static constexpr int rows_per_tile(int M) { return M == 1 ? 4 : M <= 4 ? 8 : 4; }
#endif
};

// fp32 weights as they are (a fp32 checkpoint's LM head at the coordinator): no conversion, the same loops,
// so a row's logits do not depend on the rows batched beside it, which PyTorch's fp32 GEMM does not give
// (up to 7e-5 apart between 8 rows and each alone, measured).
struct Fp32Weights {
  using T = float;
  static constexpr bool kEvenOdd = false;
  static void load16(const T* w, __m256& w0, __m256& w1) {
    w0 = _mm256_loadu_ps(w);
    w1 = _mm256_loadu_ps(w + 8);
  }
  static __m256 load8(const T* w, int half) { return _mm256_loadu_ps(w + 8 * half); }
  static float value(T w) { return w; }
#if defined(SLOWLLM_AVX512BF16)
  static __m512 wide16(const T* w) { return _mm512_loadu_ps(w); }
#endif
};

// fp32 input rows against bf16 or fp32 weights, converted to fp32 in registers (exact): the
// same numbers as converting the matrix and a dense fp32 GEMM, up to summation order, without writing
// and re-reading a float copy of it (Bloom's head: 2 GB at hidden 2048, 14 GB at 14336). 256-bit lanes:
// on CPUs that split 512-bit ops in two (Zen 4) the conversions are the bottleneck, and independent
// chains keep both vector ports busy. Each weight is converted once per M input rows. Every row sums in the
// same order whatever M is, so a row's numbers do not depend on the rows batched beside it.
//
// Weight rows against one fp32 input row, kOneRowTile at a time: each input vector loaded once for them,
// several chains in flight (a converted row no longer waits on its chains' latency: 63 -> 46 ms per 600M
// int8 weights on AVX2, when int8 weights came here, measured with four chains). With one chain per row
// (AVX2 builds) six rows: weights in cache, one core, 4 rows read 24, 6 rows 25, 8 rows 23 G weights/s
// (4 rows x 2 chains: 28), streamed from memory alike in this VM's slow-memory turns. In its fast turns
// (~60 GB/s) a tile's streams count too (one per row, per thread), and where the input row is short
// (by_input) 4 rows read faster (the 96 block linears and head of a bloom-1b7 token at one row, avx2
// build, both variants in one process in turns, three sets: 0.905x, 0.939x and 0.975x the time); where it
// is long, as at Bloom-176B's width (57 and 229 KB in fp32), each tile reads it again from L2, and 4 rows
// took 1.01-1.13x 6 rows' time; bloom-1b7's 4h -> h (32 KB fp32 rows), the 96 block linears in block
// order, fast turns only, each height against 6 in one process in turns: 4 rows 1.029x (2,456 turns), 8
// rows 1.013x (1,879). Each row sums exactly as a tile of one does (the rows left over), so a row's
// numbers are the same whether it ran here or there.
constexpr int kOneRowTile = kChains == 2 ? 4 : 6;

// Weight rows per tile for one input row read as `input_bytes` a pass (fp32 rows, int8's byte planes):
// 4 while the input row fits in half of L1 (bloom-1b7's 8 KB fp32 rows, its int8 planes of 4-16 KB), else
// kWide (kOneRowTile; VNNI's 6), whose longer tiles read a long input row (Bloom-176B's) fewer times.
constexpr int64_t kShortInputBytes = 16384;
template <int kWide = kOneRowTile, typename Body>
void by_input(int64_t input_bytes, const Body& body) {
  if (input_bytes <= kShortInputBytes) body(std::integral_constant<int, std::min(4, kWide)>{});
  else body(std::integral_constant<int, kWide>{});
}
template <int R, typename Weights, int kFetch = kTiles>
void fp32_one_row_tile(const float* X, int64_t K, const typename Weights::T* W, const float* S, float* out, int64_t rs = 1) {
  __m256 acc[R][kChains];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kChains; ++c) acc[r][c] = _mm256_setzero_ps();
  auto step = [&](int64_t k) {
    const __m256 x0 = _mm256_loadu_ps(X + k), x1 = _mm256_loadu_ps(X + k + 8);
    for (int r = 0; r < R; ++r) {
      __m256 w0, w1;
      Weights::load16(W + r * rs * K + k, w0, w1);
      acc[r][0] = _mm256_fmadd_ps(w0, x0, acc[r][0]);
      acc[r][kChains - 1] = _mm256_fmadd_ps(w1, x1, acc[r][kChains - 1]);
    }
  };
  // 64 bytes of each row per iteration, and prefetch_weights' line asked for: no branch in the loop (with one
  // for the prefetches, GCC kept the accumulators in memory: 8 one-chain rows ran at 2/3 the speed)
  constexpr int64_t kLine = 64 / sizeof(typename Weights::T);
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    for (int r = 0; r < R; ++r) prefetch_weights<kFetch>(W, r, R, rs, K, k);
    for (int64_t j = 0; j < kLine; j += 16) step(k + j);
  }
  for (; k + 16 <= K; k += 16) step(k);
  for (int r = 0; r < R; ++r) {
    float total = reduce256(chains_total(acc[r][0], acc[r][kChains - 1]));
    for (int64_t j = k; j < K; ++j) total += X[j] * Weights::value(W[r * rs * K + j]);
    out[r * rs] = S ? total * S[r * rs] : total;
  }
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

// The input rows as the fp32 loops read them, `stride` floats apart: for bf16 weights (kEvenOdd) in the
// order load16 gives the weights, in each full group of 16 the 8 even positions then the 8 odd ones (the
// tail beyond the last full group as it is). In a per-thread buffer that stays allocated (8 rows of 8,192
// floats are 256 KB: a fresh allocation that large is mapped and faulted in again at every call), from a
// 64-byte line on. malloc gives 16 bytes: a mapped chunk (256 KB) starts 16 bytes into its page, a smaller
// one anywhere, so half of the loops' 32-byte loads could straddle two lines, and how many depended on
// where this one buffer landed in each process: the AVX2 builds' 8-row products of bloom-1b7's block
// linears and head, two builds of one source in turns, differed by 5% (0.949, 12 turns; earlier rounds saw
// 6-11% between builds, by which one loaded first); aligned, 1.008, and 0.93-0.94 the misaligned time.
template <typename Weights>
const float* input_rows(const float* X, int64_t M, int64_t K, int64_t stride) {
  thread_local std::vector<float> buffer;
  buffer.resize(M * stride + 16);
  float* const out = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
  for (int64_t m = 0; m < M; ++m) {
    float* row = out + m * stride;
    std::copy_n(X + m * K, K, row);
    if (Weights::kEvenOdd)
      for (int64_t k = 0; k + 16 <= K; k += 16)
        for (int i = 0; i < 8; ++i) {
          row[k + i] = X[m * K + k + 2 * i];
          row[k + 8 + i] = X[m * K + k + 2 * i + 1];
        }
  }
  return out;
}

#include "_rows_avx2.h"  // fp32_rows_matmul: several input rows on the AVX2 builds

#if defined(SLOWLLM_AVX512BF16)
// Several fp32 input rows on the AVX-512 builds: R weight rows x M input rows of 512-bit chains, all in
// registers (32 of them), each weight vector loaded and converted once per tile and each input vector
// once per R weight rows. The 256-bit loops above keep two chains per (weight row, input row) and, with
// 16 registers, their state in memory between chunks: every FMA waited on a load, and 4 rows of a fp32
// head cost 2.2x one row's time (8 rows 3.4x, 10 GB/s where one row reads 22). A 512-bit chain holds
// exactly the lanes of those two chains, summed in the same order, and `fp32_row_total` adds them as
// fp32_one_row_tile does: every output is bit for bit what one row alone gets there, so batching still
// never changes a row's numbers.
template <typename Weights>
float fp32_row_total(__m512 acc) {
  __m256 a, b;  // fp32_one_row_tile's two chains
  if (Weights::kEvenOdd) {  // (its input rows were reordered even/odd: here they are not)
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    a = _mm512_castps512_ps256(_mm512_permutexvar_ps(even, acc));
    b = _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_add_epi32(even, _mm512_set1_epi32(1)), acc));
  } else {
    a = _mm512_castps512_ps256(acc);
    b = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  }
  return reduce256(_mm256_add_ps(a, b));
}

// R weight rows rs apart against M input rows; in a run (kFetch not kTiles) each row asks for its line
// (prefetch_weights), tiles of adjacent rows ask for nothing (as before runs). Runs against adjacent rows
// on the Sapphire Rapids-class VM (bloom-1b7's 96 block linears and head, fp32 rows of bf16 weights, two
// builds in one process in turns, outputs equal): avx512bf16 8 rows 0.754x the time (197.2 against 261.9
// ms), 4 rows 0.715x, 2 rows 0.766x; amx 8 rows 0.725x; at Bloom-176B's width 8 rows 0.787x. (A
// coordinator's LM head for several sessions' fp32 hidden states comes here.)
template <int M, int R, typename Weights, int kFetch = kTiles>
void fp32_tile(const float* X, int64_t K, const typename Weights::T* W, const float* S, float* Y, int64_t stride,
               int64_t rs = 1) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    __m512 w[R];
    for (int r = 0; r < R; ++r) w[r] = Weights::wide16(W + r * rs * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 x = _mm512_loadu_ps(X + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], x, acc[r][m]);
    }
  };
  constexpr int64_t kLine = 64 / sizeof(typename Weights::T);  // (a line a row per iteration: one prefetch each)
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    if constexpr (kFetch != kTiles)
      for (int r = 0; r < R; ++r) prefetch_weights<kFetch>(W, r, R, rs, K, k);
    for (int64_t j = 0; j < kLine; j += 16) step(k + j);
  }
  for (; k + 16 <= K; k += 16) step(k);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float total = fp32_row_total<Weights>(acc[r][m]);
      for (int64_t j = k; j < K; ++j) total += X[m * K + j] * Weights::value(W[r * rs * K + j]);
      Y[m * stride + r * rs] = S ? total * S[r * rs] : total;
    }
}

// weight rows per tile for M input rows: R x M accumulators + R weights + 1 input within 32 registers
constexpr int fp32_tile_rows(int M) { return M <= 4 ? 4 : 3; }

template <typename Weights>
void fp32_matmul_512(const float* X0, int64_t M, int64_t K, const typename Weights::T* W, const float* S, float* Y0,
                     int64_t N) {
  in_row_groups(X0, M, K, Y0, N, [&](const float* X, float* Y, int64_t rows) {
    auto one = [&](int64_t n) {
      for (int64_t m = 0; m < rows; ++m)
        fp32_tile<1, 1, Weights>(X + m * K, K, W + n * K, S ? S + n : nullptr, Y + m * N + n, N);
    };
    // (several input rows, bar the last group of 9 or 17; one row alone takes fp32_one_row_tile): tiles of
    // adjacent rows, or in runs where they ask ahead (run_rows)
#define SLOWLLM_FP32_TILES(R) over_tiles<fp32_tile_rows(R)>(N, run_rows(K * sizeof(typename Weights::T), R), \
      [&](int64_t n, int64_t rs) { by_run(rs, [&](auto run) { \
        fp32_tile<R, fp32_tile_rows(R), Weights, decltype(run)::value>(X, K, W + n * K, S ? S + n : nullptr, Y + n, \
                                                                       N, rs); }); }, one)
    SLOWLLM_DISPATCH(rows, SLOWLLM_FP32_TILES)
  });
}
#endif

// Y [M, N] = X [M, K] (fp32) @ W [N, K].T (times S[n] when scales are given), 8 input rows at a time.
// Every M sums each row in the same order: a row's numbers do not depend on the rows beside it.
template <typename Weights>
void fp32_matmul(const float* X0, int64_t M, int64_t K, const typename Weights::T* W, const float* S, float* Y0,
                 int64_t N) {
  if (M > 1) {
#if defined(SLOWLLM_AVX512BF16)
    return fp32_matmul_512<Weights>(X0, M, K, W, S, Y0, N);  // (the input rows as they are)
#else
    return fp32_rows_matmul<Weights>(X0, M, K, W, S, Y0, N);
#endif
  }
  if (Weights::kEvenOdd) X0 = input_rows<Weights>(X0, 1, K, K);
  // by_input's weight rows at a time for the fp32 row's length, the rest one by one
  by_input(K * sizeof(float), [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    over_tiles<R>(N, run_rows(K * sizeof(typename Weights::T), 1), [&](int64_t n, int64_t rs) {
      by_run(rs, [&](auto run) { fp32_one_row_tile<R, Weights, decltype(run)::value>(X0, K, W + n * K, S ? S + n : nullptr, Y0 + n, rs); });
    }, [&](int64_t n) { fp32_one_row_tile<1, Weights>(X0, K, W + n * K, S ? S + n : nullptr, Y0 + n); });
  });
}

#if defined(SLOWLLM_AVX512BF16)
// R weight rows against M input rows: R x M independent chains of bf16 dot products; each weight vector
// is loaded once for the M rows and each input vector once for the R weight rows. Every
// output sums in ONE order whatever M and R are (one chain over K in 32-wide blocks, then the reduction,
// then the scalar tail), so a row's numbers do not depend on the rows batched beside it: a node merges
// many sessions' steps into one pass and each gets exactly its numbers alone. With several input rows the
// dot products, not the memory, are the limit (Zen 4: one 512-bit bf16 dot product per 2 cycles), and
// R x M chains keep them busy: at 1b7 shapes, 4 rows went from 35 to 17 ms per 600M weights, 8 rows from
// 50 to 27. One input row takes four weight rows at a time (four chains hide each other's latency; a
// second chain per row, which one row at a time needs, would sum in another order than the tiles: 8 rows
// then cost 48 instead of 31 ms per 600M weights here).
// y[m, r] = x[m] . w[r] (times S[r] when scales are given), for R weight rows and M input rows
template <int M, int R, typename Weights, int kFetch = kTiles>
void tile(const uint16_t* X, int64_t K, const typename Weights::T* W, const float* S, float* Y, int64_t stride,
          int64_t rs = 1) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh w[R];
    for (int r = 0; r < R; ++r) {
      prefetch_weights<kFetch>(W, r, R, rs, K, k);
      w[r] = Weights::load(W + r * rs * K + k);
    }
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(X + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w[r], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float total = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = k; j < K; ++j) total += bf16_to_float(X[m * K + j]) * Weights::value(W[r * rs * K + j]);
      Y[m * stride + r * rs] = S ? total * S[r * rs] : total;
    }
}

// Y [M, N] = X [M, K] (bf16) @ W [N, K].T (times S[n] when scales are given), 8 input rows at a time:
// tiles of Weights::rows_per_tile weight rows, the rest row by row.
template <typename Weights>
void bf16_matmul(const uint16_t* X0, int64_t M, int64_t K, const typename Weights::T* W, const float* S, float* Y0,
                 int64_t N) {
  in_row_groups(X0, M, K, Y0, N, [&](const uint16_t* X, float* Y, int64_t rows) {
    auto one = [&](int64_t n) {
      const float* s = S ? S + n : nullptr;
      for (int64_t m = 0; m < rows; ++m) tile<1, 1, Weights>(X + m * K, K, W + n * K, s, Y + m * N + n, N);
    };
    const int64_t row_bytes = K * sizeof(typename Weights::T);
#define SLOWLLM_TILES(R) over_tiles<Weights::rows_per_tile(R)>(N, run_rows(row_bytes, R), [&](int64_t n, int64_t rs) { \
      by_run(rs, [&](auto run) { \
        tile<R, Weights::rows_per_tile(R), Weights, decltype(run)::value>(X, K, W + n * K, S ? S + n : nullptr, Y + n, N, rs); }); }, one)
    SLOWLLM_DISPATCH(rows, SLOWLLM_TILES)
  });
}
#endif
