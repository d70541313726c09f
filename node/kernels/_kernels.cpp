// Matrix products for decoding (a few input rows: one per sequence, or per drafted position) that read
// the weights near the memory floor.
//
// At batch 1 a linear layer is a stream of weight bytes: the work per byte is tiny, so the kernel's only
// job is to keep that stream going. One source, built once per instruction set (node/kernels/_kernels.py picks
// the best the CPU has; SLOWLLM_ISA forces one):
// - avx512bf16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later): bf16 input rows
//   against bf16 weights through AVX512-BF16 dot products, in tiles of R weight rows x M input rows (R x M
//   chains, each weight vector loaded once per tile, each input vector once per R rows). Every output sums
//   in the same order whatever M is, so batching never changes a row's numbers. int8 weights are never
//   converted: the input rows are (_int8.h), to integers, for exact VNNI byte dot products.
// - amx (Sapphire Rapids and later): the avx512bf16 build whose bf16-input products run on AMX tiles (up
//   to 16 input rows cost about what one does, batch invariant too), and int8 ones on AMX's int8 tiles.
// - avx2 (AVX2 + FMA: every x86 PC since Haswell, 2013, and all of AMD's since Zen): the input rows are
//   widened to fp32 once per call, and each bf16 weight is widened to fp32 in registers (a shift) for
//   256-bit FMAs; int8 weights are sign-extended to int16 against the input rows made integers, for exact
//   integer multiply-adds (_int16.h). The fp32 loops are also the other builds' fp32 path of one row for
//   bf16 and fp32 weights (the LM head's fp32 hidden states); several rows take 512-bit register tiles
//   there (fp32_tile), each row summed exactly as alone.
// - avx2vnni (AVX2 PCs with AVX-VNNI: Intel Alder Lake and later, AMD Zen 5): the avx2 build with int8
//   weights as integer dot products (_int8.h), 256 bits wide.
// Accumulation is fp32 (int8: exact integers). An Arm build (NEON widening for bf16, SDOT
// byte dot products for int8 as _int8.h does, BFDOT where the CPU has BF16) would be another set of the
// same few primitives (`load16`, the row and tile loops); it is not written yet, and Arm CPUs use
// PyTorch's kernels.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(SLOWLLM_AMX)
#define SLOWLLM_ISA_NAME "amx"
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(SLOWLLM_AVX512BF16)
#define SLOWLLM_ISA_NAME "avx512bf16"
#elif defined(SLOWLLM_AVX2) && defined(SLOWLLM_AVXVNNI)
#define SLOWLLM_ISA_NAME "avx2vnni"
#elif defined(SLOWLLM_AVX2)
#define SLOWLLM_ISA_NAME "avx2"
#else
#error "build with -DSLOWLLM_AVX512BF16 or -DSLOWLLM_AVX2 and the matching -m flags (node/kernels/_kernels.py does)"
#endif
#if defined(SLOWLLM_AVX512BF16) || defined(SLOWLLM_AVXVNNI)
#define SLOWLLM_INT8_DOTS  // int8 weights as integer byte dot products (_int8.h)
#endif
#if !defined(SLOWLLM_AMX)
#define SLOWLLM_INT16_DOTS  // int8 weights as int16 multiply-adds (_int16.h): avx2, and beyond one row (AMX tiles aside)
#endif

namespace {

constexpr int64_t kSlice = 32;  // weight rows per parallel task (at least)
constexpr int64_t kMaxTileRows = 8;  // input rows per tile; more run in groups of 8
// Chains per (weight row, input row) in the 256-bit fp32 loops, each step's 16 weights as two vectors
// (load16). The AVX-512 builds keep the two apart, the order their 512-bit tiles (fp32_tile) reproduce
// for several input rows. The AVX2 builds add both vectors into ONE chain (16 registers: a tile of
// several input rows then holds 12 accumulators, _rows_avx2.h; with two chains, half as many, and every
// weight converted twice as often): the 96 block linears of a bloom-1b7 token with 8 rows 148-165 instead
// of 202-204 ms, its head 86-96 instead of 107 (alternating runs, when tiles were 1 weight row x 8 input
// rows). One row pays a little for it (its two FMAs a step wait on each other): the block linears 84-85
// instead of 81-82 ms (alternating runs; within this VM's noise).
#if defined(SLOWLLM_AVX512BF16)
constexpr int kChains = 2;
#else
constexpr int kChains = 1;
#endif
// Floats between input rows beyond K in the AVX2 builds' several-row loops: rows K apart (K a multiple
// of 1,024) put the same k of 8 rows in one L1 set, whose 8 ways then also hold the weights' lines
// (a standalone loop of 1 weight row x 8 input rows on Zen 4: 11.1 cycles per 16 weights without, 10.4
// with 16 floats, 9.9 with 64)
constexpr int64_t kRowPad = 64;

// Calls per entry point, so that a test can tell the kernels ran (rather than PyTorch's fallback).
std::atomic<int64_t> g_calls[8];

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

// A (weight row, input row)'s kChains chains (the first and the last) as one vector: every fp32 loop
// ends a sum this way (by value: with a pointer, GCC stored the accumulators every step)
__m256 chains_total(__m256 first, __m256 last) { return kChains == 2 ? _mm256_add_ps(first, last) : first; }

#include "_cores.h"  // kernel_threads

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

#include "_amx.h"  // (empty unless SLOWLLM_AMX)
#include "_int8.h"  // int8_matmul

// Y [M, N] (fp32) = X [M, K] (bf16) @ W [N, K].T (times S[n]): the ISA's bf16-input path. avx2 widens
// the few input rows to fp32 once (M x K values: nothing beside the weights) and uses the fp32 path.
template <typename Weights>
void bf16_input_matmul(const torch::Tensor& x, const typename Weights::T* W, const float* S, float* Y, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
#if defined(SLOWLLM_AVX512BF16)
  auto xc = x.contiguous();
  const auto* X = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
#if defined(SLOWLLM_AMX)
  if (amx_matmul(X, M, K, W, S, Y, N)) return;  // (bf16 weights: int8 ones never come here)
#endif
  bf16_matmul<Weights>(X, M, K, W, S, Y, N);
  return;
#endif
  auto xf = x.to(torch::kFloat).contiguous();
  fp32_matmul<Weights>(xf.data_ptr<float>(), M, K, W, S, Y, N);
}

}  // namespace

namespace {
// A vector of bf16, fp16 or fp32 values as fp32: itself, or converted into `buffer` (no allocation per call
// once it has grown: a decode step makes ~100 of these calls)
const float* as_floats(const torch::Tensor& t, std::vector<float>& buffer) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "contiguous CPU scales and bias");
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  buffer.resize(t.numel());
  if (t.scalar_type() == at::kBFloat16) std::copy_n(t.data_ptr<at::BFloat16>(), t.numel(), buffer.begin());
  else if (t.scalar_type() == at::kHalf) std::copy_n(t.data_ptr<at::Half>(), t.numel(), buffer.begin());
  else TORCH_CHECK(false, "bf16, fp16 or fp32 scales and bias");
  return buffer.data();
}

// 8 floats as bf16, rounded to nearest even, NaN kept NaN (what c10::BFloat16 does, 8 at a time)
__m128i bf16_round8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// A fresh [M, N] output; from 2 MB on (the LM head's logits for several rows: 8 MB for 8 fp32 rows of
// Bloom's 250,880) in memory Linux may back with 2 MB pages. An allocation that large is a mapping of its
// own (glibc; slowllm's steady_allocator), and its first writes fault in every 4 KB page: [8, 250880] bf16
// logits widened to fp32 took 2.5 ms a step with 4 KB pages, 0.6 ms with 2 MB ones (Zen 4, THP "madvise").
// (What node/engine/_memory.py's huge_page_empty does for resident weights, here in every entry point at
// once, rather than an `out` tensor each caller would allocate and pass.)
constexpr int64_t kHugePage = 2 << 20;
torch::Tensor new_output(int64_t M, int64_t N, const at::TensorOptions& options) {
  const int64_t bytes = M * N * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  void* p = nullptr;
  const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (bytes < kHugePage || posix_memalign(&p, kHugePage, size) != 0) return torch::empty({M, N}, options);
#if defined(MADV_HUGEPAGE)
  madvise(p, size, MADV_HUGEPAGE);  // (before the first write; a no-op where huge pages are off)
#endif
  return torch::from_blob(p, {M, N}, [](void* q) { std::free(q); }, options);
}

// Where an entry point's fp32 sums Y [M, N] go and its output, in the input's dtype (or fp32 for
// `fp32_out`): a fp32 output holds its own sums; a bf16 or fp16 one is rounded (`finish`) from a per-thread
// buffer, so a call allocates only its output (a fresh fp32 buffer per call cost ~15 us of page faults,
// ~200 calls per token). `round_bf16`: a fp32 output of bf16 inputs holds each sum rounded to bf16, the
// numbers of the bf16 output widened (`.float()`) without writing and reading it (bf16_gemv's fp32_out).
struct Output {
  torch::Tensor out;
  float* Y;
  bool round_bf16 = false;
};
Output output(const torch::Tensor& x, int64_t N, bool fp32_out = false) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "bf16, fp16 or fp32 inputs");
  thread_local std::vector<float> sums;
  auto out = new_output(x.size(0), N, fp32_out ? x.options().dtype(at::kFloat) : x.options());
  if (out.scalar_type() == at::kFloat) return {out, out.data_ptr<float>(), fp32_out && x.scalar_type() == at::kBFloat16};
  sums.resize(x.size(0) * N);
  return {out, sums.data()};
}

// out = Y (+ bias [N]): the bias added in fp32 and the sum rounded once to out's dtype, in one pass (what
// `.to(dtype)` and a bias add cost as separate ops: two allocations and three passes per linear)
torch::Tensor finish(const Output& o, const c10::optional<torch::Tensor>& bias) {
  const at::ScalarType dtype = o.out.scalar_type();
  if (!bias && dtype == at::kFloat && !o.round_bf16) return o.out;
  thread_local std::vector<float> bias_buffer;
  const int64_t M = o.out.size(0), N = o.out.size(1);
  TORCH_CHECK(!bias || bias->numel() == N, "one bias per output");
  const float* b = bias ? as_floats(*bias, bias_buffer) : nullptr;
  auto* dst = reinterpret_cast<uint16_t*>(o.out.data_ptr());
  for (int64_t m = 0; m < M; ++m) {
    float* row = o.Y + m * N;
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) {  // 8 at a time: a head's 250,880 logits per row are no small loop
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(row + n), b ? _mm256_loadu_ps(b + n) : _mm256_setzero_ps());
      if (dtype == at::kFloat)
        _mm256_storeu_ps(row + n, o.round_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16_round8(v)), 16)) : v);
      else _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + m * N + n),
                            dtype == at::kBFloat16 ? bf16_round8(v) : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; n < N; ++n) {
      const float v = row[n] + (b ? b[n] : 0.0f);
      if (dtype == at::kFloat) row[n] = o.round_bf16 ? static_cast<float>(c10::BFloat16(v)) : v;
      else if (dtype == at::kBFloat16) dst[m * N + n] = c10::BFloat16(v).x;  // (rounded to nearest even)
      else dst[m * N + n] = c10::Half(v).x;
    }
  }
  return o.out;
}
}  // namespace

// y [M, N] (x's dtype) = x [M, K] (bf16) @ w [N, K].T (bf16) (+ bias); more than 8 rows run 8 at a time.
// fp32_out: y in fp32, each value the bf16 one (the LM head's bf16 logits, which sampling reads in fp32)
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, bool fp32_out) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 x and w");
  g_calls[0]++;
  const Output o = output(x, w.size(0), fp32_out);
  bf16_input_matmul<Bf16Weights>(x, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), nullptr, o.Y,
                                 w.size(0));
  return finish(o, bias);
}

// y [M, N] (bf16) = (x [M, K] (bf16) @ q [N, K].T) * scale [N] (+ bias); q int8: exact integer sums
// (_int8.h and _int16.h: VNNI byte dot products, AMX tiles, int16 dot products or multiply-adds), any
// number of rows, each its own sum. fp32_out: the bf16 results held as fp32, as bf16_gemv's (an int8 LM
// head's logits in one call, where chunks of bf16 logits were copied into a fp32 [M, V]).
torch::Tensor int8_bf16_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                             bool fp32_out) {
  check(x, q);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kChar, "bf16 x, int8 q");
  TORCH_CHECK(scale.numel() == q.size(0), "one scale per row");
  g_calls[1]++;
  thread_local std::vector<float> scale_buffer;
  const float* S = as_floats(scale, scale_buffer);
  const Output o = output(x, q.size(0), fp32_out);
  auto xc = x.contiguous();
  int8_matmul<2>(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), x.size(0), x.size(1),
                 q.data_ptr<int8_t>(), S, o.Y, q.size(0));
  return finish(o, bias);
}

// y [M, N] (x's dtype) = (x [M, K] @ q [N, K].T) * scale [N] (+ bias); q int8, x bf16/fp16/fp32 (as fp32):
// exact integer sums (_int8.h) of the inputs on a grid of 2^-(bits) of each row's largest: 24 (a fp32
// sum's own rounding: the LM head's logits), or 16 (the bf16 rows' grid, half the integer work: a block's
// int8 linears, whose weights are already rounded to 2^-8 of their row's largest)
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                        int64_t bits) {
  check(x, q);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.numel() == q.size(0), "int8 q and one scale per row");
  TORCH_CHECK(bits == 16 || bits == 24, "bits: 16 or 24");
  g_calls[2]++;
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto xf = x.to(torch::kFloat).contiguous();
  thread_local std::vector<float> scale_buffer;
  const float* S = as_floats(scale, scale_buffer);
  const Output o = output(x, N);
  if (bits == 16) int8_matmul<2>(xf.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), S, o.Y, N);
  else int8_matmul<3>(xf.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), S, o.Y, N);
  return finish(o, bias);
}

namespace {
// y [M, N] (fp32) = x [M, K] (fp32) @ W [N, K].T: the fp32-input entry points without scales
template <typename Weights>
torch::Tensor fp32_input_gemv(const torch::Tensor& x, const typename Weights::T* W, int64_t N) {
  auto xc = x.contiguous();
  auto out = new_output(x.size(0), N, x.options());
  fp32_matmul<Weights>(xc.data_ptr<float>(), x.size(0), x.size(1), W, nullptr, out.data_ptr<float>(), N);
  return out;
}
}  // namespace

// y [M, N] (fp32) = x [M, K] (fp32) @ w [N, K].T (bf16) (+ bias), each weight exact in fp32; 8 rows at a time
torch::Tensor bf16_fp32_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kBFloat16, "fp32 x, bf16 w");
  g_calls[3]++;
  auto out = fp32_input_gemv<Bf16Weights>(x, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.size(0));
  return finish({out, out.data_ptr<float>()}, bias);  // (the bias added in place, as the other entries do)
}

// y [M, N] (fp32) = x [M, K] (fp32) @ w [N, K].T (fp32), each row's sum in the same order whatever M is
torch::Tensor fp32_gemv(torch::Tensor x, torch::Tensor w) {
  check(x, w);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "fp32 x and w");
  g_calls[4]++;
  return fp32_input_gemv<Fp32Weights>(x, w.data_ptr<float>(), w.size(0));
}

// y = table[x] elementwise for bf16 x: a function of one bf16 value is 65,536 answers, so a table that
// PyTorch's own op filled once (Bloom's GELU: `F.gelu(approximate="tanh")` over every bf16 value) gives
// that op's numbers bit for bit at a load per element. PyTorch's bf16 GELU widens each element, takes a
// vectorized tanh and rounds: at 8 prompts' [8, 8192] 77 us a block against 22, at one prompt's 19 against 3.
// Elements a thread takes at least; a share that large first asks for the whole table (128 KB) into L2,
// which the weights' streams have pushed out (one row's 8,192 lookups find too few of its lines to pay)
constexpr int64_t kLookupShare = 16384;
torch::Tensor bf16_lookup(torch::Tensor x, torch::Tensor table) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && table.scalar_type() == at::kBFloat16, "bf16 x and table");
  TORCH_CHECK(table.numel() == 65536 && table.is_contiguous(), "a table of every bf16 value's answer, in bit order");
  TORCH_CHECK(x.device().is_cpu() && table.device().is_cpu(), "CPU tensors");
  g_calls[5]++;
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const auto* in = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* answers = reinterpret_cast<const uint16_t*>(table.data_ptr<at::BFloat16>());
  auto* y = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, xc.numel(), kLookupShare, [&](int64_t begin, int64_t end) {
    if (end - begin >= kLookupShare)
      for (int64_t i = 0; i < 65536; i += 32) _mm_prefetch(reinterpret_cast<const char*>(answers + i), _MM_HINT_T1);
    for (int64_t i = begin; i < end; ++i) y[i] = answers[in[i]];
  });
  return out;
}


// Reads every byte of x as a run's tiles read weights (64 bytes a step; `ahead`: each line asked
// kAheadBytes ahead, as kAhead runs do), on the kernels' threads, and returns their OR (so no read is
// skipped). bench/decode.py's floor takes the faster of this and torch's sum: where the prefetchers stop at
// every page, a plain read (torch's sum) is slower than the kernels' own and would make no floor.
int64_t read_bytes(torch::Tensor x, bool ahead) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "a contiguous CPU tensor");
  const char* p = static_cast<const char*>(x.data_ptr());
  const int64_t n = x.numel() * x.element_size(), chunk = 1 << 20;
  std::atomic<int64_t> all{0};
  parallel_slices((n + chunk - 1) / chunk, 1, [&](int64_t c) {
    __m256i acc = _mm256_setzero_si256();
    int64_t i = c * chunk;
    const int64_t end = std::min(n, i + chunk);
    for (; i + 64 <= end; i += 64) {
      if (ahead) _mm_prefetch(p + i + kAheadBytes, _MM_HINT_T0);
      acc = _mm256_or_si256(acc, _mm256_or_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32))));
    }
    int64_t bits = _mm256_extract_epi64(acc, 0) | _mm256_extract_epi64(acc, 1) | _mm256_extract_epi64(acc, 2) |
                   _mm256_extract_epi64(acc, 3);
    for (; i < end; ++i) bits |= static_cast<uint8_t>(p[i]);
    all.fetch_or(bits, std::memory_order_relaxed);
  });
  return all.load();
}

#include "_attention.h"  // attention_bmm, attention_bmm_pieces

std::map<std::string, int64_t> calls() {
  return {{"bf16_gemv", g_calls[0]}, {"int8_bf16_gemv", g_calls[1]}, {"int8_gemv", g_calls[2]},
          {"bf16_fp32_gemv", g_calls[3]}, {"fp32_gemv", g_calls[4]}, {"bf16_lookup", g_calls[5]},
          {"attention_bmm", g_calls[6]}, {"attention_bmm_pieces", g_calls[7]}};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = SLOWLLM_ISA_NAME;
  // The products run without Python's lock, as PyTorch's own ops do: a node's or coordinator's other
  // threads (its event loop sending and reading the next messages, another wave's head) go on meanwhile.
  using nogil = py::call_guard<py::gil_scoped_release>;
  const auto bias = py::arg("bias") = py::none();  // added in fp32 before the one rounding to x's dtype
  m.def("bf16_gemv", &bf16_gemv, nogil(), py::arg("x"), py::arg("w"), bias, py::arg("fp32_out") = false,
        "bf16 x [M, K] @ bf16 w [N, K].T (+ bias), fp32 accumulation; fp32_out: the bf16 results as fp32");
  m.def("int8_bf16_gemv", &int8_bf16_gemv, nogil(), py::arg("x"), py::arg("q"), py::arg("scale"), bias,
        py::arg("fp32_out") = false,
        "bf16 x [M, K] @ (int8 q [N, K] * scale [N]).T (+ bias), exact integer sums; fp32_out: the bf16 results as fp32");
  m.def("int8_gemv", &int8_gemv, nogil(), py::arg("x"), py::arg("q"), py::arg("scale"), bias, py::arg("bits") = 24,
        "x [M, K] (as fp32) @ (int8 q [N, K] * scale [N]).T (+ bias), the inputs on a grid of 2^-bits (24 or 16)");
  m.def("bf16_fp32_gemv", &bf16_fp32_gemv, nogil(), py::arg("x"), py::arg("w"), bias,
        "fp32 x [M, K] @ bf16 w [N, K].T (+ bias), fp32 throughout");
  m.def("fp32_gemv", &fp32_gemv, nogil(), "fp32 x [M, K] @ fp32 w [N, K].T, batch invariant");
  m.def("bf16_lookup", &bf16_lookup, nogil(), py::arg("x"), py::arg("table"),
        "table[x] elementwise for bf16 x and a bf16 table [65536] of every bf16 value's answer, in bit order");
  m.def("attention_bmm", &attention_bmm, nogil(), py::arg("a"), py::arg("b"), py::arg("c") = py::none(),
        py::arg("alpha") = 1.0, py::arg("beta") = 1.0,
        "beta * c + alpha * (a [B, M, K] @ b [B, K, N]) for M <= 8 (baddbmm; bmm without c), bf16 or fp32");
  m.def("attention_bmm_pieces", &attention_bmm_pieces, nogil(), py::arg("a"), py::arg("pieces"), py::arg("keys"),
        py::arg("length"), py::arg("c") = py::none(), py::arg("alpha") = 1.0, py::arg("beta") = 1.0,
        py::arg("tails") = std::vector<int64_t>{}, py::arg("gaps") = std::vector<int64_t>{},
        "attention_bmm with b in pieces, each piece's positions at the end of `length` (or its tail there, the "
        "rest `gap` before), zero padding elsewhere");
  m.def("calls", &calls, "how many times each entry point ran in this process");
  m.def("prefetch", &prefetch, "how runs ask for their weights now: ahead (2 KB ahead) or own (their own line)");
  m.def("set_prefetch", &set_prefetch, py::arg("mode"),
        "ahead or own from now on (the per-machine measurement's choice); the same numbers either way");
  m.def("read_bytes", &read_bytes, nogil(), py::arg("x"), py::arg("ahead"),
        "every byte of x read as the kernels read weights (ahead: asked 2 KB ahead); their OR");
  m.def("kernel_threads", &kernel_threads,
        "threads the kernels' parallel work uses now: PyTorch's, less the cores other programs keep busy");
}
