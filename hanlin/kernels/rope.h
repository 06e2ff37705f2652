// Training's RoPE over the fused q/k/v projection: rotate q and k, pass v, forward and backward.
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_rope(pybind11::module& m);
}
