// Argument checks with messages that name the argument: a failed check raises a Python
// ValueError/TypeError through c10's exception translation, never an abort.
#pragma once
#include <torch/extension.h>

#define VS_CHECK_CPU(x) TORCH_CHECK_VALUE((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define VS_CHECK_DIM(x, n) TORCH_CHECK_VALUE((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())
#define VS_CHECK_FLOATING(x)                                                                      \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||        \
                       (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16,      \
                   #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())

namespace vocabsem {

// Accumulation type: float64 stays float64, every other floating type accumulates in float32.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace vocabsem
