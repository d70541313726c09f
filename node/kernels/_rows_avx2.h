// Several fp32 input rows against bf16 or fp32 weights on the AVX2 builds (fp32_rows_matmul): what a node
// runs for a merged pass of several sessions, a drafted run of positions, or a job's batch of prompts.
// Included by _float_rows.h (inside _kernels.cpp's anonymous namespace), after the weight types (Bf16Weights,
// Fp32Weights), the tile walk (over_tiles) and the row buffers (input_rows) it uses.
// Its own file because it is its own idea: a register tile for 16 registers, partly in assembly.
#pragma once
#if !defined(SLOWLLM_AVX512BF16)

// Tiles of 3 adjacent weight rows x 4 input rows, K a chunk at a time. One chain per (weight row, input
// row), each step's even and odd weights into the same chain (kChains), so 12 chains: their two
// multiply-adds a step wait on each other, and the 8 chains of 2 x 4 tiles (before) were exactly what two
// FMA ports of 4 cycles' latency need, with nothing to spare for a late load. Measured on the 2-core Sapphire
// Rapids-class VM (Intel; 7.7 G 256-bit FMAs a second per core with 8 or more free chains), 8 input rows,
// G FMAs a second:
// - the loop alone, data in L1, one core: 2 x 4 5.8, 3 x 4 in C++ (GCC spills accumulators: 12 chains, 3
//   weights and an input fill all 16 registers, and it keeps the odd half's mask in a 17th) 4.7, 3 x 4 in
//   assembly 6.2;
// - 1.2 GB of bf16 weights streamed, both cores: 2 x 4 5.6-6.4, 3 x 4 in assembly 6.8-7.8 (K 2,048 and
//   8,192 alike).
// So the tile of 4 input rows is fixed-register assembly (fp32_rows_part_3x4); the input rows left over (1-3)
// take the C++ loop (fp32_rows_part), which fits 16 registers there. Both hold one weight half at a time
// (Weights::load8: R registers, not 2R) and sum each chain in fp32_one_row_tile's order: even, odd, step
// by step, chunk after chunk. So every output is bit for bit what its row gets alone, whatever M is.
// Earlier measurements on Zen 4 (2 x 4 tiles): with the inputs loaded once per tile rather than folded into
// every FMA as GCC does by itself, 1.14 -> 1.79 FMAs a cycle; chunks of kChunk inputs (64 alike, 256 up to 7%
// slower, 32 10%); a tile takes all of K before the next (slices of 16-32 rows a chunk apart, each chunk
// of inputs in L1 for all of them, were 3-9% slower in the model: many streams for the prefetchers).
constexpr int kRowsTile = 3;
constexpr int kInputsTile = 4;
constexpr int64_t kChunk = 128;

// A tile's R weight rows (`rs` rows apart) over [k0, k1) against M input rows (`xs` floats apart), carrying
// their chains in `state` [M][R]: R x M chains, R weights (one half at a time) and one input vector in
// registers.
template <int R, int M, typename Weights>
void fp32_rows_part(const float* X, int64_t xs, const typename Weights::T* W, int64_t K, int64_t k0, int64_t k1,
                    __m256* state, int64_t rs) {
  static_assert(kChains == 1, "one chain per (weight row, input row)");
  static_assert(R * M + R + 2 <= 16, "chains, weights, an input and the odd half's mask in 16 registers");
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = state[m * R + r];
  for (int64_t k = k0; k < k1; k += 16)
    for (int half = 0; half < 2; ++half) {
      __m256 w[R];
      for (int r = 0; r < R; ++r) w[r] = Weights::load8(W + r * rs * K + k, half);
      for (int m = 0; m < M; ++m) {
        __m256 x = _mm256_loadu_ps(X + m * xs + k + 8 * half);
        asm("" : "+x"(x));  // (in a register, loaded once for the R rows: GCC would fold it into each FMA)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(w[r], x, acc[m][r]);
      }
    }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) state[m * R + r] = acc[m][r];
}

// fp32_rows_part<3, 4> in fixed registers: chains ymm0-11 (input row m, weight row r: ymm 3m + r), the
// three weight rows' half ymm12-14, the input vector ymm15. Weight rows at w0, w1, w2 (`rs` rows apart),
// input rows at x0-x3, k counting inputs (bf16 weights 2 bytes each, fp32 ones and the inputs 4).
#define SLOWLLM_FMA4(off)                                                                                    \
  "vmovups " off "(%[x0],%[k],4), %%ymm15\n\t"                                                               \
  "vfmadd231ps %%ymm12, %%ymm15, %%ymm0\n\tvfmadd231ps %%ymm13, %%ymm15, %%ymm1\n\t"                         \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n\t"                                                                 \
  "vmovups " off "(%[x1],%[k],4), %%ymm15\n\t"                                                               \
  "vfmadd231ps %%ymm12, %%ymm15, %%ymm3\n\tvfmadd231ps %%ymm13, %%ymm15, %%ymm4\n\t"                         \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n\t"                                                                 \
  "vmovups " off "(%[x2],%[k],4), %%ymm15\n\t"                                                               \
  "vfmadd231ps %%ymm12, %%ymm15, %%ymm6\n\tvfmadd231ps %%ymm13, %%ymm15, %%ymm7\n\t"                         \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n\t"                                                                 \
  "vmovups " off "(%[x3],%[k],4), %%ymm15\n\t"                                                               \
  "vfmadd231ps %%ymm12, %%ymm15, %%ymm9\n\tvfmadd231ps %%ymm13, %%ymm15, %%ymm10\n\t"                        \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n\t"
#define SLOWLLM_LOAD3(insn, scale, off)                                                                      \
  insn " " off "(%[w0],%[k]," scale "), %%ymm12\n\t" insn " " off "(%[w1],%[k]," scale "), %%ymm13\n\t"      \
  insn " " off "(%[w2],%[k]," scale "), %%ymm14\n\t"
// bf16 weights: 16 in one load, the even ones shifted into place, the odd ones masked (Bf16Weights::load16)
#define SLOWLLM_BF16_STEP                                                                                    \
  SLOWLLM_LOAD3("vmovdqu", "2", "")                                                                          \
  "vpslld $16, %%ymm12, %%ymm12\n\tvpslld $16, %%ymm13, %%ymm13\n\tvpslld $16, %%ymm14, %%ymm14\n\t"        \
  SLOWLLM_FMA4("")                                                                                           \
  SLOWLLM_LOAD3("vmovdqu", "2", "")                                                                          \
  "vpand %[mask], %%ymm12, %%ymm12\n\tvpand %[mask], %%ymm13, %%ymm13\n\tvpand %[mask], %%ymm14, %%ymm14\n\t" \
  SLOWLLM_FMA4("32")
// fp32 weights: the first 8 and the next 8 (Fp32Weights::load16)
#define SLOWLLM_FP32_STEP SLOWLLM_LOAD3("vmovups", "4", "") SLOWLLM_FMA4("") SLOWLLM_LOAD3("vmovups", "4", "32") SLOWLLM_FMA4("32")
#define SLOWLLM_ROWS_ASM(STEP)                                                                               \
  asm volatile("vmovups 0(%[s]), %%ymm0\n\tvmovups 32(%[s]), %%ymm1\n\tvmovups 64(%[s]), %%ymm2\n\t"         \
               "vmovups 96(%[s]), %%ymm3\n\tvmovups 128(%[s]), %%ymm4\n\tvmovups 160(%[s]), %%ymm5\n\t"      \
               "vmovups 192(%[s]), %%ymm6\n\tvmovups 224(%[s]), %%ymm7\n\tvmovups 256(%[s]), %%ymm8\n\t"     \
               "vmovups 288(%[s]), %%ymm9\n\tvmovups 320(%[s]), %%ymm10\n\tvmovups 352(%[s]), %%ymm11\n\t"   \
               ".p2align 5\n"                                                                                \
               "1:\n\t" STEP "add $16, %[k]\n\tcmp %[k1], %[k]\n\tjl 1b\n\t"                                 \
               "vmovups %%ymm0, 0(%[s])\n\tvmovups %%ymm1, 32(%[s])\n\tvmovups %%ymm2, 64(%[s])\n\t"         \
               "vmovups %%ymm3, 96(%[s])\n\tvmovups %%ymm4, 128(%[s])\n\tvmovups %%ymm5, 160(%[s])\n\t"      \
               "vmovups %%ymm6, 192(%[s])\n\tvmovups %%ymm7, 224(%[s])\n\tvmovups %%ymm8, 256(%[s])\n\t"     \
               "vmovups %%ymm9, 288(%[s])\n\tvmovups %%ymm10, 320(%[s])\n\tvmovups %%ymm11, 352(%[s])"       \
               : [k] "+r"(k)                                                                                 \
               : [k1] "r"(k1), [s] "r"(state), [w0] "r"(W), [w1] "r"(W + rs * K), [w2] "r"(W + 2 * rs * K), \
                 [x0] "r"(X), [x1] "r"(X + xs), [x2] "r"(X + 2 * xs), [x3] "r"(X + 3 * xs),                  \
                 [mask] "m"(kOddHalves)                                                                      \
               : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",     \
                 "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")

alignas(32) const uint32_t kOddHalves[8] = {0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u,
                                            0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u};

template <typename Weights>
void fp32_rows_part_3x4(const float* X, int64_t xs, const typename Weights::T* W, int64_t K, int64_t k0, int64_t k1,
                        __m256* state, int64_t rs) {
  static_assert(kChains == 1 && kRowsTile == 3 && kInputsTile == 4, "the registers above");
  if (k0 >= k1) return;  // (the loop below runs at least once)
  int64_t k = k0;
  if constexpr (Weights::kEvenOdd) SLOWLLM_ROWS_ASM(SLOWLLM_BF16_STEP);
  else SLOWLLM_ROWS_ASM(SLOWLLM_FP32_STEP);
}
#undef SLOWLLM_ROWS_ASM
#undef SLOWLLM_FP32_STEP
#undef SLOWLLM_BF16_STEP
#undef SLOWLLM_LOAD3
#undef SLOWLLM_FMA4

// R weight rows `rs` apart against `rows` (<= kMaxTileRows) input rows: outputs Y[m * N + r * rs]. kFetch:
// how it asks for weights (prefetch_weights: in a run, its own stream's line ahead; else the next tile's)
template <int R, typename Weights, int kFetch>
void fp32_rows_tile(const float* X, int64_t xs, int64_t rows, int64_t K, const typename Weights::T* W, const float* S,
                    float* Y, int64_t N, int64_t rs) {
  alignas(32) __m256 state[kMaxTileRows * R];
  for (int i = 0; i < kMaxTileRows * R; ++i) state[i] = _mm256_setzero_ps();
  const int64_t body = K / 16 * 16;
  for (int64_t k0 = 0; k0 < body; k0 += kChunk) {
    const int64_t k1 = std::min(body, k0 + kChunk);
    for (int r = 0; r < R; ++r)
      for (int64_t k = k0; k < k1; k += 64 / sizeof(typename Weights::T))
        prefetch_weights<kFetch>(W, r, R, rs, K, k);
    // Passes of 4 input rows, those left over together; 5 rows as 3 + 2 (a pass of one row has too few
    // chains: 4 + 1 took 1.03x the time of 2 x 4 tiles, 8 chains a pass)
    int64_t m = 0;
    for (; rows - m >= kInputsTile && rows - m != 5; m += kInputsTile) {
      if constexpr (R == kRowsTile) fp32_rows_part_3x4<Weights>(X + m * xs, xs, W, K, k0, k1, state + m * R, rs);
      else fp32_rows_part<R, kInputsTile, Weights>(X + m * xs, xs, W, K, k0, k1, state + m * R, rs);
    }
    for (int64_t take; m < rows; m += take) {
      take = rows - m == 5 ? 3 : rows - m;
      switch (take) {
        case 3: fp32_rows_part<R, 3, Weights>(X + m * xs, xs, W, K, k0, k1, state + m * R, rs); break;
        case 2: fp32_rows_part<R, 2, Weights>(X + m * xs, xs, W, K, k0, k1, state + m * R, rs); break;
        case 1: fp32_rows_part<R, 1, Weights>(X + m * xs, xs, W, K, k0, k1, state + m * R, rs); break;
      }
    }
  }
  for (int64_t m = 0; m < rows; ++m)
    for (int r = 0; r < R; ++r) {
      float total = reduce256(state[m * R + r]);
      for (int64_t j = body; j < K; ++j) total += X[m * xs + j] * Weights::value(W[r * rs * K + j]);
      Y[m * N + r * rs] = S ? total * S[r * rs] : total;
    }
}

template <typename Weights>
void fp32_rows_matmul(const float* X0, int64_t M, int64_t K, const typename Weights::T* W, const float* S, float* Y0,
                      int64_t N) {
  const int64_t xs = K + kRowPad;
  const float* rows = input_rows<Weights>(X0, M, K, xs);
  // Where runs ask ahead (Intel: run_fetch), tiles of rows a run apart, as one row's: each of a tile's 3
  // streams goes on where the last tile's ended, a line 2 KB ahead asked for into L1. With 3 adjacent rows
  // a stream was one row (4 KB at hidden 2048, one page), and Intel's L2 streamer, which stops at every
  // page, found each anew: 4 input rows took 161-176 ms for bloom-1b7's 96 block linears and head, one row
  // 119. In runs (two builds in one process in turns): 8 rows 0.856x the time, 4 and 2 rows 0.823x; runs
  // without the prefetch 1.01x, lines asked ahead into L2 0.866x, 1 KB ahead as 2, 4 KB 1.08x. Adjacent rows,
  // the next tile's asked for into L2, were measured faster on Zen 4 (run_rows) and stay elsewhere.
  const int64_t run = run_rows(K * sizeof(typename Weights::T), M);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTileRows) {
    const float* X = rows + m0 * xs;
    float* Y = Y0 + m0 * N;
    const int64_t mr = std::min<int64_t>(kMaxTileRows, M - m0);
    over_tiles<kRowsTile>(N, run, [&](int64_t n, int64_t rs) {
      by_run(rs, [&](auto run) {
        fp32_rows_tile<kRowsTile, Weights, decltype(run)::value>(X, xs, mr, K, W + n * K, S ? S + n : nullptr, Y + n, N, rs);
      });
    }, [&](int64_t n) { fp32_rows_tile<1, Weights, kTiles>(X, xs, mr, K, W + n * K, S ? S + n : nullptr, Y + n, N, 1); });
  }
}
#endif
