// The shared-memory region registry (server/shm_registry.h), the SIGBUS guard
// (server/shm_guard.h), peer identification (server/peer_identity.h), and the SharedMemory
// service and Unix socket of a real server.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/peer_identity.h"
#include "server/server.h"
#include "server/shm_guard.h"
#include "server/shm_registry.h"

namespace lossd::server {
namespace {

// A POSIX shared-memory object of this process, unlinked at the end of the test.
class ShmObject {
 public:
  explicit ShmObject(size_t bytes, std::string prefix = "/lossd-")
      : name_(absl::StrCat(prefix, "test-", getpid(), "-", counter_++)) {
    fd_ = shm_open(name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    EXPECT_GE(fd_, 0) << name_ << ": " << std::strerror(errno);
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(bytes)), 0);
    data_ = static_cast<unsigned char*>(
        mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0));
    EXPECT_NE(data_, MAP_FAILED);
    bytes_ = bytes;
    for (size_t i = 0; i < bytes; ++i) data_[i] = static_cast<unsigned char>(i * 7 + 3);
  }
  ~ShmObject() {
    munmap(data_, bytes_);
    close(fd_);
    shm_unlink(name_.c_str());
  }
  const std::string& name() const { return name_; }
  unsigned char* data() { return data_; }
  int fd() const { return fd_; }

 private:
  static inline std::atomic<int> counter_{0};
  std::string name_;
  int fd_ = -1;
  unsigned char* data_ = nullptr;
  size_t bytes_ = 0;
};

v1::RegisterRegionRequest Request(const std::string& key, uint64_t offset, uint64_t size,
                                  uint32_t lease_ms = 0) {
  v1::RegisterRegionRequest r;
  r.set_name("test");
  r.set_kind(v1::REGION_KIND_SYSTEM);
  r.set_key(key);
  r.set_offset(offset);
  r.set_byte_size(size);
  r.set_lease_ms(lease_ms);
  return r;
}

v1::TensorReference Ref(const std::string& region, uint64_t offset, uint64_t size) {
  v1::TensorReference ref;
  ref.set_region(region);
  ref.set_offset(offset);
  ref.set_byte_size(size);
  return ref;
}

// A registry on a clock that the test moves by hand.
class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(ShmRegistryOptions{}); }
  void Make(ShmRegistryOptions o) {
    o.now = [this] { return now_; };
    auto r = ShmRegistry::Create(std::move(o));
    ASSERT_TRUE(r.ok()) << r.status();
    registry_ = *std::move(r);
  }
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  std::unique_ptr<ShmRegistry> registry_;
  const uid_t uid_ = geteuid();
};

TEST(ShmKeyTest, KeysOutsideThePrefixOrNotASingleNameAreRejected) {
  EXPECT_TRUE(ValidateShmKey("/lossd-abc", "/lossd-").ok());
  for (const char* key : {"", "/other-abc", "lossd-abc", "/lossd-a/b", "/lossd-..", "/lossd-a..b",
                          "/lossd"}) {
    const absl::Status s = ValidateShmKey(key, "/lossd-");
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << key;
    EXPECT_NE(s.message().find("key"), std::string::npos) << s;
  }
  EXPECT_EQ(ValidateShmKey(std::string(300, 'a').insert(0, "/lossd-"), "/lossd-").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateShmKey(std::string("/lossd-a\0b", 10), "/lossd-").code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ShmKeyTest, MalformedPrefixesAreRejectedAtCreation) {
  for (const char* prefix : {"lossd-", "/a/b", "/..x"}) {
    ShmRegistryOptions o;
    o.prefix = prefix;
    EXPECT_EQ(ShmRegistry::Create(o).status().code(), absl::StatusCode::kInvalidArgument)
        << prefix;
  }
}

TEST_F(RegistryTest, ResolvedSpansReadAndWriteTheClientsObject) {
  ShmObject object(3 * 4096);
  // An offset that is not page-aligned: the server maps from the page below.
  auto r = registry_->Register(uid_, Request(object.name(), 4096 + 100, 1000));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->region().size(), 32u);
  EXPECT_EQ(r->lease_ms(), 30000u);
  auto span = registry_->Resolve("logits.ref", Ref(r->region(), 8, 64), 64, false);
  ASSERT_TRUE(span.ok()) << span.status();
  EXPECT_EQ(span->bytes, 64);
  EXPECT_EQ(std::memcmp(span->data, object.data() + 4096 + 108, 64), 0);
  ASSERT_NE(span->damaged, nullptr);
  EXPECT_FALSE(span->damaged->load());
  auto out = registry_->Resolve("outputs.grad_logits", Ref(r->region(), 936, 64), 64, true);
  ASSERT_TRUE(out.ok()) << out.status();
  std::memset(out->data, 0xAB, 64);
  EXPECT_EQ(object.data()[4096 + 100 + 936], 0xAB);
  EXPECT_EQ(object.data()[4096 + 100 + 999], 0xAB);
  // The whole range and an empty tensor at its end.
  EXPECT_TRUE(registry_->Resolve("x", Ref(r->region(), 0, 1000), 1000, false).ok());
  EXPECT_TRUE(registry_->Resolve("x", Ref(r->region(), 1000, 0), 0, false).ok());
  EXPECT_EQ(registry_->regions(), 1);
  EXPECT_EQ(registry_->registered_bytes(uid_), 1000);
}

TEST_F(RegistryTest, HandlesAreDistinctAndUnguessable) {
  ShmObject object(4096);
  auto a = registry_->Register(uid_, Request(object.name(), 0, 4096));
  auto b = registry_->Register(uid_, Request(object.name(), 0, 4096));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->region(), b->region());
  for (char c : a->region()) EXPECT_TRUE(std::isxdigit(static_cast<unsigned char>(c))) << c;
}

TEST_F(RegistryTest, ReferencesOutsideTheRangeOrOfTheWrongSizeAreInvalid) {
  ShmObject object(4096);
  auto r = registry_->Register(uid_, Request(object.name(), 0, 1024));
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string h = r->region();
  struct Case {
    uint64_t offset, byte_size;
    int64_t bytes;
    const char* needle;
  };
  const uint64_t max = std::numeric_limits<uint64_t>::max();
  for (const Case& c : {Case{0, 8, 16, "byte_size is 8"}, Case{1020, 8, 8, "offset 1020"},
                        Case{1025, 0, 0, "offset 1025"}, Case{max, 8, 8, "offset 18446744073709551615"},
                        Case{8, max, -1, "byte_size"}, Case{max - 3, 8, 8, "lies outside"}}) {
    auto s = registry_->Resolve("targets.ref", Ref(h, c.offset, c.byte_size), c.bytes, false);
    ASSERT_FALSE(s.ok()) << c.offset << " " << c.byte_size;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
    EXPECT_NE(s.status().message().find("targets.ref"), std::string::npos) << s.status();
    EXPECT_NE(s.status().message().find(c.needle), std::string::npos) << s.status();
  }
  auto unknown = registry_->Resolve("weight.ref", Ref("00112233445566778899aabbccddeeff", 0, 8),
                                    8, false);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(unknown.status().message().find("weight.ref"), std::string::npos);
  // The full handle is a capability: messages (which reach logs) show only its start.
  EXPECT_EQ(unknown.status().message().find("00112233445566778899aabbccddeeff"),
            std::string::npos);
}

TEST_F(RegistryTest, RegistrationsAreCheckedAgainstTheObject) {
  ShmObject object(4096);
  auto code = [&](const v1::RegisterRegionRequest& r, uid_t uid) {
    return registry_->Register(uid, r).status().code();
  };
  EXPECT_EQ(code(Request(object.name(), 0, 4097), uid_), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request(object.name(), 4000, 97), uid_), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request(object.name(), 0, 0), uid_), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request(object.name(), std::numeric_limits<uint64_t>::max() - 10, 20), uid_),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request("/elsewhere-x", 0, 8), uid_), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request("/lossd-does-not-exist-" + std::to_string(getpid()), 0, 8), uid_),
            absl::StatusCode::kNotFound);
  // An object of another uid (the caller claims a uid that does not own it).
  auto other = registry_->Register(uid_ + 1, Request(object.name(), 0, 8));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(other.status().message().find(absl::StrCat("belongs to uid ", uid_)),
            std::string::npos)
      << other.status();
  // REGION_KIND_CUDA_IPC on a registry without CUDA IPC (tests/server/cuda_ipc_test.cc covers
  // it), and a kind this server does not know.
  v1::RegisterRegionRequest cuda = Request(object.name(), 0, 8);
  cuda.set_kind(v1::REGION_KIND_CUDA_IPC);
  EXPECT_EQ(code(cuda, uid_), absl::StatusCode::kFailedPrecondition);
  v1::RegisterRegionRequest unknown = Request(object.name(), 0, 8);
  unknown.set_kind(static_cast<v1::RegionKind>(7));
  EXPECT_EQ(code(unknown, uid_), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry_->regions(), 0);
}

TEST_F(RegistryTest, NonRegularFilesAreRefused) {
  const std::string name = absl::StrCat("/lossd-fifo-", getpid());
  const std::string path = "/dev/shm" + name;
  ASSERT_EQ(mkfifo(path.c_str(), 0600), 0) << std::strerror(errno);
  auto r = registry_->Register(uid_, Request(name, 0, 8));
  unlink(path.c_str());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST_F(RegistryTest, SymlinksAreNotFollowed) {
  ShmObject object(4096);
  const std::string name = absl::StrCat("/lossd-link-", getpid());
  const std::string path = "/dev/shm" + name;
  ASSERT_EQ(symlink(("/dev/shm" + object.name()).c_str(), path.c_str()), 0);
  auto r = registry_->Register(uid_, Request(name, 0, 8));
  unlink(path.c_str());
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(registry_->regions(), 0);
}

TEST_F(RegistryTest, LeasesEndWithoutRenewalAndAreCapped) {
  ShmRegistryOptions o;
  o.max_lease = absl::Seconds(10);
  Make(o);
  ShmObject object(4096);
  auto r = registry_->Register(uid_, Request(object.name(), 0, 4096, 60000));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->lease_ms(), 10000u);  // capped
  now_ += absl::Seconds(8);
  v1::RenewLeaseRequest renew;
  renew.add_regions(r->region());
  renew.add_regions("not-a-handle");
  auto renewed = registry_->Renew(uid_, renew);
  ASSERT_TRUE(renewed.ok());
  EXPECT_EQ(renewed->lease_ms(), 10000u);
  ASSERT_EQ(renewed->unknown_size(), 1);
  EXPECT_EQ(renewed->unknown(0), "not-a-handle");
  // Another uid cannot renew it.
  EXPECT_EQ(registry_->Renew(uid_ + 1, renew)->unknown_size(), 2);
  now_ += absl::Seconds(8);  // 16 s after registering, 8 s after renewing
  EXPECT_TRUE(registry_->Resolve("logits.ref", Ref(r->region(), 0, 8), 8, false).ok());
  EXPECT_EQ(registry_->Sweep(), 0);
  now_ += absl::Seconds(2);
  auto expired = registry_->Resolve("logits.ref", Ref(r->region(), 0, 8), 8, false);
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry_->Renew(uid_, renew)->unknown_size(), 2);
  EXPECT_EQ(registry_->Sweep(), 1);
  EXPECT_EQ(registry_->regions(), 0);
  EXPECT_EQ(registry_->registered_bytes(uid_), 0);
}

TEST_F(RegistryTest, UnregisteringKeepsSpansInUseMapped) {
  ShmObject object(4096);
  auto r = registry_->Register(uid_, Request(object.name(), 0, 4096));
  ASSERT_TRUE(r.ok());
  auto span = registry_->Resolve("logits.ref", Ref(r->region(), 0, 4096), 4096, false);
  ASSERT_TRUE(span.ok());
  v1::UnregisterRegionRequest un;
  un.set_region(r->region());
  EXPECT_EQ(registry_->Unregister(uid_ + 1, un).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(registry_->Unregister(uid_, un).ok());
  EXPECT_EQ(registry_->Unregister(uid_, un).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry_->Resolve("logits.ref", Ref(r->region(), 0, 8), 8, false).status().code(),
            absl::StatusCode::kNotFound);
  // The computation that holds the span still reads the object.
  EXPECT_EQ(std::memcmp(span->data, object.data(), 4096), 0);
  EXPECT_EQ(registry_->registered_bytes(uid_), 0);
}

TEST_F(RegistryTest, ListingShowsOnlyTheCallersRegions) {
  ShmObject object(4096);
  ASSERT_TRUE(registry_->Register(uid_, Request(object.name(), 0, 100)).ok());
  ASSERT_TRUE(registry_->Register(uid_, Request(object.name(), 100, 200)).ok());
  auto mine = registry_->List(uid_);
  ASSERT_TRUE(mine.ok());
  ASSERT_EQ(mine->regions_size(), 2);
  EXPECT_EQ(mine->regions(0).key(), object.name());
  EXPECT_EQ(mine->regions(1).offset(), 100u);
  EXPECT_EQ(mine->regions(1).byte_size(), 200u);
  EXPECT_EQ(mine->regions(0).expires_unix_ms(), absl::ToUnixMillis(now_ + absl::Seconds(30)));
  EXPECT_EQ(registry_->List(uid_ + 1)->regions_size(), 0);
}

TEST_F(RegistryTest, PerUidLimitsAreEnforced) {
  ShmRegistryOptions o;
  o.max_bytes_per_uid = 6000;
  o.max_regions_per_uid = 3;
  Make(o);
  ShmObject object(8192);
  ASSERT_TRUE(registry_->Register(uid_, Request(object.name(), 0, 4000)).ok());
  auto over = registry_->Register(uid_, Request(object.name(), 0, 4000));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(over.status().message().find("6000"), std::string::npos) << over.status();
  ASSERT_TRUE(registry_->Register(uid_, Request(object.name(), 0, 1000)).ok());
  ASSERT_TRUE(registry_->Register(uid_, Request(object.name(), 0, 10)).ok());
  EXPECT_EQ(registry_->Register(uid_, Request(object.name(), 0, 10)).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_F(RegistryTest, DisabledRegistryAnswersFailedPrecondition) {
  ShmRegistryOptions o;
  o.prefix = "";
  Make(o);
  EXPECT_FALSE(registry_->enabled());
  EXPECT_EQ(registry_->Register(uid_, Request("/lossd-x", 0, 8)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(registry_->List(uid_).status().code(), absl::StatusCode::kFailedPrecondition);
}

// The owner truncates its object under the mapping: reads and writes through a span go on
// (on zeros), the span is marked damaged, and a region registered later works.
TEST_F(RegistryTest, ObjectsThatShrinkUnderTheServerDoNotCrashIt) {
  ShmObject object(4 * 4096);
  auto r = registry_->Register(uid_, Request(object.name(), 0, 4 * 4096));
  ASSERT_TRUE(r.ok());
  auto span = registry_->Resolve("logits.ref", Ref(r->region(), 0, 4 * 4096), 4 * 4096, true);
  ASSERT_TRUE(span.ok());
  const int guarded = GuardedRanges();
  EXPECT_GE(guarded, 1);
  ASSERT_EQ(ftruncate(object.fd(), 0), 0);
  volatile unsigned char* p = static_cast<unsigned char*>(span->data);
  unsigned sum = 0;
  for (int i = 0; i < 4 * 4096; i += 512) sum += p[i];
  EXPECT_EQ(sum, 0u);  // zeros after the guard replaced the pages
  p[5000] = 42;        // writes do not fault either
  EXPECT_TRUE(span->damaged->load());
  auto again = registry_->Resolve("logits.ref", Ref(r->region(), 0, 8), 8, false);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(again.status().message().find("shrank"), std::string::npos) << again.status();

  ShmObject later(4096);
  auto r2 = registry_->Register(uid_, Request(later.name(), 0, 4096));
  ASSERT_TRUE(r2.ok());
  auto span2 = registry_->Resolve("logits.ref", Ref(r2->region(), 0, 4096), 4096, false);
  ASSERT_TRUE(span2.ok());
  EXPECT_EQ(std::memcmp(span2->data, later.data(), 4096), 0);
  EXPECT_FALSE(span2->damaged->load());
  // Dropping the damaged region unmaps it once the span lets go.
  v1::UnregisterRegionRequest un;
  un.set_region(r->region());
  ASSERT_TRUE(registry_->Unregister(uid_, un).ok());
  span = absl::InternalError("released");
  EXPECT_EQ(GuardedRanges(), guarded);  // r gone, r2 added
}

TEST(SigbusGuardTest, FaultsOutsideGuardedRangesStillKill) {
  ASSERT_TRUE(InstallSigbusGuard().ok());
  EXPECT_EXIT(
      {
        const std::string name = absl::StrCat("/lossd-unguarded-", getpid());
        const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT, 0600);
        shm_unlink(name.c_str());
        (void)ftruncate(fd, 4096);
        auto* q = static_cast<volatile unsigned char*>(
            mmap(nullptr, 4096, PROT_READ, MAP_SHARED, fd, 0));
        (void)ftruncate(fd, 0);
        unsigned char v = q[10];
        (void)v;
        _exit(0);
      },
      // The previous action runs: the default kills with SIGBUS; under ASan/UBSan it is the
      // sanitizer's handler, which reports the fault and exits non-zero. Never exit 0.
      [](int status) {
        if (WIFSIGNALED(status)) return WTERMSIG(status) == SIGBUS;
        return WIFEXITED(status) && WEXITSTATUS(status) != 0;
      },
      "");
}

// ---- peers ----------------------------------------------------------------------------------

TEST(PeerTest, PeerStringsAreParsed) {
  ParsedPeer v4 = ParsePeer("ipv4:127.0.0.1:5000");
  EXPECT_EQ(v4.kind, ParsedPeer::Kind::kIpv4);
  EXPECT_EQ(v4.port, 5000);
  EXPECT_TRUE(IsLoopback(v4));
  for (const char* p : {"ipv6:[::1]:6000", "ipv6:%5B::1%5D:6000"}) {
    ParsedPeer v6 = ParsePeer(p);
    EXPECT_EQ(v6.kind, ParsedPeer::Kind::kIpv6) << p;
    EXPECT_EQ(v6.port, 6000);
    EXPECT_TRUE(IsLoopback(v6));
  }
  EXPECT_TRUE(IsLoopback(ParsePeer("ipv6:%5B::ffff:127.0.0.9%5D:1")));
  EXPECT_FALSE(IsLoopback(ParsePeer("ipv4:10.0.0.1:5000")));
  EXPECT_FALSE(IsLoopback(ParsePeer("ipv6:[2001:db8::1]:5000")));
  ParsedPeer fd = ParsePeer("fd:17");
  EXPECT_EQ(fd.kind, ParsedPeer::Kind::kFd);
  EXPECT_EQ(fd.fd, 17);
  for (const char* p : {"unix:/x", "ipv4:300.0.0.1:1", "ipv4:127.0.0.1:99999", "fd:x", ""}) {
    EXPECT_EQ(ParsePeer(p).kind, ParsedPeer::Kind::kOther) << p;
  }
}

TEST(PeerTest, NonLoopbackAndUnknownPeersAreDenied) {
  PeerTable table;
  EXPECT_EQ(CallerUid("ipv4:10.1.2.3:5000", table, 50051, "/").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(CallerUid("fd:12345", table, 50051, "/").status().code(),
            absl::StatusCode::kPermissionDenied);
  table.Set(12345, {4321, 99});
  EXPECT_EQ(*CallerUid("fd:12345", table, 50051, "/"), 4321u);
  EXPECT_EQ(CallerUid("unix:/tmp/x", table, 50051, "/").status().code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(PeerTest, LoopbackUidsComeFromTheSocketTables) {
  const std::string root =
      (std::filesystem::temp_directory_path() / absl::StrCat("lossd-proc-", getpid())).string();
  std::filesystem::create_directories(root + "/proc/net");
  {
    std::ofstream tcp(root + "/proc/net/tcp");
    tcp << "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
           "timeout inode\n"
        << "   0: 0100007F:C350 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0 "
           "       0 1 1 0000000000000000 100 0 0 10 0\n"
        << "   1: 0100007F:D431 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1234 "
           "       0 2 1 0000000000000000 20 4 30 10 -1\n";
    std::ofstream tcp6(root + "/proc/net/tcp6");
    tcp6 << "  sl  local_address                         remote_address                        "
            "st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
         << "   0: 00000000000000000000000001000000:D432 00000000000000000000000001000000:C350 "
            "01 00000000:00000000 00:00000000 00000000  777        0 3 1\n"
         << "   1: 0000000000000000FFFF00000100007F:D433 0000000000000000FFFF00000100007F:C350 "
            "01 00000000:00000000 00:00000000 00000000  888        0 4 1\n";
  }
  PeerTable table;
  // 0xD431 = 54321; the server's port 0xC350 = 50000.
  EXPECT_EQ(*CallerUid("ipv4:127.0.0.1:54321", table, 50000, root), 1234u);
  EXPECT_EQ(*CallerUid("ipv6:%5B::1%5D:54322", table, 50000, root), 777u);
  EXPECT_EQ(*CallerUid("ipv4:127.0.0.1:54323", table, 50000, root), 888u);  // via tcp6
  EXPECT_EQ(CallerUid("ipv4:127.0.0.1:54321", table, 50001, root).status().code(),
            absl::StatusCode::kPermissionDenied);  // another server's connection
  EXPECT_EQ(CallerUid("ipv4:127.0.0.2:54321", table, 50000, root).status().code(),
            absl::StatusCode::kPermissionDenied);
  std::filesystem::remove_all(root);
}

TEST(PeerTest, ARealLoopbackConnectionIsFoundInProc) {
  const int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(listen(listener, 1), 0);
  socklen_t length = sizeof(address);
  getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length);
  const int server_port = ntohs(address.sin_port);
  const int client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_EQ(connect(client, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  sockaddr_in local{};
  length = sizeof(local);
  getsockname(client, reinterpret_cast<sockaddr*>(&local), &length);
  PeerTable table;
  auto uid = CallerUid(absl::StrCat("ipv4:127.0.0.1:", ntohs(local.sin_port)), table,
                       server_port, "/");
  close(client);
  close(listener);
  ASSERT_TRUE(uid.ok()) << uid.status();
  EXPECT_EQ(*uid, geteuid());
}

// ---- a real server: the SharedMemory service over the Unix socket and loopback TCP ----------

class ShmServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           absl::StrCat("lossd-shm-test-", getpid(), "-", ++counter_);
    std::filesystem::create_directories(dir_);
    socket_ = (dir_ / "lossd.sock").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::unique_ptr<LossdServer> Start(ServerOptions o = {}) {
    o.host = "127.0.0.1";
    o.port = 0;
    o.device = DevicePolicy::kCpu;
    o.workers = 1;
    o.cpu_threads = 1;
    if (o.unix_socket.empty()) o.unix_socket = socket_;
    auto s = LossdServer::Start(o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }
  // The two addresses `server` listens on: the Unix socket and loopback TCP.
  std::vector<std::string> Targets(const LossdServer& server) const {
    return {"unix:" + socket_, absl::StrCat("127.0.0.1:", server.port())};
  }
  static std::shared_ptr<grpc::Channel> Channel(const std::string& target) {
    return grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  }
  static inline int counter_ = 0;
  std::filesystem::path dir_;
  std::string socket_;
};

TEST_F(ShmServerTest, RegistersOverTheUnixSocketAndLoopbackTcp) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(server->shared_memory_enabled());
  EXPECT_EQ(server->shared_memory_prefix(), "/lossd-");
  ASSERT_NE(server->region_resolver(), nullptr);
  struct stat st {};
  ASSERT_EQ(lstat(socket_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  ShmObject object(8192);
  for (const std::string& target : Targets(*server)) {
    auto stub = v1::SharedMemory::NewStub(Channel(target));
    grpc::ClientContext c1;
    v1::RegisterRegionResponse registered;
    grpc::Status s = stub->RegisterRegion(&c1, Request(object.name(), 0, 8192), &registered);
    ASSERT_TRUE(s.ok()) << target << ": " << s.error_message();
    // The region serves tensor references.
    auto span = server->region_resolver()->Resolve("logits.ref",
                                                   Ref(registered.region(), 16, 32), 32, false);
    ASSERT_TRUE(span.ok()) << span.status();
    EXPECT_EQ(std::memcmp(span->data, object.data() + 16, 32), 0);
    grpc::ClientContext c2;
    v1::ListRegionsResponse listed;
    ASSERT_TRUE(stub->ListRegions(&c2, v1::ListRegionsRequest(), &listed).ok());
    ASSERT_EQ(listed.regions_size(), 1) << target;
    EXPECT_EQ(listed.regions(0).key(), object.name());
    grpc::ClientContext c3;
    v1::RenewLeaseRequest renew;
    renew.add_regions(registered.region());
    v1::RenewLeaseResponse renewed;
    ASSERT_TRUE(stub->RenewLease(&c3, renew, &renewed).ok());
    EXPECT_EQ(renewed.unknown_size(), 0);
    EXPECT_EQ(renewed.lease_ms(), 30000u);
    grpc::ClientContext c4;
    v1::UnregisterRegionRequest un;
    un.set_region(registered.region());
    v1::UnregisterRegionResponse unregistered;
    ASSERT_TRUE(stub->UnregisterRegion(&c4, un, &unregistered).ok());
    grpc::ClientContext c5;
    v1::RegisterRegionResponse bad;
    s = stub->RegisterRegion(&c5, Request("/outside-prefix", 0, 8), &bad);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("prefix"), std::string::npos) << s.error_message();
  }
  EXPECT_GE(server->unix_connections(), 1);
  EXPECT_EQ(server->shared_memory_regions(), 0);
  server->Shutdown(absl::Seconds(5));
  EXPECT_NE(lstat(socket_.c_str(), &st), 0) << "the socket file is removed at shutdown";
}

TEST_F(ShmServerTest, EvaluateOverTheUnixSocketEqualsTcp) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  v1::EvaluateRequest request;
  std::vector<float> x(64), y(64);
  for (int i = 0; i < 64; ++i) {
    x[i] = 0.31f * static_cast<float>(i) - 9.0f;
    y[i] = static_cast<float>(i % 2);
  }
  for (auto [tensor, values] : {std::pair{request.mutable_logits(), &x},
                                std::pair{request.mutable_targets(), &y}}) {
    tensor->set_dtype(v1::DTYPE_FLOAT32);
    tensor->add_shape(8);
    tensor->add_shape(8);
    tensor->set_data(std::string(reinterpret_cast<const char*>(values->data()), 256));
  }
  request.mutable_bce_with_logits();
  request.set_reduction(v1::REDUCTION_NONE);
  request.mutable_gradients()->set_logits(true);
  std::vector<v1::EvaluateResponse> replies;
  for (const std::string& target : Targets(*server)) {
    auto stub = v1::LossService::NewStub(Channel(target));
    grpc::ClientContext context;
    v1::EvaluateResponse reply;
    grpc::Status s = stub->Evaluate(&context, request, &reply);
    ASSERT_TRUE(s.ok()) << target << ": " << s.error_message();
    replies.push_back(reply);
  }
  EXPECT_EQ(replies[0].loss().data(), replies[1].loss().data());
  EXPECT_EQ(replies[0].grad_logits().data(), replies[1].grad_logits().data());
  EXPECT_EQ(replies[0].loss().data().size(), 256u);
}

TEST_F(ShmServerTest, DisabledSharedMemoryAnswersFailedPrecondition) {
  ServerOptions o;
  o.shared_memory_prefix = "";
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  EXPECT_FALSE(server->shared_memory_enabled());
  EXPECT_EQ(server->region_resolver(), nullptr);
  auto stub = v1::SharedMemory::NewStub(Channel("unix:" + socket_));
  grpc::ClientContext context;
  v1::RegisterRegionResponse reply;
  testing::internal::CaptureStderr();
  EXPECT_EQ(stub->RegisterRegion(&context, Request("/lossd-x", 0, 8), &reply).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  // Logged through the CallRecord like every failed call (call_record.h), under the service's
  // own method name.
  const std::string log = testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("SharedMemory.RegisterRegion failed: status=FAILED_PRECONDITION "
                     "message=\"shared memory is disabled on this server"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find(" peer="), std::string::npos) << log;
}

TEST_F(ShmServerTest, TokenIsRequiredWhenConfigured) {
  ServerOptions o;
  o.auth_token = "s3cret";
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto stub = v1::SharedMemory::NewStub(Channel("unix:" + socket_));
  grpc::ClientContext context;
  v1::ListRegionsResponse reply;
  EXPECT_EQ(stub->ListRegions(&context, v1::ListRegionsRequest(), &reply).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  grpc::ClientContext with_token;
  with_token.AddMetadata("authorization", "Bearer s3cret");
  EXPECT_TRUE(stub->ListRegions(&with_token, v1::ListRegionsRequest(), &reply).ok());
}

TEST_F(ShmServerTest, StaleSocketsAreReplacedAndOtherFilesKept) {
  {
    // A socket file left behind by a process that is gone.
    const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, socket_.c_str(), sizeof(address.sun_path) - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    close(fd);
  }
  auto server = Start();
  ASSERT_NE(server, nullptr);
  // A second server on the same live socket fails instead of stealing it.
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.device = DevicePolicy::kCpu;
  o.unix_socket = socket_;
  EXPECT_EQ(LossdServer::Start(o).status().code(), absl::StatusCode::kUnavailable);
  server.reset();
  { std::ofstream(socket_) << "not a socket"; }
  auto refused = LossdServer::Start(o);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_TRUE(std::filesystem::is_regular_file(socket_));
}

}  // namespace
}  // namespace lossd::server
