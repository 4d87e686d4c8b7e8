#include "client/loadtest/h2_transport.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lossd::loadtest::h2 {

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kDeadlineExceeded = 4, kCancelled = 1, kUnavailable = 14, kInternal = 13,
              kUnimplemented = 12;
// Our receive windows: large enough that a reply of several MB (a 1M-element Evaluate) flows
// without waiting for WINDOW_UPDATEs; nghttp2 still returns the credit as it is consumed.
constexpr int32_t kWindow = int32_t{1} << 30;
constexpr size_t kWriteBatch = 256 << 10;  // bytes gathered from nghttp2 per write()
constexpr size_t kReadBuffer = 256 << 10;

std::atomic<int> g_reports{0};  // connection failures reported on stderr (the first few)

void ReportOnce(const std::string& what) {
  if (g_reports.fetch_add(1) < 5) std::fprintf(stderr, "lossd-bench: h2: %s\n", what.c_str());
}

nghttp2_nv Header(absl::string_view name, absl::string_view value) {
  // Names and values outlive the frames (the Poller's options, the caller's per-call value):
  // nghttp2 need not copy them.
  return nghttp2_nv{reinterpret_cast<uint8_t*>(const_cast<char*>(name.data())),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), name.size(),
                    value.size(), NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE};
}

}  // namespace

absl::StatusOr<Address> Resolve(const Target& target) {
  Address a;
  a.authority = target.authority;
  if (target.unix_socket) {
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    if (target.path.size() >= sizeof(un.sun_path)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unix:", target.path, ": the path is longer than ", sizeof(un.sun_path) - 1, " bytes"));
    }
    std::memcpy(un.sun_path, target.path.data(), target.path.size());
    Address::One one;
    std::memcpy(&one.addr, &un, sizeof(un));
    one.length = sizeof(un);
    one.text = a.text = absl::StrCat("unix:", target.path);
    a.all.push_back(one);
    return a;
  }
  a.text = target.authority;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string port = absl::StrCat(target.port);
  const int rc = getaddrinfo(target.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve \"", target.host, "\": ", gai_strerror(rc)));
  }
  for (const addrinfo* r = res; r != nullptr; r = r->ai_next) {
    if (r->ai_family != AF_INET && r->ai_family != AF_INET6) continue;
    Address::One one;
    std::memcpy(&one.addr, r->ai_addr, r->ai_addrlen);
    one.length = r->ai_addrlen;
    char host[INET6_ADDRSTRLEN] = "?";
    const void* ip =
        r->ai_family == AF_INET6
            ? static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(r->ai_addr)->sin6_addr)
            : static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(r->ai_addr)->sin_addr);
    inet_ntop(r->ai_family, ip, host, sizeof(host));
    one.text = r->ai_family == AF_INET6 ? absl::StrCat("[", host, "]:", target.port)
                                        : absl::StrCat(host, ":", target.port);
    a.all.push_back(one);
  }
  freeaddrinfo(res);
  if (a.all.empty()) {
    return absl::UnavailableError(absl::StrCat("\"", target.host, "\" has no IP address"));
  }
  return a;
}

// One call's stream: owned by its connection (a pool), alive until nghttp2 closes the stream,
// which may be after its call ended (deadline, cancel): then `call` is null and what arrives is
// dropped.
struct Poller::Stream {
  Conn* conn = nullptr;
  Call* call = nullptr;
  int32_t id = 0;
  uint8_t prefix[kPrefixBytes] = {};
  absl::string_view request;
  size_t sent = 0;  // of prefix + request
  MessageReader reader;
  int http_status = 0;
  bool has_grpc_status = false;
  int grpc_status = 0;
  std::string grpc_message;
  uint64_t serial = 0;     // this use of the pooled stream
  Stream* prev = nullptr;  // the connection's streams with a call
  Stream* next = nullptr;
};

struct Poller::Conn {
  Poller* poller = nullptr;
  int fd = -1;
  nghttp2_session* session = nullptr;
  bool dead = true;
  bool draining = false;   // replaced after the server's GOAWAY (Poller::draining_)
  Clock::time_point draining_since{};
  bool armed_out = false;  // EPOLLOUT requested
  bool dirty = false;      // nghttp2 may have frames to send
  Clock::time_point retry_at{};
  std::string error = "not connected";
  std::string out;
  size_t out_off = 0;
  std::vector<std::unique_ptr<Stream>> pool;
  std::vector<Stream*> free;
  Stream live;  // sentinel

  Conn() { live.prev = live.next = &live; }
  Stream* NewStream() {
    if (free.empty()) {
      pool.push_back(std::make_unique<Stream>());
      free.push_back(pool.back().get());
    }
    Stream* s = free.back();
    free.pop_back();
    s->conn = this;
    s->call = nullptr;
    s->id = 0;
    s->sent = 0;
    s->http_status = 0;
    s->has_grpc_status = false;
    s->grpc_status = 0;
    s->grpc_message.clear();
    s->prev = s->next = nullptr;
    return s;
  }
  void Unlink(Stream* s) {
    if (s->prev == nullptr) return;
    s->prev->next = s->next;
    s->next->prev = s->prev;
    s->prev = s->next = nullptr;
  }
};

// nghttp2's callbacks; user_data is the Conn.
struct Callbacks {
  static ssize_t ReadRequest(nghttp2_session*, int32_t, uint8_t* buf, size_t length,
                             uint32_t* flags, nghttp2_data_source* source, void*) {
    auto* s = static_cast<Poller::Stream*>(source->ptr);
    const size_t total = kPrefixBytes + s->request.size();
    size_t n = 0;
    while (n < length && s->sent < total) {
      if (s->sent < kPrefixBytes) {
        const size_t k = std::min(length - n, kPrefixBytes - s->sent);
        std::memcpy(buf + n, s->prefix + s->sent, k);
        n += k;
        s->sent += k;
      } else {
        const size_t off = s->sent - kPrefixBytes;
        const size_t k = std::min(length - n, s->request.size() - off);
        std::memcpy(buf + n, s->request.data() + off, k);
        n += k;
        s->sent += k;
      }
    }
    if (s->sent == total) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return static_cast<ssize_t>(n);
  }

  static int OnHeader(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t, void*) {
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    auto* s = static_cast<Poller::Stream*>(
        nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
    if (s == nullptr || s->call == nullptr) return 0;
    const absl::string_view n(reinterpret_cast<const char*>(name), namelen);
    const absl::string_view v(reinterpret_cast<const char*>(value), valuelen);
    if (n == ":status") {
      int status = 0;
      for (char c : v) status = status * 10 + (absl::ascii_isdigit(c) ? c - '0' : 0);
      s->http_status = status;
    } else if (n == "grpc-status") {
      s->has_grpc_status = true;
      s->grpc_status = ParseGrpcStatus(v);
    } else if (n == "grpc-message") {
      s->grpc_message = PercentDecode(v);
    }
    return 0;
  }

  static int OnData(nghttp2_session* session, uint8_t, int32_t stream_id, const uint8_t* data,
                    size_t len, void*) {
    auto* s =
        static_cast<Poller::Stream*>(nghttp2_session_get_stream_user_data(session, stream_id));
    if (s == nullptr || s->call == nullptr) return 0;
    // An error is kept by the reader and decides the call's code once the stream ends.
    s->reader.Feed(absl::string_view(reinterpret_cast<const char*>(data), len)).IgnoreError();
    return 0;
  }

  static int OnClose(nghttp2_session* session, int32_t stream_id, uint32_t error_code,
                     void* user_data) {
    auto* c = static_cast<Poller::Conn*>(user_data);
    auto* s =
        static_cast<Poller::Stream*>(nghttp2_session_get_stream_user_data(session, stream_id));
    if (s == nullptr) return 0;
    if (s->call != nullptr) {
      int code = 0;
      std::string message;
      if (s->has_grpc_status) {
        code = s->grpc_status;
        message = std::move(s->grpc_message);
        if (code == 0 && !s->reader.status().ok()) {
          code = kInternal;
          message = std::string(s->reader.status().message());
        } else if (code == 0 && !s->reader.complete()) {
          // gRPC's C++ client: an OK unary call without a reply is UNIMPLEMENTED; a cut reply
          // is INTERNAL.
          code = s->reader.started() ? kInternal : kUnimplemented;
          message = s->reader.started() ? "the reply message was cut short"
                                        : "no message returned for unary request";
        }
      } else if (error_code != NGHTTP2_NO_ERROR) {
        code = ResetToCode(error_code);
        message = absl::StrCat("the stream was reset: ", nghttp2_http2_strerror(error_code));
      } else {
        code = HttpStatusToCode(s->http_status);
        message = s->http_status == 200 ? "the reply's trailers carry no grpc-status"
                                        : absl::StrCat("HTTP status ", s->http_status);
      }
      c->poller->Finish(s, code, std::move(message));
    }
    nghttp2_session_set_stream_user_data(session, stream_id, nullptr);
    c->free.push_back(s);
    return 0;
  }

  static nghttp2_session_callbacks* Get() {
    static nghttp2_session_callbacks* const cbs = [] {
      nghttp2_session_callbacks* x = nullptr;
      nghttp2_session_callbacks_new(&x);
      nghttp2_session_callbacks_set_on_header_callback(x, OnHeader);
      nghttp2_session_callbacks_set_on_data_chunk_recv_callback(x, OnData);
      nghttp2_session_callbacks_set_on_stream_close_callback(x, OnClose);
      return x;
    }();
    return cbs;
  }
};

Poller::Poller(const Address& address, const CallOptions& options, int connections, Done done)
    : address_(address), options_([&] {
        CallOptions o = options;
        for (auto& [k, v] : o.metadata) {
          k = absl::AsciiStrToLower(k);
          // Binary metadata travels base64-encoded (gRPC's rule for keys ending in -bin).
          if (absl::EndsWith(k, "-bin")) v = absl::Base64Escape(v);
        }
        o.extra_key = absl::AsciiStrToLower(o.extra_key);
        return o;
      }()),
      done_(std::move(done)) {
  if (options_.deadline > absl::ZeroDuration()) timeout_ = FormatGrpcTimeout(options_.deadline);
  rbuf_.resize(kReadBuffer);
  epoll_ = epoll_create1(EPOLL_CLOEXEC);
  event_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;
  epoll_ctl(epoll_, EPOLL_CTL_ADD, event_, &ev);
  for (int i = 0; i < connections; ++i) {
    conns_.push_back(std::make_unique<Conn>());
    conns_.back()->poller = this;
    Dial(conns_.back().get(), true);
  }
  thread_ = std::thread([this] { Loop(); });
}

Poller::~Poller() {
  Stop();
  for (auto& c : conns_) {
    if (c->session != nullptr) nghttp2_session_del(c->session);
    if (c->fd >= 0) close(c->fd);
  }
  close(event_);
  close(epoll_);
}

// One address: a connected non-blocking socket, or -1 with `*error` set.
static int ConnectOne(const Address::One& a, std::string* error) {
  const int family = reinterpret_cast<const sockaddr*>(&a.addr)->sa_family;
  const int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *error = absl::StrCat("socket: ", std::strerror(errno));
    return -1;
  }
  int rc = connect(fd, reinterpret_cast<const sockaddr*>(&a.addr), a.length);
  if (rc != 0 && (errno == EINPROGRESS || errno == EAGAIN)) {
    pollfd p{fd, POLLOUT, 0};
    rc = poll(&p, 1, 5000);
    int err = 0;
    socklen_t len = sizeof(err);
    if (rc == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
      rc = 0;
    } else {
      errno = rc == 0 ? ETIMEDOUT : err;
      rc = -1;
    }
  }
  if (rc != 0) {
    *error = absl::StrCat("cannot connect to ", a.text, ": ", std::strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

bool Poller::Dial(Conn* c, bool report) {
  c->retry_at = Clock::now() + std::chrono::seconds(1);
  int fd = -1;
  int family = AF_UNSPEC;
  for (const Address::One& a : address_.all) {
    fd = ConnectOne(a, &c->error);
    if (fd >= 0) {
      family = reinterpret_cast<const sockaddr*>(&a.addr)->sa_family;
      break;
    }
  }
  if (fd < 0) {
    if (report) ReportOnce(c->error);
    return false;
  }
  if (family != AF_UNIX) {
    // Calls are small and latency-bound; the loop already gathers each turn's frames.
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  nghttp2_option* opt = nullptr;
  nghttp2_option_new(&opt);
  // Until the server's SETTINGS arrive, one stream at a time: a server with a small
  // MAX_CONCURRENT_STREAMS would refuse the streams past it (gRPC's client retries those; we
  // never open them). nghttp2 queues requests past the server's limit.
  nghttp2_option_set_peer_max_concurrent_streams(opt, 1);
  nghttp2_session_client_new2(&c->session, Callbacks::Get(), c, opt);
  nghttp2_option_del(opt);
  const nghttp2_settings_entry settings[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
                                             {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, kWindow}};
  nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, settings, 2);
  nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, kWindow);
  c->fd = fd;
  c->dead = false;
  c->dirty = true;
  c->armed_out = false;
  c->out.clear();
  c->out_off = 0;
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = c;
  epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &ev);
  return true;
}

void Poller::Fail(Conn* c, const std::string& why, bool report) {
  if (c->dead) return;
  c->dead = true;
  c->error = why;
  c->retry_at = Clock::now() + std::chrono::seconds(1);
  if (report) ReportOnce(absl::StrCat("connection to ", address_.text, ": ", why));
  while (c->live.next != &c->live) Finish(c->live.next, kUnavailable, why);
  epoll_ctl(epoll_, EPOLL_CTL_DEL, c->fd, nullptr);
  // Without callbacks: every stream's call has ended above.
  nghttp2_session_del(c->session);
  c->session = nullptr;
  close(c->fd);
  c->fd = -1;
  c->free.clear();
  for (auto& s : c->pool) c->free.push_back(s.get());
}

// The server sent GOAWAY (or the connection ran out of stream ids): connection `index` moves
// to draining_ with its calls in flight, and a new one is dialled in its place.
Poller::Conn* Poller::Renew(int index) {
  std::unique_ptr<Conn>& slot = conns_[index];
  slot->draining = true;
  slot->draining_since = Clock::now();
  slot->dirty = true;  // Flush closes it once its streams are done
  draining_.push_back(std::move(slot));
  slot = std::make_unique<Conn>();
  slot->poller = this;
  Dial(slot.get(), true);
  return slot.get();
}

void Poller::Finish(Stream* s, int code, std::string message) {
  Call* call = s->call;
  s->call = nullptr;
  s->conn->Unlink(s);
  call->stream = nullptr;
  call->code = code;
  call->message = std::move(message);
  finished_.push_back(call);
}

void Poller::FinishNow(Call* call, int code, std::string message) {
  call->stream = nullptr;
  call->code = code;
  call->message = std::move(message);
  finished_.push_back(call);
}

void Poller::Start(Call* call) {
  call->stream = nullptr;
  if (cancel_.load(std::memory_order_relaxed)) {
    FinishNow(call, kCancelled, "cancelled");
    return;
  }
  Conn* c = conns_[call->connection].get();
  if (!c->dead && !nghttp2_session_check_request_allowed(c->session)) {
    c = Renew(call->connection);
  }
  if (c->dead && Clock::now() >= c->retry_at) Dial(c, false);
  if (c->dead) {
    FinishNow(call, kUnavailable, c->error);
    return;
  }
  Stream* s = c->NewStream();
  s->call = call;
  s->request = call->request;
  WritePrefix(static_cast<uint32_t>(call->request.size()), s->prefix);
  s->reader.Reset(&call->reply);
  nghttp2_nv nv[32];
  size_t n = 0;
  nv[n++] = Header(":method", "POST");
  nv[n++] = Header(":scheme", "http");
  nv[n++] = Header(":path", options_.path);
  nv[n++] = Header(":authority", address_.authority);
  nv[n++] = Header("te", "trailers");
  nv[n++] = Header("content-type", "application/grpc");
  nv[n++] = Header("user-agent", "lossd-bench-h2");
  if (!timeout_.empty()) nv[n++] = Header("grpc-timeout", timeout_);
  std::vector<nghttp2_nv> more;
  nghttp2_nv* all = nv;
  const size_t extra = options_.metadata.size() + (call->extra_value.empty() ? 0 : 1);
  if (n + extra > sizeof(nv) / sizeof(nv[0])) {
    more.assign(nv, nv + n);
    more.resize(n + extra);
    all = more.data();
  }
  for (const auto& [k, v] : options_.metadata) all[n++] = Header(k, v);
  if (!call->extra_value.empty()) all[n++] = Header(options_.extra_key, call->extra_value);
  nghttp2_data_provider data{};
  data.source.ptr = s;
  data.read_callback = Callbacks::ReadRequest;
  const int32_t id = nghttp2_submit_request(c->session, nullptr, all, n, &data, s);
  if (id < 0) {
    s->call = nullptr;
    c->free.push_back(s);
    const std::string why = absl::StrCat("cannot start a stream: ", nghttp2_strerror(id));
    FinishNow(call, kUnavailable, why);
    // nghttp2 takes no new stream on this session (GOAWAY and stream ids are handled above):
    // the connection is not usable; it is dialled again for later calls.
    Fail(c, why);
    return;
  }
  s->id = id;
  s->prev = &c->live;
  s->next = c->live.next;
  s->next->prev = s;
  c->live.next = s;
  call->stream = s;
  s->serial = next_serial_++;
  if (!timeout_.empty()) {
    deadlines_.push_back(
        {Clock::now() + absl::ToChronoNanoseconds(options_.deadline), {s, s->serial}});
  }
  c->dirty = true;
}

void Poller::Post(Call* call) {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake = posted_.empty();
    posted_.push_back(call);
  }
  if (wake) {
    const uint64_t one = 1;
    (void)!write(event_, &one, sizeof(one));
  }
}

void Poller::Cancel() {
  cancel_ = true;
  const uint64_t one = 1;
  (void)!write(event_, &one, sizeof(one));
}

void Poller::Stop() {
  if (!thread_.joinable()) return;
  stop_ = true;
  const uint64_t one = 1;
  (void)!write(event_, &one, sizeof(one));
  thread_.join();
}

void Poller::Drain() {
  std::vector<Call*> calls;
  {
    std::lock_guard<std::mutex> lock(mu_);
    calls.swap(posted_);
  }
  for (Call* call : calls) Start(call);
}

void Poller::CancelAll() {
  cancelled_ = true;
  for (auto* list : {&conns_, &draining_}) {
    for (auto& c : *list) {
      while (c->live.next != &c->live) {
        Stream* s = c->live.next;
        nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_CANCEL);
        c->dirty = true;
        Finish(s, kCancelled, "cancelled");
      }
    }
  }
}

void Poller::Expire() {
  if (deadlines_.empty()) return;
  const auto now = Clock::now();
  while (!deadlines_.empty() && deadlines_.front().first <= now) {
    auto [s, serial] = deadlines_.front().second;
    deadlines_.pop_front();
    if (s->serial != serial || s->call == nullptr) continue;  // ended before
    nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_CANCEL);
    s->conn->dirty = true;
    Finish(s, kDeadlineExceeded, "deadline exceeded");
  }
}

void Poller::RunFinished() {
  // One batch: completions that start calls which end at once (a dead connection) wait for
  // the next turn, so that the loop still reads, writes and sees Cancel().
  std::vector<Call*> batch;
  batch.swap(finished_);
  for (Call* call : batch) done_(call);
}

void Poller::Arm(Conn* c, bool want_out) {
  if (c->armed_out == want_out || c->dead) return;
  c->armed_out = want_out;
  epoll_event ev{};
  ev.events = EPOLLIN | (want_out ? static_cast<uint32_t>(EPOLLOUT) : 0u);
  ev.data.ptr = c;
  epoll_ctl(epoll_, EPOLL_CTL_MOD, c->fd, &ev);
}

void Poller::Flush(Conn* c) {
  c->dirty = false;
  if (c->dead) return;
  for (;;) {
    bool more = true;
    while (c->out.size() - c->out_off < kWriteBatch) {
      const uint8_t* data = nullptr;
      const ssize_t n = nghttp2_session_mem_send(c->session, &data);
      if (n < 0) {
        Fail(c, absl::StrCat("HTTP/2: ", nghttp2_strerror(static_cast<int>(n))));
        return;
      }
      if (n == 0) {
        more = false;
        break;
      }
      c->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
    }
    if (c->out.size() == c->out_off) break;
    const ssize_t w = send(c->fd, c->out.data() + c->out_off, c->out.size() - c->out_off,
                           MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        Arm(c, true);
        return;
      }
      Fail(c, absl::StrCat("write: ", std::strerror(errno)));
      return;
    }
    c->out_off += static_cast<size_t>(w);
    if (c->out_off < c->out.size()) {
      Arm(c, true);  // the socket's buffer is full: wait until it drains
      return;
    }
    c->out.clear();
    c->out_off = 0;
    if (!more) break;
  }
  Arm(c, false);
  if (!nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session)) {
    // Every stream is done and none may start: after a GOAWAY (then quietly, and the next
    // call dials again at once), or a fatal error that nghttp2 answered with its own GOAWAY.
    const bool goaway = !nghttp2_session_check_request_allowed(c->session);
    Fail(c, goaway ? "the server closed the connection (GOAWAY)" : "the HTTP/2 session ended",
         !goaway && !c->draining);
    if (goaway) c->retry_at = Clock::now();
  }
}

void Poller::Read(Conn* c) {
  while (!c->dead) {
    const ssize_t n = read(c->fd, rbuf_.data(), rbuf_.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        Fail(c, absl::StrCat("read: ", std::strerror(errno)));
      }
      return;
    }
    if (n == 0) {
      Fail(c, "the server closed the connection");
      return;
    }
    const ssize_t rv = nghttp2_session_mem_recv(c->session,
                                                reinterpret_cast<const uint8_t*>(rbuf_.data()),
                                                static_cast<size_t>(n));
    if (rv < 0) {
      Fail(c, absl::StrCat("HTTP/2: ", nghttp2_strerror(static_cast<int>(rv))));
      return;
    }
    c->dirty = true;  // SETTINGS and PING acks, WINDOW_UPDATEs, or a GOAWAY seen
    // A short read drained the socket (epoll is level-triggered): no EAGAIN round trip.
    if (static_cast<size_t>(n) < rbuf_.size()) return;
  }
}

void Poller::Loop() {
  epoll_event events[64];
  for (;;) {
    if (cancel_.load(std::memory_order_relaxed) && !cancelled_) CancelAll();
    // Draining connections that ended, once no deadline refers to their streams any more
    // (those were all set before it began draining); no epoll event refers to them here.
    if (!draining_.empty()) {
      const auto now = Clock::now();
      const auto keep = absl::ToChronoNanoseconds(options_.deadline) + std::chrono::seconds(1);
      draining_.erase(std::remove_if(draining_.begin(), draining_.end(),
                                     [&](const std::unique_ptr<Conn>& c) {
                                       return c->dead && now > c->draining_since + keep;
                                     }),
                      draining_.end());
    }
    RunFinished();
    for (auto* list : {&conns_, &draining_}) {
      for (auto& c : *list) {
        if (c->dirty) Flush(c.get());
      }
    }
    if (stop_.load(std::memory_order_relaxed)) return;
    int timeout_ms = 100;
    if (!finished_.empty()) {
      timeout_ms = 0;
    } else if (!deadlines_.empty()) {
      const auto left = deadlines_.front().first - Clock::now();
      const int64_t us = std::chrono::duration_cast<std::chrono::microseconds>(left).count();
      timeout_ms = static_cast<int>(std::clamp<int64_t>((us + 999) / 1000, 0, 100));
    }
    const int n = epoll_wait(epoll_, events, 64, timeout_ms);
    for (int i = 0; i < n; ++i) {
      auto* c = static_cast<Conn*>(events[i].data.ptr);
      if (c == nullptr) {
        uint64_t v = 0;
        (void)!read(event_, &v, sizeof(v));
        Drain();
        continue;
      }
      if (c->dead) continue;
      if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) Read(c);
      if (!c->dead && (events[i].events & EPOLLOUT)) c->dirty = true;
    }
    Expire();
  }
}

}  // namespace lossd::loadtest::h2
