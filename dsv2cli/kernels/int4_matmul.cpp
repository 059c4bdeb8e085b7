// int8 x int4 products of a few rows (decode steps) against group-wise int4 weights.
//
//     out[r, o] = step[r] * sum_g scale[e_r, o, g] * sum_{i in g} x[r, i] * (level[e_r, o, i] - 8)     (e_r = ids[r])
//
// x holds rows quantized per row (int8 values and a float32 step each). weight is a stack of E matrices
// [O, I / 2] of packed 4-bit levels (dsv2cli/model/int4.py: per block of 32 inputs, 16 bytes, byte j holds
// input j in its low nibble and input 16 + j in its high one), scale [E, O, G] float16 one per group of
// I / G inputs. ids picks each row's matrix (a layer's routed experts), so a decode step reads its K
// experts where they lie. Each group's sum is int32 and exact; the groups are then summed in float32.
//
// As in llama.cpp's Q4_0 x Q8_0 dot product, with AVX2 `maddubs` multiplies unsigned levels with the signed
// x and `madd` sums pairs into int32 (with AVX512-VNNI, one `dpbusd` does both on the same lanes). A 32-byte
// load holds 64 levels: one mask gives the low nibbles, a shift and a mask the high ones, and each row of x is
// laid out once per call so that those meet their inputs
// (`prepare`). The offset 8 is taken out once per group: 8 * sum(x) is computed once per row of x and
// subtracted lane by lane. Rows that share a matrix are processed together (each block of output
// rows read from memory once, reused from L1 for every row; two rows of x at a time unpack each load once and
// reduce four weight rows' sums into one vector, `dot_four_pair`, 1.4x faster for prefills); threads split
// blocks of output rows of every matrix used. Elsewhere a plain loop. Built at run time with the other kernels by dsv2cli/kernels/__init__.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "lane_sums.h"
#include "stacked_rows.h"

using dsv2cli::StackedRows;
using dsv2cli::Task;
using dsv2cli::stacked_rows;

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// DSV2_INT4_PORTABLE forces the plain loop and DSV2_INT4_NAMESPACE renames the operator's namespace, so that
// tests/test_int4.py can build the fallback beside the loaded kernels and compare the two.
#if defined(__AVX2__) && defined(__F16C__) && !defined(DSV2_INT4_PORTABLE)
#include <immintrin.h>
#define DSV2_INT4_AVX2 1
#endif
#ifndef DSV2_INT4_NAMESPACE
#define DSV2_INT4_NAMESPACE dsv2cli
#endif

namespace {

constexpr int64_t kBlock = 32;           // inputs per packed block (16 bytes)
constexpr int64_t kRowsPerBlock = 4;     // output rows of a block (dot_four_pair)
constexpr int64_t kPrefetchRows = 8;     // how far ahead dot_row prefetches, in rows
constexpr int64_t kRowsPerTask = 32;     // output rows per thread task

#if defined(DSV2_INT4_AVX2)
using dsv2cli::horizontal_sum;

// A row of x laid out for 32-byte weight loads. 32 bytes of packed levels are two blocks: their low nibbles are
// inputs 0-15 and 32-47 of a chunk of 64, their high nibbles inputs 16-31 and 48-63. So per chunk the row is
// stored as those 32 values (`low`) then the other 32 (`high`): a load, a mask and a shift give the levels that
// meet each. `offset`: 8 * x summed into the int32 lanes `madd(maddubs(levels, x))` fills, per chunk (group size
// 32: lanes 0-3 belong to the chunk's first group, 4-7 to its second) or per group (larger groups), so that
// subtracting it turns levels into levels - 8. A tail of 32 inputs (I = 64n + 32, group size 32) keeps input order.
struct Prepared {
  std::vector<int8_t> arranged;   // [R, I]
  std::vector<__m256i> offset;    // [R, units]
  std::vector<__m256i> reduced;   // [R, chunks] (group size 32): offset of a chunk as `reduce_four` lays out sums
  int64_t units = 0;
};

// int32 lane j: sum of the products of bytes 4j..4j+3 (unsigned levels x signed x). With AVX512-VNNI one `dpbusd`;
// otherwise `maddubs` then `madd` (the same exact sums: a maddubs lane is at most 2 * 15 * 127).
inline __m256i sum_quads(__m256i levels, __m256i x, __m256i ones) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  (void)ones;
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), levels, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(levels, x), ones);
#endif
}

inline __m256i sum_pairs(__m256i low_levels, __m256i x_low, __m256i high_levels, __m256i x_high, __m256i ones) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  (void)ones;
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), low_levels, x_low), high_levels, x_high);
#else
  // Each maddubs lane is at most 2 * 15 * 127, so two of them add up in int16 without saturating.
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(low_levels, x_low), _mm256_maddubs_epi16(high_levels, x_high)), ones);
#endif
}

// The int32 lanes of four rows' sums for one chunk (lanes 0-3 of each: group g, 4-7: group g + 1) reduced to
// [row 0..3 of group g, row 0..3 of group g + 1].
inline __m256i reduce_four(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
  return _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
}

Prepared prepare(const int8_t* x, int64_t rows, int64_t width, int64_t group) {
  Prepared p;
  const int64_t chunks = width / 64, tail = width % 64;
  p.units = group == 32 ? chunks + (tail ? 1 : 0) : width / group;
  p.arranged.resize(static_cast<size_t>(rows * width));
  p.offset.resize(static_cast<size_t>(rows * p.units));
  if (group == 32) p.reduced.resize(static_cast<size_t>(rows * chunks));
  const __m256i eights = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* in = x + r * width;
    int8_t* out = p.arranged.data() + r * width;
    __m256i* offset = p.offset.data() + r * p.units;
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* chunk = in + 64 * c;
      int8_t* to = out + 64 * c;
      std::copy(chunk, chunk + 16, to);
      std::copy(chunk + 32, chunk + 48, to + 16);
      std::copy(chunk + 16, chunk + 32, to + 32);
      std::copy(chunk + 48, chunk + 64, to + 48);
      const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(to));
      const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(to + 32));
      const __m256i eight_x = sum_pairs(eights, low, eights, high, ones);
      if (group == 32) {
        offset[c] = eight_x;
        p.reduced[r * chunks + c] = reduce_four(eight_x, eight_x, eight_x, eight_x);
      } else {
        const int64_t g = 64 * c / group;
        offset[g] = (64 * c) % group == 0 ? eight_x : _mm256_add_epi32(offset[g], eight_x);
      }
    }
    if (tail) {
      std::copy(in + 64 * chunks, in + width, out + 64 * chunks);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + 64 * chunks));
      offset[chunks] = sum_quads(eights, xv, ones);
    }
  }
  return p;
}

// Scales of groups g and g + 1 of a row as [d_g x 4, d_g+1 x 4] (the lanes of a chunk with group size 32).
inline __m256 two_scales(const c10::Half* scale, __m256i spread) {
  int32_t raw;
  std::memcpy(&raw, scale, sizeof(raw));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(raw))), spread);
}

inline float scale_value(const c10::Half* scale) {
  uint16_t raw;
  std::memcpy(&raw, scale, sizeof(raw));
  return _cvtsh_ss(raw);
}

// One weight row against one prepared x row: sum_g d[g] * sum_{i in g} x_i (q_i - 8). A block's rows are read one
// after the other, in memory order, each prefetching the row kPrefetchRows ahead: one sequential stream reads
// faster than rows interleaved chunk by chunk (19 against 14 GB/s for a decode step's experts on 2 Zen 2 cores;
// without the prefetch, 9.5).
float dot_row(const int8_t* x, const __m256i* offset, const uint8_t* weight, int64_t stride, const c10::Half* scale,
              int64_t groups, int64_t width) {
  const int64_t group = width / groups, chunks = width / 64;
  const __m256i low_mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const char* ahead = reinterpret_cast<const char*>(weight + kPrefetchRows * stride);
  __m256 acc = _mm256_setzero_ps();
  if (group == 32) {
    // Two sums, even and odd chunks, so that consecutive chunks' FMAs do not wait on each other (one chain
    // allows a chunk per FMA latency, about what one core must stream).
    __m256 odd = _mm256_setzero_ps();
    const auto chunk = [&](int64_t c, __m256 sum) {
      const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * c));
      const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * c + 32));
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + 32 * c));
      const __m256i low = _mm256_and_si256(packed, low_mask), high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
      const __m256i sums32 = _mm256_sub_epi32(sum_pairs(low, x_low, high, x_high, ones), offset[c]);
      return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums32), two_scales(scale + 2 * c, spread), sum);
    };
    int64_t c = 0;
    for (; c + 1 < chunks; c += 2) {
      _mm_prefetch(ahead + 32 * c, _MM_HINT_T0);
      acc = chunk(c, acc);
      odd = chunk(c + 1, odd);
    }
    if (c < chunks) {
      _mm_prefetch(ahead + 32 * c, _MM_HINT_T0);
      acc = chunk(c, acc);
    }
    acc = _mm256_add_ps(acc, odd);
    if (width % 64) {  // one block of 32 in input order, its lanes all in the last group
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * chunks));
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + 32 * chunks));
      const __m256i levels = _mm256_and_si256(_mm256_insertf128_si256(_mm256_castsi128_si256(bytes), _mm_srli_epi16(bytes, 4), 1), low_mask);
      const __m256i sums32 = _mm256_sub_epi32(sum_quads(levels, xv, ones), offset[chunks]);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums32), _mm256_set1_ps(scale_value(scale + groups - 1)), acc);
    }
  } else {
    const int64_t per_group = group / 64;
    for (int64_t g = 0; g < groups; ++g) {
      __m256i isum = _mm256_setzero_si256();
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        if (c % 2 == 0) _mm_prefetch(ahead + 32 * c, _MM_HINT_T0);
        const __m256i x_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * c));
        const __m256i x_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * c + 32));
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + 32 * c));
        const __m256i low = _mm256_and_si256(packed, low_mask), high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
        isum = _mm256_add_epi32(isum, sum_pairs(low, x_low, high, x_high, ones));
      }
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(isum, offset[g])), _mm256_set1_ps(scale_value(scale + g)), acc);
    }
  }
  return horizontal_sum(acc);
}

// Scales of 4 weight rows for one chunk of 64 inputs (group size 32: groups g = 2c and g + 1) in the order of
// `reduce_four`'s lanes, [d_0g, d_1g, d_2g, d_3g, d_0g+1, d_1g+1, d_2g+1, d_3g+1]. `raw` holds row k's two
// float16 scales in its 32-bit lane k.
inline __m256 four_scales(__m128i raw) {
  return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(raw), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

// Four weight rows (group size 32, I a multiple of 64) against two rows of x (prefills, decode batches): each
// 32-byte load of levels is unpacked once for both, and the four rows' int32 sums of a chunk are reduced into one
// vector (`reduce_four`), so the offset, the conversion to float and the scales cost one instruction per chunk
// for four rows instead of one each. The scales of four chunks are read as four 16-byte rows and transposed.
// (Against one row of x the rows are read one at a time, `dot_row`: a decode step is bound by reading the weights.)
void dot_four_pair(const int8_t* const* x, const __m256i* const* offset, const uint8_t* weight, int64_t stride,
                   const c10::Half* scale, int64_t groups, int64_t width, float* const* sums) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t chunks = width / 64;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const auto chunk_step = [&](int64_t c, __m128i raw_scales) {
    __m256i x_low[2], x_high[2], s[2][4];
    for (int r = 0; r < 2; ++r) {
      x_low[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r] + 64 * c));
      x_high[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r] + 64 * c + 32));
    }
    for (int k = 0; k < 4; ++k) {
      const uint8_t* w = weight + k * stride + 32 * c;
      if (c % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + 4 * stride), _MM_HINT_T0);
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i low = _mm256_and_si256(packed, low_mask), high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
      for (int r = 0; r < 2; ++r) s[r][k] = sum_pairs(low, x_low[r], high, x_high[r], ones);
    }
    const __m256 d = four_scales(raw_scales);
    for (int r = 0; r < 2; ++r) {
      const __m256i reduced = _mm256_sub_epi32(reduce_four(s[r][0], s[r][1], s[r][2], s[r][3]), offset[r][c]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduced), d, acc[r]);
    }
  };
  int64_t c = 0;
  for (; c + 4 <= chunks; c += 4) {  // scales of chunks c..c+3: 16 bytes per row, transposed to 16 bytes per chunk
    const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + 2 * c));
    const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + groups + 2 * c));
    const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + 2 * groups + 2 * c));
    const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + 3 * groups + 2 * c));
    const __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpacklo_epi32(r2, r3);
    const __m128i t2 = _mm_unpackhi_epi32(r0, r1), t3 = _mm_unpackhi_epi32(r2, r3);
    chunk_step(c, _mm_unpacklo_epi64(t0, t1));
    chunk_step(c + 1, _mm_unpackhi_epi64(t0, t1));
    chunk_step(c + 2, _mm_unpacklo_epi64(t2, t3));
    chunk_step(c + 3, _mm_unpackhi_epi64(t2, t3));
  }
  for (; c < chunks; ++c) {
    int32_t raw[4];
    for (int k = 0; k < 4; ++k) std::memcpy(&raw[k], scale + k * groups + 2 * c, sizeof(int32_t));
    chunk_step(c, _mm_loadu_si128(reinterpret_cast<const __m128i*>(raw)));
  }
  for (int r = 0; r < 2; ++r) _mm_storeu_ps(sums[r], _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1)));
}

void dot_rows(const int8_t* x, const __m256i* offset, const uint8_t* weight, int64_t stride, const c10::Half* scale,
              int64_t groups, int64_t count, int64_t width, float* sums) {
  for (int64_t k = 0; k < count; ++k) sums[k] = dot_row(x, offset, weight + k * stride, stride, scale + k * groups, groups, width);
}
#else
void dot_rows(const int8_t* x, const void*, const uint8_t* weight, int64_t stride, const c10::Half* scale, int64_t groups,
              int64_t count, int64_t width, float* sums) {
  const int64_t group = width / groups;
  for (int64_t k = 0; k < count; ++k) {
    const uint8_t* w = weight + k * stride;
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t isum = 0;
      for (int64_t i = g * group; i < (g + 1) * group; i += kBlock) {
        const uint8_t* block = w + i / 2;
        for (int64_t j = 0; j < kBlock / 2; ++j) {
          isum += static_cast<int32_t>(x[i + j]) * (static_cast<int32_t>(block[j] & 0x0F) - 8);
          isum += static_cast<int32_t>(x[i + kBlock / 2 + j]) * (static_cast<int32_t>(block[j] >> 4) - 8);
        }
      }
      total += static_cast<float>(isum) * static_cast<float>(scale[k * groups + g]);
    }
    sums[k] = total;
  }
}
#endif


}  // namespace

// x [R, I] int8, step [R] float32, weight [E, O, I / 2] uint8 (rows contiguous), scale [E, O, G] float16,
// ids [R] int64 (the matrix of each row; -1: none, its output is 0) or an empty tensor (all rows use
// matrix 0) -> [R, O] float32.
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& step, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& ids) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar, "int4_matmul: x must be int8 [R, I]");
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kByte, "int4_matmul: weight must be uint8 [E, O, I / 2]");
  TORCH_CHECK(x.size(1) % kBlock == 0 && weight.size(2) * 2 == x.size(1) && weight.stride(2) == 1,
              "int4_matmul: weight [E, O, I / 2] with contiguous rows matching x, I a multiple of 32");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == weight.size(0) && scale.size(1) == weight.size(1) && scale.scalar_type() == at::kHalf,
              "int4_matmul: scale must be float16 [E, O, G]");
  const int64_t rows = x.size(0), width = x.size(1), experts = weight.size(0), outputs = weight.size(1), groups = scale.size(2);
  TORCH_CHECK(groups > 0 && width % groups == 0 && (width / groups == kBlock || (width / groups) % 64 == 0),
              "int4_matmul: the group size must be 32 or a multiple of 64 dividing I");
  TORCH_CHECK(step.numel() == rows && step.scalar_type() == at::kFloat, "int4_matmul: step must be float32 [R]");
  const bool routed = ids.numel() > 0;
  TORCH_CHECK(!routed || (ids.numel() == rows && ids.scalar_type() == at::kLong), "int4_matmul: ids must be int64 [R] or empty");

  const at::Tensor xs = x.contiguous(), steps = step.contiguous().view({-1}), scales = scale.contiguous();
  at::Tensor out = at::zeros({rows, outputs}, x.options().dtype(at::kFloat));
  if (rows == 0 || outputs == 0) return out;

  const StackedRows grouped = stacked_rows(ids, rows, experts, outputs, kRowsPerTask, "int4_matmul");
  const std::vector<int64_t>& order = grouped.order;
  const std::vector<Task>& tasks = grouped.tasks;

  const int8_t* x_data = xs.data_ptr<int8_t>();
  const uint8_t* w_data = weight.data_ptr<uint8_t>();
  const float* step_data = steps.data_ptr<float>();
  const c10::Half* scale_data = scales.data_ptr<c10::Half>();
  float* out_data = out.data_ptr<float>();
  const int64_t w_matrix = weight.stride(0), w_row = weight.stride(1);

#if defined(DSV2_INT4_AVX2)
  const Prepared prepared = prepare(x_data, rows, width, width / groups);
  const int8_t* row_data = prepared.arranged.data();
  const __m256i* offset_data = prepared.offset.data();
  const int64_t units = prepared.units, chunks = width / 64;
  const __m256i* reduced_data = prepared.reduced.data();
  const bool pairs = width / groups == kBlock && width % 64 == 0;  // dot_four_pair's case
#else
  const int8_t* row_data = x_data;
  const char* offset_data = nullptr;
#endif

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t first_task, int64_t last_task) {
    float sums[kRowsPerBlock];
    for (int64_t t = first_task; t < last_task; ++t) {
      const Task& task = tasks[t];
      const int64_t last = std::min(outputs, task.first + kRowsPerTask);
      for (int64_t o = task.first; o < last; o += kRowsPerBlock) {
        const int64_t count = std::min(kRowsPerBlock, last - o);
        const uint8_t* w = w_data + task.matrix * w_matrix + o * w_row;
        const c10::Half* s = scale_data + (task.matrix * outputs + o) * groups;
        for (int64_t j = task.begin; j < task.end; ++j) {
          const int64_t r = order[j];
#if defined(DSV2_INT4_AVX2)
          if (pairs && count == kRowsPerBlock && j + 1 < task.end) {  // two rows of x at once
            const int64_t r1 = order[j + 1];
            float sums1[kRowsPerBlock];
            const int8_t* xs[2] = {row_data + r * width, row_data + r1 * width};
            const __m256i* offsets[2] = {reduced_data + r * chunks, reduced_data + r1 * chunks};
            float* outs[2] = {sums, sums1};
            dot_four_pair(xs, offsets, w, w_row, s, groups, width, outs);
            for (int64_t k = 0; k < count; ++k) {
              out_data[r * outputs + o + k] = sums[k] * step_data[r];
              out_data[r1 * outputs + o + k] = sums1[k] * step_data[r1];
            }
            ++j;
            continue;
          }
          dot_rows(row_data + r * width, offset_data + r * units, w, w_row, s, groups, count, width, sums);
#else
          dot_rows(row_data + r * width, offset_data, w, w_row, s, groups, count, width, sums);
#endif
          for (int64_t k = 0; k < count; ++k) out_data[r * outputs + o + k] = sums[k] * step_data[r];
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(DSV2_INT4_NAMESPACE, m) {
  m.def("int4_matmul(Tensor x, Tensor step, Tensor weight, Tensor scale, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(DSV2_INT4_NAMESPACE, CPU, m) {
  m.impl("int4_matmul", &int4_matmul);
}
