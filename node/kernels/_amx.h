// AMX tiles for the bf16-input products (the `amx` build): included by _kernels.cpp inside its anonymous
// namespace, after the helpers it uses (parallel_slices, bf16_to_float). int8 weights take the integer
// tiles of _int8.h.
// Its own file because it is its own idea: tiles, their configuration and Linux's permission for them.
#pragma once
#if defined(SLOWLLM_AMX)
// AMX (Intel Sapphire Rapids and later): bf16 weights straight from memory into tiles of 16 weight rows x
// 32 inputs, the input rows packed once per call in the pairs the tile product wants, 16 at a time. One tile
// product does 16 x 16 x 32 multiply-adds, so even 16 input rows cost about what one does (the weights'
// bytes are the limit), where the AVX512 kernels pay per row (8 rows: 1.6x one row, one thread) and
// PyTorch's AMX GEMM rounds each row differently by batch size. Here every output sums its 32-wide tile
// products in the same order whatever M is: batch invariant at any M, so a node merges as many sessions'
// steps as its limits allow and every one gets its numbers alone.
constexpr int kTileRows = 16;  // weight rows (and input rows) per tile
constexpr int kTileK = 32;  // bf16 inputs per tile row (64 bytes)
// Weight tiles (of 16 rows) per task, and how a task's rows lie (amx_tasks): two tiles, 32 rows, each a
// run apart, so that each of a task's 32 streams goes on where the previous task's ended, as the AVX
// loops' runs do (over_tiles). Four tiles of adjacent rows (64 streams, each one row long) read slower:
// the Sapphire Rapids-class VM, bf16, the 96 block linears and head of a bloom-1b7 token, two builds in
// one process in turns, outputs equal: two tiles in runs 0.906x the time at 1 input row (130.0 against
// 143.6 ms, 8 turns), 0.94x at 8, 0.92x at 16; two tiles of adjacent rows 0.946x, one 0.97x, three in runs
// as two, four in runs 0.976x.
// No software prefetch: asking for each row's line 256 B - 1 KB ahead as the AVX loops do on Intel
// (prefetch_weights) made it slower (adjacent rows, bf16 at one row: 21-26 -> 14-17 GB/s; int8 18-20 ->
// 13-14), and in runs 2 KB ahead 1.55x the time (into L1 or L2 alike): a task's loads already fill
// the line buffers, and 64 prefetches an iteration only queue behind them.
constexpr int kAmxBlocks = 2;

bool amx_permitted() {  // Linux hands out the 8 KB of tile state only on request, once per process
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: sums (weight rows x 16 fp32), tmm4: inputs (16 pairs x 16 rows), tmm5-7: weights (weight rows x 32).
// Fewer weight rows than 16 (the rows beyond a matrix's last whole tile) make shorter tiles: each output is
// its own sum in a tile product, so those rows get exactly the numbers a whole tile gives them.
void configure_tiles(int weight_rows = kTileRows) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = t == 4 ? kTileRows : weight_rows, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// X [M, K] bf16 -> per block of 16 input rows and per 32 inputs, a tile [16 pairs][16 rows][2] (zeros
// beyond M): the layout whose row p holds inputs 2p, 2p+1 of every input row.
std::vector<uint16_t> pack_inputs(const uint16_t* X, int64_t M, int64_t K) {
  const int64_t blocks = (M + kTileRows - 1) / kTileRows, tiles = K / kTileK;
  std::vector<uint16_t> out(blocks * tiles * kTileRows * kTileK, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t t = 0; t < tiles; ++t) {
      uint16_t* tile = out.data() + ((m / kTileRows) * tiles + t) * kTileRows * kTileK;
      for (int p = 0; p < kTileK / 2; ++p) {
        tile[p * kTileK + (m % kTileRows) * 2] = X[m * K + t * kTileK + 2 * p];
        tile[p * kTileK + (m % kTileRows) * 2 + 1] = X[m * K + t * kTileK + 2 * p + 1];
      }
    }
  return out;
}

// The sums of one tile (C [weight rows][16 input rows]) into Y [M, N], with the K tail (K % 32) and scales.
// (the tile's weight rows are n0, n0 + rs, n0 + 2 rs, ...)
void store_tile(const float* C, int weight_rows, const uint16_t* X, int64_t M, int64_t K, const uint16_t* W,
                const float* S, int64_t n0, int64_t rs, int64_t m0, float* Y, int64_t N) {
  const int64_t k_tail = K / kTileK * kTileK;
  for (int i = 0; i < weight_rows; ++i)
    for (int64_t m = m0; m < std::min(M, m0 + kTileRows); ++m) {
      const int64_t n = n0 + i * rs;
      float total = C[i * kTileRows + (m - m0)];
      for (int64_t j = k_tail; j < K; ++j) total += bf16_to_float(X[m * K + j]) * bf16_to_float(W[n * K + j]);
      Y[m * N + n] = S ? total * S[n] : total;
    }
}

// Tasks over the whole tiles of rows [0, N) (N a multiple of 16): task(B, n0, rs) for B tiles (kAmxBlocks,
// or 1 for the tiles left over) of rows n0, n0 + rs, n0 + 2 rs, ... In blocks of L tasks of rows L apart,
// taken by one thread in turn, each of their streams going on where the previous task's ended (L at most
// `run_rows`', and at least 4 blocks per thread, and odd: below), then tasks of adjacent rows. Only where
// each weight row lies changes: each sums alone, in the same order.
// Why odd: a task's 32 streams are L rows apart, and with rows of 4 KB (bf16 at hidden 2048) a run of 64
// put them 256 KB apart: where 2 MB pages (in_huge_pages) are physically contiguous, as on a PC's Linux,
// the same line of every stream then falls in one L2 set, 32 lines for its 16 ways, and each evicts
// another's before it is read. With L odd they spread over 32 sets (rows of 16 KB: 8, four each). The
// Sapphire Rapids-class VM, the 96 block linears and head of a bloom-1b7 token in 2 MB pages, two builds
// in one process in turns, outputs equal, while its host backed those pages contiguously (the old build's
// one row took 153 ms then, 120-123 later the same day): bf16 1 input row 0.825x the time (126.4 against
// 153.3 ms), 8 rows 0.835x, 16 rows 0.83x, int8 8 rows 0.75x. Where the pages scatter (4 KB pages, or
// that VM later) nothing conflicts and odd runs cost 1.02-1.03x; at Bloom-176B's width, whose runs
// were odd or one row already, 0.97-0.99x. The AVX loops' tiles (4-6 streams) fit a set's ways either way.
template <typename Task>
void amx_tasks(int64_t N, int64_t row_bytes, const Task& task) {
  constexpr int64_t per_task = kAmxBlocks * kTileRows;
  int64_t L = run_length(N, per_task, run_rows(row_bytes, 1));
  if (L > 1 && L % 2 == 0) L -= 1;
  const int64_t block = per_task * L, blocks = L > 1 ? N / block : 0, done = blocks * block;
  const int64_t tasks = (N - done) / per_task, singles = (N - done) / kTileRows - tasks * kAmxBlocks;
  parallel_slices(blocks + tasks + singles, 1, [&](int64_t g) {
    configure_tiles();
    if (g < blocks)
      for (int64_t t = 0; t < L; ++t) task(std::integral_constant<int, kAmxBlocks>{}, g * block + t, L);
    else if (g < blocks + tasks) task(std::integral_constant<int, kAmxBlocks>{}, done + (g - blocks) * per_task, 1);
    else task(std::integral_constant<int, 1>{}, done + tasks * per_task + (g - blocks - tasks) * kTileRows, 1);
    _tile_release();
  });
}

// B weight tiles (16 rows each, rs apart, from row n0; one of `weight_rows` where B is 1) against every
// block of 16 input rows; tile registers are immediates, hence the unrolled cases.
template <int B>
void amx_rows(const uint16_t* packed, const uint16_t* X, int64_t M, int64_t K, const uint16_t* W,
              const float* S, int64_t n0, int64_t rs, float* Y, int64_t N, int weight_rows = kTileRows) {
  static_assert(B <= 4, "tmm0-3 hold the sums");
  const int64_t tiles = K / kTileK, stride = K * 2 * rs, next = kTileRows * rs * K;  // (next: tile b to b + 1)
  alignas(64) float C[B][kTileRows * kTileRows];
  const uint16_t* w = W + n0 * K;
  asm volatile("" ::: "memory");  // (the packed inputs are written before the tile loads read them)
  for (int64_t mb = 0; mb * kTileRows < M; ++mb) {
    _tile_zero(0);
    if constexpr (B > 1) _tile_zero(1);
    if constexpr (B > 2) _tile_zero(2);
    if constexpr (B > 3) _tile_zero(3);
    const uint16_t* in = packed + mb * tiles * kTileRows * kTileK;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t k = t * kTileK;
      _tile_loadd(4, in + t * kTileRows * kTileK, 64);
      _tile_loadd(5, w + k, stride);
      _tile_dpbf16ps(0, 5, 4);
      if constexpr (B > 1) { _tile_loadd(6, w + next + k, stride); _tile_dpbf16ps(1, 6, 4); }
      if constexpr (B > 2) { _tile_loadd(7, w + 2 * next + k, stride); _tile_dpbf16ps(2, 7, 4); }
      if constexpr (B > 3) { _tile_loadd(5, w + 3 * next + k, stride); _tile_dpbf16ps(3, 5, 4); }
    }
    _tile_stored(0, C[0], 64);
    if constexpr (B > 1) _tile_stored(1, C[1], 64);
    if constexpr (B > 2) _tile_stored(2, C[2], 64);
    if constexpr (B > 3) _tile_stored(3, C[3], 64);
    asm volatile("" ::: "memory");  // (the sums are stored before these reads)
    for (int b = 0; b < B; ++b)
      store_tile(C[b], weight_rows, X, M, K, W, S, n0 + b * kTileRows * rs, rs, mb * kTileRows, Y, N);
  }
}

// Y [M, N] = X [M, K] @ W [N, K].T (times S[n]), bf16 inputs and weights, fp32 out: the whole tiles of
// 16 weight rows (amx_tasks), then one shorter tile of the rows beyond. Every weight row sums in one tile
// product's order, whatever M is and however the rows are handed out (a vocabulary in chunks, one row
// alone). False where the OS refuses the tile state (the caller uses the AVX512 kernels).
bool amx_matmul(const uint16_t* X, int64_t M, int64_t K, const uint16_t* W, const float* S, float* Y,
                int64_t N) {
  if (K < kTileK || !amx_permitted()) return false;
  const std::vector<uint16_t> packed = pack_inputs(X, M, K);
  const int64_t whole = N / kTileRows * kTileRows;
  amx_tasks(whole, K * 2, [&](auto B, int64_t n0, int64_t rs) {
    amx_rows<decltype(B)::value>(packed.data(), X, M, K, W, S, n0, rs, Y, N);
  });
  if (whole < N) {  // (on this thread: fewer than 16 rows)
    configure_tiles(static_cast<int>(N - whole));
    amx_rows<1>(packed.data(), X, M, K, W, S, whole, 1, Y, N, static_cast<int>(N - whole));
    _tile_release();
  }
  return true;
}
#endif
