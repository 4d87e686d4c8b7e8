#include "server/oip_shm.h"

#include <algorithm>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace lossd::server {

namespace {

constexpr size_t kMaxRegionName = 256;

absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

std::string Quoted(std::string_view name) {
  return absl::StrCat("'", absl::CHexEscape(absl::string_view(name.data(), name.size())), "'");
}

}  // namespace

OipSharedMemory::OipSharedMemory(ShmRegistry* registry, const PeerTable* peers,
                                 std::string proc_root)
    : registry_(registry), peers_(peers), proc_root_(std::move(proc_root)) {}

OipSharedMemory::~OipSharedMemory() {
  absl::MutexLock lock(&mu_);
  if (registry_ == nullptr) return;
  for (const auto& [name, entry] : entries_) {
    v1::UnregisterRegionRequest request;
    request.set_region(entry.handle);
    (void)registry_->Unregister(name.first, request);
  }
  entries_.clear();
}

void OipSharedMemory::set_port(OipProtocol protocol, int port) {
  (protocol == OipProtocol::kRest ? http_port_ : grpc_port_).store(port);
}

absl::Status OipSharedMemory::Enabled() const {
  if (registry_ == nullptr || !registry_->enabled()) {
    return absl::FailedPreconditionError(
        "system shared memory is disabled on this server (--shared_memory_prefix is empty)");
  }
  return absl::OkStatus();
}

absl::StatusOr<uid_t> OipSharedMemory::Caller(std::string_view peer,
                                              OipProtocol protocol) const {
  if (absl::Status s = Enabled(); !s.ok()) return s;
  const int port = (protocol == OipProtocol::kRest ? http_port_ : grpc_port_).load();
  return CallerUid(peer, *peers_, port, proc_root_);
}

absl::Status OipSharedMemory::Register(uid_t uid,
                                       const inference::SystemSharedMemoryRegisterRequest& r) {
  if (absl::Status s = Enabled(); !s.ok()) return s;
  if (r.name().empty()) {
    return absl::InvalidArgumentError("the region's name is empty");
  }
  if (r.name().size() > kMaxRegionName) {
    return absl::InvalidArgumentError(absl::StrCat("the region's name is ", r.name().size(),
                                                   " bytes long; at most ", kMaxRegionName));
  }
  absl::MutexLock lock(&mu_);  // registrations are rare: one at a time
  const Name name{uid, r.name()};
  if (entries_.contains(name)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "system shared memory region ", Quoted(r.name()),
        " is already registered; unregister it first"));
  }
  v1::RegisterRegionRequest request;
  request.set_key(r.key());
  request.set_offset(r.offset());
  request.set_byte_size(r.byte_size());
  request.set_name(r.name());
  auto handle = registry_->RegisterWithoutLease(uid, request);
  if (!handle.ok()) {
    return absl::Status(handle.status().code(),
                        absl::StrCat("system shared memory region ", Quoted(r.name()), ": ",
                                     handle.status().message()));
  }
  entries_[name] = Entry{*std::move(handle), r.key(), r.offset(), r.byte_size()};
  return absl::OkStatus();
}

absl::Status OipSharedMemory::Unregister(uid_t uid, std::string_view name) {
  if (absl::Status s = Enabled(); !s.ok()) return s;
  std::vector<std::string> handles;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->first.first == uid && (name.empty() || it->first.second == name)) {
        handles.push_back(std::move(it->second.handle));
        entries_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  for (const std::string& handle : handles) {
    v1::UnregisterRegionRequest request;
    request.set_region(handle);
    (void)registry_->Unregister(uid, request);  // memory in use by a computation stays mapped
  }
  return absl::OkStatus();
}

absl::StatusOr<inference::SystemSharedMemoryStatusResponse> OipSharedMemory::Status(
    uid_t uid, std::string_view name) const {
  if (absl::Status s = Enabled(); !s.ok()) return s;
  inference::SystemSharedMemoryStatusResponse response;
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [n, entry] : entries_) {
    if (n.first != uid || (!name.empty() && n.second != name)) continue;
    auto& status = (*response.mutable_regions())[n.second];
    status.set_name(n.second);
    status.set_key(entry.key);
    status.set_offset(entry.offset);
    status.set_byte_size(entry.byte_size);
  }
  if (!name.empty() && response.regions().empty()) {
    return absl::NotFoundError(absl::StrCat("system shared memory region ", Quoted(name),
                                            " is not registered by the caller's uid ", uid));
  }
  return response;
}

absl::StatusOr<v1::TensorReference> OipSharedMemory::Reference(uid_t uid, std::string_view what,
                                                               std::string_view name,
                                                               uint64_t offset,
                                                               uint64_t byte_size) const {
  if (absl::Status s = Enabled(); !s.ok()) return s;
  absl::ReaderMutexLock lock(&mu_);
  auto it = entries_.find(Name{uid, std::string(name)});
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat(
        Sv(what), ": shared_memory_region ", Quoted(name),
        " is not registered by the caller's uid ", uid,
        " (register it with SystemSharedMemoryRegister first)"));
  }
  const uint64_t size = it->second.byte_size;
  if (offset > size || byte_size > size - offset) {
    return absl::InvalidArgumentError(absl::StrCat(
        Sv(what), ": shared_memory_offset ", offset, " + shared_memory_byte_size ", byte_size,
        " lies outside region ", Quoted(name), " of ", size, " bytes"));
  }
  v1::TensorReference ref;
  ref.set_region(it->second.handle);
  ref.set_offset(offset);
  ref.set_byte_size(byte_size);
  return ref;
}

int64_t OipSharedMemory::regions() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<int64_t>(entries_.size());
}

absl::StatusOr<v1::TensorReference> OipShmCaller::Reference(std::string_view what,
                                                            std::string_view name,
                                                            uint64_t offset,
                                                            uint64_t byte_size) const {
  if (shm_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        Sv(what), " names shared_memory_region ", Quoted(name),
        " but system shared memory is disabled on this server (--shared_memory_prefix is "
        "empty)"));
  }
  if (absl::Status s = shm_->Enabled(); !s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(Sv(what), " names shared_memory_region ",
                                                      Quoted(name), " but ", s.message()));
  }
  if (!uid_) uid_ = shm_->Caller(peer_, protocol_);
  if (!uid_->ok()) {
    return absl::Status(uid_->status().code(),
                        absl::StrCat(Sv(what), ": ", uid_->status().message()));
  }
  return shm_->Reference(**uid_, what, name, offset, byte_size);
}

}  // namespace lossd::server
