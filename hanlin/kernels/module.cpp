// The `hanlin_cpu` extension: every compiled CPU kernel, each source file registering its own functions.
#include <torch/extension.h>

#include "decode.h"
#include "qlinear.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  hanlin::register_qlinear(m);
  hanlin::register_decode(m);
}
