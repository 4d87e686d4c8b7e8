// Baseline gRPC services for the service benchmark (tools/bench/lossd_bench) and load tests:
// what a lossd call would cost without lossd.
//
//   EchoService  parses the lossd EvaluateRequest with protobuf and replies with an
//                EvaluateResponse as large as lossd's reply to a REDUCTION_NONE call (loss, and
//                grad_logits when requested, carry the logits' dtype, shape and bytes): the cost
//                of protobuf with no compute.
//   RawService   Raw.Call (kRawMethod) as a raw callback method, i.e. gRPC's unary path with
//                ByteBuffers: takes the request as one message without parsing it and replies
//                with the number of bytes its kReplyBytesKey metadata asks for, as one slice of a
//                preallocated, shared zero buffer (no copy, no allocation per call): the
//                transport's limit.
//
// BaselineServer hosts one of them on TCP and/or a Unix socket with lossd's message limits.
#ifndef LOSSD_TOOLS_BENCH_BASELINE_SERVICES_H_
#define LOSSD_TOOLS_BENCH_BASELINE_SERVICES_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "tools/bench/echo.grpc.pb.h"

namespace lossd::bench {

// Request metadata of the raw method: the reply's size in bytes (decimal).
inline constexpr char kReplyBytesKey[] = "x-reply-bytes";
// The method name the benchmark clients call on the raw server (any unknown name works).
inline constexpr char kRawMethod[] = "/lossd.bench.v1.Raw/Call";
// The echo method.
inline constexpr char kEchoMethod[] = "/lossd.bench.v1.Echo/Echo";

class EchoService final : public lossd::bench::v1::Echo::CallbackService {
 public:
  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* ctx,
                                 const lossd::v1::EvaluateRequest* request,
                                 lossd::v1::EvaluateResponse* response) override;
};

class RawService final
    : public lossd::bench::v1::Raw::WithRawCallbackMethod_Call<lossd::bench::v1::Raw::Service> {
 public:
  // `reserve_bytes`: size of the zero buffer allocated up front (it grows on demand).
  explicit RawService(int64_t reserve_bytes = 0);
  grpc::ServerUnaryReactor* Call(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override;

  // At least `bytes` zero bytes that stay valid for the service's lifetime.
  const char* Zeros(int64_t bytes);

 private:
  absl::Mutex mu_;
  std::vector<std::unique_ptr<char[]>> blocks_ ABSL_GUARDED_BY(mu_);  // grow-only, never freed
  std::atomic<const char*> largest_{nullptr};
  std::atomic<int64_t> largest_bytes_{0};
};

struct BaselineServerOptions {
  std::string service = "echo";  // "echo" or "raw"
  std::string host = "127.0.0.1";
  int port = 0;             // 0 picks a free port; negative: no TCP listener
  std::string unix_socket;  // also listen on unix:PATH when not empty
  int64_t max_message_bytes = int64_t{256} << 20;  // lossd's default
  int64_t reserve_bytes = 0;                       // raw: zero buffer allocated at start
};

class BaselineServer {
 public:
  static absl::StatusOr<std::unique_ptr<BaselineServer>> Start(const BaselineServerOptions& o);
  ~BaselineServer();
  int port() const { return port_; }  // 0 without a TCP listener
  void Shutdown();

 private:
  BaselineServer() = default;
  std::unique_ptr<EchoService> echo_;
  std::unique_ptr<RawService> raw_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace lossd::bench

#endif  // LOSSD_TOOLS_BENCH_BASELINE_SERVICES_H_
