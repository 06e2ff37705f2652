// Training's routed SwiGLU experts of an MoE layer: gather, expert matmuls and weighted combine, forward and backward.
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_moe_experts(pybind11::module& m);
}
