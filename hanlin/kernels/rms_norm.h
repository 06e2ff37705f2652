// RMSNorm forward and backward for training (one pass over each row instead of PyTorch's chain of elementwise ops).
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_rms_norm(pybind11::module& m);
}
