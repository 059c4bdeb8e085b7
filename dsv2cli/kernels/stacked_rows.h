// Rows of a stacked product grouped by the matrix each one uses, and the tasks that share them out.
//
// Shared by int8_matmul.cpp and int4_matmul.cpp: x [R, I] goes through a stack of E matrices [E, O, ...], row r
// through matrix ids[r] (a layer's routed experts; -1: no matrix, its output stays zero) or, with empty ids,
// every row through matrix 0. Rows are grouped by matrix with a counting sort, so each matrix is read once for
// all of its rows; a task is one block of `rows_per_task` output rows of one matrix that some row uses.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace dsv2cli {

struct Task {
  int64_t matrix;  // which of the E matrices
  int64_t first;   // first output row
  int64_t begin;   // this matrix's rows of x: order[begin, end)
  int64_t end;
};

struct StackedRows {
  std::vector<int64_t> order;  // rows of x, grouped by matrix
  std::vector<Task> tasks;
};

inline StackedRows stacked_rows(const at::Tensor& ids, int64_t rows, int64_t experts, int64_t outputs,
                                int64_t rows_per_task, const char* op) {
  std::vector<int64_t> matrix_of(rows, 0);
  if (ids.numel() > 0) {
    const at::Tensor id_values = ids.contiguous();
    const int64_t* id = id_values.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(id[r] >= -1 && id[r] < experts, op, ": id out of range");
      matrix_of[r] = id[r];
    }
  }
  std::vector<int64_t> starts(experts + 1, 0);
  for (int64_t r = 0; r < rows; ++r)
    if (matrix_of[r] >= 0) starts[matrix_of[r] + 1] += 1;
  for (int64_t e = 0; e < experts; ++e) starts[e + 1] += starts[e];
  StackedRows result;
  result.order.resize(starts[experts]);
  std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
  for (int64_t r = 0; r < rows; ++r)
    if (matrix_of[r] >= 0) result.order[fill[matrix_of[r]]++] = r;
  for (int64_t e = 0; e < experts; ++e) {
    if (starts[e] == starts[e + 1]) continue;
    for (int64_t first = 0; first < outputs; first += rows_per_task) result.tasks.push_back({e, first, starts[e], starts[e + 1]});
  }
  return result;
}

}  // namespace dsv2cli
