// MoE experts in int8 (the w8a8 scheme), one call per layer (see int8_experts.cpp).
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_int8_experts(pybind11::module& m);
}
