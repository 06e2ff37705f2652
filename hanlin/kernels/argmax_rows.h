// Greedy sampling's argmax over rows of logits.
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_argmax_rows(pybind11::module& m);
}
