// lossd-bench's requests: each kind of the mix (client/bench/spec.h) becomes one
// EvaluateRequest built once from a seed (logits uniform in [-8, 8], targets in {0, 1/3, 2/3, 1},
// weight and pos_weight in [0.5, 2]), serialized once and sent as is by every call. With
// --verify the kind also holds the float64 reference of its outputs
// (lossd_kernels_reference), and every reply is checked against it within the bounds of
// client/bench/verify.h.
#ifndef LOSSD_CLIENT_LOADTEST_REQUESTS_H_
#define LOSSD_CLIENT_LOADTEST_REQUESTS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/grpc_predict_v2.pb.h"
#include "lossd/v1/lossd.pb.h"
#include "client/bench/spec.h"

namespace lossd::loadtest {

struct RequestOptions {
  lossd::v1::DType dtype = lossd::v1::DTYPE_FLOAT32;
  lossd::v1::Reduction reduction = lossd::v1::REDUCTION_NONE;
  bool focal = false;            // sigmoid_focal_loss instead of bce_with_logits
  bool grad_logits = true;
  bool grad_targets = false;
  bool weight = false;           // a full-shape weight tensor
  bool pos_weight = true;        // a [C] pos_weight (bce only)
  std::optional<int64_t> ignore_index;
  bool normalize = false;
  double label_smoothing = 0;
  std::optional<double> alpha, gamma;
  lossd::v1::Device device = lossd::v1::DEVICE_AUTO;
  bool reject_nan = false;
  lossd::v1::Precision precision = lossd::v1::PRECISION_DEFAULT;
  int64_t cols = 64;  // last dimension when it divides the element count; else shape [n]
};

struct RequestKind {
  bench::MixEntry entry;
  std::string label;               // "1000 [15,64]" or "64 badshape"
  lossd::v1::EvaluateRequest request;
  std::string serialized;          // request.SerializeAsString()
  std::string oip_serialized;      // the same call as an OIP ModelInferRequest (--protocol=oip)
  std::vector<int64_t> shape;
  int64_t elements = 0;
  int64_t echo_reply_bytes = 0;    // size of an echo-style reply (the raw baseline's reply)
  bool expect_failure = false;     // "badshape": the server must refuse it
  // With --verify: the float64 reference of every output, and each gradient element's scale.
  bool has_reference = false;
  std::vector<double> loss, grad_logits, grad_targets, scale_logits, scale_targets;
};

// Values of a tensor read from a file (--logits_npy ...; client/bench/npy.h), widened to double.
struct TensorValues {
  std::string name;  // the file, for messages
  std::vector<int64_t> shape;
  std::vector<double> values;
};

// The shape lossd-bench sends for n elements: [n / cols, cols] when cols divides n, else [n].
std::vector<int64_t> ShapeFor(int64_t n, int64_t cols);

absl::StatusOr<RequestKind> BuildKind(const bench::MixEntry& entry, const RequestOptions& o,
                                      uint64_t seed, bool with_reference);

// The one kind of --logits_npy/--targets_npy[/--weight_npy]: the arrays as given (targets and
// weight of the logits' shape), rounded to o.dtype; pos_weight drawn from `seed` when asked for.
absl::StatusOr<RequestKind> BuildKindFromArrays(const TensorValues& logits,
                                                const TensorValues& targets,
                                                const TensorValues* weight,
                                                const RequestOptions& o, uint64_t seed,
                                                bool with_reference);

// The Open Inference Protocol request that asks lossd for the same computation as `request`
// (docs/interop.md; the conventions of server/oip_models.cc): model bce_with_logits or
// sigmoid_focal_loss, inputs LOGITS, TARGETS, WEIGHT, POS_WEIGHT as raw_input_contents,
// options as parameters, outputs LOSS and the gradients asked for.
inference::ModelInferRequest OipRequest(const lossd::v1::EvaluateRequest& request);

// The ModelInferResponse of OipRequest(request) as the EvaluateResponse it stands for (LOSS,
// GRAD_LOGITS and GRAD_TARGETS by name), so that VerifyReply checks it; an error when an
// output is missing, repeated or of another datatype than the request's.
absl::StatusOr<lossd::v1::EvaluateResponse> FromOipReply(
    const lossd::v1::EvaluateRequest& request, const inference::ModelInferResponse& reply);

// "" when the reply matches the kind's reference, else what differs (first element).
std::string VerifyReply(const RequestKind& kind, const lossd::v1::EvaluateResponse& reply);
// Accumulate of `batches` copies of the kind: "" when the loss matches.
std::string VerifyAccumulate(const RequestKind& kind, int batches, double loss);

}  // namespace lossd::loadtest

#endif  // LOSSD_CLIENT_LOADTEST_REQUESTS_H_
