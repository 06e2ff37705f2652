// Cross-entropy over vocabulary rows, each row overwritten by the loss's gradient with respect to it:
// softmax(row) - one_hot(label), or zeros where the label is ignore_index. A row stays in cache across its three
// passes (max; exp and sum; scale), where PyTorch's log_softmax, nll_loss and their backward each stream the
// whole logits matrix through memory. See hanlin.models.linear_cross_entropy.
#include "cross_entropy.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace hanlin {
namespace {

// Returns the row's loss, logsumexp(row) - row[label], and leaves softmax(row) - one_hot(label) in the row.
float cross_entropy_row(float* row, int64_t n, int64_t label) {
  const float target = row[label];
  float top;
  const float sum = softmax_in_place(row, n, &top);
  scale_(row, n, 1.0f / sum);
  row[label] -= 1.0f;
  return std::log(sum) + top - target;
}

}  // namespace

// logits [R, V] float32 contiguous, labels [R] int64: per-row losses [R] (0 where ignored); logits become gradients.
torch::Tensor cross_entropy_grad_(torch::Tensor& logits, const torch::Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == torch::kFloat32,
              "cross_entropy_grad_: contiguous float32 logits [R, V]");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == torch::kInt64,
              "cross_entropy_grad_: int64 labels [R]");
  const int64_t R = logits.size(0), V = logits.size(1);
  const torch::Tensor labels_c = labels.contiguous();
  const int64_t* label = labels_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(label[r] == ignore_index || (label[r] >= 0 && label[r] < V),
                "cross_entropy_grad_: label ", label[r], " outside the vocabulary of ", V);
  }
  torch::Tensor losses = torch::zeros({R}, logits.options());
  float* loss = losses.data_ptr<float>();
  float* base = logits.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = base + r * V;
      if (label[r] == ignore_index) {
        std::fill(row, row + V, 0.0f);
      } else {
        loss[r] = cross_entropy_row(row, V, label[r]);
      }
    }
  });
  return losses;
}

void register_cross_entropy(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cross_entropy_grad_", &cross_entropy_grad_, py::arg("logits"), py::arg("labels"), py::arg("ignore_index"));
}

}  // namespace hanlin
