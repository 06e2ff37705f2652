// softmax(scale * scores) in place over the last dimension, keys past each batch row's length masked out.
#pragma once
#include <torch/extension.h>

namespace hanlin {
void register_attention_softmax(pybind11::module& m);
}
