// The data path's message formats (docs/data-path.md): requests read from gRPC's received
// slices without copying their tensors' data, and replies assembled from slices that reference
// the computation's output blocks.
//
// A request is scanned at the wire level. The `data` fields of its tensors (logits, targets,
// weight, bce_with_logits.pos_weight) are left where they are: data inside one received slice
// is used in place (the slice is kept), data across slices is copied once into a pool block,
// and every slice that nothing points into is released as soon as it has been read. All other
// bytes form a small "skeleton" message that protobuf parses as usual, so it validates
// everything but those fields. The result equals protobuf's parse of the whole message for
// every input: the last occurrence of a data field wins, sub-messages merge, a oneof switch
// drops the other member, unknown fields are kept, and malformed input fails with
// INVALID_ARGUMENT (tests/server/data_path_parse_test.cc checks this against protobuf).
#ifndef LOSSD_SERVER_MESSAGE_IO_H_
#define LOSSD_SERVER_MESSAGE_IO_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "server/buffer_pool.h"
#include "server/executor.h"
#include "lossd/v1/lossd.pb.h"
#include "server/memory.h"
#include "server/request.h"

namespace lossd::server {

// A request read by ParseEvaluateRequest: the message without its tensors' data, and the data
// as views into received slices or copies that this object holds. Not thread-safe.
class ReceivedRequest {
 public:
  ReceivedRequest() = default;
  ReceivedRequest(const ReceivedRequest&) = delete;
  ReceivedRequest& operator=(const ReceivedRequest&) = delete;

  // The request without the data fields of its tensors (their Tensor.data is empty).
  const v1::EvaluateRequest& message() const { return message_; }
  v1::EvaluateRequest* mutable_message() { return &message_; }
  // The data of logits, targets, weight and pos_weight (empty when absent); valid while this
  // object holds them.
  TensorDataViews views() const { return {&data_[0], &data_[1], &data_[2], &data_[3]}; }
  std::string_view data(int tensor) const { return data_[tensor]; }

  // Tensor data bytes (metrics).
  int64_t payload_bytes() const;
  // Bytes this request holds: the slices its views point into and its copies.
  int64_t held_bytes() const { return held_bytes_; }
  // How the tensors' data was read: in place, or copied (bytes copied).
  int viewed_tensors() const { return viewed_; }
  int copied_tensors() const { return copied_; }
  int64_t copied_bytes() const { return copied_bytes_; }
  // True when the message was small enough to be parsed whole by protobuf (kWholeParseBytes):
  // then every tensor's data was copied once, by protobuf, and is held here.
  bool parsed_whole() const { return parsed_whole_; }

  // Releases everything (the views become invalid).
  void Clear();

 private:
  friend absl::Status ParseEvaluateRequest(grpc::ByteBuffer* buffer, BufferPool* pool,
                                           Reservation* reservation, ReceivedRequest* out);
  v1::EvaluateRequest message_;
  std::string_view data_[4];
  std::vector<grpc::Slice> kept_;
  std::vector<PoolBlock> copies_;
  int64_t held_bytes_ = 0;
  int viewed_ = 0;
  int copied_ = 0;
  int64_t copied_bytes_ = 0;
  bool parsed_whole_ = false;
  std::string owned_[4];  // the data of a message parsed whole
};

// Indices of ReceivedRequest::data.
enum : int { kLogitsData = 0, kTargetsData = 1, kWeightData = 2, kPosWeightData = 3 };

// Messages of at most this many bytes that arrive in one slice are parsed whole by protobuf
// (their tensors are copied once); larger ones, or ones in several slices, are scanned and
// their tensors viewed where they lie.
inline constexpr size_t kWholeParseBytes = size_t{32} << 10;

// Reads the EvaluateRequest in `buffer` into `out` (cleared first). The buffer is emptied:
// its slices are released once read, or kept by `out`. `reservation` (may be null) holds the
// received bytes on entry; the copies and the skeleton are added to it before they are made
// (RESOURCE_EXHAUSTED when the budget refuses them), and on return it holds what `out` holds
// (nothing of this request on error). Errors: INVALID_ARGUMENT "request bytes (N) do not
// parse as lossd.v1.EvaluateRequest: <reason>", RESOURCE_EXHAUSTED.
absl::Status ParseEvaluateRequest(grpc::ByteBuffer* buffer, BufferPool* pool,
                                  Reservation* reservation, ReceivedRequest* out);

// Encodes `result` as a serialized EvaluateResponse with `request_id` (or, with `stream`, an
// EvaluateStreamResponse whose `response` it is) into `out`, byte for byte what protobuf would
// serialize. Output blocks of at least kZeroCopyBytes become slices of the reply without a
// copy (they return to their pool when gRPC releases them); smaller replies are one slice.
// Takes the blocks out of `result`.
inline constexpr size_t kZeroCopyBytes = size_t{64} << 10;
absl::Status EncodeEvaluateReply(const std::string& request_id, bool stream,
                                 ComputeResult* result, grpc::ByteBuffer* out);

// Tensor data bytes of a result's reply (metrics).
int64_t ReplyPayloadBytes(const ComputeResult& result);
// Tensor payload bytes of a request / response (metrics, tests).
int64_t PayloadBytes(const v1::EvaluateRequest& request);
int64_t PayloadBytes(const v1::EvaluateResponse& response);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_MESSAGE_IO_H_
