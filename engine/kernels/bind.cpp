// The module's Python face: every kernel bound, the GIL released while one runs, as torch's own ops
// do (the service's event loop goes on meanwhile). Only this file includes pybind11 and torch's
// casters (torch/csrc/utils/pybind.h: ~6 s to parse, where <torch/extension.h> took 25-30 s of
// each file's build).
#include <torch/csrc/utils/pybind.h>
#include "decode.h"
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV pool (CPU)", release());
  m.def("causal_attention", &causal_attention, "causal attention of new tokens over K/V that include them (CPU)",
        release());
  m.def("rms_norm", &rms_norm, "Hugging Face's RMSNorm, fused", release());
  m.def("add_rms_norm", &add_rms_norm, "h += delta in place, then RMSNorm of h, fused", release());
  m.def("rope_", &rope_, "rotary embedding in place, fused", release());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up, fused", release());
  m.def("pack_linear", &pack_linear, "a linear's weight in the panels `linear` reads", release());
  m.def("linear", &linear, "x W^T + b for few rows (a decode step's GEMMs)", release());
  m.def("gate_up_order", &gate_up_order, "[gate; up] rows (or a bias) reordered as pack_gate_up packs them", release());
  m.def("pack_gate_up", &pack_gate_up, "an MLP's [gate; up] weight in the panels `linear_silu_mul` reads", release());
  m.def("linear_silu_mul", &linear_silu_mul, "silu(x G^T + bg) * (x U^T + bu), the activation in the GEMM", release());
  m.attr("LINEAR_DTYPES") = pybind11::cast(linear_dtypes());
  m.attr("LINEAR_BF16_WIDENED") = linear_bf16_widened();
  m.attr("HEAD_DIMS") = pybind11::make_tuple(16, 32, 64, 80, 96, 128, 256);
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double>())
      .def("add", &DecodeStack::add, "append a decoder layer's packed weights and norms")
      .def("__len__", &DecodeStack::size)
      .def("run", &DecodeStack::run, "a decode step's decoder layers; h updated in place and returned", release());
}
