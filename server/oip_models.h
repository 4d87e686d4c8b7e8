// The KServe v2 / Open Inference Protocol view of lossd (docs/interop.md): each loss is a model
// (`bce_with_logits`, `sigmoid_focal_loss`, version "1"), its tensors are named inputs and
// outputs and its options are request parameters. A ModelInferRequest is translated into the
// lossd.v1 EvaluateRequest that asks for the same computation, which then runs through the
// same validation and compute as lossd.v1 (Planner::Prepare, Executor::Compute); the
// ComputeResult is encoded as the ModelInferResponse. Pure functions: no gRPC server state.
#ifndef LOSSD_SERVER_OIP_MODELS_H_
#define LOSSD_SERVER_OIP_MODELS_H_

#include <grpcpp/support/byte_buffer.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/executor.h"
#include "inference/grpc_predict_v2.pb.h"
#include "lossd/v1/lossd.pb.h"
#include "server/memory.h"

namespace lossd::server {

// The one version of every model.
inline constexpr absl::string_view kOipModelVersion = "1";
// ModelMetadataResponse.platform of every model.
inline constexpr absl::string_view kOipPlatform = "lossd";

struct OipModel {
  absl::string_view name;
  bool focal;  // sigmoid_focal_loss (else bce_with_logits)
};

// The models, in the order ModelMetadata and errors list them.
const std::vector<OipModel>& OipModels();

// The model `name` at `version` ("" or "1"). NOT_FOUND "unknown model 'x'; this server has
// models bce_with_logits, sigmoid_focal_loss" or "model 'bce_with_logits' has no version '2';
// its only version is '1'".
absl::StatusOr<const OipModel*> FindOipModel(absl::string_view name, absl::string_view version);

// Fills `response` with the model's name, version, platform, inputs and outputs.
void FillModelMetadata(const OipModel& model, inference::ModelMetadataResponse* response);

// Fills `response` with the server's name ("lossd"), version and the protocol extensions both
// front-ends serve ("parameters", "model_configuration", "statistics", "system_shared_memory";
// the REST front-end adds
// "binary_tensor_data").
void FillServerMetadata(inference::ServerMetadataResponse* response);

// ModelReady / GET /v2/models/{name}/ready: a model of this server at `version` ("" or "1"),
// and the server not draining. Unknown models and versions are not ready (not an error).
bool OipModelReady(bool draining, absl::string_view name, absl::string_view version);

// The outputs of a model, in the order a reply lists them when the request names none.
enum class OipOutput { kLoss, kGradLogits, kGradTargets };
absl::string_view OipOutputName(OipOutput output);

// "FP32", "FP64", "FP16", "BF16" for a lossd dtype; "" for DTYPE_UNSPECIFIED.
absl::string_view OipDatatype(v1::DType dtype);

// Which front-end a request came through: only the names of the fields that messages cite
// differ (gRPC raw_input_contents[i] and fp32_contents / fp64_contents; REST binary data
// (binary_data_size) and data). The rules are the same.
enum class OipProtocol { kGrpc, kRest };

// Triton's system shared memory extension as the translation sees it (oip_shm.h): the lossd.v1
// reference of `byte_size` bytes at `offset` of the region the caller registered as `name`.
// `what` names the tensor in messages ("input 'LOGITS'", "output 'LOSS'").
class OipShmLookup {
 public:
  virtual ~OipShmLookup() = default;
  virtual absl::StatusOr<v1::TensorReference> Reference(std::string_view what,
                                                        std::string_view name, uint64_t offset,
                                                        uint64_t byte_size) const = 0;
};

// What TranslateInferRequest produces besides the EvaluateRequest.
struct OipTranslation {
  const OipModel* model = nullptr;
  std::vector<OipOutput> outputs;  // in the order of the reply
};

// Translates `request` into `out` (cleared first). The inputs' raw bytes are moved (swapped)
// into the EvaluateRequest's tensors, not copied: `request` loses them. Typed contents
// (fp32_contents, fp64_contents) are copied once into the tensors' bytes; `reservation` (may be
// null) is charged for that copy before it is made. Errors: NOT_FOUND for an unknown model or
// version; INVALID_ARGUMENT naming the input, output or parameter and the values for an
// unknown, repeated or missing input, an unsupported datatype, a negative dimension, data whose
// length does not match the shape, an unknown output or parameter, or a parameter of the wrong
// type or value; RESOURCE_EXHAUSTED when the reservation refuses the copy. Everything else
// (ranks, element limits, broadcasting, option ranges, devices) is checked by Planner::Prepare,
// whose messages use lossd.v1's field names (logits: LOGITS, targets: TARGETS, weight: WEIGHT,
// pos_weight: POS_WEIGHT, bce_with_logits.X / sigmoid_focal_loss.X: parameter X).
//
// Inputs and outputs with the parameters shared_memory_region, shared_memory_byte_size and
// (optional, default 0) shared_memory_offset live in a region registered with Triton's system
// shared memory extension: through `shm`, an input becomes a TensorReference (its byte_size
// must be the tensor's size; it has no raw_input_contents entry, which are then one per other
// input) and an output an OutputPlacement (its byte_size at least the output's size). `shm`
// null: such tensors get FAILED_PRECONDITION (shared memory is disabled).
absl::Status TranslateInferRequest(inference::ModelInferRequest* request,
                                   Reservation* reservation, v1::EvaluateRequest* out,
                                   OipTranslation* translation,
                                   const OipShmLookup* shm = nullptr);

// The same translation with the inputs' raw bytes given per input: `raw[i]` (moved, not
// copied) holds the bytes of request->inputs(i), or is null when that input's elements are in
// its typed contents. gRPC: raw_input_contents, all inputs or none (TranslateInferRequest
// above); REST: the binary tensor data extension, input by input (oip_http.h). `raw` has one
// entry per input. Messages name the fields of `protocol`.
absl::Status TranslateInferInputs(OipProtocol protocol, inference::ModelInferRequest* request,
                                  const std::vector<std::string*>& raw,
                                  Reservation* reservation, v1::EvaluateRequest* out,
                                  OipTranslation* translation,
                                  const OipShmLookup* shm = nullptr);

// Whether an input names a shared-memory region (its parameters include shared_memory_region).
bool UsesSharedMemory(const inference::ModelInferRequest::InferInputTensor& input);

// Encodes `result` as a serialized ModelInferResponse into `out`, byte for byte what protobuf
// would serialize: `outputs` in that order with their datatype and shape, each one's bytes an
// entry of raw_output_contents (an empty entry for an output placed in shared memory, as
// Triton keeps the entries in the order of the outputs), and the parameter "device" ("cpu" or
// "cuda"). Output blocks of at least kZeroCopyBytes become slices of the reply without a copy;
// smaller ones are copied into the reply's first slice. Takes the blocks out of `result`.
absl::Status EncodeInferReply(const OipModel& model, const std::string& id,
                              const std::vector<OipOutput>& outputs, ComputeResult* result,
                              grpc::ByteBuffer* out);

// The reply without its tensor bytes: model name and version, id, the parameter "device" and
// `outputs` in that order with their datatype and shape (raw_output_contents left empty),
// outputs placed in shared memory included.
// INTERNAL when an output was not computed.
absl::Status FillInferResponseHeader(const OipModel& model, const std::string& id,
                                     const std::vector<OipOutput>& outputs,
                                     const ComputeResult& result,
                                     inference::ModelInferResponse* response);

// The computed tensor of `output` in `result`.
const OutputTensor& OipOutputTensor(const ComputeResult& result, OipOutput output);

// Tensor data bytes of the reply: the outputs listed (metrics).
int64_t InferReplyPayloadBytes(const std::vector<OipOutput>& outputs, const ComputeResult& result);

// The same reply as a message (tests).
absl::Status BuildInferResponse(const OipModel& model, const std::string& id,
                                const std::vector<OipOutput>& outputs,
                                const ComputeResult& result,
                                inference::ModelInferResponse* response);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_OIP_MODELS_H_
