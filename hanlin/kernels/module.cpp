// The `hanlin_cpu` extension: every compiled CPU kernel, each source file registering its own functions.
#include <torch/extension.h>

#include "argmax_rows.h"
#include "attention_softmax.h"
#include "causal_attention.h"
#include "cross_entropy.h"
#include "decode.h"
#include "int8_experts.h"
#include "int8_rows.h"
#include "moe_experts.h"
#include "paged_attention.h"
#include "qlinear.h"
#include "rms_norm.h"
#include "rope.h"
#include "swiglu.h"
#include "vnni_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  hanlin::register_qlinear(m);
  hanlin::register_decode(m);
  hanlin::register_int8_rows(m);
  hanlin::register_int8_experts(m);
  hanlin::register_attention_softmax(m);
  hanlin::register_causal_attention(m);
  hanlin::register_cross_entropy(m);
  hanlin::register_vnni_gemm(m);
  hanlin::register_paged_attention(m);
  hanlin::register_rms_norm(m);
  hanlin::register_swiglu(m);
  hanlin::register_moe_experts(m);
  hanlin::register_rope(m);
  hanlin::register_argmax_rows(m);
}
