// Who is on the other end of a call: the uid and pid of a Unix-socket peer (SO_PEERCRED, taken
// when the connection is accepted), or the uid of a loopback TCP peer (from the kernel's socket
// tables in /proc/net/tcp and /proc/net/tcp6). The SharedMemory service uses it to check that a
// caller owns the object it registers.
#ifndef LOSSD_SERVER_PEER_IDENTITY_H_
#define LOSSD_SERVER_PEER_IDENTITY_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace grpc {
class Server;
}

namespace lossd::server {

struct PeerCredentials {
  uid_t uid = 0;
  pid_t pid = 0;
};

// Credentials of the connections accepted on the Unix socket, by file descriptor. gRPC names
// the peer of such a connection "fd:<N>". An entry is overwritten when a later accept returns
// the same number, which the kernel only does once the earlier connection's descriptor is
// closed. Thread-safe.
class PeerTable {
 public:
  void Set(int fd, PeerCredentials credentials);
  // The credentials recorded for descriptor `fd`; NOT_FOUND when none are.
  absl::StatusOr<PeerCredentials> Find(int fd) const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<int, PeerCredentials> by_fd_ ABSL_GUARDED_BY(mu_);
};

// A gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000",
// "fd:7") taken apart.
struct ParsedPeer {
  enum class Kind { kIpv4, kIpv6, kFd, kOther };
  Kind kind = Kind::kOther;
  uint8_t address[16] = {};  // kIpv4: the first 4 bytes; kIpv6: all 16 (network order)
  int port = 0;
  int fd = -1;
};
ParsedPeer ParsePeer(std::string_view peer);

// True for 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104.
bool IsLoopback(const ParsedPeer& peer);

// The uid owning the TCP socket whose local end is the peer's address and port and whose
// remote port is `server_port`, found in <proc_root>/proc/net/tcp and tcp6. NOT_FOUND when no
// such socket is listed (the peer is in another network namespace, or gone).
absl::StatusOr<uid_t> LoopbackPeerUid(const ParsedPeer& peer, int server_port,
                                      const std::string& proc_root);

// The uid of the caller whose gRPC peer string is `peer`: Unix-socket peers from `table`,
// loopback TCP peers from the kernel's socket tables. PERMISSION_DENIED, naming the peer, for
// any other peer and for a peer whose uid cannot be found.
absl::StatusOr<uid_t> CallerUid(std::string_view peer, const PeerTable& table, int server_port,
                                const std::string& proc_root);

// A listening Unix stream socket whose connections are accepted here (to record SO_PEERCRED)
// and handed to a gRPC server. The socket file is created with `mode` (a stale socket file at
// the path is removed first; any other file there is an error) and removed by Stop().
class UnixListener {
 public:
  // Binds and listens; accepting starts with Start(). INVALID_ARGUMENT for a path that is too
  // long or names an existing non-socket file, UNAVAILABLE when binding fails.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Bind(const std::string& path,
                                                            mode_t mode);
  ~UnixListener();  // Stop()

  // Accepts connections on a thread and hands each to `server` (which must outlive Stop()).
  void Start(grpc::Server* server, PeerTable* table);
  // Stops accepting, closes the listening socket and removes the socket file. Idempotent.
  void Stop();

  const std::string& path() const { return path_; }
  int64_t accepted() const { return accepted_.load(); }

 private:
  UnixListener(std::string path, int fd, int wake_fd);
  void Loop(grpc::Server* server, PeerTable* table);

  std::string path_;
  int fd_ = -1;
  int wake_fd_ = -1;  // eventfd: Stop() wakes the accept loop through it
  std::thread thread_;
  std::atomic<int64_t> accepted_{0};
  bool stopped_ = false;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_PEER_IDENTITY_H_
