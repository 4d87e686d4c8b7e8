// lossd-bench's own HTTP/2 client for unary gRPC calls (--transport=h2; docs/perf.md, "Is
// lossd-bench the bottleneck?"): gRPC's C++ client spends most of a load tester's CPU on its
// own per-call machinery, while a unary call is only one HTTP/2 stream (h2_framing.h). Each
// Poller is one thread with an epoll loop that owns its connections: one nghttp2 client
// session per connection (plaintext TCP or a Unix socket), many streams in flight, the frames
// of all streams written together once per loop turn, so that a turn that saw many replies
// sends the next calls in one write.
//
// A Call is started on its connection's poller: Start() on that poller's own thread (e.g. from
// a completion, for a closed-loop caller's next call), Post() from any other thread (a queue
// and an eventfd). Its completion runs `done` on the poller's thread with the call's code,
// message and reply filled. A call whose deadline passes is reset (RST_STREAM CANCEL) and
// ends DEADLINE_EXCEEDED; Cancel() ends every call in flight and every later one CANCELLED.
// A connection that fails ends its calls UNAVAILABLE and is dialled again for later calls at
// most once a second (calls meanwhile end UNAVAILABLE at once, as gRPC's fail-fast calls do).
// A connection the server closes gracefully (GOAWAY, e.g. lossd's max_connection_age) keeps
// its calls in flight until they end, and a new connection takes the next calls at once.
#ifndef LOSSD_CLIENT_LOADTEST_H2_TRANSPORT_H_
#define LOSSD_CLIENT_LOADTEST_H2_TRANSPORT_H_

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "client/loadtest/h2_framing.h"

namespace lossd::loadtest::h2 {

// A resolved target: the socket addresses every connection dials, in order until one
// connects (names are resolved once; "localhost" may give ::1 and 127.0.0.1).
struct Address {
  struct One {
    sockaddr_storage addr{};
    socklen_t length = 0;
    std::string text;  // for messages
  };
  std::vector<One> all;
  std::string authority;  // :authority
  std::string text;       // the target, for messages
};
absl::StatusOr<Address> Resolve(const Target& target);

struct CallOptions {
  std::string path;  // :path, "/package.Service/Method"
  absl::Duration deadline = absl::ZeroDuration();  // 0: none
  std::vector<std::pair<std::string, std::string>> metadata;  // keys lowercased here
  std::string extra_key;  // a per-call header's name (its value is Call::extra_value)
};

struct Call {
  // Set by the caller before Start/Post; `request` (the message, unframed) and `extra_value`
  // must stay valid until `done` runs.
  absl::string_view request;
  absl::string_view extra_value;  // empty: no per-call header
  int connection = 0;             // index among the poller's connections
  // Set before `done` runs.
  int code = 0;
  std::string message;
  std::string reply;  // the reply message (unframed); its capacity is reused call after call
  // The transport's.
  void* stream = nullptr;  // its stream while in flight
};

class Poller {
 public:
  using Done = std::function<void(Call*)>;
  // `connections` connections to `address`, dialled here (each waits up to 5 s; a failure is
  // reported on stderr once and the connection's calls end UNAVAILABLE until it is dialled
  // again). `done` runs on the poller's thread.
  Poller(const Address& address, const CallOptions& options, int connections, Done done);
  ~Poller();  // Stop()s; the connections are closed
  Poller(const Poller&) = delete;
  Poller& operator=(const Poller&) = delete;

  void Start(Call* call);  // on the poller's thread only (from `done`)
  void Post(Call* call);   // from any other thread
  void Cancel();           // from any thread
  void Stop();             // from another thread, once no call is in flight; joins the thread
  int connections() const { return static_cast<int>(conns_.size()); }

 private:
  struct Conn;
  struct Stream;
  void Loop();
  void Drain();
  void Finish(Stream* s, int code, std::string message);
  void FinishNow(Call* call, int code, std::string message);
  void Fail(Conn* c, const std::string& why, bool report = true);
  Conn* Renew(int index);
  bool Dial(Conn* c, bool report);
  void Flush(Conn* c);
  void Read(Conn* c);
  void Arm(Conn* c, bool want_out);
  void Expire();
  void CancelAll();
  void RunFinished();

  const Address address_;
  const CallOptions options_;
  const Done done_;
  std::string timeout_;  // grpc-timeout's value
  std::vector<std::unique_ptr<Conn>> conns_;
  // Connections the server is closing gracefully (GOAWAY): their calls in flight finish there
  // while new calls go to the connection that replaced them; closed once they are done.
  std::vector<std::unique_ptr<Conn>> draining_;
  int epoll_ = -1, event_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false}, cancel_{false};
  bool cancelled_ = false;  // the loop has seen cancel_
  std::mutex mu_;
  std::vector<Call*> posted_;  // guarded by mu_
  std::vector<Call*> finished_;  // completions to run once out of nghttp2's callbacks
  // Deadlines in the order the calls started (they all have the same length): the stream and
  // its serial then; a stream whose serial changed or whose call ended is skipped. Streams,
  // unlike open-loop calls, live as long as the poller.
  std::deque<std::pair<std::chrono::steady_clock::time_point, std::pair<Stream*, uint64_t>>>
      deadlines_;
  uint64_t next_serial_ = 1;
  std::vector<char> rbuf_;
  friend struct Callbacks;
};

}  // namespace lossd::loadtest::h2

#endif  // LOSSD_CLIENT_LOADTEST_H2_TRANSPORT_H_
