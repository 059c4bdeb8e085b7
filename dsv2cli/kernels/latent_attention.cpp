// One-pass absorbed MLA decode attention over a latent cache (flash-decoding on CPU).
//
// For each query row r (the H heads of one new token) and the first `length` cached entries
// e_t = [c_t, k_pe_t] (C + R values each):
//
//     out[r] = sum_t softmax_t(scale * query[r] . e_t) * c_t            (C values)
//
// The latent c_t is both key (with k_pe_t) and value, so the kernel reads each entry once, from
// memory into cache: a block of entries is scored against all rows, the rows' online softmax is
// updated, and the block is accumulated into the rows' outputs before the next block is read.
// Threads split the entries (flash-decoding) and their partial results are merged at the end.
//
// Layout: rows go in groups of L = Vec::size() (16 with AVX-512), one row per vector lane, so the
// scores of an entry for a group are one vector (no horizontal sums) and the softmax is vectorized
// across rows. Products and sums are float32; a bfloat16 cache is widened as it is read, except on
// CPUs with AVX512-BF16, where both products run as bfloat16 dot products with float32 sums (the
// query and the probabilities rounded to bfloat16, as a bfloat16 matmul would do).
//
// Built at run time by dsv2cli/kernels/__init__.py with the vector flags inductor uses.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define DSV2_DOT_BF16 1
#else
#define DSV2_DOT_BF16 0
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t L = Vec::size();  // rows per group: one per lane
constexpr int64_t kBlock = 64;      // entries scored and accumulated together (even)
constexpr int64_t kEntryTile = 8;   // entries scored at once (one accumulator each)
constexpr int64_t kRowTile = L;     // rows x vectors of C accumulated at once (measured best of 4x4, 8x2, 16x1)
constexpr int64_t kVectorTile = 1;

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline Vec load_as_float(const T* data) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(data);
  } else {
    Vec out;
    at::vec::load_to_float<T>(data, out);
    return out;
  }
}

// The query of one group of L rows, transposed so that lane l is row l: float32 [width][L], and for
// the bfloat16 dot products [width / 2][L][2] (lane l holds the pair (q[l][2d], q[l][2d + 1])).
struct Group {
  std::vector<float> columns;
  std::vector<at::BFloat16> pairs;
};

// What one thread keeps for one group over its range of entries: per lane the running max and sum
// of exponentials, and the unnormalized outputs [L][C].
struct Partial {
  Vec max = Vec(-std::numeric_limits<float>::infinity());
  Vec sum = Vec(0.0f);
  std::vector<float> out;
};

// scores[e] (a vector over the group's rows) = scale * query . entry_e for the block's `count` entries.
template <typename T>
void score_block(const Group& group, int64_t width, const T* block, int64_t stride, int64_t count, float scale, Vec* scores) {
  for (int64_t e0 = 0; e0 < count; e0 += kEntryTile) {
    const T* entry[kEntryTile];
    for (int64_t j = 0; j < kEntryTile; ++j) entry[j] = block + std::min(e0 + j, count - 1) * stride;
    Vec acc[kEntryTile];
    for (int64_t j = 0; j < kEntryTile; ++j) acc[j] = Vec(0.0f);
    for (int64_t d = 0; d < width; ++d) {
      const Vec q = Vec::loadu(group.columns.data() + d * L);
      for (int64_t j = 0; j < kEntryTile; ++j) acc[j] = at::vec::fmadd(Vec(widen(entry[j][d])), q, acc[j]);
    }
    for (int64_t j = 0; j < kEntryTile && e0 + j < count; ++j) scores[e0 + j] = acc[j] * Vec(scale);
  }
}

#if DSV2_DOT_BF16
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

void score_block(const Group& group, int64_t width, const at::BFloat16* block, int64_t stride, int64_t count, float scale, Vec* scores) {
  for (int64_t e0 = 0; e0 < count; e0 += kEntryTile) {
    const at::BFloat16* entry[kEntryTile];
    for (int64_t j = 0; j < kEntryTile; ++j) entry[j] = block + std::min(e0 + j, count - 1) * stride;
    __m512 acc[kEntryTile];
    for (int64_t j = 0; j < kEntryTile; ++j) acc[j] = _mm512_setzero_ps();
    const at::BFloat16* q = group.pairs.data();
    for (int64_t d = 0; d < width / 2; ++d, q += 2 * L) {
      const __m512i qv = _mm512_loadu_si512(q);
      for (int64_t j = 0; j < kEntryTile; ++j) {
        int32_t pair;  // entry values 2d and 2d + 1
        std::memcpy(&pair, entry[j] + 2 * d, sizeof(pair));
        acc[j] = _mm512_dpbf16_ps(acc[j], as_bh(_mm512_set1_epi32(pair)), as_bh(qv));
      }
    }
    for (int64_t j = 0; j < kEntryTile && e0 + j < count; ++j) scores[e0 + j] = Vec(acc[j]) * Vec(scale);
  }
}
#endif

// out[l] += sum_e probs[e][l] * c_e for the group's rows l < rows, over the block's `count` entries.
template <typename T>
void accumulate_block(const Vec* probs, int64_t rows, const T* block, int64_t stride, int64_t count, int64_t rank, float* out) {
  const float* p = reinterpret_cast<const float*>(probs);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    int64_t row[kRowTile];
    for (int64_t i = 0; i < kRowTile; ++i) row[i] = std::min(r0 + i, rows - 1);
    for (int64_t c0 = 0; c0 < rank; c0 += kVectorTile * L) {
      const int64_t vectors = std::min(kVectorTile, (rank - c0) / L);
      Vec acc[kRowTile][kVectorTile];
      for (int64_t i = 0; i < kRowTile; ++i)
        for (int64_t v = 0; v < vectors; ++v) acc[i][v] = Vec::loadu(out + row[i] * rank + c0 + v * L);
      for (int64_t e = 0; e < count; ++e) {
        const T* c = block + e * stride + c0;
        Vec value[kVectorTile];
        for (int64_t v = 0; v < vectors; ++v) value[v] = load_as_float(c + v * L);
        for (int64_t i = 0; i < kRowTile; ++i) {
          const Vec weight(p[e * L + row[i]]);
          for (int64_t v = 0; v < vectors; ++v) acc[i][v] = at::vec::fmadd(weight, value[v], acc[i][v]);
        }
      }
      for (int64_t i = 0; i < kRowTile; ++i)
        for (int64_t v = 0; v < vectors; ++v) acc[i][v].store(out + row[i] * rank + c0 + v * L);
    }
  }
}

#if DSV2_DOT_BF16
// Entries e and e + 1 are interleaved value by value, so that one dot product adds
// p_e * c_e + p_e+1 * c_e+1 to 16 outputs; the probabilities of the pair are rounded to bfloat16 and
// interleaved the same way (an odd last entry is paired with probability 0).
void accumulate_block(const Vec* probs, int64_t rows, const at::BFloat16* block, int64_t stride, int64_t count, int64_t rank, float* out) {
  const __m512i interleave = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i halves = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  int32_t pairs[kBlock / 2][L];  // [pair][row]: (p_e, p_e+1) as two bfloat16
  for (int64_t e = 0; e < count; e += 2) {
    const __m512 second = e + 1 < count ? __m512(probs[e + 1]) : _mm512_setzero_ps();
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(second, __m512(probs[e]));  // [p_e (16), p_e+1 (16)]
    _mm512_storeu_si512(pairs[e / 2], _mm512_permutexvar_epi16(halves, both));
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    int64_t row[kRowTile];
    for (int64_t i = 0; i < kRowTile; ++i) row[i] = std::min(r0 + i, rows - 1);
    for (int64_t c0 = 0; c0 < rank; c0 += kVectorTile * 16) {
      const int64_t vectors = std::min(kVectorTile, (rank - c0) / 16);
      __m512 acc[kRowTile][kVectorTile];
      for (int64_t i = 0; i < kRowTile; ++i)
        for (int64_t v = 0; v < vectors; ++v) acc[i][v] = _mm512_loadu_ps(out + row[i] * rank + c0 + v * 16);
      for (int64_t e = 0; e < count; e += 2) {
        const at::BFloat16* first = block + e * stride + c0;
        const at::BFloat16* second = e + 1 < count ? first + stride : first;
        __m512i value[kVectorTile];
        for (int64_t v = 0; v < vectors; ++v)
          value[v] = _mm512_permutex2var_epi16(
              _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + v * 16))), interleave,
              _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + v * 16))));
        for (int64_t i = 0; i < kRowTile; ++i) {
          const __m512i weight = _mm512_set1_epi32(pairs[e / 2][row[i]]);
          for (int64_t v = 0; v < vectors; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], as_bh(value[v]), as_bh(weight));
        }
      }
      for (int64_t i = 0; i < kRowTile; ++i)
        for (int64_t v = 0; v < vectors; ++v) _mm512_storeu_ps(out + row[i] * rank + c0 + v * 16, acc[i][v]);
    }
  }
}
#endif

// One group's partial result over entries [begin, end).
template <typename T>
void attend_range(const Group& group, int64_t rows, int64_t width, const T* entries, int64_t stride, int64_t begin, int64_t end,
                  int64_t rank, float scale, Partial& partial) {
  partial.out.assign(L * rank, 0.0f);
  Vec probs[kBlock];
  for (int64_t first = begin; first < end; first += kBlock) {
    const int64_t count = std::min(kBlock, end - first);
    const T* block = entries + first * stride;
    score_block(group, width, block, stride, count, scale, probs);
    // Online softmax, every row at once; rows whose max grows rescale their running outputs.
    Vec block_max = probs[0];
    for (int64_t e = 1; e < count; ++e) block_max = at::vec::maximum(block_max, probs[e]);
    const Vec new_max = first == begin ? block_max : at::vec::maximum(partial.max, block_max);
    Vec block_sum(0.0f);
    for (int64_t e = 0; e < count; ++e) {
      probs[e] = (probs[e] - new_max).exp_u20();
      block_sum = block_sum + probs[e];
    }
    if (first == begin) {
      partial.sum = block_sum;
    } else {
      const Vec correction = (partial.max - new_max).exp_u20();
      partial.sum = partial.sum * correction + block_sum;
      float factors[L];
      correction.store(factors);
      for (int64_t r = 0; r < rows; ++r) {
        if (factors[r] == 1.0f) continue;
        float* o = partial.out.data() + r * rank;
        for (int64_t c = 0; c < rank; c += L) (Vec::loadu(o + c) * Vec(factors[r])).store(o + c);
      }
    }
    partial.max = new_max;
    accumulate_block(probs, rows, block, stride, count, rank, partial.out.data());
  }
}

// `pairs` for bfloat16 entries on CPUs with AVX512-BF16 (the bfloat16 dot products read only them),
// `columns` otherwise. Built once per call, so kept cheap (a few microseconds at 16 x 576): the rows
// are rounded to bfloat16 with vector conversions first, then each (2d, 2d + 1) pair moves as one
// 32-bit word.
Group make_group(const float* query, int64_t rows, int64_t width, bool bfloat16_entries) {
  Group group;
  if (DSV2_DOT_BF16 && bfloat16_entries) {
    std::vector<at::BFloat16> rounded(rows * width);
    at::vec::convert(query, rounded.data(), rows * width);
    group.pairs.assign(width * L, at::BFloat16(0.0f));
    const auto* from = reinterpret_cast<const int32_t*>(rounded.data());  // [rows][width / 2]
    auto* to = reinterpret_cast<int32_t*>(group.pairs.data());              // [width / 2][L]
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < width / 2; ++d) to[d * L + r] = from[r * (width / 2) + d];
  } else {
    group.columns.assign(width * L, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < width; ++d) group.columns[d * L + r] = query[r * width + d];
  }
  return group;
}

// query [rows, C + R] float32, entries [T, C + R] (float32 or bfloat16, rows contiguous), filled: the
// number of entries attended (an int64 tensor of one element, so that a compiled decode step passes
// its slot without a graph break) -> [rows, C] float32.
at::Tensor latent_attention(const at::Tensor& query, const at::Tensor& entries, const at::Tensor& filled, int64_t rank, double scale) {
  TORCH_CHECK(query.dim() == 2 && entries.dim() == 2, "latent_attention: query [rows, C+R] and entries [T, C+R]");
  TORCH_CHECK(query.scalar_type() == at::kFloat, "latent_attention: query must be float32");
  TORCH_CHECK(entries.scalar_type() == at::kFloat || entries.scalar_type() == at::kBFloat16, "latent_attention: entries must be float32 or bfloat16");
  const int64_t width = query.size(1), rows = query.size(0);
  TORCH_CHECK(entries.size(1) == width && entries.stride(1) == 1, "latent_attention: entries [T, C+R] with contiguous rows");
  TORCH_CHECK(width % 2 == 0 && rank % 16 == 0 && rank <= width, "latent_attention: C must be a multiple of 16 and C + R even");
  TORCH_CHECK(filled.numel() == 1 && filled.scalar_type() == at::kLong, "latent_attention: filled is one int64");
  const int64_t length = filled.item<int64_t>();
  TORCH_CHECK(length >= 1 && length <= entries.size(0), "latent_attention: length out of range");
  const at::Tensor q = query.contiguous();
  const int64_t groups = (rows + L - 1) / L;
  std::vector<Group> query_groups;
  for (int64_t g = 0; g < groups; ++g)
    query_groups.push_back(
        make_group(q.data_ptr<float>() + g * L * width, std::min(L, rows - g * L), width, entries.scalar_type() == at::kBFloat16));
  // Ranges of entries for the threads (flash-decoding), at least a block each.
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (length + kBlock - 1) / kBlock));
  const int64_t per_range = (length + ranges - 1) / ranges;
  std::vector<Partial> partials(ranges * groups);
  auto run = [&](auto* data) {
    const int64_t stride = entries.stride(0);
    at::parallel_for(0, ranges * groups, 1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t range = task / groups, g = task % groups;
        const int64_t begin = range * per_range, end = std::min(length, begin + per_range);
        attend_range(query_groups[g], std::min(L, rows - g * L), width, data, stride, begin, end, rank, static_cast<float>(scale), partials[task]);
      }
    });
  };
  if (entries.scalar_type() == at::kFloat) {
    run(entries.data_ptr<float>());
  } else {
    run(entries.data_ptr<at::BFloat16>());
  }
  // Merge the ranges: weight each by exp(its max - the overall max).
  at::Tensor out = at::empty({rows, rank}, query.options());
  float* result = out.data_ptr<float>();
  std::vector<float> maxes(ranges), sums(ranges);  // per row, refilled
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / L, lane = r % L;
    for (int64_t i = 0; i < ranges; ++i) {
      float lanes[L];
      partials[i * groups + g].max.store(lanes);
      maxes[i] = lanes[lane];
      partials[i * groups + g].sum.store(lanes);
      sums[i] = lanes[lane];
    }
    const float top = *std::max_element(maxes.begin(), maxes.end());
    float total = 0.0f;
    for (int64_t i = 0; i < ranges; ++i) {
      maxes[i] = std::exp(maxes[i] - top);  // now the range's weight
      total += sums[i] * maxes[i];
    }
    for (int64_t c = 0; c < rank; c += L) {  // rank is a multiple of 16, so of L
      Vec value(0.0f);
      for (int64_t i = 0; i < ranges; ++i) value = at::vec::fmadd(Vec::loadu(partials[i * groups + g].out.data() + lane * rank + c), Vec(maxes[i]), value);
      (value / Vec(total)).store(result + r * rank + c);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(dsv2cli, m) {
  m.def("latent_attention(Tensor query, Tensor entries, Tensor filled, int rank, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2cli, CPU, m) {
  m.impl("latent_attention", &latent_attention);
}
