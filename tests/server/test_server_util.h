// Helpers for the in-process server tests.
#ifndef LOSSD_TESTS_SERVER_TEST_SERVER_UTIL_H_
#define LOSSD_TESTS_SERVER_TEST_SERVER_UTIL_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/server.h"

namespace lossd::server::testing {

template <typename T>
v1::Tensor MakeTensor(const std::vector<T>& v, const std::vector<int64_t>& shape) {
  v1::Tensor t;
  t.set_dtype(sizeof(T) == 4 ? v1::DTYPE_FLOAT32 : v1::DTYPE_FLOAT64);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)));
  return t;
}

template <typename T>
std::vector<T> Values(const v1::Tensor& t) {
  std::vector<T> v(t.data().size() / sizeof(T));
  std::memcpy(v.data(), t.data().data(), t.data().size());
  return v;
}

// A BCE request over rows x cols random values (weight and pos_weight [cols]).
template <typename T>
v1::EvaluateRequest RandomRequest(int64_t rows, int64_t cols, uint64_t seed, v1::Reduction r) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> ux(-6, 6), u(0, 1);
  std::vector<T> x(rows * cols), y(rows * cols), w(cols), p(cols);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<T>(ux(rng));
    y[i] = static_cast<T>(u(rng) < 0.5 ? 0.0 : u(rng) < 0.5 ? 1.0 : u(rng));
  }
  for (int64_t c = 0; c < cols; ++c) {
    w[c] = static_cast<T>(0.5 + u(rng));
    p[c] = static_cast<T>(0.5 + 2 * u(rng));
  }
  v1::EvaluateRequest req;
  *req.mutable_logits() = MakeTensor(x, {rows, cols});
  *req.mutable_targets() = MakeTensor(y, {rows, cols});
  *req.mutable_weight() = MakeTensor(w, {cols});
  *req.mutable_bce_with_logits()->mutable_pos_weight() = MakeTensor(p, {cols});
  req.set_reduction(r);
  return req;
}

// Rows [r0, r1) of a request made by RandomRequest.
inline v1::EvaluateRequest SliceRows(const v1::EvaluateRequest& full, int64_t r0, int64_t r1) {
  v1::EvaluateRequest part = full;
  const int64_t cols = full.logits().shape(1);
  const size_t item = full.logits().dtype() == v1::DTYPE_FLOAT32 ? 4 : 8;
  for (v1::Tensor* t : {part.mutable_logits(), part.mutable_targets()}) {
    t->set_shape(0, r1 - r0);
    t->set_data(t->data().substr(r0 * cols * item, (r1 - r0) * cols * item));
  }
  return part;
}

// A slow request: the focal loss with a gamma other than 0, 1 and 2 runs the scalar double
// path (gamma 2 takes the SIMD block, several times faster), about 10^7 elements/s per thread.
inline v1::EvaluateRequest SlowRequest(int64_t rows, v1::Reduction reduction = v1::REDUCTION_MEAN,
                                       uint64_t seed = 3) {
  v1::EvaluateRequest req = RandomRequest<float>(rows, 64, seed, reduction);
  req.clear_bce_with_logits();
  req.mutable_sigmoid_focal_loss()->set_gamma(1.5);
  return req;
}

// Sends `req` from `calls` threads at once through `call` (one Evaluate each) and counts the
// status codes: {OK, RESOURCE_EXHAUSTED, any other}.
struct CodeCounts {
  int ok = 0, exhausted = 0, other = 0;
};
template <typename CallFn>
CodeCounts ConcurrentCalls(int calls, CallFn call) {
  std::vector<grpc::StatusCode> codes(calls);
  std::vector<std::thread> threads;
  for (int i = 0; i < calls; ++i) threads.emplace_back([&, i] { codes[i] = call(); });
  for (auto& t : threads) t.join();
  CodeCounts n;
  for (auto c : codes) {
    if (c == grpc::StatusCode::OK) {
      ++n.ok;
    } else if (c == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++n.exhausted;
    } else {
      ++n.other;
    }
  }
  return n;
}

inline ServerOptions LoopbackOptions() {
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.device = DevicePolicy::kCpu;
  o.workers = 2;
  return o;
}

// Starts a server with `o`. One that does not start fails the calling test (or test suite): the
// exception, which names the status, is reported by GoogleTest as the failure.
inline std::unique_ptr<LossdServer> StartServer(const ServerOptions& o = LoopbackOptions()) {
  absl::StatusOr<std::unique_ptr<LossdServer>> server = LossdServer::Start(o);
  if (!server.ok()) throw std::runtime_error("LossdServer::Start: " + server.status().ToString());
  return *std::move(server);
}

inline std::unique_ptr<v1::LossService::Stub> Connect(
    int port, std::shared_ptr<grpc::ChannelCredentials> creds = nullptr,
    const std::string& host = "127.0.0.1") {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  return v1::LossService::NewStub(grpc::CreateCustomChannel(
      absl::StrCat(host, ":", port), creds ? creds : grpc::InsecureChannelCredentials(), args));
}

// One Evaluate call on a fresh context; `resp` may be null when only the status matters.
inline grpc::Status Evaluate(v1::LossService::Stub* stub, const v1::EvaluateRequest& req,
                             v1::EvaluateResponse* resp = nullptr) {
  grpc::ClientContext ctx;
  v1::EvaluateResponse ignored;
  return stub->Evaluate(&ctx, req, resp != nullptr ? resp : &ignored);
}

// One Accumulate call over `batches` (written in order, then WritesDone) on a fresh context;
// `resp` may be null when only the status matters.
inline grpc::Status Accumulate(v1::LossService::Stub* stub,
                               const std::vector<v1::EvaluateRequest>& batches,
                               v1::AccumulateResponse* resp = nullptr) {
  grpc::ClientContext ctx;
  v1::AccumulateResponse ignored;
  auto writer = stub->Accumulate(&ctx, resp != nullptr ? resp : &ignored);
  for (const v1::EvaluateRequest& b : batches) writer->Write(b);
  writer->WritesDone();
  return writer->Finish();
}

// One unary call of `method` ("/package.Service/Method") through `generic` with `bytes` as the
// request message, whether or not they parse as one; waits for the call's status.
inline grpc::Status UnaryBytes(grpc::GenericStub* generic, const std::string& method,
                               const std::string& bytes) {
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1), reply;
  grpc::ClientContext ctx;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  generic->UnaryCall(&ctx, method, grpc::StubOptions(), &request, &reply, [&](grpc::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    status = s;
    done = true;
    cv.notify_one();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  return status;
}

}  // namespace lossd::server::testing

#endif  // LOSSD_TESTS_SERVER_TEST_SERVER_UTIL_H_
