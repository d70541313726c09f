// int8 weights as integer dot products (the avx512bf16, amx and avx2vnni builds): included by _kernels.cpp
// inside its anonymous namespace, after the helpers it uses (parallel_slices, over_tiles, SLOWLLM_DISPATCH).
//
// Converting int8 weights to bf16 or fp32 in registers takes more instructions per weight byte than the
// memory needs to deliver it: int8 decode ran at bf16's rate per weight (~13 G weights/s on 2 cores), so
// half the bytes did not halve the time. Here the weights are never converted. Each input row becomes
// integers on a power-of-two grid, x ~= (u - 2^(8P-1)) * step with u < 2^(8P) (one step per row, chosen from its
// largest |x|), u kept as P byte planes (high first), and VNNI's byte dot products (vpdpbusd: 64 unsigned
// x signed byte products per instruction with AVX512-VNNI, 32 with AVX-VNNI, which the AVX2-only CPUs of
// Intel since Alder Lake and AMD since Zen 5 have; AMX's tdpbsud: 16 x 16 x 64 per tile product) sum
// q * byte exactly in int32. The offset needs each weight row's sum of q (AMX: a column of ones beside the
// planes, free within a tile product) or, with VNNI, is folded into the high plane taken as signed (the
// weights offset by 128 instead, and the row's high-byte sum, computed once, takes it out). The sums are
// exact integers, so a row's result is the same whatever rows are beside it, however
// the work is tiled or threaded, and the tails can run any path. The only rounding is the grid's: fp32
// inputs take P = 3 planes (elements off by at most 2^-24 of the row's largest, the rounding of a fp32
// sum), bf16 inputs P = 2 (every bf16 element within 2^-8 of the largest is exact, all 8 of its bits, and
// smaller ones are off by at most 2^-16 of the largest, far below the bf16 rounding the inputs already
// carry): a dot product less per input row, which is most of the work beyond one row. A block's int8
// linears take fp32 rows on the P = 2 grid too (int8_gemv's bits=16: the weights' own rounding, 2^-8 of
// their row's largest, is far coarser); the LM head keeps P = 3.
//
// The int16 paths (the avx2 build, and several input rows on avx512bf16 and avx2vnni) are in _int16.h.
#pragma once
#if defined(SLOWLLM_INT8_DOTS) || defined(SLOWLLM_INT16_DOTS)
constexpr int64_t kIntMaxK = 65536;  // |sum over K of 255 x 128| < 2^31: an int32 sum cannot overflow

inline uint32_t magnitude_bits(float v) { uint32_t b; std::memcpy(&b, &v, 4); return b & 0x7FFFFFFFu; }
inline uint32_t magnitude_bits(uint16_t v) { return (static_cast<uint32_t>(v) << 16) & 0x7FFFFFFFu; }
inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return bf16_to_float(v); }

// 8 inputs as fp32 (bf16: the top half of the fp32 with the same value)
inline __m256 floats8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 floats8(const uint16_t* x) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16));
}

// byte 0 of each of v's eight 32-bit lanes, in order, in the low 8 bytes (the low 4 bytes of each 128-bit
// half, then the two halves together)
inline __m128i low_bytes8(__m256i v) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1)));
}

// An input row's grid for P bytes per input: x ~= s * step with |s| <= 2^(8P-1), step a power of two
// chosen from the row's largest |x|; `inverse` = 1 / step (x * inverse is exact). A row with an inf or a
// NaN has step NaN (its outputs are NaN, as a float sum's would be), one below 2^-100 everywhere is zeros.
struct RowGrid {
  double step;
  float inverse;
  bool zeros;  // every s is 0
};
template <int P, typename In>
RowGrid row_grid(const In* x, int64_t K) {
  uint32_t top = 0;  // the largest |x| as bits: as integers, finite < inf < NaN
  for (int64_t k = 0; k < K; ++k) top = std::max(top, magnitude_bits(x[k]));
  const int exponent = static_cast<int>(top >> 23) - 127;  // of the largest: it lies in [2^e, 2^(e+1))
  if (top >= 0x7F800000u || exponent < -100) return {top >= 0x7F800000u ? std::nan("") : 1.0, 0.0f, true};
  // |x| / step < 2^(8P-1); rounding to nearest even may reach it for the largest: clamped one step below
  return {std::ldexp(1.0, exponent - (8 * P - 2)), std::ldexp(1.0f, 8 * P - 2 - exponent), false};
}

// Input planes kept in blocks of B inputs, each block holding every row's planes side by side: Q planes
// of M rows as [K / B blocks][M][Q][B] (the last block padded). A tile's loop then reads all its input
// vectors from one pointer at fixed offsets; with one K-long array per plane, 8 rows x 2 planes needed 16
// address registers and the loop reloaded them from the stack (int8 with 8 rows ran at a third of its
// dot products' rate on Zen 4).
// The buffer is aligned to 64 bytes, so that no 512-bit load of a plane spans two cache lines (a vector's
// 16-byte alignment made every one do so; measured no slower or faster), and starts zeroed.
template <typename T, int Q, int64_t B>
struct BlockedPlanes {
  struct Free { void operator()(T* p) const { std::free(p); } };
  int64_t M, K;
  std::unique_ptr<T[], Free> planes;
  BlockedPlanes(int64_t M, int64_t K) : M(M), K(K) {
    const size_t bytes = ((K + B - 1) / B * B * M * Q * sizeof(T) + 63) / 64 * 64;
    planes.reset(static_cast<T*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64))));
    TORCH_CHECK(planes, "out of memory for the int8 kernels' input planes");
    std::memset(planes.get(), 0, bytes);
  }
  // plane q of row m at input k (to the end of k's block; the row's next plane B further)
  const T* plane(int64_t m, int q, int64_t k) const { return planes.get() + ((k / B * M + m) * Q + q) * B + k % B; }
  T* plane(int64_t m, int q, int64_t k) { return planes.get() + ((k / B * M + m) * Q + q) * B + k % B; }
  int64_t block_stride() const { return M * Q * B; }  // from one block of a row's planes to the next
};

// One output from its exact integer sum: sum over k of q * s, times the row's step and scale.
inline float int_output(int64_t total, double step, const float* S) {
  const float y = static_cast<float>(static_cast<double>(total) * step);
  return S ? y * *S : y;
}

// Y [M, N] = rows @ W [N, K].T (times S[n]) with Kernel's tiles: where M exceeds its pass, each tile of
// `rows_per_tile(kPassRows)` weight rows takes every pass of input rows in turn (their bytes read from
// memory once: the later passes find them in L1); otherwise tiles of `rows_per_tile(M)` weight rows x M
// input rows.
template <typename Kernel, typename Rows>
void int_matmul(const Rows& in, const int8_t* W, const float* S, float* Y, int64_t N) {
  const int64_t M = in.M;
  if (M > Kernel::kPassRows) {
    constexpr int R = Kernel::rows_per_tile(Kernel::kPassRows);
#define SLOWLLM_INT_PASS(I) Kernel::template tile<I, R, decltype(run)::value>(in, m0, W + n * in.K, S ? S + n : nullptr, Y + m0 * N + n, N, rs)
#define SLOWLLM_INT_PASS1(I) Kernel::template tile<I, 1>(in, m0, W + n * in.K, S ? S + n : nullptr, Y + m0 * N + n, N)
    over_tiles<R>(N, run_rows(in.K, M), [&](int64_t n, int64_t rs) {
      by_run(rs, [&](auto run) {
        for (int64_t m0 = 0; m0 < M; m0 += Kernel::kPassRows)
          SLOWLLM_DISPATCH(std::min<int64_t>(Kernel::kPassRows, M - m0), SLOWLLM_INT_PASS)
      });
    }, [&](int64_t n) {
      for (int64_t m0 = 0; m0 < M; m0 += Kernel::kPassRows)
        SLOWLLM_DISPATCH(std::min<int64_t>(Kernel::kPassRows, M - m0), SLOWLLM_INT_PASS1)
    });
    return;
  }
  auto one = [&](int64_t n) {
    for (int64_t m = 0; m < M; ++m) Kernel::template tile<1, 1>(in, m, W + n * in.K, S ? S + n : nullptr, Y + m * N + n, N);
  };
  if (M == 1) {  // one row: as many weight rows a tile as by_input says for its planes' length
    by_input<Kernel::rows_per_tile(1)>(in.K * Kernel::kPlaneBytes, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      over_tiles<R>(N, run_rows(in.K, 1), [&](int64_t n, int64_t rs) {
        by_run(rs, [&](auto run) { Kernel::template tile<1, R, decltype(run)::value>(in, 0, W + n * in.K, S ? S + n : nullptr, Y + n, N, rs); });
      }, one);
    });
    return;
  }
  // several rows: tiles of adjacent weight rows, or in runs where they ask ahead (run_rows)
#define SLOWLLM_INT_TILES(R) over_tiles<Kernel::rows_per_tile(R)>(N, run_rows(in.K, R), [&](int64_t n, int64_t rs) { \
    by_run(rs, [&](auto run) { \
      Kernel::template tile<R, Kernel::rows_per_tile(R), decltype(run)::value>(in, 0, W + n * in.K, S ? S + n : nullptr, Y + n, N, rs); }); }, one)
  SLOWLLM_DISPATCH(M, SLOWLLM_INT_TILES)
}
#endif

#if defined(SLOWLLM_INT8_DOTS)

// The build's vectors: byte dot products and the input rows' conversion to integers, F floats at a time.
#if defined(SLOWLLM_AVX512BF16)
struct ByteDots {
  using V = __m512i;
  static constexpr int kBytes = 64, kRegisters = 32, F = 16;
  static V zero() { return _mm512_setzero_si512(); }
  static V ones() { return _mm512_set1_epi8(1); }
  static V flip() { return _mm512_set1_epi8(static_cast<char>(0x80)); }
  static V xor_(V a, V b) { return _mm512_xor_si512(a, b); }
  static V load(const void* p) { return _mm512_loadu_si512(p); }
  static V dot(V acc, V u8, V s8) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
  }
  static int64_t sum(V v) { return _mm512_reduce_add_epi32(v); }
  static __m512 floats(const float* x) { return _mm512_loadu_ps(x); }
  static __m512 floats(const uint16_t* x) {  // bf16: the top half of the fp32 with the same value
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
  }
  // F values x * scale rounded to integers (to nearest even), + offset, at most `most`, into P planes
  // (plane p at out + p * stride)
  template <int P, typename In>
  static void planes(const In* x, float scale, int32_t offset, int32_t most, uint8_t* out, int64_t stride) {
    __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(floats(x), _mm512_set1_ps(scale))),
                                 _mm512_set1_epi32(offset));
    u = _mm512_min_epi32(u, _mm512_set1_epi32(most));
    for (int p = 0; p < P; ++p)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + p * stride), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8 * (P - 1 - p))));
  }
};
#else
struct ByteDots {
  using V = __m256i;
  static constexpr int kBytes = 32, kRegisters = 16, F = 8;
  static V zero() { return _mm256_setzero_si256(); }
  static V ones() { return _mm256_set1_epi8(1); }
  static V flip() { return _mm256_set1_epi8(static_cast<char>(0x80)); }
  static V xor_(V a, V b) { return _mm256_xor_si256(a, b); }
  static V load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V dot(V acc, V u8, V s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
  static int64_t sum(V v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  }
  template <typename In>
  static __m256 floats(const In* x) { return floats8(x); }
  template <int P, typename In>
  static void planes(const In* x, float scale, int32_t offset, int32_t most, uint8_t* out, int64_t stride) {
    __m256i u = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(floats(x), _mm256_set1_ps(scale))),
                                 _mm256_set1_epi32(offset));
    u = _mm256_min_epi32(u, _mm256_set1_epi32(most));
    for (int p = 0; p < P; ++p)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + p * stride), low_bytes8(_mm256_srli_epi32(u, 8 * (P - 1 - p))));
  }
};
#endif

// The input rows as P integer byte planes (plane 0: the high byte), and each row's step (NaN for a row with
// an inf or NaN: its outputs are NaN, as a float sum's would be).
template <int P>
struct IntRows : BlockedPlanes<uint8_t, P, ByteDots::kBytes> {
  static constexpr int32_t kOffset = 1 << (8 * P - 1);
  std::vector<double> step;
  std::vector<int64_t> high;  // per row: the sum of the high bytes minus 128 over the VNNI body
  IntRows(int64_t M, int64_t K) : BlockedPlanes<uint8_t, P, ByteDots::kBytes>(M, K), step(M), high(M) {}
  int32_t value(int64_t m, int64_t k) const {  // u - offset
    int32_t u = 0;
    for (int p = 0; p < P; ++p) u = u << 8 | *this->plane(m, p, k);
    return u - kOffset;
  }
};

// X [M, K] (bf16 as uint16_t, or fp32) -> IntRows<P>.
template <int P, typename In>
IntRows<P> int_rows(const In* X, int64_t M, int64_t K) {
  constexpr int32_t offset = IntRows<P>::kOffset, most = (1 << (8 * P)) - 1;
  constexpr int64_t B = ByteDots::kBytes;
  IntRows<P> out(M, K);
  const int64_t vnni_body = K / B * B;
  const int64_t body = K / ByteDots::F * ByteDots::F;
  for (int64_t m = 0; m < M; ++m) {
    const In* x = X + m * K;
    const RowGrid grid = row_grid<P>(x, K);
    const float inverse = grid.inverse;
    out.step[m] = grid.step;
    if (grid.zeros) {  // u = offset: x = 0
      for (int64_t k = 0; k < K; k += B) std::memset(out.plane(m, 0, k), 0x80, B);
      continue;
    }
    for (int64_t k = 0; k < body; k += ByteDots::F)  // (F divides B: a group never crosses a block)
      ByteDots::planes<P>(x + k, inverse, offset, most, out.plane(m, 0, k), B);
    for (int64_t k = body; k < K; ++k) {
      const int32_t u = std::min(static_cast<int32_t>(std::nearbyint(as_float(x[k]) * inverse)) + offset, most);
      for (int p = 0; p < P; ++p) *out.plane(m, p, k) = (u >> 8 * (P - 1 - p)) & 0xFF;
    }
    int64_t high = 0;
    for (int64_t k = 0; k < vnni_body; k += B)
      for (int64_t i = 0; i < B; ++i) high += out.plane(m, 0, k)[i];
    out.high[m] = high - 128 * vnni_body;
  }
  return out;
}

// sum over k in [from, K) of q[k] * (u[m][k] - offset), one by one (the tails)
template <int P>
int64_t int_tail(const IntRows<P>& in, int64_t m, const int8_t* w, int64_t from) {
  int64_t total = 0;
  for (int64_t k = from; k < in.K; ++k) total += static_cast<int64_t>(w[k]) * in.value(m, k);
  return total;
}

// The planes' sums over the vector body (high first, `plane(p)`) into the total, less `offsets` times
// 2^(8P-1): AMX's planes are offset (u = x + 2^(8P-1)) and `offsets` is the weight row's sum of q; VNNI's
// high plane is signed, summed against q + 128, and `offsets` is the row's sum of signed high bytes.
template <int P, typename Plane>
int64_t int_total(const Plane& plane, int64_t offsets) {
  int64_t total = 0;
  for (int p = 0; p < P; ++p) total = (total << 8) + plane(p);
  return total - (offsets << (8 * P - 1));
}

// R weight rows against M input rows (m0 on) with VNNI: R x M x P int32 chains, each weight vector loaded
// once for all of them (and offset by 128 once, for the high planes taken as signed).
template <int M, int R, int P, int kFetch = kTiles>
void vnni_tile(const IntRows<P>& in, int64_t m0, const int8_t* W, const float* S, float* Y, int64_t stride,
               int64_t rs = 1) {
  using D = ByteDots;
  constexpr int64_t B = D::kBytes;
  const int64_t K = in.K, body = K / B * B, next = in.block_stride();
  const D::V flip = D::flip();
  D::V acc[R][M][P];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int p = 0; p < P; ++p) acc[r][m][p] = D::zero();
  const uint8_t* planes = in.plane(m0, 0, 0);  // row m0 + m's plane p at planes + (m * P + p) * B
  for (int64_t k = 0; k < body; k += B, planes += next) {
    auto high = [&](int m) { return D::xor_(D::load(planes + m * P * B), flip); };  // taken as signed
    D::V highs[M];  // several weight rows: each row's high plane once for all of them
    if constexpr (R > 1)
      for (int m = 0; m < M; ++m) highs[m] = high(m);
    for (int r = 0; r < R; ++r) {
      if (B == 64 || (k & 63) == 0) prefetch_weights<kFetch>(W, r, R, rs, K, k);
      const D::V w = D::load(W + r * rs * K + k), shifted = D::xor_(w, flip);  // q + 128, unsigned
      for (int m = 0; m < M; ++m) {
        acc[r][m][0] = D::dot(acc[r][m][0], shifted, R > 1 ? highs[m] : high(m));
        for (int p = 1; p < P; ++p) acc[r][m][p] = D::dot(acc[r][m][p], D::load(planes + (m * P + p) * B), w);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      // high: sum (q + 128) h - 128 sum h = sum q h, h = high byte - 128 (the offset is in h already)
      int64_t total = int_total<P>([&](int p) { return D::sum(acc[r][m][p]); }, in.high[m0 + m]);
      if (body < K) total += int_tail(in, m0 + m, W + r * rs * K, body);
      Y[m * stride + r * rs] = int_output(total, in.step[m0 + m], S ? S + r * rs : nullptr);
    }
  }
}

// Weight rows per VNNI tile for M input rows: R x M x P sums, a weight vector, its offset copy, a plane
// vector and the 0x80 constant fit the vector registers (at most 6: beyond, the rows' loads compete with
// too few sums); and input rows per pass, so that one weight row fits (8; 256-bit: 6 bf16 rows, 4 fp32).
// One input row takes 4 where its planes are short (by_input): its tile is R weight streams, and with 6
// per thread the int8 loop read at ~70% of the memory's speed in this Zen 4 VM's fast turns (~60 GB/s);
// with 4, 86% (the 96 block linears and head of a bloom-1b7 token, avx512bf16 build, both in one process
// in turns: 0.86x and 0.92x the time in two sets; 3 rows and 2 alike). At Bloom-176B's width (planes of
// 28 and 112 KB) 6 read faster: 4 gave up the 0.95-0.97x that 256 KB runs had gained there.
template <int P>
constexpr int vnni_rows_per_tile(int M) { return std::max(1, std::min(6, (ByteDots::kRegisters - 4) / (P * M))); }
template <int P>
constexpr int64_t kVnniPassRows = std::min(8, (ByteDots::kRegisters - 4) / P);

template <int P>
struct VnniKernel {
  static constexpr int64_t kPassRows = kVnniPassRows<P>;
  static constexpr int64_t kPlaneBytes = P;  // an input's bytes in the planes a tile reads
  static constexpr int rows_per_tile(int M) { return vnni_rows_per_tile<P>(M); }
  template <int M, int R, int kFetch = kTiles>
  static void tile(const IntRows<P>& in, int64_t m0, const int8_t* W, const float* S, float* Y, int64_t stride,
                   int64_t rs = 1) {
    vnni_tile<M, R, P, kFetch>(in, m0, W, S, Y, stride, rs);
  }
};

#if defined(SLOWLLM_AMX)
// AMX: tiles of 16 weight rows x 64 int8 straight from memory (signed) against tiles of the planes as
// columns (unsigned): column 0 the ones, column 1 + Pm + p plane p of input row m, 16 columns a group;
// tdpbsud sums 16 x 16 x 64 products per tile product. bf16 rows 1-7 fit one group (one tile product per
// weight tile: int8 reads its bytes at the memory's speed), 8-15 two; fp32 rows 1-5 one.
template <int P>
int64_t int_groups(int64_t M) { return (1 + P * M + 15) / 16; }

// per group and per 64 inputs, a tile [16 quads][16 columns][4 bytes] (zeros in unused columns)
template <int P>
std::vector<uint8_t> pack_columns(const IntRows<P>& in) {
  const int64_t tiles = in.K / 64, cols = 1 + P * in.M, groups = int_groups<P>(in.M);
  std::vector<uint8_t> out(groups * tiles * 1024, 0);
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t t = 0; t < tiles; ++t) {
      const uint8_t* src = j ? in.plane((j - 1) / P, (j - 1) % P, t * 64) : nullptr;  // (blocks of 64 here)
      uint8_t* tile = out.data() + ((j / 16) * tiles + t) * 1024 + (j % 16) * 4;
      for (int p = 0; p < 16; ++p)
        if (src) std::memcpy(tile + p * 64, src + 4 * p, 4);
        else std::memset(tile + p * 64, 1, 4);
    }
  }
  return out;
}

// B weight tiles (16 rows each, rs apart, from row n0) against every group of columns, then the outputs.
template <int B, int P>
void amx_int_rows(const uint8_t* packed, const IntRows<P>& in, const int8_t* W, const float* S, int64_t n0,
                  int64_t rs, float* Y, int64_t N) {
  static_assert(B <= 4, "tmm0-3 hold the sums");
  const int64_t K = in.K, tiles = K / 64, groups = int_groups<P>(in.M), stride = K * rs, next = 16 * rs * K;
  thread_local std::vector<int32_t> sums;  // [B][groups][16 rows][16 columns]
  sums.resize(B * groups * 256);
  const int8_t* w = W + n0 * K;
  asm volatile("" ::: "memory");  // (the packed columns are written before the tile loads read them)
  for (int64_t g = 0; g < groups; ++g) {
    _tile_zero(0);
    if constexpr (B > 1) _tile_zero(1);
    if constexpr (B > 2) _tile_zero(2);
    if constexpr (B > 3) _tile_zero(3);
    const uint8_t* cols = packed + g * tiles * 1024;
    for (int64_t t = 0; t < tiles; ++t) {
      _tile_loadd(4, cols + t * 1024, 64);
      _tile_loadd(5, w + t * 64, stride);
      _tile_dpbsud(0, 5, 4);
      if constexpr (B > 1) { _tile_loadd(6, w + next + t * 64, stride); _tile_dpbsud(1, 6, 4); }
      if constexpr (B > 2) { _tile_loadd(7, w + 2 * next + t * 64, stride); _tile_dpbsud(2, 7, 4); }
      if constexpr (B > 3) { _tile_loadd(5, w + 3 * next + t * 64, stride); _tile_dpbsud(3, 5, 4); }
    }
    _tile_stored(0, sums.data() + (0 * groups + g) * 256, 64);
    if constexpr (B > 1) _tile_stored(1, sums.data() + (1 * groups + g) * 256, 64);
    if constexpr (B > 2) _tile_stored(2, sums.data() + (2 * groups + g) * 256, 64);
    if constexpr (B > 3) _tile_stored(3, sums.data() + (3 * groups + g) * 256, 64);
  }
  asm volatile("" ::: "memory");  // (and stored before these reads)
  const bool tail = tiles * 64 < K;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < 16; ++i) {
      const int64_t n = n0 + (16 * b + i) * rs;
      const int32_t* row = sums.data() + (b * groups * 16 + i) * 16;  // column j at row[(j / 16) * 256 + j % 16]
      auto column = [&](int64_t j) -> int64_t { return row[(j >> 4) * 256 + (j & 15)]; };
      const int64_t Q = row[0];
      for (int64_t m = 0; m < in.M; ++m) {
        int64_t total = int_total<P>([&](int p) { return column(1 + P * m + p); }, Q);
        if (tail) total += int_tail(in, m, W + n * K, tiles * 64);
        Y[m * N + n] = int_output(total, in.step[m], S ? S + n : nullptr);
      }
    }
}

// Y [M, N] = IntRows @ W [N, K].T (times S[n]) on AMX tiles: the whole tiles of 16 weight rows (amx_tasks),
// the rows beyond the last whole tile through VNNI (exact integers: the same numbers). False where the OS
// refuses the tile state or K has no whole tile (the caller uses VNNI).
template <int P>
bool amx_int_matmul(const IntRows<P>& in, const int8_t* W, const float* S, float* Y, int64_t N) {
  if (in.K < 64 || !amx_permitted()) return false;
  const std::vector<uint8_t> packed = pack_columns(in);
  const int64_t whole = N / kTileRows;
  amx_tasks(whole * kTileRows, in.K, [&](auto B, int64_t n0, int64_t rs) {
    amx_int_rows<decltype(B)::value>(packed.data(), in, W, S, n0, rs, Y, N);
  });
  for (int64_t n = whole * kTileRows; n < N; ++n)
    for (int64_t m = 0; m < in.M; ++m) vnni_tile<1, 1, P>(in, m, W + n * in.K, S ? S + n : nullptr, Y + m * N + n, N);
  return true;
}
#endif

// Y [M, N] (fp32) = X [M, K] (bf16 or fp32) @ (q [N, K] * S [N]).T with byte dot products (AMX's tiles first
// from 2 input rows on; one row takes VNNI's, whose runs ask for their weights ahead: the same exact integers)
template <int P, typename In>
void byte_dots_matmul(const In* X, int64_t M, int64_t K, const int8_t* W, const float* S, float* Y, int64_t N) {
  const IntRows<P> in = int_rows<P>(X, M, K);
#if defined(SLOWLLM_AMX)
  if (M > 1 && amx_int_matmul(in, W, S, Y, N)) return;
#endif
  int_matmul<VnniKernel<P>>(in, W, S, Y, N);
}
#endif

#include "_int16.h"  // the int16 paths: Shorts, MaddKernel and (VNNI builds) SplitKernel

// Y [M, N] (fp32) = X [M, K] (bf16 or fp32) @ (q [N, K] * S [N]).T, the inputs on a grid of P bytes. The
// VNNI builds but AMX have three paths: one row takes byte dot products; more take int16 dot products on
// the 16-bit grid, and split rows on the 24-bit one. Per 64 weights and input row the first two take two
// dot products (two byte planes, or one int16 plane 32 wide), but the byte path also flips the high
// plane's sign and loads three vectors: on Zen 4 a standalone loop of 8 rows took 25.7 cycles per 64
// weights with byte dots and 19.0 with vpdpwssd, and the kernel went from 10 to 16 G weights/s. On
// avx2vnni (AVX-VNNI's 256-bit vpdpwssd), the 96 block linears and head of a bloom-1b7 token, bf16-grid
// rows, in turns on an Intel Xeon: 3 rows 0.81x the byte path's time, 6 rows 0.75x, 8 rows 0.63x (178 ->
// 113 ms), 16 rows 0.55x, 2 rows 0.97x. On the 24-bit grid (fp32 rows: the LM head's) two int16 planes
// took 1.17x the byte path's time at 8 rows there; split rows (SplitRows: three dot products per 2L
// weights, no flips) 0.86x the byte path's at 8 rows, 0.87x at 2, on avx512bf16 0.92x the int16 planes'.
// Every path sums the same exact integers: the same numbers whichever runs.
template <int P, typename In>
void int8_matmul(const In* X, int64_t M, int64_t K, const int8_t* W, const float* S, float* Y, int64_t N) {
  TORCH_CHECK(K <= kIntMaxK, "the int8 kernels take at most ", kIntMaxK, " inputs per row");
#if defined(SLOWLLM_INT8_DOTS) && defined(SLOWLLM_INT16_DOTS)
  if (M == 1) return byte_dots_matmul<P>(X, M, K, W, S, Y, N);
  if constexpr (P == 3) return int_matmul<SplitKernel>(split_rows(X, M, K), W, S, Y, N);
#elif defined(SLOWLLM_INT8_DOTS)
  return byte_dots_matmul<P>(X, M, K, W, S, Y, N);
#endif
#if defined(SLOWLLM_INT16_DOTS)
  int_matmul<MaddKernel<P>>(short_rows<P>(X, M, K), W, S, Y, N);
#endif
}
