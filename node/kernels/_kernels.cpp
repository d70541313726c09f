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

#include "_walk.h"  // parallel_slices, over_tiles, run_rows, by_run, prefetch_weights

#include "_float_rows.h"  // bf16 and fp32 weights: fp32_matmul, bf16_matmul (and _rows_avx2.h)

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
