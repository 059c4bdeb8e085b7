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
// scores of an entry for a group are one vector and the softmax is vectorized across rows. Products
// and sums are float32; a bfloat16 cache is widened as it is read (a path with AVX512-BF16 dot products,
// the query and the probabilities rounded to bfloat16, is written but off: see DSV2_DOT_BF16).
//
// With AVX-512 the scores read each entry as 64-bit words (two float32 values, or two bfloat16
// pairs): one broadcast word feeds two products, for rows 0-7 and rows 8-15, whose lanes hold
// (row, even or odd half of the word); 16 sums are in flight and the entries of the tile after next
// are prefetched a cache line per step, so a cache that comes from memory streams at about the
// speed of one already in cache. The outputs are accumulated 8 rows x 32 columns at a time, the
// rows' offsets constants (every lane is accumulated; lanes past the group's rows are never read).
//
// With AVX2 (8 lanes: two groups for 16 heads) a thread scores and accumulates a block of entries for
// every group before reading the next, so each entry comes from memory once however many groups there
// are, and groups go in pairs: a broadcast entry value feeds the products of both (score_pair), and the
// outputs of both are accumulated 4 rows x 24 columns at a time, 12 sums in flight (accumulate_pair);
// scores of bfloat16 entries run along the width, a tile of 4 rows x 2 entries at a time.
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

#if defined(CPU_CAPABILITY_AVX512)
#define DSV2_AVX512 1
#else
#define DSV2_AVX512 0
#endif

#if !DSV2_AVX512 && defined(CPU_CAPABILITY_AVX2)
#define DSV2_AVX2 1
#include <immintrin.h>

#include "lane_sums.h"
#else
#define DSV2_AVX2 0
#endif

// The AVX512-BF16 dot products for a bfloat16 cache (the query and the probabilities rounded to bfloat16) are
// off: on the first AVX512-BF16 CPU the tests ran on (AMD Zen 4, 2026-12-06) they failed
// tests/test_one_forward.py's eager 3-row bfloat16-weights path (error 0.22 against a bound of 0.06; every
// other path passed). Until that is found, a bfloat16 cache is widened as it is read, as on other CPUs.
#define DSV2_DOT_BF16 0

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t L = Vec::size();  // rows per group: one per lane
constexpr int64_t kBlock = 64;      // entries scored and accumulated together (even)
constexpr int64_t kEntryTile = 8;   // entries scored at once (one accumulator each; two with AVX-512)
constexpr int64_t kRowTile = L;     // generic path: rows x vectors of C accumulated at once (measured best of 4x4, 8x2, 16x1;
constexpr int64_t kVectorTile = 1;  // with AVX2, 8x1 against 4x2: 8.7 against 10.4 ms at 4096 entries)
#if DSV2_AVX2
constexpr int64_t kScoreRows = 4;   // AVX2 scores of bfloat16 entries: rows x entries whose products run along the width
constexpr int64_t kScoreEntries = 2;
#endif

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

// The query of one group of L rows, transposed for the products: `columns` float32 [width][L] (lane
// l is row l) for the generic path; `units` for the AVX-512 paths; `rows` float32 [L][width] as it
// is (rows past the group's end zero) for AVX2 with bfloat16 entries (make_group).
struct Group {
  std::vector<float> columns;
  std::vector<int32_t> units;
  std::vector<float> rows;
  std::vector<float> paired;  // AVX2, float32 entries, even groups followed by another: [width][2L], this group's columns then the next's
  int64_t count = 0;          // the group's rows (the last group may have fewer than L)
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
#if DSV2_AVX2
    // The tile after next, a line every other step (a tile is kEntryTile * width * 4 bytes, 32 per step);
    // prefetches do not fault, so the range's end needs no care.
    const char* ahead = reinterpret_cast<const char*>(block + (e0 + 2 * kEntryTile) * stride);
#endif
    for (int64_t d = 0; d < width; ++d) {
#if DSV2_AVX2
      if (d % 2 == 0) _mm_prefetch(ahead + d * static_cast<int64_t>(sizeof(T)) * kEntryTile, _MM_HINT_T0);
#endif
      const Vec q = Vec::loadu(group.columns.data() + d * L);
      for (int64_t j = 0; j < kEntryTile; ++j) acc[j] = at::vec::fmadd(Vec(widen(entry[j][d])), q, acc[j]);
    }
    for (int64_t j = 0; j < kEntryTile && e0 + j < count; ++j) scores[e0 + j] = acc[j] * Vec(scale);
  }
}

#if DSV2_AVX512
static_assert(L == 16, "the AVX-512 paths take 16 rows per group");

#if DSV2_DOT_BF16
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
#endif

// acc + the products of a broadcast word with the query's units: float32 FMAs, or bfloat16 dot
// products (a unit is then a pair, whose two products are summed into the lane).
inline __m512 dot(__m512 acc, __m512i word, __m512i query, const float*) {
  return _mm512_fmadd_ps(_mm512_castsi512_ps(word), _mm512_castsi512_ps(query), acc);
}
#if DSV2_DOT_BF16
inline __m512 dot(__m512 acc, __m512i word, __m512i query, const at::BFloat16*) { return _mm512_dpbf16_ps(acc, as_bh(word), as_bh(query)); }
#endif

// One step of score_tile: each entry's 64-bit word at `offset` (two units; for the odd last unit of
// an entry, that unit and zeros) broadcast against the query's units for rows 0-7 and rows 8-15.
template <bool Odd, typename T>
inline void score_step(const int32_t* query, const char* entry, int64_t bytes, int64_t offset, const T* tag, __m512* low, __m512* high) {
  const __m512i query_low = _mm512_loadu_si512(query), query_high = _mm512_loadu_si512(query + L);
  for (int64_t j = 0; j < kEntryTile; ++j) {
    int64_t word = 0;
    std::memcpy(&word, entry + j * bytes + offset, Odd ? 4 : 8);
    const __m512i broadcast = _mm512_set1_epi64(word);
    low[j] = dot(low[j], broadcast, query_low, tag);
    high[j] = dot(high[j], broadcast, query_high, tag);
  }
}

// Unscaled scores of kEntryTile consecutive entries (entry j at first + j * stride; each `units`
// 32-bit units long) against the group's units [steps][rows 0-7, rows 8-15][8 rows][2 halves].
template <typename T>
inline void score_tile(const int32_t* query, int64_t units, const T* first, int64_t stride, __m512* scores) {
  __m512 low[kEntryTile], high[kEntryTile];  // rows 0-7 and rows 8-15, lanes (row, half)
  for (int64_t j = 0; j < kEntryTile; ++j) low[j] = high[j] = _mm512_setzero_ps();
  const char* entry = reinterpret_cast<const char*>(first);
  const int64_t bytes = stride * sizeof(T);
  // A tile is kEntryTile * units * 4 bytes = 64 bytes per step: one line per step covers the tile
  // after next (prefetches do not fault, so the range's end needs no care).
  const char* ahead = entry + 2 * kEntryTile * bytes;
  int64_t step = 0;
  for (; 2 * step + 1 < units; ++step, query += 2 * L) {
    _mm_prefetch(ahead + 64 * step, _MM_HINT_T0);
    score_step<false>(query, entry, bytes, 8 * step, first, low, high);
  }
  if (2 * step < units) score_step<true>(query, entry, bytes, 8 * step, first, low, high);
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t j = 0; j < kEntryTile; ++j) {
    const __m512 rows_low = _mm512_add_ps(low[j], _mm512_permute_ps(low[j], 0xB1));  // both halves of a row summed
    const __m512 rows_high = _mm512_add_ps(high[j], _mm512_permute_ps(high[j], 0xB1));
    scores[j] = _mm512_permutex2var_ps(rows_low, evens, rows_high);  // lane r: row r
  }
}

template <typename T>
void score_block_units(const Group& group, int64_t width, const T* block, int64_t stride, int64_t count, float scale, Vec* scores) {
  const int64_t units = width * static_cast<int64_t>(sizeof(T)) / 4;
  __m512 tile[kEntryTile];
  int64_t e0 = 0;
  for (; e0 + kEntryTile <= count; e0 += kEntryTile) {
    score_tile(group.units.data(), units, block + e0 * stride, stride, tile);
    for (int64_t j = 0; j < kEntryTile; ++j) scores[e0 + j] = Vec(tile[j]) * Vec(scale);
  }
  if (e0 < count) {  // the range's last entries, copied next to zeros (once per range)
    std::vector<T> rest(kEntryTile * width, T(0.0f));
    for (int64_t j = 0; e0 + j < count; ++j) std::memcpy(rest.data() + j * width, block + (e0 + j) * stride, width * sizeof(T));
    score_tile(group.units.data(), units, rest.data(), width, tile);
    for (int64_t j = 0; e0 + j < count; ++j) scores[e0 + j] = Vec(tile[j]) * Vec(scale);
  }
}

void score_block(const Group& group, int64_t width, const float* block, int64_t stride, int64_t count, float scale, Vec* scores) {
  score_block_units(group, width, block, stride, count, scale, scores);
}
#if DSV2_DOT_BF16
void score_block(const Group& group, int64_t width, const at::BFloat16* block, int64_t stride, int64_t count, float scale, Vec* scores) {
  score_block_units(group, width, block, stride, count, scale, scores);
}
#endif
#endif

#if DSV2_AVX2
using dsv2cli::horizontal_sum;

// With AVX2 and bfloat16 entries, broadcasting each entry value against a column of 8 rows widens one
// value per FMA; instead a tile of kScoreRows rows x kScoreEntries entries runs along the width, 8 values
// at a time, each entry vector widened once for 4 rows, and each sum is reduced across its lanes at the
// end (8.0 against 11.1 ms at 4096 entries). Float32 entries keep the generic broadcast scores, which
// measured faster than this (7.6 against 8.6 ms).
void score_block(const Group& group, int64_t width, const at::BFloat16* block, int64_t stride, int64_t count, float scale, Vec* scores) {
  float* out = reinterpret_cast<float*>(scores);  // [count][L]
  const int64_t vector_end = width - width % L;
  for (int64_t e0 = 0; e0 < count; e0 += kScoreEntries) {
    const at::BFloat16* entry[kScoreEntries];
    for (int64_t j = 0; j < kScoreEntries; ++j) entry[j] = block + std::min(e0 + j, count - 1) * stride;
    for (int64_t r0 = 0; r0 < L; r0 += kScoreRows) {
      if (r0 >= group.count) {  // lanes of rows the group does not have: never read, kept finite
        for (int64_t j = 0; j < kScoreEntries && e0 + j < count; ++j)
          for (int64_t i = 0; i < kScoreRows; ++i) out[(e0 + j) * L + r0 + i] = 0.0f;
        continue;
      }
      const float* query = group.rows.data() + r0 * width;
      Vec acc[kScoreRows][kScoreEntries];
      for (int64_t i = 0; i < kScoreRows; ++i)
        for (int64_t j = 0; j < kScoreEntries; ++j) acc[i][j] = Vec(0.0f);
      for (int64_t d = 0; d < vector_end; d += L) {
        Vec value[kScoreEntries];
        for (int64_t j = 0; j < kScoreEntries; ++j) value[j] = load_as_float(entry[j] + d);
        for (int64_t i = 0; i < kScoreRows; ++i) {
          const Vec q = Vec::loadu(query + i * width + d);
          for (int64_t j = 0; j < kScoreEntries; ++j) acc[i][j] = at::vec::fmadd(q, value[j], acc[i][j]);
        }
      }
      for (int64_t j = 0; j < kScoreEntries && e0 + j < count; ++j) {
        for (int64_t i = 0; i < kScoreRows; ++i) {
          float sum = horizontal_sum(acc[i][j]);
          for (int64_t d = vector_end; d < width; ++d) sum += query[i * width + d] * widen(entry[j][d]);
          out[(e0 + j) * L + r0 + i] = sum * scale;
        }
      }
    }
  }
}

// Two groups (16 rows) at once, float32 entries: each broadcast entry value feeds two products, one per group,
// so a step of kPairEntries entries loads 2 + 6 values for 12 FMAs with 12 sums in flight (one group at a time
// loads 9 for 8, and 8 sums cover less than the FMAs' latency x throughput). A microbenchmark of the bare loops
// on one Zen 2 core, cache from memory: 41 against 28 G multiply-adds/s. probs [count][2] (group, then the next).
constexpr int64_t kPairEntries = 6;

void score_pair(const Group& group, int64_t width, const float* block, int64_t stride, int64_t count, float scale, Vec* scores) {
  const float* query = group.paired.data();
  for (int64_t e0 = 0; e0 < count; e0 += kPairEntries) {
    const float* entry[kPairEntries];
    for (int64_t j = 0; j < kPairEntries; ++j) entry[j] = block + std::min(e0 + j, count - 1) * stride;
    __m256 first[kPairEntries], second[kPairEntries];
    for (int64_t j = 0; j < kPairEntries; ++j) first[j] = second[j] = _mm256_setzero_ps();
    // The tile after next, a line every other step (a tile is kPairEntries * width * 4 bytes, 24 per step).
    const char* ahead = reinterpret_cast<const char*>(block + (e0 + 2 * kPairEntries) * stride);
    for (int64_t d = 0; d < width; ++d) {
      if (d % 2 == 0) _mm_prefetch(ahead + d * static_cast<int64_t>(sizeof(float)) * kPairEntries, _MM_HINT_T0);
      const __m256 q_first = _mm256_loadu_ps(query + d * 2 * L), q_second = _mm256_loadu_ps(query + d * 2 * L + L);
      for (int64_t j = 0; j < kPairEntries; ++j) {
        const __m256 value = _mm256_broadcast_ss(entry[j] + d);
        first[j] = _mm256_fmadd_ps(value, q_first, first[j]);
        second[j] = _mm256_fmadd_ps(value, q_second, second[j]);
      }
    }
    const __m256 factor = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < kPairEntries && e0 + j < count; ++j) {
      scores[2 * (e0 + j)] = Vec(_mm256_mul_ps(first[j], factor));
      scores[2 * (e0 + j) + 1] = Vec(_mm256_mul_ps(second[j], factor));
    }
  }
}

// outs[g][i][c] += sum_e probs[e][g][i] * c_e[c] for the 16 rows of two groups: tiles of 4 rows x 3 vectors of 8
// columns (12 sums, 3 + 4 loads for 12 FMAs; in the microbenchmark 4 x 3 beat 8 x 1, 4 x 2, 3 x 4 and 2 x 6).
constexpr int64_t kPairRows = 4, kPairVectors = 3;

template <int64_t Vectors, typename T>
inline void accumulate_pair_tile(const float* probs, const T* block, int64_t stride, int64_t count, int64_t r0, int64_t c0, float* out,
                                 int64_t rank) {
  Vec acc[kPairRows][Vectors];
  for (int64_t i = 0; i < kPairRows; ++i)
    for (int64_t v = 0; v < Vectors; ++v) acc[i][v] = Vec::loadu(out + i * rank + c0 + v * L);
  for (int64_t e = 0; e < count; ++e) {
    Vec value[Vectors];
    for (int64_t v = 0; v < Vectors; ++v) value[v] = load_as_float(block + e * stride + c0 + v * L);
    for (int64_t i = 0; i < kPairRows; ++i) {
      const Vec weight(probs[e * 2 * L + r0 + i]);
      for (int64_t v = 0; v < Vectors; ++v) acc[i][v] = at::vec::fmadd(weight, value[v], acc[i][v]);
    }
  }
  for (int64_t i = 0; i < kPairRows; ++i)
    for (int64_t v = 0; v < Vectors; ++v) acc[i][v].store(out + i * rank + c0 + v * L);
}

template <typename T>
void accumulate_pair(const Vec* probs, const T* block, int64_t stride, int64_t count, int64_t rank, float* first, float* second) {
  const float* p = reinterpret_cast<const float*>(probs);  // [count][2L]
  for (int64_t r0 = 0; r0 < 2 * L; r0 += kPairRows) {
    float* out = (r0 < L ? first : second) + (r0 % L) * rank;  // a tile's rows lie in one group
    int64_t c0 = 0;
    for (; c0 + kPairVectors * L <= rank; c0 += kPairVectors * L) accumulate_pair_tile<kPairVectors>(p, block, stride, count, r0, c0, out, rank);
    for (; c0 < rank; c0 += L) accumulate_pair_tile<1>(p, block, stride, count, r0, c0, out, rank);  // rank is a multiple of 16
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

#if DSV2_AVX512
constexpr int64_t kRows = 8;  // rows per pass of the AVX-512 accumulation (x `Vectors` vectors of 16 columns)

// out[r0 + i][c0 .. c0 + 16 * Vectors) += sum_e probs[e][r0 + i] * c_e[...] over the block's entries, float32 entries.
template <int Vectors>
inline void accumulate_columns(const float* probs, const float* block, int64_t stride, int64_t count, int64_t rank, int64_t r0, int64_t c0, float* out) {
  __m512 acc[kRows][Vectors];
  for (int64_t i = 0; i < kRows; ++i)
    for (int64_t v = 0; v < Vectors; ++v) acc[i][v] = _mm512_loadu_ps(out + (r0 + i) * rank + c0 + 16 * v);
  const float* entry = block + c0;
  for (int64_t e = 0; e < count; ++e, entry += stride) {
    __m512 value[Vectors];
    for (int64_t v = 0; v < Vectors; ++v) value[v] = _mm512_loadu_ps(entry + 16 * v);
    const float* weights = probs + e * L + r0;
    for (int64_t i = 0; i < kRows; ++i) {
      const __m512 weight = _mm512_set1_ps(weights[i]);
      for (int64_t v = 0; v < Vectors; ++v) acc[i][v] = _mm512_fmadd_ps(weight, value[v], acc[i][v]);
    }
  }
  for (int64_t i = 0; i < kRows; ++i)
    for (int64_t v = 0; v < Vectors; ++v) _mm512_storeu_ps(out + (r0 + i) * rank + c0 + 16 * v, acc[i][v]);
}

void accumulate_block(const Vec* probs, int64_t, const float* block, int64_t stride, int64_t count, int64_t rank, float* out) {
  const float* p = reinterpret_cast<const float*>(probs);
  for (int64_t r0 = 0; r0 < L; r0 += kRows) {
    int64_t c0 = 0;
    for (; c0 + 32 <= rank; c0 += 32) accumulate_columns<2>(p, block, stride, count, rank, r0, c0, out);
    if (c0 < rank) accumulate_columns<1>(p, block, stride, count, rank, r0, c0, out);  // rank is a multiple of 16
  }
}
#endif

#if DSV2_DOT_BF16
// Entries e and e + 1 are interleaved value by value, so that one dot product adds
// p_e * c_e + p_e+1 * c_e+1 to 16 outputs; the probabilities of the pair are rounded to bfloat16 and
// interleaved the same way (an odd last entry is paired with probability 0).
template <int Vectors>
inline void accumulate_columns(const int32_t (*pairs)[L], const at::BFloat16* block, int64_t stride, int64_t count, int64_t rank, int64_t r0,
                               int64_t c0, float* out) {
  const __m512i interleave = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  __m512 acc[kRows][Vectors];
  for (int64_t i = 0; i < kRows; ++i)
    for (int64_t v = 0; v < Vectors; ++v) acc[i][v] = _mm512_loadu_ps(out + (r0 + i) * rank + c0 + 16 * v);
  const at::BFloat16* first = block + c0;
  for (int64_t e = 0; e < count; e += 2, first += 2 * stride) {
    const at::BFloat16* second = e + 1 < count ? first + stride : first;
    __m512i value[Vectors];
    for (int64_t v = 0; v < Vectors; ++v)
      value[v] = _mm512_permutex2var_epi16(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + 16 * v))), interleave,
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + 16 * v))));
    const int32_t* weights = pairs[e / 2] + r0;
    for (int64_t i = 0; i < kRows; ++i) {
      const __m512i weight = _mm512_set1_epi32(weights[i]);
      for (int64_t v = 0; v < Vectors; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], as_bh(value[v]), as_bh(weight));
    }
  }
  for (int64_t i = 0; i < kRows; ++i)
    for (int64_t v = 0; v < Vectors; ++v) _mm512_storeu_ps(out + (r0 + i) * rank + c0 + 16 * v, acc[i][v]);
}

void accumulate_block(const Vec* probs, int64_t, const at::BFloat16* block, int64_t stride, int64_t count, int64_t rank, float* out) {
  const __m512i halves = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  int32_t pairs[kBlock / 2][L];  // [pair][row]: (p_e, p_e+1) as two bfloat16
  for (int64_t e = 0; e < count; e += 2) {
    const __m512 second = e + 1 < count ? __m512(probs[e + 1]) : _mm512_setzero_ps();
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(second, __m512(probs[e]));  // [p_e (16), p_e+1 (16)]
    _mm512_storeu_si512(pairs[e / 2], _mm512_permutexvar_epi16(halves, both));
  }
  for (int64_t r0 = 0; r0 < L; r0 += kRows) {
    int64_t c0 = 0;
    for (; c0 + 32 <= rank; c0 += 32) accumulate_columns<2>(pairs, block, stride, count, rank, r0, c0, out);
    if (c0 < rank) accumulate_columns<1>(pairs, block, stride, count, rank, r0, c0, out);  // rank is a multiple of 16
  }
}
#endif

// The online softmax of one group over a block: its `count` scores (every `step`-th vector of `scores`) become
// probabilities against the running max, which moves up to the block's; rows whose max grew rescale their outputs.
void softmax_block(Vec* scores, int64_t step, int64_t count, bool first_block, int64_t rows, int64_t rank, Partial& partial) {
  Vec block_max = scores[0];
  for (int64_t e = 1; e < count; ++e) block_max = at::vec::maximum(block_max, scores[e * step]);
  const Vec new_max = first_block ? block_max : at::vec::maximum(partial.max, block_max);
  Vec block_sum(0.0f);
  for (int64_t e = 0; e < count; ++e) {
    scores[e * step] = (scores[e * step] - new_max).exp_u20();
    block_sum = block_sum + scores[e * step];
  }
  if (first_block) {
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
}

// The partial results of `sets` consecutive groups over entries [begin, end): each block of entries is
// read from memory once and then served to every group from the CPU's caches (with AVX2, two groups at a time
// where there are two: score_pair, accumulate_pair).
template <typename T>
void attend_range(const Group* groups, int64_t sets, int64_t width, const T* entries, int64_t stride, int64_t begin, int64_t end,
                  int64_t rank, float scale, Partial* partials) {
  for (int64_t g = 0; g < sets; ++g) partials[g].out.assign(L * rank, 0.0f);
  Vec probs[2 * kBlock];
  for (int64_t first = begin; first < end; first += kBlock) {
    const int64_t count = std::min(kBlock, end - first);
    const T* block = entries + first * stride;
    int64_t g = 0;
#if DSV2_AVX2
    for (; g + 1 < sets; g += 2) {
      if constexpr (std::is_same_v<T, float>) {
        score_pair(groups[g], width, block, stride, count, scale, probs);
      } else {  // bfloat16 scores run along the width, a group at a time; the pair shares the accumulation
        Vec scores[2][kBlock];
        score_block(groups[g], width, block, stride, count, scale, scores[0]);
        score_block(groups[g + 1], width, block, stride, count, scale, scores[1]);
        for (int64_t e = 0; e < count; ++e) {
          probs[2 * e] = scores[0][e];
          probs[2 * e + 1] = scores[1][e];
        }
      }
      softmax_block(probs, 2, count, first == begin, groups[g].count, rank, partials[g]);
      softmax_block(probs + 1, 2, count, first == begin, groups[g + 1].count, rank, partials[g + 1]);
      accumulate_pair(probs, block, stride, count, rank, partials[g].out.data(), partials[g + 1].out.data());
    }
#endif
    for (; g < sets; ++g) {
      score_block(groups[g], width, block, stride, count, scale, probs);
      softmax_block(probs, 1, count, first == begin, groups[g].count, rank, partials[g]);
      accumulate_block(probs, groups[g].count, block, stride, count, rank, partials[g].out.data());
    }
  }
}

// The query in the layout the entries' products read: `units` where an AVX-512 path serves them
// (float32 entries; bfloat16 entries with AVX512-BF16: the rows rounded to bfloat16 with vector
// conversions, each pair one 32-bit unit), `columns` otherwise. Built once per call, so kept cheap
// (a few microseconds at 16 x 576).
Group make_group(const float* query, int64_t rows, int64_t width, bool bfloat16_entries) {
  Group group;
  if ((DSV2_AVX512 && !bfloat16_entries) || (DSV2_DOT_BF16 && bfloat16_entries)) {
    std::vector<at::BFloat16> rounded;
    const int32_t* from = reinterpret_cast<const int32_t*>(query);  // [rows][units]
    if (bfloat16_entries) {
      rounded.resize(rows * width);
      at::vec::convert(query, rounded.data(), rows * width);
      from = reinterpret_cast<const int32_t*>(rounded.data());
    }
    const int64_t units = bfloat16_entries ? width / 2 : width, steps = (units + 1) / 2, half = L / 2;
    group.units.assign(steps * 2 * L, 0);  // [steps][rows 0-7, rows 8-15][8 rows][2 halves]
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t u = 0; u < units; ++u) group.units[(u / 2) * 2 * L + (r / half) * L + (r % half) * 2 + u % 2] = from[r * units + u];
  } else if (DSV2_AVX2 && bfloat16_entries) {
    group.rows.assign(L * width, 0.0f);
    std::memcpy(group.rows.data(), query, rows * width * sizeof(float));
  } else {
    group.columns.assign(width * L, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < width; ++d) group.columns[d * L + r] = query[r * width + d];
  }
  group.count = rows;
  return group;
}

// query [rows, C + R] float32, entries [T, C + R] (float32 or bfloat16, rows contiguous), filled: the
// entries attended, as an int64 tensor (so that a compiled decode step passes its slot without a graph
// break) of one element (entries 0..end-1) or two (first, end: a left-padded row) -> [rows, C] float32.
at::Tensor latent_attention(const at::Tensor& query, const at::Tensor& entries, const at::Tensor& filled, int64_t rank, double scale) {
  TORCH_CHECK(query.dim() == 2 && entries.dim() == 2, "latent_attention: query [rows, C+R] and entries [T, C+R]");
  TORCH_CHECK(query.scalar_type() == at::kFloat, "latent_attention: query must be float32");
  TORCH_CHECK(entries.scalar_type() == at::kFloat || entries.scalar_type() == at::kBFloat16, "latent_attention: entries must be float32 or bfloat16");
  const int64_t width = query.size(1), rows = query.size(0);
  TORCH_CHECK(entries.size(1) == width && entries.stride(1) == 1, "latent_attention: entries [T, C+R] with contiguous rows");
  TORCH_CHECK(width % 2 == 0 && rank % 16 == 0 && rank <= width, "latent_attention: C must be a multiple of 16 and C + R even");
  TORCH_CHECK((filled.numel() == 1 || filled.numel() == 2) && filled.scalar_type() == at::kLong,
              "latent_attention: filled is one or two int64");
  const at::Tensor bounds = filled.contiguous();
  const int64_t first_entry = filled.numel() == 2 ? bounds.data_ptr<int64_t>()[0] : 0;
  const int64_t length = bounds.data_ptr<int64_t>()[filled.numel() - 1];
  TORCH_CHECK(first_entry >= 0 && first_entry < length && length <= entries.size(0), "latent_attention: entries out of range");
  const at::Tensor q = query.contiguous();
  const int64_t groups = (rows + L - 1) / L;
  std::vector<Group> query_groups;
  for (int64_t g = 0; g < groups; ++g)
    query_groups.push_back(
        make_group(q.data_ptr<float>() + g * L * width, std::min(L, rows - g * L), width, entries.scalar_type() == at::kBFloat16));
#if DSV2_AVX2
  if (entries.scalar_type() == at::kFloat) {
    for (int64_t g = 0; g + 1 < groups; g += 2) {
      std::vector<float>& paired = query_groups[g].paired;
      paired.resize(width * 2 * L);
      for (int64_t d = 0; d < width; ++d) {
        std::memcpy(paired.data() + d * 2 * L, query_groups[g].columns.data() + d * L, L * sizeof(float));
        std::memcpy(paired.data() + d * 2 * L + L, query_groups[g + 1].columns.data() + d * L, L * sizeof(float));
      }
    }
  }
#endif
  // Ranges of entries for the threads (flash-decoding), at least a block each.
  const int64_t attended = length - first_entry;
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (attended + kBlock - 1) / kBlock));
  const int64_t per_range = (attended + ranges - 1) / ranges;
  // A task is a range and all groups (each entry read once), or, when there are fewer ranges than
  // threads (short contexts), a range and one group, so that every thread has work.
  const int64_t sets = ranges >= at::get_num_threads() ? groups : 1;
  std::vector<Partial> partials(ranges * groups);  // [range][group]
  auto run = [&](auto* data) {
    const int64_t stride = entries.stride(0);
    at::parallel_for(0, ranges * (groups / sets), 1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t range = task / (groups / sets), g = task % (groups / sets) * sets;
        const int64_t begin = first_entry + range * per_range, end = std::min(length, begin + per_range);
        attend_range(query_groups.data() + g, sets, width, data, stride, begin, end, rank, static_cast<float>(scale),
                     partials.data() + range * groups + g);
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
