// int8 weights as int16 dot products (the avx2 build; avx512bf16 and avx2vnni from 2 input rows on): included
// by _int8.h, after the grid, the blocked planes and int_matmul, and (VNNI builds) ByteDots.
//
// The avx2 build (no VNNI) puts the input rows on _int8.h's grid, as signed 16-bit integers (bf16: s itself;
// fp32: s >> 8 and s & 255, two planes), and multiplies them by the weights sign-extended to 16 bits with
// vpmaddwd (16 products per instruction, pairs summed in int32; the int32 sums are moved into int64 every
// 2,048 inputs, before they could overflow). Three instructions per 16 weights where converting them to
// fp32 for FMAs took seven: the weights stream at the memory's speed, and every build gives the same exact
// sums, so a row's numbers are the same on every x86 build. The VNNI builds but AMX take this path too
// from 2 input rows on the 16-bit grid, with VNNI's in-place int16 dot product (vpdpwssd): fewer
// instructions per weight and row than the byte planes; on the 24-bit grid they split each s into its
// high 16 bits (vpdpwssd) and its low byte (vpdpbusd against the weight bytes as stored: SplitRows).
#pragma once
#if defined(SLOWLLM_INT16_DOTS)
// the eight int32 lanes' sum in int64 (each may be near 2^30: kFlushSteps)
inline int64_t sum_lanes(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t total = 0;
  for (int i = 0; i < 8; ++i) total += lanes[i];
  return total;
}

// The build's vectors for int16 multiply-adds: 16 lanes (AVX2) or 32 (AVX-512)
#if defined(SLOWLLM_AVX512BF16)
struct Shorts {
  using V = __m512i;
  static constexpr int kLanes = 32, kRegisters = 32;
  static V zero() { return _mm512_setzero_si512(); }
  static V widen(const int8_t* w) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))); }
  static V load(const int16_t* x) { return _mm512_loadu_si512(x); }
  static void in_register(V& x) { asm("" : "+v"(x)); }
  static V madd(V acc, V w, V x) {  // vpdpwssd (AVX512-VNNI): multiply-add in place
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
  }
  static int64_t sum(V v) { return sum_lanes(_mm512_castsi512_si256(v)) + sum_lanes(_mm512_extracti64x4_epi64(v, 1)); }
};
#else
struct Shorts {
  using V = __m256i;
  static constexpr int kLanes = 16, kRegisters = 16;
  static V zero() { return _mm256_setzero_si256(); }
  static V widen(const int8_t* w) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
  static V load(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
  static void in_register(V& x) { asm("" : "+x"(x)); }
#if defined(SLOWLLM_AVXVNNI)
  static V madd(V acc, V w, V x) { return _mm256_dpwssd_avx_epi32(acc, w, x); }  // (AVX-VNNI: in place)
#else
  static V madd(V acc, V w, V x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
#endif
  static int64_t sum(V v) { return sum_lanes(v); }
};
#endif

// The input rows on the grid as int16 planes (`BlockedPlanes`, blocks of a vector's lanes): P = 2 (bf16
// rows) one plane, s; P = 3 (fp32) two, s >> 8 (signed) and s & 255, s = 256 * high + low.
template <int P>
struct ShortRows : BlockedPlanes<int16_t, P - 1, Shorts::kLanes> {
  static constexpr int Q = P - 1;
  std::vector<double> step;
  ShortRows(int64_t M, int64_t K) : BlockedPlanes<int16_t, P - 1, Shorts::kLanes>(M, K), step(M) {}
  int64_t value(int64_t m, int64_t k) const {  // s
    return Q == 1 ? *this->plane(m, 0, k) : static_cast<int64_t>(*this->plane(m, 0, k)) * 256 + *this->plane(m, 1, k);
  }
};

// 8 values of s (int32 lanes) into their planes at `out` (plane q at out + q * stride)
template <int P>
void store_short(__m256i s, int16_t* out, int64_t stride) {
  auto store = [](__m256i v, int16_t* to) {  // (packs keeps the order within 128-bit halves: lo then hi)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to), _mm_packs_epi32(_mm256_castsi256_si128(v),
                                                                     _mm256_extracti128_si256(v, 1)));
  };
  if constexpr (P == 2) {
    store(s, out);
  } else {
    store(_mm256_srai_epi32(s, 8), out);
    store(_mm256_and_si256(s, _mm256_set1_epi32(255)), out + stride);
  }
}

// Each row of X (bf16 as uint16_t, or fp32) on its grid of P bytes (row_grid, its step into step[m]):
// s = round(x / step), at most 2^(8P-1) - 1, handed to eight(m, k, s) 8 inputs at a time (8 divides a
// block) and to one(m, k, s) for the rest. A row of zeros is skipped (s = 0: the planes start zeroed).
// short_rows and split_rows both take their integers from here: the same integers on either path.
template <int P, typename In, typename Eight, typename One>
void grid_integers(const In* X, int64_t M, int64_t K, std::vector<double>& step, const Eight& eight, const One& one) {
  constexpr int32_t most = (1 << (8 * P - 1)) - 1;
  const int64_t body = K / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    const In* x = X + m * K;
    const RowGrid grid = row_grid<P>(x, K);
    step[m] = grid.step;
    if (grid.zeros) continue;
    const __m256 inverse = _mm256_set1_ps(grid.inverse);
    for (int64_t k = 0; k < body; k += 8)
      eight(m, k, _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(floats8(x + k), inverse)), _mm256_set1_epi32(most)));
    for (int64_t k = body; k < K; ++k)
      one(m, k, std::min(static_cast<int32_t>(std::nearbyint(as_float(x[k]) * grid.inverse)), most));
  }
}

// X [M, K] (bf16 as uint16_t, or fp32) -> ShortRows<P>: the integers the VNNI builds' byte planes hold (u - offset)
template <int P, typename In>
ShortRows<P> short_rows(const In* X, int64_t M, int64_t K) {
  ShortRows<P> out(M, K);
  grid_integers<P>(X, M, K, out.step, [&](int64_t m, int64_t k, __m256i s) {
    store_short<P>(s, out.plane(m, 0, k), Shorts::kLanes);
  }, [&](int64_t m, int64_t k, int32_t v) {
    if constexpr (P == 2) *out.plane(m, 0, k) = static_cast<int16_t>(v);
    else *out.plane(m, 0, k) = static_cast<int16_t>(v >> 8), *out.plane(m, 1, k) = static_cast<int16_t>(v & 255);
  });
  return out;
}

// The int32 lanes of a multiply-add chain gain at most 2 x 128 x 32768 = 2^23 per step: moved into
// int64 every kFlushSteps steps, they stay below 2^30.
constexpr int64_t kFlushSteps = 128;

// R weight rows against M input rows (m0 on): R x M x Q int32 chains of vpmaddwd (or vpdpwssd), each weight vector
// sign-extended once for all of them. From 3 input rows on, the tile's weight vectors come first and each
// input vector is then loaded into a register once for all R (otherwise, on AVX2, GCC folds every use into
// its multiply-add as a memory operand: a load per product). With tiles of 2 x 4 on AVX2 (below), the 96
// block linears and head of a bloom-1b7 token, bf16 rows, alternating builds on Zen 4: 8 rows 11.0-11.2 ->
// 12.9-13.0 GB/s, 6 rows 15.6 -> 17.3, 4 rows 21.4-21.7 -> 25.0-25.4, 3 rows 22-25 -> 26-27; on
// avx512bf16 8 rows 10.5 -> 14.1-14.4, 16 rows 5.1 -> 9.3-9.5, 8 fp32 rows 4.7 -> 7.0, 4 rows 3% slower
// (within noise); 1 and 2 rows keep each weight row in turn with its loads (2 rows the other way: 13% slower).
template <int M, int R, int P, int kFetch = kTiles>
void madd_tile(const ShortRows<P>& in, int64_t m0, const int8_t* W, const float* S, float* Y, int64_t stride,
               int64_t rs = 1) {
  using D = Shorts;
  constexpr int Q = P - 1, L = D::kLanes;
  const int64_t K = in.K, body = K / L * L, next = in.block_stride();
  D::V acc[R][M][Q];
  int64_t total[R][M][Q] = {};
  const int16_t* planes = in.plane(m0, 0, 0);  // row m0 + m's plane q at planes + (m * Q + q) * L
  for (int64_t k = 0; k < body;) {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        for (int q = 0; q < Q; ++q) acc[r][m][q] = D::zero();
    for (const int64_t end = std::min(body, k + L * kFlushSteps); k < end; k += L, planes += next) {
      if constexpr (M <= 2) {  // each weight row in turn, its input vectors loaded for it (the weights
        // widened first, then these loops: 2 rows 5-13% slower on AVX2)
        for (int r = 0; r < R; ++r) {
          if ((k & 63) == 0) prefetch_weights<kFetch>(W, r, R, rs, K, k);
          const D::V w = D::widen(W + r * rs * K + k);
          for (int m = 0; m < M; ++m)
            for (int q = 0; q < Q; ++q) acc[r][m][q] = D::madd(acc[r][m][q], w, D::load(planes + (m * Q + q) * L));
        }
      } else {  // the tile's weight rows first, then each input vector loaded once for all of them
        D::V w[R];
        for (int r = 0; r < R; ++r) {
          if ((k & 63) == 0) prefetch_weights<kFetch>(W, r, R, rs, K, k);
          w[r] = D::widen(W + r * rs * K + k);
        }
        for (int m = 0; m < M; ++m)
          for (int q = 0; q < Q; ++q) {
            D::V x = D::load(planes + (m * Q + q) * L);
            D::in_register(x);
            for (int r = 0; r < R; ++r) acc[r][m][q] = D::madd(acc[r][m][q], w[r], x);
          }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        for (int q = 0; q < Q; ++q) total[r][m][q] += D::sum(acc[r][m][q]);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      int64_t sum = Q == 1 ? total[r][m][0] : total[r][m][0] * 256 + total[r][m][Q - 1];
      for (int64_t k = body; k < K; ++k) sum += static_cast<int64_t>(W[r * rs * K + k]) * in.value(m0 + m, k);
      Y[m * stride + r * rs] = int_output(sum, in.step[m0 + m], S ? S + r * rs : nullptr);
    }
}

// R x M x Q chains, the R weight vectors, an input vector and a product within the registers (4 weight
// rows at most, as VNNI's): on AVX2 8 chains, so that passes of 4 input rows take 2 weight rows at a time
// (12 chains took 8 rows in one pass of one weight row, each input vector loaded for every product).
// AVX-VNNI's vpdpwssd adds in place, needing no register for the product: 12 chains, passes of 4 input
// rows over 3 weight rows (16 registers). The 96 block linears and head of a bloom-1b7 token, bf16-grid
// rows, against 8 chains, in turns on an Intel Xeon: 8 rows 0.87x the time, 4 rows 0.93x.
template <int P>
struct MaddKernel {
#if defined(SLOWLLM_AVXVNNI)
  static constexpr int kChains = 12;
#else
  static constexpr int kChains = Shorts::kRegisters == 32 ? 16 : 8;
#endif
  static constexpr int64_t kPassRows = std::min(4, kChains / (P - 1));
  static constexpr int64_t kPlaneBytes = 2 * (P - 1);  // an input's int16 planes
  static constexpr int rows_per_tile(int M) { return std::max(1, std::min(4, kChains / ((P - 1) * M))); }
  template <int M, int R, int kFetch = kTiles>
  static void tile(const ShortRows<P>& in, int64_t m0, const int8_t* W, const float* S, float* Y, int64_t stride,
                   int64_t rs = 1) {
    madd_tile<M, R, P, kFetch>(in, m0, W, S, Y, stride, rs);
  }
};

#endif

#if defined(SLOWLLM_INT8_DOTS) && defined(SLOWLLM_INT16_DOTS)
// fp32 rows on the 24-bit grid (P = 3), several at a time, on the VNNI builds but AMX: s = 256 h + l with
// h = s >> 8 (signed, 16 bits) and l = s & 255. h meets the weights widened to int16 in vpdpwssd, l the
// weight bytes as they are in vpdpbusd (unsigned x signed: no offset to take out, no sign flip). Per 2L
// weights (L: the int16 lanes of a vector) and input row: two int16 dot products and one byte dot
// product, where two int16 planes took four and three byte planes three plus the high plane's flips. A
// row's block holds its 2L high parts, then its 2L low bytes; blocks as BlockedPlanes' ([K / 2L][M]).
struct SplitRows {
  static constexpr int64_t L = Shorts::kLanes, B = 2 * L;  // inputs per block
  static constexpr int64_t kRowBytes = 3 * B;  // a row's block: B int16 high parts, then B low bytes
  int64_t M, K;
  BlockedPlanes<uint8_t, 1, kRowBytes> bytes;  // (its "K" counts bytes: blocks x kRowBytes)
  std::vector<double> step;
  SplitRows(int64_t M, int64_t K) : M(M), K(K), bytes(M, (K + B - 1) / B * kRowBytes), step(M) {}
  const uint8_t* block(int64_t m, int64_t k) const { return bytes.plane(m, 0, k / B * kRowBytes); }
  uint8_t* block(int64_t m, int64_t k) { return bytes.plane(m, 0, k / B * kRowBytes); }
  int64_t block_stride() const { return M * kRowBytes; }
  int64_t value(int64_t m, int64_t k) const {  // s
    const uint8_t* b = block(m, k);
    return static_cast<int64_t>(reinterpret_cast<const int16_t*>(b)[k % B]) * 256 + b[2 * B + k % B];
  }
};

// X [M, K] (bf16 as uint16_t, or fp32) -> SplitRows: s = round(x / step) on the 24-bit grid, as
// short_rows<3> and int_rows<3> make it (the same integers)
template <typename In>
SplitRows split_rows(const In* X, int64_t M, int64_t K) {
  constexpr int64_t B = SplitRows::B;
  SplitRows out(M, K);
  grid_integers<3>(X, M, K, out.step, [&](int64_t m, int64_t k, __m256i s) {
    uint8_t* b = out.block(m, k);
    store_short<2>(_mm256_srai_epi32(s, 8), reinterpret_cast<int16_t*>(b) + k % B, 0);  // h
    _mm_storel_epi64(reinterpret_cast<__m128i*>(b + 2 * B + k % B), low_bytes8(s));  // l: s's low byte
  }, [&](int64_t m, int64_t k, int32_t v) {
    uint8_t* b = out.block(m, k);
    reinterpret_cast<int16_t*>(b)[k % B] = static_cast<int16_t>(v >> 8);
    b[2 * B + k % B] = static_cast<uint8_t>(v & 255);
  });
  return out;
}

// The high parts' chains gain at most 2 x 2 x 128 x 32768 = 2^24 a step (two int16 dot products), the low
// bytes' 4 x 255 x 128 < 2^17: moved into int64 every 64 steps, every lane stays below 2^30 and a vector's
// low lanes summed in int32 (ByteDots::sum) below 2^31.
constexpr int64_t kSplitFlushSteps = 64;

// R weight rows against M input rows (m0 on): R x M chains of each kind; each weight row's vectors (two
// widened, one as bytes) in turn, its input vectors loaded for it.
template <int M, int R, int kFetch = kTiles>
void split_tile(const SplitRows& in, int64_t m0, const int8_t* W, const float* S, float* Y, int64_t stride,
                int64_t rs = 1) {
  using H = Shorts;
  using D = ByteDots;
  constexpr int64_t L = SplitRows::L, B = SplitRows::B, row_bytes = SplitRows::kRowBytes;
  const int64_t K = in.K, body = K / B * B, next = in.block_stride();
  H::V high[R][M];
  D::V low[R][M];
  int64_t total[R][M] = {};
  const uint8_t* blocks = in.block(m0, 0);  // row m0 + m's block at blocks + m * row_bytes
  for (int64_t k = 0; k < body;) {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) high[r][m] = H::zero(), low[r][m] = D::zero();
    for (const int64_t end = std::min(body, k + B * kSplitFlushSteps); k < end; k += B, blocks += next) {
      for (int r = 0; r < R; ++r) {
        if ((k & 63) == 0) prefetch_weights<kFetch>(W, r, R, rs, K, k);
        const int8_t* w = W + r * rs * K + k;
        const H::V w0 = H::widen(w), w1 = H::widen(w + L);
        const D::V wb = D::load(w);
        for (int m = 0; m < M; ++m) {
          const uint8_t* b = blocks + m * row_bytes;
          high[r][m] = H::madd(high[r][m], w0, H::load(reinterpret_cast<const int16_t*>(b)));
          high[r][m] = H::madd(high[r][m], w1, H::load(reinterpret_cast<const int16_t*>(b) + L));
          low[r][m] = D::dot(low[r][m], D::load(b + 2 * B), wb);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) total[r][m] += H::sum(high[r][m]) * 256 + D::sum(low[r][m]);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      int64_t sum = total[r][m];
      for (int64_t k = body; k < K; ++k) sum += static_cast<int64_t>(W[r * rs * K + k]) * in.value(m0 + m, k);
      Y[m * stride + r * rs] = int_output(sum, in.step[m0 + m], S ? S + r * rs : nullptr);
    }
}

// R x M x 2 chains and a weight row's three vectors within the registers: 8 chains on AVX2 (passes of 4
// input rows, one weight row a tile), 16 on AVX-512
struct SplitKernel {
  static constexpr int kChains = Shorts::kRegisters == 32 ? 16 : 8;
  static constexpr int64_t kPassRows = kChains / 2;
  static constexpr int64_t kPlaneBytes = 3;  // an input's bytes in the blocks
  static constexpr int rows_per_tile(int M) { return std::max(1, std::min(4, kChains / (2 * M))); }
  template <int M, int R, int kFetch = kTiles>
  static void tile(const SplitRows& in, int64_t m0, const int8_t* W, const float* S, float* Y, int64_t stride,
                   int64_t rs = 1) {
    split_tile<M, R, kFetch>(in, m0, W, S, Y, stride, rs);
  }
};
#endif
