// Training's causal self-attention, forward and backward, for keys that start per query row (documents, windows).
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_causal_attention(pybind11::module& m);
}
