// Softmax cross-entropy rows turned into their own gradient in place (training's fused lm_head + loss).
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_cross_entropy(pybind11::module& m);
}
