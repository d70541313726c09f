// How a product walks its weights: tasks handed to the threads in slices (parallel_slices), rows taken in
// runs so that each weight stream goes on where the last tile's ended (run_length, over_tiles, run_rows,
// by_run), and where the loops ask for their next lines (prefetch_weights: own line or 2 KB ahead, chosen
// per machine). Included by _kernels.cpp inside its anonymous namespace, after _cores.h (kernel_threads);
// every kernel file after it (_rows_avx2.h, _amx.h, _int8.h, _int16.h) walks its rows this way.
#pragma once

// Tasks [0, n) in slices of `grain`, taken by the threads one slice at a time: a thread whose core is
// shared with another process (a volunteer's PC is never idle) does fewer slices instead of holding up
// the others at the end, as an even split (at::parallel_for's) would.
// As many threads as cores stay free of other programs (_cores.h): one runs inline, with no region.
template <typename Body>
void parallel_slices(int64_t n, int64_t grain, const Body& body) {
  const int64_t slices = (n + grain - 1) / grain;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(slices, kernel_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t s = next.fetch_add(1); s < slices; s = next.fetch_add(1))
      for (int64_t t = s * grain, end = std::min(n, t + grain); t < end; ++t) body(t);
  });
}

// Bytes of weights each of a tile's R rows reads in one run (over_tiles). A tile reads its R weight rows
// side by side, R streams; with adjacent rows each stream ended after one row (2 KB for int8 at hidden
// 2048) and the next had to be found by the prefetchers again: at one input row int8 rows of 2 KB
// streamed at 33 GB/s where rows of 8 KB reached 43 (512 MB on Zen 4), bf16 rows of 2 KB 34, of 8 KB 50.
// Runs of 32 KB (16 and 64 alike), the 96 block linears of a bloom-1b7 token at one row, alternating
// runs of both builds on Zen 4: int8 39-44 -> 36-39 ms (avx512bf16; once 39 -> 29), 45-49 -> 32-33 (avx2's
// int16 path), bf16 weights with fp32 rows (avx2) 70-81 -> 60-75, bf16 rows (avx512bf16) 1-4% faster;
// the head alike. Only with one input row: with several the dot products are the limit, and adjacent
// rows, the next tile's prefetched, measured faster (8 bf16 rows 8%, 8 int8 rows on avx2 6%; Zen 4, with
// the row after asked for in runs). On Intel, lines asked 2 KB ahead, tiles of several rows take runs too
// (run_rows, below: 0.72-0.87x the time; the AVX-512 builds' fp32 ones, fp32_tile, 0.72-0.77x, 0.79x at
// Bloom-176B's width); AMX's tasks take runs on their own terms (amx_tasks, _amx.h).
// Runs of 256 KB: those figures came from this VM's slow-memory turns (~35 GB/s), where any run length
// reads at the memory's speed; in its fast turns (~60 GB/s) the streams' restarts cost (a standalone
// copy of the avx2 one-row loop, 600 MB: 32 KB runs 48, 64 KB 50, 128 KB 52, 256 KB 52 GB/s, against a
// plain read at 56). The 96 block linears and head of a bloom-1b7 token at one row, both builds in one
// process in turns, then loaded in the other order: fast turns 0.885x the time with bf16 rows
// (avx512bf16), 0.907x with fp32 rows of bf16 weights (avx2), 0.848x for int8 on avx2 (int16), int8 on
// avx512bf16 (VNNI, which reads at ~70% of the memory's speed either way) 1.00-1.03x; slow turns
// 0.94-0.99x. At Bloom-176B's width (one block; bf16 rows of 28 and 112 KB were runs of one row)
// 0.87-0.97x. Runs are still capped at 4 blocks per thread, so a thread on a busy core still holds up no
// one: with a CPU-bound process beside, both alike (0.97-1.00x). 1 MB runs: as 256 KB.
constexpr int64_t kRunBytes = 262144;

// Rows per run for N weight rows taken `per_tile` at a time: at most `run`, and at least 4 blocks a thread
inline int64_t run_length(int64_t N, int64_t per_tile, int64_t run) {
  return std::max<int64_t>(1, std::min(run, N / (per_tile * 4 * at::get_num_threads())));
}

// Rows [0, N) in tiles of R weight rows `rs` apart, whole(n, rs) for the tile whose first row is n (the
// rows left over one by one, one(n)). Rows are taken in blocks of R x L: tile t of a block has rows t,
// t + L, t + 2L, ..., so each of its R streams goes on where the previous tile's ended, L rows (at most
// `run`, run_rows') in one run. A thread takes a block at a time (at least 4 per thread, so that a thread
// whose core is busy holds up no one), or kSlice rows of blocks where blocks are smaller.
template <int R, typename Tile, typename One>
void over_tiles(int64_t N, int64_t run, const Tile& whole, const One& one) {
  const int64_t L = run_length(N, R, run);
  const int64_t block = R * L, blocks = N / block, rest = N - blocks * block;
  parallel_slices(blocks + (rest + R - 1) / R, std::max<int64_t>(1, kSlice / block), [&](int64_t g) {  // (kSlice rows a slice)
    if (g < blocks) {
      for (int64_t t = 0; t < L; ++t) whole(g * block + t, L);
      return;
    }
    const int64_t n = blocks * block + (g - blocks) * R;
    if (n + R <= N) whole(n, 1);
    else for (int64_t r = n; r < N; ++r) one(r);
  });
}

// A tile's prefetch for its weight row r (of R, rows `rs` apart) while it reads the line at k. Tiles of
// adjacent rows (not in a run: tiles of several input rows where runs ask for their own line, and one
// row's tiles where a row is longer than a run, 256 KB: hidden sizes past 131,072 in bf16) ask for the next
// tile's row r, as each stream ends with its row, into L2, not L1 (T0): on Zen 4 the 96 int8 block linears
// of a bloom-1b7 token
// streamed at 22 GB/s with T0 and 24-28 with T2 (avx2's int16 path 20 -> 24), bf16 rows gained ~10% (29
// -> 33 GB/s; they had no prefetch); with T0, probably, the L1 miss buffers are the limit while the tile's
// own loads need them. Sapphire Rapids measured T0, T1, T2 alike. The avx2 builds' fp32 loops for several
// input rows (fp32_rows_tile) still asked T0 until measured on Zen 4 (bf16 weights, 1.4 GB of block-shaped
// matrices, two threads, the two builds alternating in one process and then loaded in the other order, as
// which one loads first moved the ratio by 6-11% even between two builds of one source): T2 1.065x
// the multiply-adds a second at 8 rows, 1.12x at 4, 1.20x at 2, the same outputs bit for bit (T1 like
// T2; no prefetch and T2 two tiles ahead slower than T0).
// Within a run (rs > 1: one input row) the hardware prefetchers follow each stream, and asking for
// the row after made it slower: the row asks for its own line, which it is about to read (no branch in
// the loops), measured on Zen 4 at one row, alternating builds, the 96 block linears of a bloom-1b7 token
// with the memory reading 53-63 GB/s: bf16 rows 45 -> 48-50 GB/s (avx512bf16), fp32 rows of bf16 weights
// 39-41 -> 43-45 (avx512bf16) and 39-42 -> 43-44 (avx2), int8 alike (+-3%). It asks non-temporal (NTA):
// weights read once a token then stay out of L2 and L3, where the rest of the step (the KV cache, norms,
// activations, PyTorch's and Python's own data) lives. Decoding one prompt of the bloom-1b7 shape, every
// block in RAM, two processes measured in turns on Zen 4 (ms/token per turn, new / old): bf16 on
// avx512bf16 0.946 median (faster in 19 of 24 turns; 89.7 -> 83.8 ms in an earlier round's fast turns),
// the avx2 path's fp32 rows 0.986 (13 of 20), int8 0.99 on both builds (avx2 11 of 16).
//
// On Intel it asks 2 KB ahead instead (kAhead, into L1): Intel's L2 streamer stops at every 4 KB page and
// must find the stream again in the next, so a row of 4 KB (bf16 at hidden 2048) restarts it every row;
// a line asked for 2 KB ahead is on its way before the stream crosses. Measured on the 2-core Sapphire
// Rapids-class VM, the 96 block linears of a bloom-1b7 token at one row, builds forced (GB/s of weights;
// torch's sum over the same memory read 19-23): avx2 fp32 rows of bf16 weights 16.2-18.4 (own line, NTA)
// -> 21.0-23.3 (no prefetch) -> 25.6-28.0 (1-2 KB ahead, T0) and 24.8-26.6 (T2); avx2 int8 (int16 path)
// 18.7 -> 18.5 -> 23.4-23.5 (T0) and 24.0-24.4 (T2); avx512bf16 int8 17.8 -> 22.7, bf16 rows 20.7 -> 25.1;
// 512 B ahead 22.7 and 25.9, 8 KB 21.6 and 24.5; NTA at a distance 11-12 (bf16). Decoding one prompt on the
// AVX2 path (PyTorch capped too), in turns: int8 119-125 -> 107-114 ms/token, bf16 weights 295-309 -> 147-153.
// Zen 4 never measured ahead, so neither way is the default anywhere: each machine measures both on its
// first start (_kernels.py's _faster_fetch: 1 and 8 rows, bf16 and int8, 256-512 MB; on this VM ahead
// took 0.81-0.86x own's time on the avx512bf16 and AVX2 builds, 0.95x on amx, whose bf16 tiles walk their
// own way) and keeps the faster, the vendor's (below) unless the other is clearly faster. SLOWLLM_PREFETCH=
// ahead|own forces either on any CPU (bench/decode.py --prefetch compares them).
enum Fetch : int { kTiles = 0, kOwnLine = 1, kAhead = 2 };  // kTiles: adjacent rows' tiles (not in a run)
constexpr int64_t kAheadBytes = 2048;

template <int kFetch, typename T>
inline void prefetch_weights(const T* W, int r, int R, int64_t rs, int64_t K, int64_t k) {
  const char* own = reinterpret_cast<const char*>(W + r * rs * K + k);
  if constexpr (kFetch == kAhead) _mm_prefetch(own + kAheadBytes, _MM_HINT_T0);  // (a prefetch never faults)
  else if constexpr (kFetch == kOwnLine) _mm_prefetch(own, _MM_HINT_NTA);
  else _mm_prefetch(reinterpret_cast<const char*>(W + (r + R) * K + k), _MM_HINT_T2);
}

// How runs ask for their weights until the per-machine measurement (set_prefetch, from _kernels.py's
// calibration) says: SLOWLLM_PREFETCH (ahead, own), else by the CPU's vendor (above).
int choose_run_fetch() {
  if (const char* v = std::getenv("SLOWLLM_PREFETCH")) {
    const std::string mode(v);
    if (mode == "ahead") return kAhead;
    if (mode == "own") return kOwnLine;
    std::fprintf(stderr, "slowllm: SLOWLLM_PREFETCH=%s is neither ahead nor own; choosing for this CPU\n", v);
  }
  unsigned a = 0, b = 0, c = 0, d = 0;
  char vendor[13] = {};
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
  }
  return std::string(vendor) == "GenuineIntel" ? kAhead : kOwnLine;
}

// (an atomic: the calibration sets it once, before the module is handed out, while nothing else runs)
std::atomic<int>& run_fetch_mode() {
  static std::atomic<int> mode{choose_run_fetch()};
  return mode;
}

int run_fetch() { return run_fetch_mode().load(std::memory_order_relaxed); }

std::string prefetch() { return run_fetch() == kAhead ? "ahead" : "own"; }

void set_prefetch(const std::string& mode) {
  TORCH_CHECK(mode == "ahead" || mode == "own", "prefetch is ahead or own, not ", mode);
  run_fetch_mode().store(mode == "ahead" ? kAhead : kOwnLine, std::memory_order_relaxed);
}

// Rows per run for tiles of M input rows whose weight rows are `row_bytes` long (over_tiles): one row's
// always; several rows' where runs ask ahead (Intel: adjacent rows restart its L2 streamer at every row), else 1,
// adjacent rows with the next tile's asked for (measured faster on Zen 4: kRunBytes). The Sapphire Rapids-class VM,
// bloom-1b7's 96 block linears and head, two builds in one process in turns, runs against adjacent rows: the AVX2
// builds' fp32 rows on bf16 weights 8 rows 0.856x the time, 4 and 2 rows 0.823x (_rows_avx2.h); int8 on avx2 (int16)
// 8 rows 0.856x, 3 rows 0.724x; on avx512bf16 (VNNI) 0.801x and 0.720x; avx512bf16's bf16 rows 8 rows 0.869x, 4 rows
// 0.786x.
inline int64_t run_rows(int64_t row_bytes, int M) {
  if (M > 1 && run_fetch() != kAhead) return 1;
  return std::max<int64_t>(1, kRunBytes / std::max<int64_t>(1, row_bytes));  // (K = 0: empty rows)
}

// tile(kTiles) for a tile of adjacent rows, tile(run_fetch()) for one in a run (rs > 1), each an
// std::integral_constant: the loops' prefetch hint is a compile-time choice (prefetch_weights)
template <typename Tile>
void by_run(int64_t rs, const Tile& tile) {
  if (rs <= 1) tile(std::integral_constant<int, kTiles>{});
  else if (run_fetch() == kAhead) tile(std::integral_constant<int, kAhead>{});
  else tile(std::integral_constant<int, kOwnLine>{});
}
