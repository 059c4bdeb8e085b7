// int8 x int8 products of a few rows (decode steps) against int8 weights with a scale per output row.
//
//     out[r, o] = step[r] * scale[e_r, o] * sum_i x[r, i] * weight[e_r, o, i]          (e_r = ids[r])
//
// x holds rows quantized per row (int8 values and a float32 step each), weight is a stack of E
// matrices [O, I] (E = 1 for a plain linear; the routed experts of a layer otherwise) and ids picks
// each row's matrix, so a decode step reads its K experts where they lie, without gathering them.
// The sums are int32 and exact (|x|, |w| <= 127: a pair of products fits int16, I * 127^2 fits int32),
// so a row's result does not depend on the other rows, on threads or on the instruction set.
//
// Rows that share a matrix are processed together: each block of output rows of the matrix is read
// from memory once and reused from L1 for every row, so a decode batch reads each weight once. Work
// is split across threads by blocks of output rows of every matrix used. With AVX512-VNNI, 64 products
// per instruction (`dpbusd`, unsigned x signed bytes: x is offset to x + 128 and 128 * sum(w) taken off
// again); the first row of x reads a block's weight rows one after the other, computing their sums, and the
// others reuse both from L1. With AVX2, 32 products per instruction pair (`maddubs` on |x| and
// sign-adjusted w, then `madd` to int32, as llama.cpp's Q8_0 dot products); elsewhere a plain loop the
// compiler vectorizes.
//
// Built at run time with latent_attention.cpp by dsv2cli/kernels/__init__.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lane_sums.h"
#include "stacked_rows.h"

using dsv2cli::StackedRows;
using dsv2cli::Task;
using dsv2cli::stacked_rows;
#if defined(__AVX2__)
using dsv2cli::horizontal_sum;
#endif

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowsPerBlock = 8;     // output rows whose sums are accumulated together
constexpr int64_t kBlocksPerTask = 4;    // 32 output rows per thread task

#if defined(__AVX2__)
// Products of 32 int8 pairs, summed in pairs of pairs into 8 int32 lanes.
inline __m256i dot32(__m256i x_abs, __m256i x, __m256i w, __m256i ones) {
  const __m256i products = _mm256_maddubs_epi16(x_abs, _mm256_sign_epi8(w, x));  // |x| * (w * sign x): 16 int16
  return _mm256_madd_epi16(products, ones);
}
#endif

// Sums of `count` (<= kRowsPerBlock) weight rows against one x row, each of `width` values.
inline void dot_rows(const int8_t* x, const int8_t* weight, int64_t stride, int64_t count, int64_t width, int32_t* sums) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kRowsPerBlock];
  for (int64_t k = 0; k < kRowsPerBlock; ++k) acc[k] = _mm256_setzero_si256();
  const int64_t vector_end = width - width % 32;
  if (count == kRowsPerBlock) {
    for (; i < vector_end; i += 32) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      const __m256i x_abs = _mm256_sign_epi8(xv, xv);
      for (int64_t k = 0; k < kRowsPerBlock; ++k) {
        if (i % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(weight + (k + kRowsPerBlock) * stride + i), _MM_HINT_T0);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + k * stride + i));
        acc[k] = _mm256_add_epi32(acc[k], dot32(x_abs, xv, w, ones));
      }
    }
  } else {
    for (; i < vector_end; i += 32) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      const __m256i x_abs = _mm256_sign_epi8(xv, xv);
      for (int64_t k = 0; k < count; ++k) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + k * stride + i));
        acc[k] = _mm256_add_epi32(acc[k], dot32(x_abs, xv, w, ones));
      }
    }
  }
  for (int64_t k = 0; k < count; ++k) sums[k] = horizontal_sum(acc[k]);
#else
  for (int64_t k = 0; k < count; ++k) sums[k] = 0;
#endif
  for (int64_t k = 0; k < count; ++k) {
    int32_t tail = 0;
    for (int64_t j = i; j < width; ++j) tail += static_cast<int32_t>(x[j]) * static_cast<int32_t>(weight[k * stride + j]);
    sums[k] += tail;
  }
}


#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define DSV2_INT8_VNNI 1

// The lanes of a 64-byte load that hold the `remaining` values left of a row (all of them from 64 on).
inline __mmask64 lanes_left(int64_t remaining) {
  return remaining >= 64 ? ~__mmask64{0} : (__mmask64{1} << remaining) - 1;
}

// x + 128 (uint8) against one weight row of `width` values: returns sum_i x[i] * w[i] and stores sum_i w[i] in
// *weight_sum: sum_i (x[i] + 128) * w[i] - 128 * sum_i w[i], exact in int32 (|sum| <= I * 255 * 128). The row is
// read front to back, one stream: on 2 Zen 4 cores 34 GB/s, where 8 rows read column by column reach 25.
inline int32_t dot_row_vnni(const uint8_t* x, const int8_t* weight, int64_t width, int32_t* weight_sum) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, sum0 = acc0, sum1 = acc0;
  int64_t i = 0;
  for (; i + 128 <= width; i += 128) {
    const __m512i w0 = _mm512_loadu_si512(weight + i), w1 = _mm512_loadu_si512(weight + i + 64);
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(x + i), w0);
    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(x + i + 64), w1);
    sum0 = _mm512_dpbusd_epi32(sum0, ones, w0);
    sum1 = _mm512_dpbusd_epi32(sum1, ones, w1);
  }
  for (; i < width; i += 64) {  // the rest with masked loads: lanes past the end read as 0
    const __mmask64 mask = lanes_left(width - i);
    const __m512i w = _mm512_maskz_loadu_epi8(mask, weight + i);
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_maskz_loadu_epi8(mask, x + i), w);
    sum0 = _mm512_dpbusd_epi32(sum0, ones, w);
  }
  *weight_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(sum0, sum1));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1)) - 128 * *weight_sum;
}

// x + 128 (uint8) against `count` (<= kRowsPerBlock) weight rows that the block's first row brought into L1,
// column by column (each x vector loaded once for all of them), with their weight sums from that first pass.
inline void dot_rows_vnni(const uint8_t* x, const int8_t* weight, int64_t stride, int64_t count, int64_t width,
                          const int32_t* weight_sums, int32_t* sums) {
  __m512i acc[kRowsPerBlock];
  for (int64_t k = 0; k < kRowsPerBlock; ++k) acc[k] = _mm512_setzero_si512();
  const int64_t vector_end = width - width % 64;
  int64_t i = 0;
  if (count == kRowsPerBlock) {
    for (; i < vector_end; i += 64) {
      const __m512i xv = _mm512_loadu_si512(x + i);
      for (int64_t k = 0; k < kRowsPerBlock; ++k) acc[k] = _mm512_dpbusd_epi32(acc[k], xv, _mm512_loadu_si512(weight + k * stride + i));
    }
  }
  for (; i < width; i += 64) {  // a short block, or the last width % 64 values
    const __mmask64 mask = lanes_left(width - i);
    const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + i);
    for (int64_t k = 0; k < count; ++k) acc[k] = _mm512_dpbusd_epi32(acc[k], xv, _mm512_maskz_loadu_epi8(mask, weight + k * stride + i));
  }
  for (int64_t k = 0; k < count; ++k) sums[k] = _mm512_reduce_add_epi32(acc[k]) - 128 * weight_sums[k];
}
#else
#define DSV2_INT8_VNNI 0
#endif

}  // namespace

// x [R, I] int8, step [R] float32, weight [E, O, I] int8 (rows contiguous), scale [E, O] float32,
// ids [R] int64 (the matrix of each row; -1: none, its output is 0) or an empty tensor (all rows use
// matrix 0) -> [R, O] float32.
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& step, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& ids) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar, "int8_matmul: x must be int8 [R, I]");
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kChar, "int8_matmul: weight must be int8 [E, O, I]");
  TORCH_CHECK(weight.size(2) == x.size(1) && weight.stride(2) == 1, "int8_matmul: weight [E, O, I] with contiguous rows matching x");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == weight.size(0) && scale.size(1) == weight.size(1) && scale.scalar_type() == at::kFloat,
              "int8_matmul: scale must be float32 [E, O]");
  TORCH_CHECK(step.numel() == x.size(0) && step.scalar_type() == at::kFloat, "int8_matmul: step must be float32 [R]");
  const int64_t rows = x.size(0), width = x.size(1), experts = weight.size(0), outputs = weight.size(1);
  const bool routed = ids.numel() > 0;
  TORCH_CHECK(!routed || (ids.numel() == rows && ids.scalar_type() == at::kLong), "int8_matmul: ids must be int64 [R] or empty");

  const at::Tensor xs = x.contiguous(), steps = step.contiguous().view({-1}), scales = scale.contiguous();
  at::Tensor out = at::zeros({rows, outputs}, x.options().dtype(at::kFloat));
  if (rows == 0 || outputs == 0) return out;

  const int64_t per_task = kRowsPerBlock * kBlocksPerTask;
  const StackedRows grouped = stacked_rows(ids, rows, experts, outputs, per_task, "int8_matmul");
  const std::vector<int64_t>& order = grouped.order;
  const std::vector<Task>& tasks = grouped.tasks;

  const int8_t* x_data = xs.data_ptr<int8_t>();
  const int8_t* w_data = weight.data_ptr<int8_t>();
  const float* step_data = steps.data_ptr<float>();
  const float* scale_data = scales.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t w_matrix = weight.stride(0), w_row = weight.stride(1);
#if DSV2_INT8_VNNI
  // x + 128, the unsigned operand of dpbusd (left uninitialized: every byte is written below)
  const std::unique_ptr<uint8_t[]> x_offset(new uint8_t[rows * width]);
  for (int64_t j = 0; j < rows * width; ++j) x_offset[j] = static_cast<uint8_t>(x_data[j]) ^ 0x80;
#endif
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t first_task, int64_t last_task) {
    int32_t sums[kRowsPerBlock];
#if DSV2_INT8_VNNI
    int32_t weight_sums[kRowsPerBlock];
#endif
    for (int64_t t = first_task; t < last_task; ++t) {
      const Task& task = tasks[t];
      const int64_t last = std::min(outputs, task.first + per_task);
      for (int64_t o = task.first; o < last; o += kRowsPerBlock) {
        const int64_t count = std::min(kRowsPerBlock, last - o);
        const int8_t* w = w_data + task.matrix * w_matrix + o * w_row;
        const float* s = scale_data + task.matrix * outputs + o;
        for (int64_t j = task.begin; j < task.end; ++j) {
          const int64_t r = order[j];
#if DSV2_INT8_VNNI
          if (j == task.begin)
            for (int64_t k = 0; k < count; ++k) sums[k] = dot_row_vnni(x_offset.get() + r * width, w + k * w_row, width, &weight_sums[k]);
          else
            dot_rows_vnni(x_offset.get() + r * width, w, w_row, count, width, weight_sums, sums);
#else
          dot_rows(x_data + r * width, w, w_row, count, width, sums);
#endif
          for (int64_t k = 0; k < count; ++k) out_data[r * outputs + o + k] = static_cast<float>(sums[k]) * s[k] * step_data[r];
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(dsv2cli, m) {
  m.def("int8_matmul(Tensor x, Tensor step, Tensor weight, Tensor scale, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2cli, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
}
