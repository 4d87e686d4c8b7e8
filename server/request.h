// Decoding and validation of lossd.v1 requests into kernel arguments. Pure functions: no gRPC
// server state. Views point into the request's own buffers, into the received bytes the data
// views name (docs/data-path.md) or into shared-memory regions (no copy); the request and the
// buffers behind its views must outlive the returned plan.
#ifndef LOSSD_SERVER_REQUEST_H_
#define LOSSD_SERVER_REQUEST_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/v1/lossd.pb.h"
#include "server/regions.h"

namespace lossd::server {

struct Limits {
  // Per tensor, inputs and outputs alike (the per-sample loss of a [N, 0] request has N values
  // from 0 inputs); larger gives RESOURCE_EXHAUSTED.
  int64_t max_elements = int64_t{1} << 28;
  int max_rank = 8;  // larger gives INVALID_ARGUMENT
  // Largest reply payload (loss + gradient tensor bytes); larger gives RESOURCE_EXHAUSTED
  // before anything is allocated. 0: unchecked.
  int64_t max_reply_bytes = 0;
};

// A validated tensor: dtype known, dims >= 0, numel within limits, data length exact.
struct TensorView {
  kernels::DType dtype = kernels::DType::kFloat32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel = 0;
  // `data` is CUDA device memory (a span of a REGION_KIND_CUDA_IPC region): never read on
  // the host.
  bool device = false;
};

// "[4,7]"; "[]" for a scalar.
std::string ShapeString(const std::vector<int64_t>& shape);

// Where the data bytes of a request's tensors are when the parsed message does not hold them
// (message_io.h leaves them in the received slices): each view overrides that tensor's
// Tensor.data. Null pointers: Tensor.data holds them.
struct TensorDataViews {
  const std::string_view* logits = nullptr;
  const std::string_view* targets = nullptr;
  const std::string_view* weight = nullptr;
  const std::string_view* pos_weight = nullptr;
};

// A shared-memory span a plan reads or writes, kept alive (RegionSpan::keepalive) as long as
// the plan, and checked after the computation (RegionSpan::damaged).
struct HeldSpan {
  std::string field;  // "logits.ref", "outputs.loss"
  RegionSpan span;
};

// Validates `t` (named `field` in messages). INVALID_ARGUMENT for an unset or unknown dtype,
// rank above the limit, a negative dimension, numel overflow or a data length that is not
// numel * itemsize; RESOURCE_EXHAUSTED when numel exceeds limits.max_elements. `data`, when
// given, replaces t.data(). A tensor with `ref` set is resolved through `regions` (its data
// must then be empty) and its span appended to `spans`: FAILED_PRECONDITION without a
// resolver, the resolver's error otherwise.
absl::StatusOr<TensorView> DecodeTensor(const std::string& field, const v1::Tensor& t,
                                        const Limits& limits,
                                        const std::string_view* data = nullptr,
                                        const RegionResolver* regions = nullptr,
                                        std::vector<HeldSpan>* spans = nullptr);

// Everything needed to run one Evaluate, validated.
struct EvaluatePlan {
  kernels::BceArgs args;          // pointers into the request (or into operand storage)
  std::vector<int64_t> shape;     // logits' shape
  // Values in the loss output (product of LossShape()) and the reply's tensor bytes (loss and
  // requested gradients), both checked against Limits before the plan is returned.
  int64_t loss_count = 0;
  int64_t reply_bytes = 0;
  // Shape of the loss output: the logits' shape (NONE), [] (SUM/MEAN) or the logits' shape
  // without its last dimension (PER_SAMPLE_MEAN).
  std::vector<int64_t> LossShape() const;
  bool grad_logits = false;
  bool grad_targets = false;
  v1::Device device = v1::DEVICE_AUTO;
  bool reject_nan = false;
  std::vector<TensorView> nan_checked;  // tensors scanned when reject_nan
  std::vector<std::string> nan_names;
  // Shared memory: the input spans read and the output spans written (EvaluateRequest.outputs;
  // an output with a span is written there and its reply tensor carries `*_ref` instead of
  // data). Held until the plan is destroyed.
  std::vector<HeldSpan> spans;
  void* loss_out = nullptr;
  void* grad_logits_out = nullptr;
  void* grad_targets_out = nullptr;
  v1::OutputPlacement placed;  // the references of the placed outputs
  // Placed outputs in CUDA device memory: kernels::on_device::kLoss | kGradLogits |
  // kGradTargets, for BceOutputs::on_device (inputs are marked in args.on_device).
  uint32_t out_on_device = 0;
  // True when a tensor of the plan lies in CUDA device memory (docs/shared-memory.md, "CUDA
  // IPC regions"): only the CUDA backend may compute it, and nothing on the host reads it.
  bool on_device() const { return args.on_device != 0 || out_on_device != 0; }
};

// Validates a request: tensors, shapes, broadcasting, loss, reduction, device, and the sizes of
// every output (overflow-checked, counted against `limits`). Errors are INVALID_ARGUMENT or
// RESOURCE_EXHAUSTED with a message naming the field and values. `views` (optional) holds the
// tensors' data when the message does not. Tensor references and output placements resolve
// through `regions` (null: shared memory is off, FAILED_PRECONDITION); placed outputs must be
// outputs the request produces and may not overlap each other or an input span
// (INVALID_ARGUMENT naming both fields). Spans of CUDA device memory set the plan's on_device
// bits; such a plan is refused (INVALID_ARGUMENT naming the field) with device CPU, with
// options that read tensors on the host (reject_nan, PRECISION_CORRECTLY_ROUNDED) and with a
// device weight or pos_weight whose broadcast needs a host copy.
absl::StatusOr<EvaluatePlan> PlanEvaluate(const v1::EvaluateRequest& request,
                                          const Limits& limits,
                                          const TensorDataViews& views = {},
                                          const RegionResolver* regions = nullptr);

// FAILED_PRECONDITION when a span of the plan was damaged (its region's object shrank) during
// the computation; OK otherwise. Called after the computation.
absl::Status CheckSpans(const EvaluatePlan& plan);

// Sets plan->loss_count and plan->reply_bytes from the plan's shape, reduction and requested
// gradients, overflow-checked and against `limits` (INVALID_ARGUMENT on overflow,
// RESOURCE_EXHAUSTED past a limit). PlanEvaluate calls it; call it again after changing any of
// those in a plan.
absl::Status SizeOutputs(const Limits& limits, EvaluatePlan* plan);

// INVALID_ARGUMENT "targets contains NaN at flat index 5" for the first NaN found in the plan's
// nan_checked tensors; OK otherwise. O(total elements). INVALID_ARGUMENT, without reading it,
// for a tensor in device memory (PlanEvaluate refuses reject_nan for those).
absl::Status CheckNoNan(const EvaluatePlan& plan);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_REQUEST_H_
