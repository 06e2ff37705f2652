// Fused decoder-layer halves for the engine's CPU hot path (see decode.cpp).
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_decode(pybind11::module& m);
}
