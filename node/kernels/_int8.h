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
// carry): a dot product less per input row, which is most of the work beyond one row.
#pragma once
#if defined(SLOWLLM_INT8_DOTS)
constexpr int64_t kIntMaxK = 65536;  // |sum over K of 255 x 128| < 2^31: an int32 sum cannot overflow

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
  static V dot(V acc, V u8, V s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
  static int64_t sum(V v) { return _mm512_reduce_add_epi32(v); }
  static __m512 floats(const float* x) { return _mm512_loadu_ps(x); }
  static __m512 floats(const uint16_t* x) {  // bf16: the top half of the fp32 with the same value
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
  }
  // F values x * scale rounded to integers (to nearest even), + offset, at most `most`, into P planes
  template <int P, typename In>
  static void planes(const In* x, float scale, int32_t offset, int32_t most, uint8_t* out, int64_t K) {
    __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(floats(x), _mm512_set1_ps(scale))),
                                 _mm512_set1_epi32(offset));
    u = _mm512_min_epi32(u, _mm512_set1_epi32(most));
    for (int p = 0; p < P; ++p)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + p * K), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8 * (P - 1 - p))));
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
  static __m256 floats(const float* x) { return _mm256_loadu_ps(x); }
  static __m256 floats(const uint16_t* x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16));
  }
  template <int P, typename In>
  static void planes(const In* x, float scale, int32_t offset, int32_t most, uint8_t* out, int64_t K) {
    __m256i u = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(floats(x), _mm256_set1_ps(scale))),
                                 _mm256_set1_epi32(offset));
    u = _mm256_min_epi32(u, _mm256_set1_epi32(most));
    // byte 0 of each 32-bit lane to the low 4 bytes of its 128-bit half, then the two halves together
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i halves = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
    for (int p = 0; p < P; ++p) {
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_srli_epi32(u, 8 * (P - 1 - p)), pick), halves);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + p * K), _mm256_castsi256_si128(bytes));
    }
  }
};
#endif

// The input rows as P integer byte planes: plane p (0: high byte) of row m at planes[(m * P + p) * K], and
// each row's step (NaN for a row with an inf or NaN: its outputs are NaN, as a float sum's would be).
template <int P>
struct IntRows {
  static constexpr int32_t kOffset = 1 << (8 * P - 1);
  int64_t M, K;
  std::vector<uint8_t> planes;
  std::vector<double> step;
  std::vector<int64_t> high;  // per row: the sum of the high bytes minus 128 over the VNNI body
  const uint8_t* plane(int64_t m, int p) const { return planes.data() + (m * P + p) * K; }
  int32_t value(int64_t m, int64_t k) const {  // u - offset
    int32_t u = 0;
    for (int p = 0; p < P; ++p) u = u << 8 | plane(m, p)[k];
    return u - kOffset;
  }
};

inline uint32_t magnitude_bits(float v) { uint32_t b; std::memcpy(&b, &v, 4); return b & 0x7FFFFFFFu; }
inline uint32_t magnitude_bits(uint16_t v) { return (static_cast<uint32_t>(v) << 16) & 0x7FFFFFFFu; }
inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return bf16_to_float(v); }

// X [M, K] (bf16 as uint16_t, or fp32) -> IntRows<P>.
template <int P, typename In>
IntRows<P> int_rows(const In* X, int64_t M, int64_t K) {
  constexpr int32_t offset = IntRows<P>::kOffset, most = (1 << (8 * P)) - 1;
  IntRows<P> out{M, K, std::vector<uint8_t>(M * P * K), std::vector<double>(M), std::vector<int64_t>(M)};
  const int64_t vnni_body = K / ByteDots::kBytes * ByteDots::kBytes;
  const int64_t body = K / ByteDots::F * ByteDots::F;
  for (int64_t m = 0; m < M; ++m) {
    const In* x = X + m * K;
    uint32_t top = 0;  // the largest |x| as bits: as integers, finite < inf < NaN
    for (int64_t k = 0; k < K; ++k) top = std::max(top, magnitude_bits(x[k]));
    const int exponent = static_cast<int>(top >> 23) - 127;  // of the largest: it lies in [2^e, 2^(e+1))
    uint8_t* planes = out.planes.data() + m * P * K;  // plane p at planes + p * K
    if (top >= 0x7F800000u || exponent < -100) {  // not finite: NaN out; all below 2^-100: zeros
      out.step[m] = top >= 0x7F800000u ? std::nan("") : 1.0;
      std::memset(planes, 0x80, K), std::memset(planes + K, 0, (P - 1) * K);  // u = offset: x = 0
      continue;
    }
    out.step[m] = std::ldexp(1.0, exponent - (8 * P - 2));  // |x| / step < offset
    const float inverse = std::ldexp(1.0f, 8 * P - 2 - exponent);  // a power of two: x * inverse is exact
    // (rounding to nearest even may reach the offset for the largest: clamped to `most`, one grid step)
    for (int64_t k = 0; k < body; k += ByteDots::F) ByteDots::planes<P>(x + k, inverse, offset, most, planes + k, K);
    for (int64_t k = body; k < K; ++k) {
      const int32_t u = std::min(static_cast<int32_t>(std::nearbyint(as_float(x[k]) * inverse)) + offset, most);
      for (int p = 0; p < P; ++p) planes[p * K + k] = (u >> 8 * (P - 1 - p)) & 0xFF;
    }
    int64_t high = 0;
    for (int64_t k = 0; k < vnni_body; ++k) high += planes[k];
    out.high[m] = high - 128 * vnni_body;
  }
  return out;
}

// One output from its exact integer sum: sum over k of q * (u - offset), times the row's step and scale.
inline float int_output(int64_t total, double step, const float* S) {
  const float y = static_cast<float>(static_cast<double>(total) * step);
  return S ? y * *S : y;
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
template <int M, int R, int P>
void vnni_tile(const IntRows<P>& in, int64_t m0, const int8_t* W, const float* S, float* Y, int64_t stride) {
  using D = ByteDots;
  const int64_t K = in.K, body = K / D::kBytes * D::kBytes;
  const D::V flip = D::flip();
  D::V acc[R][M][P];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int p = 0; p < P; ++p) acc[r][m][p] = D::zero();
  for (int64_t k = 0; k < body; k += D::kBytes) {
    for (int r = 0; r < R; ++r) {
      const D::V w = D::load(W + r * K + k), shifted = D::xor_(w, flip);  // q + 128, unsigned
      for (int m = 0; m < M; ++m) {
        acc[r][m][0] = D::dot(acc[r][m][0], shifted, D::xor_(D::load(in.plane(m0 + m, 0) + k), flip));
        for (int p = 1; p < P; ++p) acc[r][m][p] = D::dot(acc[r][m][p], D::load(in.plane(m0 + m, p) + k), w);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      // high: sum (q + 128) h - 128 sum h = sum q h, h = high byte - 128 (the offset is in h already)
      int64_t total = int_total<P>([&](int p) { return D::sum(acc[r][m][p]); }, in.high[m0 + m]);
      if (body < K) total += int_tail(in, m0 + m, W + r * K, body);
      Y[m * stride + r] = int_output(total, in.step[m0 + m], S ? S + r : nullptr);
    }
  }
}

// Weight rows per VNNI tile for M input rows: R x M x P sums, a weight vector, its offset copy, a plane
// vector and the 0x80 constant fit the vector registers (at most 6: beyond, the rows' loads compete with
// too few sums); and input rows per pass, so that one weight row fits (8; 256-bit: 6 bf16 rows, 4 fp32).
template <int P>
constexpr int vnni_rows_per_tile(int M) { return std::min(6, (ByteDots::kRegisters - 4) / (P * M)); }
template <int P>
constexpr int64_t kVnniPassRows = std::min(8, (ByteDots::kRegisters - 4) / P);

template <int P>
void vnni_matmul(const IntRows<P>& in, const int8_t* W, const float* S, float* Y, int64_t N) {
  const int64_t M = in.M;
  if (M > kVnniPassRows<P>) {  // several passes: each weight row takes them all in turn, its bytes read
    parallel_slices(N, kSlice, [&](int64_t n) {  // from memory once (the later passes find them in L1)
      for (int64_t m0 = 0; m0 < M; m0 += kVnniPassRows<P>) {
#define SLOWLLM_VNNI_PASS(R) vnni_tile<R, 1, P>(in, m0, W + n * in.K, S ? S + n : nullptr, Y + m0 * N + n, N)
        SLOWLLM_DISPATCH(std::min<int64_t>(kVnniPassRows<P>, M - m0), SLOWLLM_VNNI_PASS)
      }
    });
    return;
  }
  auto one = [&](int64_t n) {
    for (int64_t m = 0; m < M; ++m) vnni_tile<1, 1, P>(in, m, W + n * in.K, S ? S + n : nullptr, Y + m * N + n, N);
  };
#define SLOWLLM_VNNI(R) over_tiles<vnni_rows_per_tile<P>(R)>(N, [&](int64_t n) { \
    vnni_tile<R, vnni_rows_per_tile<P>(R), P>(in, 0, W + n * in.K, S ? S + n : nullptr, Y + n, N); }, one)
  SLOWLLM_DISPATCH(M, SLOWLLM_VNNI)
}

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
    const uint8_t* src = j ? in.plane((j - 1) / P, (j - 1) % P) : nullptr;
    for (int64_t t = 0; t < tiles; ++t) {
      uint8_t* tile = out.data() + ((j / 16) * tiles + t) * 1024 + (j % 16) * 4;
      for (int p = 0; p < 16; ++p)
        if (src) std::memcpy(tile + p * 64, src + t * 64 + 4 * p, 4);
        else std::memset(tile + p * 64, 1, 4);
    }
  }
  return out;
}

// B weight tiles (16 rows each, from row n0) against every group of columns, then the outputs.
template <int B, int P>
void amx_int_rows(const uint8_t* packed, const IntRows<P>& in, const int8_t* W, const float* S, int64_t n0, float* Y,
                  int64_t N) {
  const int64_t K = in.K, tiles = K / 64, groups = int_groups<P>(in.M);
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
      _tile_loadd(5, w + t * 64, K);
      _tile_dpbsud(0, 5, 4);
      if constexpr (B > 1) { _tile_loadd(6, w + 16 * K + t * 64, K); _tile_dpbsud(1, 6, 4); }
      if constexpr (B > 2) { _tile_loadd(7, w + 32 * K + t * 64, K); _tile_dpbsud(2, 7, 4); }
      if constexpr (B > 3) { _tile_loadd(5, w + 48 * K + t * 64, K); _tile_dpbsud(3, 5, 4); }
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
      const int64_t n = n0 + 16 * b + i;
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

// Y [M, N] = IntRows @ W [N, K].T (times S[n]) on AMX tiles: 64 weight rows per task, the last whole tiles
// of 16 after them, the rows beyond the last whole tile through VNNI (exact integers: the same numbers).
// False where the OS refuses the tile state or K has no whole tile (the caller uses VNNI).
template <int P>
bool amx_int_matmul(const IntRows<P>& in, const int8_t* W, const float* S, float* Y, int64_t N) {
  if (in.K < 64 || !amx_permitted()) return false;
  const std::vector<uint8_t> packed = pack_columns(in);
  const int64_t per_task = kAmxBlocks * kTileRows, tasks = N / per_task, whole = N / kTileRows;
  const int64_t singles = whole - tasks * kAmxBlocks;
  parallel_slices(tasks + singles, 1, [&](int64_t task) {
    configure_tiles();
    if (task < tasks) amx_int_rows<kAmxBlocks>(packed.data(), in, W, S, task * per_task, Y, N);
    else amx_int_rows<1>(packed.data(), in, W, S, (tasks * kAmxBlocks + task - tasks) * kTileRows, Y, N);
    _tile_release();
  });
  for (int64_t n = whole * kTileRows; n < N; ++n)
    for (int64_t m = 0; m < in.M; ++m) vnni_tile<1, 1, P>(in, m, W + n * in.K, S ? S + n : nullptr, Y + m * N + n, N);
  return true;
}
#endif

// Y [M, N] (fp32) = X [M, K] (bf16 or fp32) @ (q [N, K] * S [N]).T
template <typename In>
void int8_matmul(const In* X, int64_t M, int64_t K, const int8_t* W, const float* S, float* Y, int64_t N) {
  TORCH_CHECK(K <= kIntMaxK, "the int8 kernels take at most ", kIntMaxK, " inputs per row");
  constexpr int P = std::is_same_v<In, float> ? 3 : 2;
  const IntRows<P> in = int_rows<P>(X, M, K);
#if defined(SLOWLLM_AMX)
  if (amx_int_matmul(in, W, S, Y, N)) return;
#endif
  vnni_matmul(in, W, S, Y, N);
}
#endif
