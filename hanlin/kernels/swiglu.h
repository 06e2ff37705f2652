// SwiGLU's activation silu(gate) * up, forward and backward, for training.
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_swiglu(pybind11::module& m);
}
