// float32 rows against a small float32 matrix: out[r, o] = sum_i x[r, i] * weight[o, i].
//
// For the MoE router (64 x 2048 float32 on DeepSeek-V2-Lite, 0.5 MB a layer, read from memory in a decode step
// because the experts streamed through the caches since the last one): BLAS runs a product this small on one
// thread, and the other waits. Here threads split the matrix's rows, each thread's rows are read from memory
// once (the first row of x, prefetching ahead) and stay in its cache for the other rows of x. Every row of
// x is summed the same way whatever rows come with it (four float32 vectors of sums, then the lanes), so a
// sequence routes its tokens the same alone, in a decode batch or in a prefill. Built at run time with the other kernels by dsv2cli/kernels/__init__.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kSums = 4;            // vectors of partial sums per dot product
constexpr int64_t kRowsPerTask = 8;     // output rows per thread task
constexpr int64_t kPrefetchRows = 2;    // how far ahead a row prefetches, in rows

// x . w over `width` values; with Prefetch (the first row of x against this row of the matrix) the row
// `ahead` is prefetched along the way, so it arrives before its turn.
template <bool Prefetch>
float dot(const float* x, const float* w, int64_t width, const char* ahead) {
  constexpr int64_t step = kSums * Vec::size();
  Vec acc[kSums];
  for (int64_t k = 0; k < kSums; ++k) acc[k] = Vec(0.0f);
  int64_t i = 0;
  for (; i + step <= width; i += step) {
    if constexpr (Prefetch) {
      __builtin_prefetch(ahead + i * static_cast<int64_t>(sizeof(float)));
      __builtin_prefetch(ahead + i * static_cast<int64_t>(sizeof(float)) + 64);
    }
    for (int64_t k = 0; k < kSums; ++k)
      acc[k] = at::vec::fmadd(Vec::loadu(x + i + k * Vec::size()), Vec::loadu(w + i + k * Vec::size()), acc[k]);
  }
  for (int64_t k = 1; k < kSums; ++k) acc[0] = acc[0] + acc[k];
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[0]);
  for (; i < width; ++i) sum += x[i] * w[i];
  return sum;
}

// x [R, I] float32, weight [O, I] float32 (rows contiguous) -> [R, O] float32.
at::Tensor float_matmul(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "float_matmul: x must be float32 [R, I]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(1) == x.size(1) && weight.stride(1) == 1,
              "float_matmul: weight must be float32 [O, I] with contiguous rows matching x");
  const at::Tensor xs = x.contiguous();
  const int64_t rows = xs.size(0), width = xs.size(1), outputs = weight.size(0), stride = weight.stride(0);
  at::Tensor out = at::empty({rows, outputs}, xs.options());
  const float* x_data = xs.data_ptr<float>();
  const float* w_data = weight.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  if (rows == 0) return out;
  const int64_t tasks = (outputs + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    const int64_t begin = first * kRowsPerTask, end = std::min(outputs, last * kRowsPerTask);
    for (int64_t o = begin; o < end; ++o) {  // the first row of x reads the matrix rows from memory, prefetching ahead
      const float* w = w_data + o * stride;
      out_data[o] = dot<true>(x_data, w, width, reinterpret_cast<const char*>(w + kPrefetchRows * stride));
    }
    for (int64_t r = 1; r < rows; ++r)  // the others find them in the cache
      for (int64_t o = begin; o < end; ++o) out_data[r * outputs + o] = dot<false>(x_data + r * width, w_data + o * stride, width, nullptr);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv2cli, m) {
  m.def("float_matmul(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2cli, CPU, m) {
  m.impl("float_matmul", &float_matmul);
}
