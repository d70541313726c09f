// Attention's two products in a decode step: Bloom's `alibi.baddbmm(query, keys.T)` (the scores) and
// `bmm(probs, values)` (the weighted values), for a few queries per head (one per session, or a speculative
// check's few) against every cached position. transformers' BloomAttention still runs them, as it
// always does; these are what the two PyTorch ops compute, for the shapes a decode step gives them
// (node/engine/_attention_products.py hands them here).
//
// Why: each head's product is a [M, K] x [K, N] with M = 1-8, a stream through the cache with ~1 multiply-add
// per element read, and the library paths PyTorch takes for it are made for larger matrices. Zen 4, 8
// sessions (128 heads of 128), caches read from memory (as in a step), us, PyTorch -> this: bf16 (oneDNN)
// scores at 25 / 300 / 1,024 positions 251 -> 51, 2,058 -> 578, 13,237 -> 1,195, weighted values 188 -> 59,
// 1,215 -> 369, 11,624 -> 1,071; fp32 (MKL) scores 176 -> 122, 1,446 -> 762, 2,807 -> 2,494, values 70 -> 71,
// 1,434 -> 717, 2,932 -> 2,269. At 1,024 positions this reads at the memory's speed (~34 GB/s there).
//
// One loop per form of the right-hand matrix b, fp32 sums (bf16 widened in registers: exact), each output
// rounded once to the inputs' dtype:
// - "rows" (b's n contiguous: keys stored transposed, values as rows): out[m, n] += a[m, k] * b[k, n] over
//   k, vectors along n; up to 32 outputs in registers (rows_tile), more in rows of sums in L1 (rows_stream);
// - "dots" (b's k contiguous: keys as rows, values transposed, which PyTorch's own bf16 loops prefer for
//   prompts): out[m, n] = dot(a[m, :], b[n, :]), vectors along k, summed across at the end.
// A query's sums run in the same order whatever M is, so its scores do not depend on the queries batched
// beside it. 256-bit lanes in every build (Zen 4 splits 512-bit ops in two; the loop is a read).

namespace attention {

constexpr int64_t kMaxQueries = 8;  // queries per head this path takes (more: PyTorch's GEMMs pay)

// (8 values as fp32, and one: _int8.h's `floats8` and `as_float`)
// the first `n` (1-7) of 8, zeros after: a row's end, without reading past it (masked loads: lanes
// masked off are never read, so a row that ends where its buffer does is safe)
inline __m256i first_lanes(int64_t n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
inline __m256 load_part(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
inline __m256 load_part(const uint16_t* p, int64_t n) {
#if defined(SLOWLLM_AVX512BF16)
  const __m128i v = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1), p);
#else  // pairs of bf16 as 32-bit lanes, and an odd last one on its own
  __m128i v = _mm_maskload_epi32(reinterpret_cast<const int*>(p), _mm256_castsi256_si128(first_lanes(n / 2)));
  if (n & 1) {
    alignas(16) uint16_t last[8] = {};
    last[n - 1] = p[n - 1];
    v = _mm_or_si128(v, _mm_load_si128(reinterpret_cast<const __m128i*>(last)));
  }
#endif
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
template <typename T>
inline __m256 load_upto(const T* p, int64_t n) { return n >= 8 ? floats8(p) : load_part(p, n); }

// out[m, n0 + i] for i < count (1-8) = alpha * sum + beta * c[m, n0 + i], rounded once to T
template <typename T>
inline void store_upto(T* out, __m256 sum, const T* c, float alpha, float beta, int64_t count) {
  __m256 v = _mm256_mul_ps(_mm256_set1_ps(alpha), sum);
  if (c != nullptr) v = _mm256_fmadd_ps(_mm256_set1_ps(beta), load_upto(c, count), v);
  if constexpr (std::is_same_v<T, float>) {
    if (count >= 8) _mm256_storeu_ps(out, v);
    else {
      float tmp[8];
      _mm256_storeu_ps(tmp, v);
      std::memcpy(out, tmp, count * sizeof(float));
    }
  } else {
    const __m128i r = bf16_round8(v);
    if (count >= 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(out), r);
    else {
      uint16_t tmp[8];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), r);
      std::memcpy(out, tmp, count * sizeof(uint16_t));
    }
  }
}

// Where one head's matrices are: a [M, K] (k contiguous), b (rows: [K, N], n contiguous; dots: [N, K], k
// contiguous), c [M, N] or null (n contiguous; rows `ldc` apart, 0 when broadcast), out [M, N] (n
// contiguous, rows `ldo` apart).
template <typename T>
struct Head {
  const T* a; int64_t lda;
  const T* b; int64_t ldb;
  const T* c; int64_t ldc;
  T* out; int64_t ldo;
};

// "rows": vectors along n, NV of them (8 NV outputs) per query row, for the queries [m0, m0 + MT); the
// last tile of a row is `count` (< 8 NV) wide
template <typename T, int MT, int NV>
void rows_tile(const Head<T>& h, int64_t K, int64_t N, int64_t m0, int64_t n0, float alpha, float beta) {
  const int64_t count = std::min<int64_t>(8 * NV, N - n0);
  __m256 acc[MT][NV];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_setzero_ps();
  if (count == 8 * NV) {
    for (int64_t k = 0; k < K; ++k) {
      const T* row = h.b + k * h.ldb + n0;
      __m256 w[NV];
      for (int j = 0; j < NV; ++j) w[j] = floats8(row + 8 * j);
      for (int m = 0; m < MT; ++m) {
        const __m256 q = _mm256_set1_ps(as_float(h.a[(m0 + m) * h.lda + k]));
        for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_fmadd_ps(q, w[j], acc[m][j]);
      }
    }
  } else {  // a row's end: the same sums, the last vector read in part
    for (int64_t k = 0; k < K; ++k) {
      const T* row = h.b + k * h.ldb + n0;
      __m256 w[NV];
      for (int j = 0; j < NV; ++j) w[j] = 8 * j < count ? load_upto(row + 8 * j, count - 8 * j) : _mm256_setzero_ps();
      for (int m = 0; m < MT; ++m) {
        const __m256 q = _mm256_set1_ps(as_float(h.a[(m0 + m) * h.lda + k]));
        for (int j = 0; j < NV; ++j) acc[m][j] = _mm256_fmadd_ps(q, w[j], acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NV && 8 * j < count; ++j)
      store_upto(h.out + (m0 + m) * h.ldo + n0 + 8 * j, acc[m][j],
                 h.c ? h.c + (m0 + m) * h.ldc + n0 + 8 * j : nullptr, alpha, beta, count - 8 * j);
}

// "dots": 4 outputs n0..n0+3 (fewer at the end) per query row, each a vector of partial sums along k,
// summed across at the end (always in the same order)
template <typename T, int MT>
void dots_tile(const Head<T>& h, int64_t K, int64_t N, int64_t m0, int64_t n0, float alpha, float beta) {
  constexpr int NT = 4;
  const int64_t nt = std::min<int64_t>(NT, N - n0);
  __m256 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const int64_t left = K - k;
    __m256 q[MT];
    for (int m = 0; m < MT; ++m) q[m] = load_upto(h.a + (m0 + m) * h.lda + k, left);
    for (int j = 0; j < nt; ++j) {
      const __m256 w = load_upto(h.b + (n0 + j) * h.ldb + k, left);
      for (int m = 0; m < MT; ++m) acc[m][j] = _mm256_fmadd_ps(q[m], w, acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(32) float sums[8] = {};
    for (int j = 0; j < nt; ++j) sums[j] = reduce256(acc[m][j]);
    store_upto(h.out + (m0 + m) * h.ldo + n0, _mm256_load_ps(sums), h.c ? h.c + (m0 + m) * h.ldc + n0 : nullptr,
               alpha, beta, nt);
  }
}

// "rows" for longer rows (more than 32 outputs: a head's values, or the scores of more than 32 positions):
// each of b's rows read whole and in order, into rows of sums in L1, for up to 4 queries at a time. A tile
// of registers (rows_tile) would walk b down 32-output columns, one line from each row in turn (a row's
// length apart), and the prefetchers lose it: Zen 4, bf16, 8 sessions' 128 heads, caches read from memory (as in a step), the
// scores at 300 / 1,024 positions 953 / 2,655 us in tiles against 500 / 990 (34 GB/s, the memory's speed),
// the values 757 / 2,147 against 410 / 1,094; fp32 alike (1,024 positions: 4,250 / 2,118 and 3,556 / 1,764).
template <typename T, int MT>
void rows_stream(const Head<T>& h, int64_t m0, int64_t K, int64_t N, float alpha, float beta) {
  thread_local std::vector<float> buffer;
  const int64_t stride = (N + 15) / 8 * 8;  // (room for a last part vector; rows 32-byte apart)
  buffer.assign(MT * stride, 0.0f);
  float* s = buffer.data();
  const int64_t N8 = N / 8 * 8;
  for (int64_t k = 0; k < K; ++k) {
    const T* row = h.b + k * h.ldb;
    __m256 q[MT];
    for (int m = 0; m < MT; ++m) q[m] = _mm256_set1_ps(as_float(h.a[(m0 + m) * h.lda + k]));
    for (int64_t n = 0; n < N; n += 8) {
      const __m256 w = n < N8 ? floats8(row + n) : load_part(row + n, N - n);
      for (int m = 0; m < MT; ++m)
        _mm256_storeu_ps(s + m * stride + n, _mm256_fmadd_ps(q[m], w, _mm256_loadu_ps(s + m * stride + n)));
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int64_t n = 0; n < N; n += 8)
      store_upto(h.out + (m0 + m) * h.ldo + n, _mm256_loadu_ps(s + m * stride + n),
                 h.c ? h.c + (m0 + m) * h.ldc + n : nullptr, alpha, beta, N - n);
}

// One head: its queries in groups (of 4, or 2 in registers), then one by one (each query's sums in the
// same order either way)
template <typename T>
void head(const Head<T>& h, int64_t M, int64_t K, int64_t N, bool dots, float alpha, float beta) {
  int64_t m = 0;
  if (dots) {
    for (; m + 4 <= M; m += 4)
      for (int64_t n = 0; n < N; n += 4) dots_tile<T, 4>(h, K, N, m, n, alpha, beta);
    for (; m < M; ++m)
      for (int64_t n = 0; n < N; n += 4) dots_tile<T, 1>(h, K, N, m, n, alpha, beta);
  } else if (N > 32) {
    for (; m + 4 <= M; m += 4) rows_stream<T, 4>(h, m, K, N, alpha, beta);
    for (; m < M; ++m) rows_stream<T, 1>(h, m, K, N, alpha, beta);
  } else {
    for (; m + 2 <= M; m += 2) rows_tile<T, 2, 4>(h, K, N, m, 0, alpha, beta);  // (8 + 4 + 1 registers of 16)
    for (; m < M; ++m) rows_tile<T, 1, 4>(h, K, N, m, 0, alpha, beta);
  }
}

// Heads in parallel when there is enough work for two threads to pay (waking them costs ~5-10 us)
constexpr int64_t kParallelWork = 1 << 15;  // multiply-adds

template <typename T>
void run(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor* c, const torch::Tensor& out,
         bool dots, float alpha, float beta) {
  const int64_t B = a.size(0), M = a.size(1), K = a.size(2), N = out.size(2);
  const T* A = reinterpret_cast<const T*>(a.data_ptr());
  const T* Bm = reinterpret_cast<const T*>(b.data_ptr());
  const T* C = c ? reinterpret_cast<const T*>(c->data_ptr()) : nullptr;
  T* O = reinterpret_cast<T*>(out.data_ptr());
  const int64_t ldb = dots ? b.stride(2) : b.stride(1);
  auto one = [&](int64_t i) {
    const Head<T> h{A + i * a.stride(0), a.stride(1), Bm + i * b.stride(0), ldb,
                    C ? C + i * c->stride(0) : nullptr, C ? c->stride(1) : 0, O + i * M * N, N};
    head(h, M, K, N, dots, alpha, beta);
  };
  const int64_t work = B * M * K * N;
  if (work < kParallelWork || kernel_threads() == 1) {
    for (int64_t i = 0; i < B; ++i) one(i);
    return;
  }
  parallel_slices(B, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, M * K * N)), one);
}

// A merged pass's products (node/engine/_merge.py), b in pieces: each session's cache where it lies, not
// copied into one padded matrix. pieces[j] holds the next pieces[j].size(0) of the B heads and n_j positions
// of each, placed in the pass's row of `length` positions as MergedCache lays a session out: its last
// tails[j] (its new positions) at the row's end, the ones before them ending gaps[j] positions earlier (a
// speculative check's longer step beside it: holes), padding before them; every other position is padding
// (zero keys and values, what the copy this replaces wrote). keys: the scores, b [B, K, length], the
// padding's columns beta * c (as zero keys give); values: the weighted values, b [B, length, N], the
// padding's rows skipped (zero values, probabilities 0: they add nothing). A head's sums are those of its
// session's step alone (a score's column is one dot product wherever it is written; a weighted value sums
// its session's positions in order, its probabilities gathered past the gap).
template <typename T>
void run_pieces(const torch::Tensor& a, const std::vector<torch::Tensor>& pieces, const std::vector<int64_t>& tails,
                const std::vector<int64_t>& gaps, bool keys, int64_t length, const torch::Tensor* c,
                const torch::Tensor& out, float alpha, float beta) {
  const int64_t B = a.size(0), M = a.size(1), K = a.size(2), N = out.size(2);
  const T* A = reinterpret_cast<const T*>(a.data_ptr());
  const T* C = c ? reinterpret_cast<const T*>(c->data_ptr()) : nullptr;
  const int64_t ldc = c ? c->stride(1) : 0;
  T* O = reinterpret_cast<T*>(out.data_ptr());
  std::vector<int64_t> owner(B), first(pieces.size());
  int64_t work = 0;
  for (int64_t j = 0, i = 0; j < static_cast<int64_t>(pieces.size()); ++j) {
    first[j] = i;
    for (int64_t r = 0; r < pieces[j].size(0); ++r) owner[i++] = j;
    work += pieces[j].size(0) * pieces[j].size(1) * pieces[j].size(2) * M;
  }
  auto one = [&](int64_t i) {
    const int64_t j = owner[i];
    const torch::Tensor& p = pieces[j];
    const int64_t n = keys ? p.size(2) : p.size(1);  // the session's positions
    const int64_t gap = gaps[j], tail = gap ? tails[j] : n, split = n - tail, lead = length - n - gap;
    const bool dots = p.stride(2) != 1;
    const int64_t ldb = dots ? p.stride(2) : p.stride(1);
    const T* b = reinterpret_cast<const T*>(p.data_ptr()) + (i - first[j]) * p.stride(0);
    const T* ai = A + i * a.stride(0);
    const T* ci = C ? C + i * c->stride(0) : nullptr;
    T* o = O + i * M * N;
    if (keys) {  // columns [0, split) at lead, [split, n) at length - tail; beta * c between and before
      if (split > 0) head(Head<T>{ai, a.stride(1), b, ldb, ci ? ci + lead : nullptr, ldc, o + lead, N}, M, K, split,
                          dots, alpha, beta);
      const T* rest = b + split * (dots ? ldb : 1);
      const int64_t end = length - tail;
      head(Head<T>{ai, a.stride(1), rest, ldb, ci ? ci + end : nullptr, ldc, o + end, N}, M, K, tail, dots, alpha,
           beta);
      const std::pair<int64_t, int64_t> padding[2] = {{0, lead}, {lead + split, end}};
      for (int64_t m = 0; m < M; ++m)
        for (const auto& [from, to] : padding)
          for (int64_t x = from; x < to; x += 8)
            store_upto(o + m * N + x, _mm256_setzero_ps(), ci ? ci + m * ldc + x : nullptr, alpha, beta,
                       std::min<int64_t>(8, to - x));
    } else if (gap == 0) {
      head(Head<T>{ai + lead, a.stride(1), b, ldb, ci, ldc, o, N}, M, n, N, dots, alpha, beta);
    } else {  // the probabilities of its positions side by side (M x n), as its step alone has them
      thread_local std::vector<T> gathered;
      gathered.resize(M * n);
      for (int64_t m = 0; m < M; ++m) {
        std::memcpy(gathered.data() + m * n, ai + m * a.stride(1) + lead, split * sizeof(T));
        std::memcpy(gathered.data() + m * n + split, ai + m * a.stride(1) + length - tail, tail * sizeof(T));
      }
      head(Head<T>{gathered.data(), n, b, ldb, ci, ldc, o, N}, M, n, N, dots, alpha, beta);
    }
  };
  if (work < kParallelWork || kernel_threads() == 1) {
    for (int64_t i = 0; i < B; ++i) one(i);
    return;
  }
  parallel_slices(B, std::max<int64_t>(1, kParallelWork * B / work), one);
}

// c broadcast to the output [B, M, N], n contiguous, in a's dtype; none where beta is 0 (c is then not read,
// as PyTorch's ops do: NaN in it does not propagate)
inline c10::optional<torch::Tensor> broadcast_c(const c10::optional<torch::Tensor>& c, double beta,
                                                const torch::Tensor& a, int64_t B, int64_t M, int64_t N) {
  if (!c || beta == 0.0) return c10::nullopt;
  torch::Tensor cc = c->expand({B, M, N});
  TORCH_CHECK(cc.scalar_type() == a.scalar_type(), "c in the inputs' dtype");
  return cc.stride(2) == 1 ? cc : cc.contiguous();
}

}  // namespace attention

// out [B, M, N] = beta * c + alpha * (a [B, M, K] @ b [B, K, N]), fp32 sums rounded once to the inputs'
// dtype (bf16 or fp32): `torch.baddbmm(c, a, b, beta=, alpha=)`, and `torch.bmm(a, b)` without c, for
// M <= 8. b may be a view whose last or middle dimension is contiguous (the cache's keys or values as
// stored); c may repeat one row for every query (stride 0).
torch::Tensor attention_bmm(torch::Tensor a, torch::Tensor b, c10::optional<torch::Tensor> c, double alpha,
                            double beta) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(2) == b.size(1),
              "a [B, M, K] and b [B, K, N]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16),
              "a and b both bf16 or both fp32");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "CPU tensors");
  TORCH_CHECK(a.size(1) <= attention::kMaxQueries, "at most 8 queries per head");
  g_calls[6]++;
  const int64_t B = a.size(0), M = a.size(1), N = b.size(2);
  if (a.stride(2) != 1) a = a.contiguous();
  const bool dots = b.stride(2) != 1 && b.stride(1) == 1;
  if (!dots && b.stride(2) != 1) b = b.contiguous();
  auto out = torch::empty({B, M, N}, a.options());
  if (B == 0 || M == 0 || N == 0) return out;
  const c10::optional<torch::Tensor> cc = attention::broadcast_c(c, beta, a, B, M, N);
  if (a.size(2) == 0) {  // no products: beta * c (or zeros), as PyTorch gives
    return cc ? (*cc * beta).to(a.scalar_type()) : out.zero_();
  }
  const torch::Tensor* cp = cc ? &*cc : nullptr;
  if (a.scalar_type() == at::kFloat) attention::run<float>(a, b, cp, out, dots, alpha, beta);
  else attention::run<uint16_t>(a, b, cp, out, dots, alpha, beta);
  return out;
}

// `attention_bmm` with b in pieces (attention::run_pieces): a merged pass's sessions' caches where they lie.
// keys: a [B, M, K], each piece [b_j, K, n_j], out [B, M, length]; values: a [B, M, length], each piece
// [b_j, n_j, N], out [B, M, N]; the pieces' b_j add up to B. Piece j's positions end at the row's end
// (gaps empty, or gaps[j] 0), or its last tails[j] do and the others end gaps[j] positions before them.
torch::Tensor attention_bmm_pieces(torch::Tensor a, std::vector<torch::Tensor> pieces, bool keys, int64_t length,
                                   c10::optional<torch::Tensor> c, double alpha, double beta,
                                   std::vector<int64_t> tails, std::vector<int64_t> gaps) {
  TORCH_CHECK(a.dim() == 3 && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
                  a.device().is_cpu(), "a [B, M, K], bf16 or fp32, on the CPU");
  TORCH_CHECK(a.size(1) <= attention::kMaxQueries, "at most 8 queries per head");
  TORCH_CHECK(!pieces.empty(), "at least one piece");
  TORCH_CHECK(keys || a.size(2) == length, "values: a [B, M, length]");
  if (gaps.empty()) gaps.assign(pieces.size(), 0);
  if (tails.empty()) tails.assign(pieces.size(), 0);
  TORCH_CHECK(gaps.size() == pieces.size() && tails.size() == pieces.size(), "a tail and a gap per piece");
  const int64_t B = a.size(0), M = a.size(1), N = keys ? length : pieces[0].size(2);
  int64_t heads = 0;
  for (size_t j = 0; j < pieces.size(); ++j) {
    auto& p = pieces[j];
    TORCH_CHECK(p.dim() == 3 && p.scalar_type() == a.scalar_type() && p.device().is_cpu(),
                "pieces [b, K, n] or [b, n, N] in a's dtype");
    TORCH_CHECK(keys ? p.size(1) == a.size(2) : p.size(2) == N,
                keys ? "keys' pieces [b, K, n]" : "values' pieces [b, n, N]");
    const int64_t n = keys ? p.size(2) : p.size(1);
    TORCH_CHECK(gaps[j] >= 0 && (gaps[j] == 0 || (tails[j] >= 1 && tails[j] <= n)) && n + gaps[j] <= length,
                "each piece's positions (and gap) within length, its tail within its positions");
    if (p.stride(2) != 1 && p.stride(1) != 1) p = p.contiguous();
    heads += p.size(0);
  }
  TORCH_CHECK(heads == B, "the pieces hold a's B heads");
  g_calls[7]++;
  if (a.stride(2) != 1) a = a.contiguous();
  auto out = torch::empty({B, M, N}, a.options());
  if (B == 0 || M == 0 || N == 0) return out;
  const c10::optional<torch::Tensor> cc = attention::broadcast_c(c, beta, a, B, M, N);
  const torch::Tensor* cp = cc ? &*cc : nullptr;
  if (a.scalar_type() == at::kFloat)
    attention::run_pieces<float>(a, pieces, tails, gaps, keys, length, cp, out, alpha, beta);
  else
    attention::run_pieces<uint16_t>(a, pieces, tails, gaps, keys, length, cp, out, alpha, beta);
  return out;
}
