// LossService on gRPC's callback API, with raw (ByteBuffer) methods: lossd parses each request
// itself (wire.h) so that malformed bytes get INVALID_ARGUMENT and the request's size is
// admitted against the memory budget before it is parsed. Each call is validated on the gRPC
// thread (cheap), then computed on the Executor's worker queue (small unary requests inline);
// workers finish the reactors. No handler blocks.
#ifndef LOSSD_SERVER_SERVICE_H_
#define LOSSD_SERVER_SERVICE_H_

#include <grpcpp/support/byte_buffer.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/call_record.h"
#include "server/core.h"
#include "lossd/kernels/accumulator.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/v1/lossd.grpc.pb.h"

namespace lossd::server {

using RawLossService = v1::LossService::WithRawCallbackMethod_Evaluate<
    v1::LossService::WithRawCallbackMethod_GetCapabilities<
        v1::LossService::WithRawCallbackMethod_EvaluateStream<
            v1::LossService::WithRawCallbackMethod_Accumulate<
                v1::LossService::WithRawCallbackMethod_MergePartials<
                    v1::LossService::Service>>>>>;

class LossServiceImpl final : public RawLossService {
 public:
  explicit LossServiceImpl(Core* core) : core_(core) {}

  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* GetCapabilities(grpc::CallbackServerContext* context,
                                            const grpc::ByteBuffer* request,
                                            grpc::ByteBuffer* reply) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* EvaluateStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* Accumulate(grpc::CallbackServerContext* context,
                                                        grpc::ByteBuffer* reply) override;
  // Computed on the gRPC thread: linear in the request's bytes, like its parse.
  grpc::ServerUnaryReactor* MergePartials(grpc::CallbackServerContext* context,
                                          const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* reply) override;

 private:
  Core* core_;
};

// The exact partial state of an Accumulate call over one slice of a dataset, or of a merge
// of such states (lossd.proto, AccumulateResponse.partial_state, which documents the
// encoding). Implemented in stream_reactors.cc.
inline constexpr uint32_t kPartialStateVersion = 1;
inline constexpr size_t kPartialStateHeaderBytes = 40;  // before the BlockSum's own state
struct PartialState {
  uint64_t fingerprint = 0;  // OptionsFingerprint of the batches
  int64_t batches = 0;
  // The reduction rule (reduction, normalize, has_ignore_index), the exact sum (its offset and
  // count are the slice's) and the kept count: kernels/include/lossd/kernels/accumulator.h.
  kernels::Accumulator acc;
};// FNV-1a 64 of the loss options and reduction that every batch of an Accumulate call shares.
uint64_t OptionsFingerprint(const v1::EvaluateRequest& request);
std::string EncodePartialState(const PartialState& state);
// InvalidArgument (the message names the inconsistency, not the field) for anything that
// Encode could not have produced.
absl::StatusOr<PartialState> DecodePartialState(std::string_view bytes);
// Joins states given in any order that tile one range of elements; errors name the field
// (partial_states[i]) of the state at fault.
absl::StatusOr<PartialState> MergePartialStates(std::vector<PartialState> states);
// The reply of an Accumulate or a merge for `state`: loss (state.acc.Value(): the rule lives
// in the kernels' Accumulator), num_elements, num_kept, num_batches, reduction.
void SetReducedLoss(const PartialState& state, v1::AccumulateResponse* response);

// Creates the reactors of the streaming calls (stream_reactors.cc).
grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NewEvaluateStream(
    Core* core, grpc::CallbackServerContext* context);
grpc::ServerReadReactor<grpc::ByteBuffer>* NewAccumulate(Core* core,
                                                         grpc::CallbackServerContext* context,
                                                         grpc::ByteBuffer* reply);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_SERVICE_H_
