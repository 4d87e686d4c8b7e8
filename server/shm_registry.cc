#include "server/shm_registry.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/call_record.h"
#include "server/grpc_status.h"
#include "server/shm_guard.h"

namespace lossd::server {

namespace {

constexpr size_t kMaxKeyBytes = 255;   // NAME_MAX of /dev/shm, with the leading '/'
constexpr size_t kMaxNameBytes = 256;  // the client's label
constexpr size_t kHandleHexDigits = 32;
constexpr size_t kCudaIpcHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t)

// The start of a handle, for messages and logs: enough to tell regions apart, not enough to
// use one (handles are capabilities).
std::string ShortHandle(absl::string_view handle) {
  if (handle.size() <= 8) return absl::StrCat("\"", absl::CHexEscape(handle), "\"");
  return absl::StrCat("\"", absl::CHexEscape(handle.substr(0, 8)), "...\"");
}

absl::StatusOr<std::string> NewHandle() {
  unsigned char bytes[kHandleHexDigits / 2];
  size_t filled = 0;
  while (filled < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + filled, sizeof(bytes) - filled, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("getrandom: ", std::strerror(errno)));
    }
    filled += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

int64_t PageSize() {
  static const int64_t page = [] {
    const long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<int64_t>(p) : int64_t{4096};
  }();
  return page;
}

uint32_t ToMs(absl::Duration d) {
  const int64_t ms = absl::ToInt64Milliseconds(d);
  return static_cast<uint32_t>(std::clamp<int64_t>(ms, 0, std::numeric_limits<uint32_t>::max()));
}

}  // namespace

absl::Status ValidateShmKey(std::string_view key_view, std::string_view prefix_view) {
  const absl::string_view key(key_view.data(), key_view.size());
  const absl::string_view prefix(prefix_view.data(), prefix_view.size());
  auto bad = [key](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("key \"", absl::CHexEscape(key.substr(0, 300)), "\" ", why));
  };
  if (key.empty()) return bad("is empty: it must name a POSIX shared-memory object");
  if (key.size() > kMaxKeyBytes) {
    return bad(absl::StrCat("is ", key.size(), " bytes long; at most ", kMaxKeyBytes));
  }
  if (key.substr(0, prefix.size()) != prefix) {
    return bad(absl::StrCat("does not start with this server's prefix \"", prefix, "\""));
  }
  if (key[0] != '/') return bad("must start with '/'");
  if (key.size() < 2) return bad("names no object");
  if (key.find('/', 1) != absl::string_view::npos) {
    return bad("contains '/' after the first character: it must be a single name");
  }
  if (key.find("..") != absl::string_view::npos) return bad("contains \"..\"");
  if (key.find('\0') != absl::string_view::npos) return bad("contains a NUL character");
  return absl::OkStatus();
}

// A mapped range of an object: unmapped when the last region or span holding it lets go.
struct ShmRegistry::Mapping {
  void* base = nullptr;
  size_t length = 0;
  int guard = -1;
  std::atomic<bool> damaged{false};

  ~Mapping() {
    Unguard(guard);  // before munmap: the address range may be reused by the next mmap
    if (base != nullptr) munmap(base, length);
  }
};

struct ShmRegistry::Region {
  uid_t uid = 0;
  std::string name;
  v1::RegionKind kind = v1::REGION_KIND_SYSTEM;
  std::string key;
  uint64_t offset = 0;
  uint64_t byte_size = 0;
  // The registered range's first byte: inside `mapping` (SYSTEM), or the device pointer of
  // `device_memory` (CUDA_IPC), which host code never dereferences.
  char* data = nullptr;
  std::shared_ptr<Mapping> mapping;        // SYSTEM; null for CUDA_IPC
  std::shared_ptr<void> device_memory;     // CUDA_IPC: the opened handle (DeviceMemory::keepalive)
  bool leased = true;  // false: registered by RegisterWithoutLease, never expires
  absl::Duration lease;
  absl::Time expires;  // guarded by the registry's mutex
};

ShmRegistry::ShmRegistry(ShmRegistryOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<ShmRegistry>> ShmRegistry::Create(ShmRegistryOptions options) {
  if (!options.prefix.empty()) {
    const std::string& p = options.prefix;
    if (p[0] != '/' || p.find('/', 1) != std::string::npos ||
        p.find("..") != std::string::npos || p.find('\0') != std::string::npos ||
        p.size() > 128) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shared_memory_prefix \"", absl::CHexEscape(p),
          "\" must start with '/', contain no other '/' nor \"..\", and be at most 128 bytes"));
    }
  }
  if (options.max_lease <= absl::ZeroDuration() ||
      options.max_lease > absl::Milliseconds(std::numeric_limits<uint32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shared_memory_max_lease ", absl::FormatDuration(options.max_lease),
        " must be positive and below 49 days"));
  }
  if (options.default_lease <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the default lease ", absl::FormatDuration(options.default_lease), " must be positive"));
  }
  if (options.max_bytes_per_uid <= 0 || options.max_regions_per_uid <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shared_memory_max_bytes ", options.max_bytes_per_uid, " and the region limit ",
        options.max_regions_per_uid, " must be positive"));
  }
  if (options.sweep_interval <= absl::ZeroDuration()) options.sweep_interval = absl::Seconds(1);
  if (!options.prefix.empty()) {
    if (absl::Status s = InstallSigbusGuard(); !s.ok()) return s;
  }
  std::unique_ptr<ShmRegistry> registry(new ShmRegistry(std::move(options)));
  if (registry->enabled()) {
    registry->sweeper_ = std::thread([r = registry.get()] { r->SweepLoop(); });
  }
  return registry;
}

ShmRegistry::~ShmRegistry() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (sweeper_.joinable()) sweeper_.join();
}

absl::Duration ShmRegistry::Lease(uint32_t requested_ms) const {
  const absl::Duration requested =
      requested_ms == 0 ? options_.default_lease : absl::Milliseconds(requested_ms);
  return std::min(requested, options_.max_lease);
}

absl::StatusOr<v1::RegisterRegionResponse> ShmRegistry::Register(
    uid_t uid, const v1::RegisterRegionRequest& request) {
  return RegisterRange(uid, request, /*leased=*/true);
}

absl::StatusOr<std::string> ShmRegistry::RegisterWithoutLease(
    uid_t uid, const v1::RegisterRegionRequest& request) {
  if (request.kind() == v1::REGION_KIND_CUDA_IPC) {
    return absl::InvalidArgumentError(
        "the inference protocol's shared memory registers system shared memory only");
  }
  auto response = RegisterRange(uid, request, /*leased=*/false);
  if (!response.ok()) return response.status();
  return std::string(response->region());
}

// The registered range's checks shared by every region kind: a positive size, no overflow, and
// within what one uid may register.
absl::Status ShmRegistry::CheckRange(uint64_t offset, uint64_t size) const {
  if (size == 0) return absl::InvalidArgumentError("byte_size must be positive, got 0");
  if (size > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
      offset > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) - size) {
    return absl::InvalidArgumentError(absl::StrCat("offset ", offset, " + byte_size ", size,
                                                   " overflows"));
  }
  if (static_cast<int64_t>(size) > options_.max_bytes_per_uid) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "byte_size ", size, " exceeds the ", options_.max_bytes_per_uid,
        " bytes one uid may register (--shared_memory_max_bytes)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::RegisterRegionResponse> ShmRegistry::RegisterRange(
    uid_t uid, const v1::RegisterRegionRequest& request, bool leased) {
  if (!enabled()) {
    return absl::FailedPreconditionError("shared memory is disabled on this server");
  }
  if (request.kind() == v1::REGION_KIND_CUDA_IPC && leased) return RegisterCudaIpc(uid, request);
  if (request.kind() != v1::REGION_KIND_UNSPECIFIED && request.kind() != v1::REGION_KIND_SYSTEM) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kind ", v1::RegionKind_Name(request.kind()), " (", static_cast<int>(request.kind()),
        ") is not supported; this server registers REGION_KIND_SYSTEM (POSIX shared memory)",
        cuda_ipc_enabled() ? " and REGION_KIND_CUDA_IPC" : ""));
  }
  if (!request.cuda_ipc_handle().empty()) {
    return absl::InvalidArgumentError("cuda_ipc_handle must be empty for REGION_KIND_SYSTEM");
  }
  if (request.name().size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("name is ", request.name().size(),
                                                   " bytes long; at most ", kMaxNameBytes));
  }
  if (absl::Status s = ValidateShmKey(request.key(), options_.prefix); !s.ok()) return s;
  const uint64_t offset = request.offset();
  const uint64_t size = request.byte_size();
  if (absl::Status s = CheckRange(offset, size); !s.ok()) return s;
  const std::string& key = request.key();
  const int fd = shm_open(key.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0);
  if (fd < 0) {
    const int e = errno;
    const std::string what = absl::StrCat("key \"", key, "\": cannot open the object: ",
                                          std::strerror(e));
    if (e == ENOENT) return absl::NotFoundError(what);
    if (e == EACCES || e == EPERM) {
      return absl::PermissionDeniedError(absl::StrCat(
          what, " (the server's uid ", geteuid(), " needs read and write permission on it)"));
    }
    if (e == ELOOP || e == ENAMETOOLONG || e == EINVAL) return absl::InvalidArgumentError(what);
    if (e == EMFILE || e == ENFILE || e == ENOMEM) return absl::ResourceExhaustedError(what);
    return absl::UnavailableError(what);
  }
  struct stat st {};
  const bool stat_ok = fstat(fd, &st) == 0;
  const int stat_errno = errno;
  if (!stat_ok) {
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("key \"", key, "\": fstat: ", std::strerror(stat_errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("key \"", key, "\" is not a regular shared-memory object"));
  }
  if (st.st_uid != uid) {
    close(fd);
    return absl::PermissionDeniedError(absl::StrCat(
        "key \"", key, "\" belongs to uid ", st.st_uid, ", not to the caller's uid ", uid,
        ": only the owner of an object may register it"));
  }
  if (static_cast<uint64_t>(st.st_size) < offset + size) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        "offset ", offset, " + byte_size ", size, " = ", offset + size,
        " exceeds the size of key \"", key, "\" (", st.st_size, " bytes)"));
  }
  const uint64_t aligned = offset - offset % static_cast<uint64_t>(PageSize());
  const size_t length = static_cast<size_t>(offset + size - aligned);
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                    static_cast<off_t>(aligned));
  const int map_errno = errno;
  close(fd);
  if (base == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat("key \"", key, "\": cannot map ", length,
                                                     " bytes: ", std::strerror(map_errno)));
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->base = base;
  mapping->length = length;
  mapping->guard = Guard(base, length, &mapping->damaged);
  if (mapping->guard < 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this server guards at most ", kMaxGuardedRanges, " mapped regions at once"));
  }
  auto region = std::make_shared<Region>();
  region->uid = uid;
  region->name = request.name();
  region->key = key;
  region->offset = offset;
  region->byte_size = size;
  region->data = static_cast<char*>(base) + (offset - aligned);
  region->mapping = std::move(mapping);
  region->leased = leased;
  region->lease = leased ? Lease(request.lease_ms()) : absl::InfiniteDuration();
  return Add(std::move(region));
}

// docs/shared-memory.md, "CUDA IPC regions": the caller rules and limits of a SYSTEM region
// (checked by the service and Add), the handle opened instead of an object mapped.
absl::StatusOr<v1::RegisterRegionResponse> ShmRegistry::RegisterCudaIpc(
    uid_t uid, const v1::RegisterRegionRequest& request) {
  if (!options_.cuda_ipc_enabled) {
    return absl::FailedPreconditionError(absl::StrCat(
        "kind REGION_KIND_CUDA_IPC is not available: ", options_.cuda_ipc_unavailable,
        "; register REGION_KIND_SYSTEM regions or send the tensors' bytes"));
  }
  if (request.name().size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("name is ", request.name().size(),
                                                   " bytes long; at most ", kMaxNameBytes));
  }
  if (!request.key().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key must be empty for REGION_KIND_CUDA_IPC (the handle names the memory), got \"",
        absl::CHexEscape(absl::string_view(request.key()).substr(0, 300)), "\""));
  }
  if (request.cuda_ipc_handle().size() != kCudaIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda_ipc_handle is ", request.cuda_ipc_handle().size(), " bytes; a cudaIpcMemHandle_t "
        "(cudaIpcGetMemHandle) is ", kCudaIpcHandleBytes, " bytes"));
  }
  if (request.cuda_device_uuid() != options_.cuda_device_uuid) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda_device_uuid \"", absl::CHexEscape(absl::string_view(request.cuda_device_uuid())
                                                    .substr(0, 100)),
        "\" is not the GPU of this server (\"", options_.cuda_device_uuid,
        "\"); CUDA IPC needs the client's memory on the server's GPU"));
  }
  const uint64_t offset = request.offset();
  const uint64_t size = request.byte_size();
  if (absl::Status s = CheckRange(offset, size); !s.ok()) return s;
  const std::string& handle = request.cuda_ipc_handle();
  auto memory = options_.open_cuda_ipc
                    ? options_.open_cuda_ipc(handle, offset, size)
                    : kernels::OpenCudaIpcMemory(handle, offset, size);
  if (!memory.ok()) {
    return absl::Status(memory.status().code(),
                        absl::StrCat("cuda_ipc_handle (offset ", offset, ", byte_size ", size,
                                     "): ", memory.status().message()));
  }
  // The opener's contract; checked so that a wrong pointer or size can never become a span.
  if (memory->data == nullptr || memory->bytes != static_cast<int64_t>(size) ||
      memory->keepalive == nullptr) {
    return absl::InternalError(absl::StrCat(
        "opening cuda_ipc_handle gave ", memory->bytes, " bytes",
        memory->data == nullptr ? " at a null pointer" : "", memory->keepalive == nullptr ?
        " without a keepalive" : "", " for a range of ", size, " bytes"));
  }
  auto region = std::make_shared<Region>();
  region->uid = uid;
  region->name = request.name();
  region->kind = v1::REGION_KIND_CUDA_IPC;
  region->offset = offset;
  region->byte_size = size;
  region->data = static_cast<char*>(memory->data);
  region->device_memory = std::move(memory->keepalive);
  region->lease = Lease(request.lease_ms());
  return Add(std::move(region));
}

absl::StatusOr<v1::RegisterRegionResponse> ShmRegistry::Add(std::shared_ptr<Region> region) {
  auto handle = NewHandle();
  if (!handle.ok()) return handle.status();
  const uid_t uid = region->uid;
  const uint64_t size = region->byte_size;
  const bool leased = region->leased;
  {
    absl::MutexLock lock(&mu_);
    Usage& usage = usage_[uid];
    if (usage.regions >= options_.max_regions_per_uid) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "uid ", uid, " has ", usage.regions, " regions registered, the most allowed"));
    }
    if (usage.bytes + static_cast<int64_t>(size) > options_.max_bytes_per_uid) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "uid ", uid, " has ", usage.bytes, " bytes registered; ", size, " more would exceed ",
          options_.max_bytes_per_uid, " (--shared_memory_max_bytes)"));
    }
    usage.regions += 1;
    usage.bytes += static_cast<int64_t>(size);
    region->expires = leased ? Now() + region->lease : absl::InfiniteFuture();
    regions_[*handle] = region;
  }
  v1::RegisterRegionResponse response;
  response.set_region(*handle);
  if (leased) response.set_lease_ms(ToMs(region->lease));
  return response;
}

absl::StatusOr<v1::RenewLeaseResponse> ShmRegistry::Renew(uid_t uid,
                                                          const v1::RenewLeaseRequest& request) {
  if (!enabled()) {
    return absl::FailedPreconditionError("shared memory is disabled on this server");
  }
  v1::RenewLeaseResponse response;
  absl::Duration shortest = absl::InfiniteDuration();
  absl::MutexLock lock(&mu_);
  const absl::Time now = Now();
  for (const std::string& handle : request.regions()) {
    auto it = regions_.find(handle);
    if (it == regions_.end() || it->second->uid != uid || !it->second->leased ||
        it->second->expires <= now) {
      response.add_unknown(handle);
      continue;
    }
    it->second->expires = now + it->second->lease;
    shortest = std::min(shortest, it->second->lease);
  }
  response.set_lease_ms(shortest == absl::InfiniteDuration() ? 0 : ToMs(shortest));
  return response;
}

absl::Status ShmRegistry::Unregister(uid_t uid, const v1::UnregisterRegionRequest& request) {
  if (!enabled()) {
    return absl::FailedPreconditionError("shared memory is disabled on this server");
  }
  std::shared_ptr<Region> dropped;  // released outside the lock
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(request.region());
  if (it == regions_.end() || it->second->uid != uid) {
    return absl::NotFoundError(absl::StrCat("region ", ShortHandle(request.region()),
                                            " is not registered by this uid"));
  }
  dropped = std::move(it->second);
  regions_.erase(it);
  Usage& usage = usage_[uid];
  usage.regions -= 1;
  usage.bytes -= static_cast<int64_t>(dropped->byte_size);
  return absl::OkStatus();
}

absl::StatusOr<v1::ListRegionsResponse> ShmRegistry::List(uid_t uid) const {
  if (!enabled()) {
    return absl::FailedPreconditionError("shared memory is disabled on this server");
  }
  v1::ListRegionsResponse response;
  absl::ReaderMutexLock lock(&mu_);
  const absl::Time now = Now();
  for (const auto& [handle, region] : regions_) {
    // Regions without a lease are the inference protocol's (SystemSharedMemoryStatus).
    if (region->uid != uid || !region->leased || region->expires <= now) continue;
    v1::RegionInfo* info = response.add_regions();
    info->set_name(region->name);
    info->set_kind(region->kind);
    info->set_key(region->key);
    info->set_offset(region->offset);
    info->set_byte_size(region->byte_size);
    info->set_expires_unix_ms(absl::ToUnixMillis(region->expires));
  }
  std::sort(response.mutable_regions()->begin(), response.mutable_regions()->end(),
            [](const v1::RegionInfo& a, const v1::RegionInfo& b) {
              if (a.key() != b.key()) return a.key() < b.key();
              if (a.offset() != b.offset()) return a.offset() < b.offset();
              return a.name() < b.name();
            });
  return response;
}

absl::StatusOr<RegionSpan> ShmRegistry::Resolve(std::string_view field_view,
                                                const v1::TensorReference& ref, int64_t bytes,
                                                bool writable) const {
  const absl::string_view field(field_view.data(), field_view.size());
  (void)writable;  // every region is mapped read-write
  std::shared_ptr<Region> region;
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = regions_.find(ref.region());
    if (it != regions_.end() && it->second->expires > Now()) region = it->second;
  }
  if (region == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        field, ".region ", ShortHandle(ref.region()),
        " is not registered (unknown, unregistered, or its lease ended)"));
  }
  if (bytes < 0 || ref.byte_size() != static_cast<uint64_t>(bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".byte_size is ", ref.byte_size(),
                                                   ", but the tensor has ", bytes, " bytes"));
  }
  const uint64_t size = region->byte_size;
  if (ref.offset() > size || static_cast<uint64_t>(bytes) > size - ref.offset()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": offset ", ref.offset(), " + byte_size ", ref.byte_size(),
        " lies outside region ", ShortHandle(ref.region()), " (", size, " bytes, ",
        region->kind == v1::REGION_KIND_CUDA_IPC ? std::string("CUDA IPC")
                                                 : absl::StrCat("key \"", region->key, "\""),
        ")"));
  }
  RegionSpan span;
  span.data = region->data + ref.offset();  // within the range: checked above
  span.bytes = bytes;
  if (region->kind == v1::REGION_KIND_CUDA_IPC) {
    // Device memory: nothing can shrink under it (the opened handle keeps the allocation).
    span.device = true;
    span.keepalive = region->device_memory;
    return span;
  }
  if (region->mapping->damaged.load()) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, ": the object of region ", ShortHandle(ref.region()), " (key \"", region->key,
        "\") shrank while registered; unregister it and register it again"));
  }
  span.damaged = &region->mapping->damaged;
  span.keepalive = std::shared_ptr<const void>(region->mapping, region->mapping.get());
  return span;
}

int ShmRegistry::Sweep() {
  std::vector<std::shared_ptr<Region>> expired;  // released outside the lock
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = Now();
    for (auto it = regions_.begin(); it != regions_.end();) {
      if (it->second->expires <= now) {
        Usage& usage = usage_[it->second->uid];
        usage.regions -= 1;
        usage.bytes -= static_cast<int64_t>(it->second->byte_size);
        expired.push_back(std::move(it->second));
        regions_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  return static_cast<int>(expired.size());
}

void ShmRegistry::SweepLoop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.sweep_interval);
      if (stop_) return;
    }
    Sweep();
  }
}

int64_t ShmRegistry::regions() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<int64_t>(regions_.size());
}

int64_t ShmRegistry::registered_bytes(uid_t uid) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = usage_.find(uid);
  return it == usage_.end() ? 0 : it->second.bytes;
}

// ---- SharedMemoryService --------------------------------------------------------------------

namespace {

bool ConstantTimeEqual(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

SharedMemoryService::SharedMemoryService(ShmRegistry* registry, const PeerTable* peers,
                                         std::string auth_token, std::string proc_root)
    : registry_(registry),
      peers_(peers),
      auth_token_(std::move(auth_token)),
      proc_root_(std::move(proc_root)) {}

absl::StatusOr<uid_t> SharedMemoryService::Caller(grpc::CallbackServerContext* context,
                                                  bool during_drain) const {
  if (!during_drain && draining_.load()) {
    return absl::UnavailableError("the server is draining for shutdown; retry on another server");
  }
  if (!auth_token_.empty()) {
    const auto& md = context->client_metadata();
    auto it = md.find("authorization");
    if (it == md.end()) {
      return absl::UnauthenticatedError(
          "missing \"authorization: Bearer <token>\" metadata (this server requires a token)");
    }
    const absl::string_view value(it->second.data(), it->second.size());
    constexpr absl::string_view kPrefix = "Bearer ";
    if (!(value.size() > kPrefix.size() && value.substr(0, kPrefix.size()) == kPrefix &&
          ConstantTimeEqual(value.substr(kPrefix.size()), auth_token_))) {
      return absl::UnauthenticatedError("invalid bearer token");
    }
  }
  if (registry_ == nullptr || !registry_->enabled()) {
    return absl::FailedPreconditionError(
        "shared memory is disabled on this server (--shared_memory_prefix is empty)");
  }
  return CallerUid(context->peer(), *peers_, server_port_.load(), proc_root_);
}

grpc::ServerUnaryReactor* SharedMemoryService::Finish(grpc::CallbackServerContext* context,
                                                      const char* method,
                                                      const absl::Status& status) const {
  // Logged like every call; not counted in lossd_requests_total (call_record.h).
  CallRecord(/*metrics=*/nullptr, method, context, absl::GetCurrentTimeNanos()).Finish(status);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// The caller's uid (Caller), then fn(uid)'s status as the call's.
template <typename F>
grpc::ServerUnaryReactor* SharedMemoryService::Respond(grpc::CallbackServerContext* context,
                                                       const char* method, bool during_drain,
                                                       F&& fn) const {
  auto uid = Caller(context, during_drain);
  return Finish(context, method, uid.ok() ? fn(*uid) : uid.status());
}

grpc::ServerUnaryReactor* SharedMemoryService::RegisterRegion(
    grpc::CallbackServerContext* context, const v1::RegisterRegionRequest* request,
    v1::RegisterRegionResponse* response) {
  return Respond(context, "SharedMemory.RegisterRegion", /*during_drain=*/false, [&](uid_t uid) {
    return StoreReply(registry_->Register(uid, *request), response);
  });
}

grpc::ServerUnaryReactor* SharedMemoryService::RenewLease(grpc::CallbackServerContext* context,
                                                          const v1::RenewLeaseRequest* request,
                                                          v1::RenewLeaseResponse* response) {
  return Respond(context, "SharedMemory.RenewLease", /*during_drain=*/true, [&](uid_t uid) {
    return StoreReply(registry_->Renew(uid, *request), response);
  });
}

grpc::ServerUnaryReactor* SharedMemoryService::UnregisterRegion(
    grpc::CallbackServerContext* context, const v1::UnregisterRegionRequest* request,
    v1::UnregisterRegionResponse*) {
  return Respond(context, "SharedMemory.UnregisterRegion", /*during_drain=*/true,
                 [&](uid_t uid) { return registry_->Unregister(uid, *request); });
}

grpc::ServerUnaryReactor* SharedMemoryService::ListRegions(grpc::CallbackServerContext* context,
                                                           const v1::ListRegionsRequest*,
                                                           v1::ListRegionsResponse* response) {
  return Respond(context, "SharedMemory.ListRegions", /*during_drain=*/true,
                 [&](uid_t uid) { return StoreReply(registry_->List(uid), response); });
}

}  // namespace lossd::server
