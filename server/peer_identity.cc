#include "server/peer_identity.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/server.h>
#include <grpcpp/server_posix.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "server/log.h"

namespace lossd::server {

// ---- PeerTable ------------------------------------------------------------------------------

void PeerTable::Set(int fd, PeerCredentials credentials) {
  absl::MutexLock lock(&mu_);
  by_fd_[fd] = credentials;
}

absl::StatusOr<PeerCredentials> PeerTable::Find(int fd) const {
  absl::MutexLock lock(&mu_);
  auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) {
    return absl::NotFoundError(absl::StrCat("no credentials recorded for connection fd:", fd));
  }
  return it->second;
}

// ---- peer strings ---------------------------------------------------------------------------

ParsedPeer ParsePeer(std::string_view peer_string) {
  const absl::string_view peer(peer_string.data(), peer_string.size());
  ParsedPeer out;
  auto port_of = [&out](absl::string_view digits) {
    int port = 0;
    if (!absl::SimpleAtoi(digits, &port) || port < 0 || port > 65535) return false;
    out.port = port;
    return true;
  };
  if (peer.substr(0, 3) == "fd:") {
    int fd = -1;
    if (absl::SimpleAtoi(peer.substr(3), &fd) && fd >= 0) {
      out.kind = ParsedPeer::Kind::kFd;
      out.fd = fd;
    }
    return out;
  }
  if (peer.substr(0, 5) == "ipv4:") {
    const absl::string_view rest = peer.substr(5);
    const size_t colon = rest.rfind(':');
    if (colon == absl::string_view::npos) return out;
    const std::string host(rest.substr(0, colon));
    if (inet_pton(AF_INET, host.c_str(), out.address) != 1) return out;
    if (!port_of(rest.substr(colon + 1))) return out;
    out.kind = ParsedPeer::Kind::kIpv4;
    return out;
  }
  if (peer.substr(0, 5) == "ipv6:") {
    // gRPC writes the brackets percent-encoded in URIs ("%5B::1%5D:5000").
    const std::string rest = absl::StrReplaceAll(
        peer.substr(5), {{"%5B", "["}, {"%5b", "["}, {"%5D", "]"}, {"%5d", "]"}, {"%25", "%"}});
    if (rest.empty() || rest[0] != '[') return out;
    const size_t close = rest.find(']');
    if (close == std::string::npos || close + 1 >= rest.size() || rest[close + 1] != ':') {
      return out;
    }
    std::string host = rest.substr(1, close - 1);
    if (const size_t zone = host.find('%'); zone != std::string::npos) host.resize(zone);
    if (inet_pton(AF_INET6, host.c_str(), out.address) != 1) return out;
    if (!port_of(absl::string_view(rest).substr(close + 2))) return out;
    out.kind = ParsedPeer::Kind::kIpv6;
    return out;
  }
  return out;
}

namespace {

bool IsV4Mapped(const uint8_t* a) {
  for (int i = 0; i < 10; ++i) {
    if (a[i] != 0) return false;
  }
  return a[10] == 0xff && a[11] == 0xff;
}

// The IPv4 address of an IPv4 peer or an IPv4-mapped IPv6 one; false otherwise.
bool AsIpv4(const ParsedPeer& peer, uint8_t out[4]) {
  if (peer.kind == ParsedPeer::Kind::kIpv4) {
    std::memcpy(out, peer.address, 4);
    return true;
  }
  if (peer.kind == ParsedPeer::Kind::kIpv6 && IsV4Mapped(peer.address)) {
    std::memcpy(out, peer.address + 12, 4);
    return true;
  }
  return false;
}

// One address of /proc/net/tcp{,6}: hex words of the in-memory (network order) bytes, printed
// as native integers; ":PORT" in hex.
bool ParseProcAddress(absl::string_view text, uint8_t* bytes, size_t size, int* port) {
  const size_t colon = text.find(':');
  if (colon != size * 2) return false;
  for (size_t word = 0; word < size / 4; ++word) {
    uint32_t v = 0;
    if (!absl::SimpleHexAtoi(text.substr(word * 8, 8), &v)) return false;
    std::memcpy(bytes + word * 4, &v, 4);
  }
  uint32_t p = 0;
  if (!absl::SimpleHexAtoi(text.substr(colon + 1), &p) || p > 65535) return false;
  *port = static_cast<int>(p);
  return true;
}

// Searches one table (size 4: tcp, 16: tcp6) for a socket whose local end is (address, port)
// and whose remote port is server_port.
bool FindInTable(const std::string& path, size_t size, const uint8_t* address, int port,
                 int server_port, uid_t* uid) {
  std::ifstream in(path);
  if (!in) return false;
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string slot, local, remote, state, queues, timer, retransmits;
    uint64_t owner = 0;
    if (!(fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >>
          owner)) {
      continue;
    }
    uint8_t local_bytes[16], remote_bytes[16];
    int local_port = 0, remote_port = 0;
    if (!ParseProcAddress(local, local_bytes, size, &local_port) ||
        !ParseProcAddress(remote, remote_bytes, size, &remote_port)) {
      continue;
    }
    if (local_port != port || remote_port != server_port) continue;
    if (std::memcmp(local_bytes, address, size) != 0) continue;
    *uid = static_cast<uid_t>(owner);
    return true;
  }
  return false;
}

}  // namespace

bool IsLoopback(const ParsedPeer& peer) {
  uint8_t v4[4];
  if (AsIpv4(peer, v4)) return v4[0] == 127;
  if (peer.kind != ParsedPeer::Kind::kIpv6) return false;
  static const uint8_t kLoopback6[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  return std::memcmp(peer.address, kLoopback6, 16) == 0;
}

absl::StatusOr<uid_t> LoopbackPeerUid(const ParsedPeer& peer, int server_port,
                                      const std::string& proc_root) {
  std::string root = proc_root.empty() ? "/" : proc_root;
  if (root.back() != '/') root += '/';
  uid_t uid = 0;
  uint8_t v4[4];
  if (AsIpv4(peer, v4)) {
    if (FindInTable(root + "proc/net/tcp", 4, v4, peer.port, server_port, &uid)) return uid;
    // The client's socket may be an IPv6 one talking to a mapped address.
    uint8_t mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    std::memcpy(mapped + 12, v4, 4);
    if (FindInTable(root + "proc/net/tcp6", 16, mapped, peer.port, server_port, &uid)) {
      return uid;
    }
  } else if (peer.kind == ParsedPeer::Kind::kIpv6) {
    if (FindInTable(root + "proc/net/tcp6", 16, peer.address, peer.port, server_port, &uid)) {
      return uid;
    }
  }
  return absl::NotFoundError("no socket of this peer in /proc/net/tcp or /proc/net/tcp6");
}

absl::StatusOr<uid_t> CallerUid(std::string_view peer_string, const PeerTable& table,
                                int server_port, const std::string& proc_root) {
  const ParsedPeer parsed = ParsePeer(peer_string);
  const absl::string_view peer(peer_string.data(), peer_string.size());
  if (parsed.kind == ParsedPeer::Kind::kFd) {
    auto credentials = table.Find(parsed.fd);
    if (!credentials.ok()) {
      return absl::PermissionDeniedError(
          absl::StrCat("the uid of peer ", peer, " is unknown: ", credentials.status().message()));
    }
    return credentials->uid;
  }
  if (parsed.kind == ParsedPeer::Kind::kOther) {
    return absl::PermissionDeniedError(absl::StrCat(
        "peer ", peer, " is neither a Unix-socket nor a loopback TCP peer: shared memory is "
        "only for clients on this host"));
  }
  if (!IsLoopback(parsed)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "peer ", peer, " is not a loopback address: shared memory is only for clients on this "
        "host (connect to 127.0.0.1, ::1 or the Unix socket)"));
  }
  auto uid = LoopbackPeerUid(parsed, server_port, proc_root);
  if (!uid.ok()) {
    return absl::PermissionDeniedError(
        absl::StrCat("the uid of loopback peer ", peer, " is unknown: ", uid.status().message()));
  }
  return *uid;
}

// ---- UnixListener ---------------------------------------------------------------------------

UnixListener::UnixListener(std::string path, int fd, int wake_fd)
    : path_(std::move(path)), fd_(fd), wake_fd_(wake_fd) {}

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Bind(const std::string& path,
                                                                 mode_t mode) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("unix_socket \"", path, "\" must be 1 to ",
                                                   sizeof(address.sun_path) - 1,
                                                   " characters, got ", path.size()));
  }
  if (path.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError("unix_socket contains a NUL character");
  }
  if ((mode & ~mode_t{0777}) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("unix_socket_mode ", absl::StrCat(absl::Hex(mode)), " is not a mode"));
  }
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unix_socket ", path, " exists and is not a socket: not removing it"));
    }
    // A stale socket: a server still listening there would answer a connect.
    const int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    std::memcpy(address.sun_path, path.data(), path.size());
    const bool live = probe >= 0 &&
        connect(probe, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0;
    if (probe >= 0) close(probe);
    if (live) {
      return absl::UnavailableError(
          absl::StrCat("unix_socket ", path, " is in use by another server"));
    }
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return absl::UnavailableError(absl::StrCat("cannot remove the stale socket ", path, ": ",
                                                 std::strerror(errno)));
    }
  }
  std::memcpy(address.sun_path, path.data(), path.size());
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("socket(AF_UNIX): ", std::strerror(errno)));
  }
  // Bind with no permissions at all, then open up to `mode`: no client can connect in between
  // with wider rights than intended.
  const mode_t old_umask = umask(0777);
  const int bound = bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  const int bind_errno = errno;
  umask(old_umask);
  if (bound != 0) {
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot bind unix_socket ", path, ": ", std::strerror(bind_errno)));
  }
  if (chmod(path.c_str(), mode) != 0 || listen(fd, SOMAXCONN) != 0) {
    const int e = errno;
    close(fd);
    unlink(path.c_str());
    return absl::UnavailableError(
        absl::StrCat("cannot listen on unix_socket ", path, ": ", std::strerror(e)));
  }
  const int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    const int e = errno;
    close(fd);
    unlink(path.c_str());
    return absl::UnavailableError(absl::StrCat("eventfd: ", std::strerror(e)));
  }
  return std::unique_ptr<UnixListener>(new UnixListener(path, fd, wake));
}

UnixListener::~UnixListener() { Stop(); }

void UnixListener::Start(grpc::Server* server, PeerTable* table) {
  thread_ = std::thread([this, server, table] { Loop(server, table); });
}

void UnixListener::Loop(grpc::Server* server, PeerTable* table) {
  for (;;) {
    pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const int n = poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      Log(LogLevel::kError, absl::StrCat("unix_socket poll: ", std::strerror(errno)));
      return;
    }
    if (fds[1].revents != 0) return;  // Stop()
    if (fds[0].revents == 0) continue;
    const int conn = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (conn < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) {
        continue;
      }
      // Out of descriptors or memory: log, back off briefly, keep serving.
      LogRateLimited(LogLevel::kWarning,
                     absl::StrCat("unix_socket accept: ", std::strerror(errno)));
      pollfd wait = {wake_fd_, POLLIN, 0};
      if (poll(&wait, 1, 100) > 0) return;
      continue;
    }
    ucred credentials{};
    socklen_t length = sizeof(credentials);
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) {
      LogRateLimited(LogLevel::kWarning,
                     absl::StrCat("unix_socket SO_PEERCRED: ", std::strerror(errno)));
      close(conn);
      continue;
    }
    // Recorded before gRPC sees the descriptor: the first call on it finds its uid.
    table->Set(conn, PeerCredentials{credentials.uid, credentials.pid});
    accepted_.fetch_add(1);
    LogRateLimited(LogLevel::kInfo,
                   absl::StrCat("unix_socket connection fd:", conn, " from uid ",
                                credentials.uid, " pid ", credentials.pid));
    grpc::AddInsecureChannelFromFd(server, conn);  // gRPC owns (and closes) the descriptor
  }
}

void UnixListener::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (thread_.joinable()) {
    const uint64_t one = 1;
    while (write(wake_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
    thread_.join();
  }
  close(fd_);
  close(wake_fd_);
  // Remove the file only if it is still the socket this server bound.
  struct stat st {};
  if (lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path_.c_str());
}

}  // namespace lossd::server
