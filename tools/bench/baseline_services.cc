#include "tools/bench/baseline_services.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace lossd::bench {

namespace {

int64_t UnixNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The reply size a raw call asks for; 0 when absent or malformed.
int64_t ReplyBytes(const grpc::CallbackServerContext* ctx) {
  const auto& md = ctx->client_metadata();
  const auto it = md.find(kReplyBytesKey);
  if (it == md.end()) return 0;
  int64_t n = 0;
  if (!absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()), &n) || n < 0) {
    return 0;
  }
  return n;
}

}  // namespace

grpc::ServerUnaryReactor* EchoService::Echo(grpc::CallbackServerContext* ctx,
                                            const lossd::v1::EvaluateRequest* request,
                                            lossd::v1::EvaluateResponse* response) {
  const int64_t received = UnixNanos();
  const auto start = std::chrono::steady_clock::now();
  // The fields of lossd's reply to a REDUCTION_NONE call, with the logits' bytes as the loss
  // and as dl/dx.
  response->set_request_id(request->request_id());
  *response->mutable_loss() = request->logits();
  if (request->gradients().logits()) *response->mutable_grad_logits() = request->logits();
  if (request->gradients().targets()) *response->mutable_grad_targets() = request->logits();
  response->set_device(lossd::v1::DEVICE_CPU);
  int64_t numel = 1;
  for (int64_t d : request->logits().shape()) numel *= d;
  response->set_num_elements(numel);
  auto* t = response->mutable_timing();
  const int64_t total =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  const int64_t now = UnixNanos();
  t->set_queue_ns(1);
  t->set_compute_ns(std::max<int64_t>(1, total));
  t->set_total_ns(std::max<int64_t>(1, total));
  t->set_received_unix_ns(received);
  t->set_compute_start_unix_ns(received);
  t->set_compute_end_unix_ns(now);
  t->set_reply_unix_ns(now);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

RawService::RawService(int64_t reserve_bytes) {
  if (reserve_bytes > 0) Zeros(reserve_bytes);
}

const char* RawService::Zeros(int64_t bytes) {
  bytes = std::max<int64_t>(bytes, 1);
  if (bytes <= largest_bytes_.load(std::memory_order_acquire)) {
    return largest_.load(std::memory_order_acquire);
  }
  absl::MutexLock lock(&mu_);
  const int64_t have = largest_bytes_.load(std::memory_order_relaxed);
  if (bytes <= have) return largest_.load(std::memory_order_relaxed);
  // Grow geometrically; older blocks stay allocated because replies in flight may point at
  // them (at most ~log2 of the largest size blocks, about twice the largest size in all).
  const int64_t size = std::max<int64_t>(bytes, std::min<int64_t>(2 * have, int64_t{1} << 30));
  blocks_.push_back(std::unique_ptr<char[]>(new char[size]()));
  largest_.store(blocks_.back().get(), std::memory_order_relaxed);
  largest_bytes_.store(size, std::memory_order_release);
  return blocks_.back().get();
}

grpc::ServerUnaryReactor* RawService::Call(grpc::CallbackServerContext* ctx,
                                           const grpc::ByteBuffer* /*request*/,
                                           grpc::ByteBuffer* response) {
  // The request stays unparsed (gRPC frees its slices after the call).
  const int64_t n = ReplyBytes(ctx);
  grpc::Slice slice(Zeros(n), static_cast<size_t>(n), grpc::Slice::STATIC_SLICE);
  *response = grpc::ByteBuffer(&slice, 1);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

absl::StatusOr<std::unique_ptr<BaselineServer>> BaselineServer::Start(
    const BaselineServerOptions& o) {
  std::unique_ptr<BaselineServer> s(new BaselineServer());
  grpc::ServerBuilder b;
  b.SetMaxReceiveMessageSize(static_cast<int>(std::min<int64_t>(o.max_message_bytes, INT32_MAX)));
  b.SetMaxSendMessageSize(static_cast<int>(std::min<int64_t>(o.max_message_bytes, INT32_MAX)));
  if (o.service == "echo") {
    s->echo_ = std::make_unique<EchoService>();
    b.RegisterService(s->echo_.get());
  } else if (o.service == "raw") {
    s->raw_ = std::make_unique<RawService>(o.reserve_bytes);
    b.RegisterService(s->raw_.get());
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown service \"", o.service, "\" (echo or raw)"));
  }
  if (o.port >= 0) {
    b.AddListeningPort(absl::StrCat(o.host, ":", o.port), grpc::InsecureServerCredentials(),
                       &s->port_);
  }
  if (!o.unix_socket.empty()) {
    b.AddListeningPort(absl::StrCat("unix:", o.unix_socket), grpc::InsecureServerCredentials());
  }
  if (o.port < 0 && o.unix_socket.empty()) {
    return absl::InvalidArgumentError("no listener: give a port >= 0 or a unix socket");
  }
  s->server_ = b.BuildAndStart();
  if (!s->server_ || (o.port >= 0 && s->port_ == 0)) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", o.host, ":", o.port,
                     o.unix_socket.empty() ? "" : absl::StrCat(" / unix:", o.unix_socket)));
  }
  return s;
}

BaselineServer::~BaselineServer() { Shutdown(); }

void BaselineServer::Shutdown() {
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    server_->Wait();
    server_.reset();
  }
}

}  // namespace lossd::bench
