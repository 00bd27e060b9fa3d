// The part of torch the kernels use: tensors and their methods, at::empty(_like) and at::zeros,
// TORCH_CHECK, BFloat16. Not <torch/extension.h> (pybind11, autograd and every ATen op): parsing it
// took 25-30 s of each file's build, these ~4-6 s. bind.cpp, the module's Python face, takes
// pybind11 and torch's casters alone.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
