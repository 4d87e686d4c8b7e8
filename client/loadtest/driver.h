// lossd-bench's load engine: drives one server at one load point and returns what it counted
// (client/bench/report.h). Unary calls use gRPC's completion-queue API, a few poller threads
// with many calls in flight each; streams and Accumulate use the callback API (no thread per
// call).
//   closed loop  N callers, each sending its next call when the previous one ends (latency from
//                its send); EvaluateStream callers keep `stream_window` batches in flight on
//                one stream, Accumulate callers send `accumulate_batches` batches per call
//   open loop    calls sent at a fixed rate or with Poisson arrivals (client/bench/schedule.h);
//                latency from each call's scheduled time, so a server that falls behind
//                cannot hide its queueing (no coordinated omission). Evaluate: one unary call
//                per arrival; EvaluateStream: one batch per arrival, queued on one of
//                `channels` streams (a stream per channel) whatever is still in flight on it;
//                Accumulate: one call of `accumulate_batches` batches per arrival.
// --transport=h2: unary calls over lossd-bench's own HTTP/2 client (h2_transport.h) instead of
// gRPC's, with the same scheduling, counting and reply reading; a connection per closed-loop
// caller (one with shared_channel) or `channels` connections in open loop, spread over
// `client_threads` poller threads, each owning its connections.
// Calls started in the warm-up are counted only as warm-up calls. The measured window ends
// after `duration`, or once `requests` calls have been started; calls in flight then are
// waited for and counted.
#ifndef LOSSD_CLIENT_LOADTEST_DRIVER_H_
#define LOSSD_CLIENT_LOADTEST_DRIVER_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "client/bench/report.h"
#include "client/loadtest/requests.h"
#include "client/bench/spec.h"

namespace lossd::loadtest {

class SharedMemoryPlan;  // shm.h
namespace h2 {
struct Address;  // h2_transport.h
}

enum class Rpc { kEvaluate, kStream, kAccumulate };
// What carries unary calls: gRPC's C++ client, or lossd-bench's HTTP/2 client (h2_transport.h).
enum class Transport { kGrpc, kH2 };
// What a server is loaded through: lossd.v1 Evaluate, the baselines' methods (tools/bench),
// or the Open Inference Protocol's ModelInfer (--protocol=oip; RequestKind::oip_serialized).
enum class Service { kLossd, kEcho, kRaw, kOip };

// How to reach a server: its gRPC target, credentials and channel arguments.
struct Endpoint {
  std::string target;  // host:port, unix:PATH, ipv4:A,B or any gRPC target URI
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string lb_policy;           // "" (gRPC's default: pick_first) or "round_robin"
  std::string authority_override;  // TLS: server name to check instead of the target's host
  // --transport=h2: the target resolved once (ResolveForH2).
  std::shared_ptr<const h2::Address> h2;
};

// Resolves `e->target` for --transport=h2 (host:port, [v6]:port, unix:PATH); an error names
// the target and why it cannot be used.
absl::Status ResolveForH2(Endpoint* e);

// A channel to the endpoint; distinct `index` values give distinct connections.
std::shared_ptr<grpc::Channel> MakeChannel(const Endpoint& e, int index);

struct LoadPoint {
  bool open = false;
  bool poisson = false;
  int concurrency = 1;  // closed loop
  double rate = 0;      // open loop, calls/s
};

struct DriverOptions {
  Rpc rpc = Rpc::kEvaluate;
  Transport transport = Transport::kGrpc;  // kH2: unary Evaluate (rpc) only
  int stream_window = 4;
  int accumulate_batches = 4;
  absl::Duration warmup = absl::Seconds(1);
  absl::Duration duration = absl::Seconds(5);
  int64_t requests = 0;  // > 0: the measured window ends after this many calls
  bool shared_channel = false;  // closed loop: one channel for all callers
  // Unary calls: threads polling completion queues (0: one per CPU the process may run on),
  // at most one per caller (closed loop) or channel (open loop).
  int client_threads = 0;
  int channels = 0;             // open loop: channels used round robin (0: 1)
  bool verify = false;
  bool parse_replies = true;    // read the server's timings (lossd and echo)
  absl::Duration deadline = absl::ZeroDuration();  // per call; 0: none
  std::vector<std::pair<std::string, std::string>> metadata;
  int64_t max_outstanding = 10000;  // open loop: calls in flight before the sender waits
  uint64_t seed = 1;
  std::string progress_label;  // non-empty: a progress line on stderr every second
  // --shared_memory (unary Evaluate on lossd): requests of the plan's region, outputs in the
  // caller's slot (closed loop: slot = caller; open loop: a free slot per call in flight, so
  // max_outstanding must not exceed its slots).
  SharedMemoryPlan* shm = nullptr;
};

// Loads the endpoint until the window ends or `*interrupted` turns true (then it stops sending,
// waits up to 2 s for calls in flight and returns what was counted).
bench::RunStats RunLoad(const Endpoint& endpoint, Service service,
                        const std::vector<RequestKind>& kinds, const bench::MixPicker& mix,
                        const LoadPoint& point, const DriverOptions& options,
                        const std::atomic<bool>* interrupted);

}  // namespace lossd::loadtest

#endif  // LOSSD_CLIENT_LOADTEST_DRIVER_H_
