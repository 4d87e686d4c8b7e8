#include "client/loadtest/shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lossd/v1/lossd.grpc.pb.h"

namespace lossd::loadtest {

namespace {

constexpr int64_t kAlign = 64;

int64_t AlignUp(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

int64_t ItemSize(lossd::v1::DType d) {
  switch (d) {
    case lossd::v1::DTYPE_FLOAT64: return 8;
    case lossd::v1::DTYPE_FLOAT16:
    case lossd::v1::DTYPE_BFLOAT16: return 2;
    default: return 4;
  }
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

void Prepare(grpc::ClientContext* ctx,
             const std::vector<std::pair<std::string, std::string>>& metadata) {
  for (const auto& [k, v] : metadata) ctx->AddMetadata(k, v);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
}

// Values of the loss a request produces: the logits' count, one per row (per_sample_mean), or
// one (mean, sum).
int64_t LossCount(const RequestKind& kind) {
  switch (kind.request.reduction()) {
    case lossd::v1::REDUCTION_NONE: return kind.elements;
    case lossd::v1::REDUCTION_PER_SAMPLE_MEAN:
      return kind.shape.size() > 1 ? kind.elements / kind.shape.back() : 1;
    default: return 1;
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemoryPlan>> SharedMemoryPlan::Create(
    const Endpoint& endpoint, const std::vector<std::pair<std::string, std::string>>& metadata,
    const std::vector<RequestKind>& kinds, int slots) {
  auto plan = std::unique_ptr<SharedMemoryPlan>(new SharedMemoryPlan());
  plan->endpoint_ = endpoint;
  plan->metadata_ = metadata;
  plan->slots_ = slots;
  auto channel = MakeChannel(endpoint, -2);

  // 1. Does the server offer shared memory, and under which prefix?
  lossd::v1::Capabilities caps;
  {
    grpc::ClientContext ctx;
    Prepare(&ctx, metadata);
    const grpc::Status s = lossd::v1::LossService::NewStub(channel)->GetCapabilities(
        &ctx, lossd::v1::GetCapabilitiesRequest(), &caps);
    if (!s.ok()) return FromGrpc(s, absl::StrCat(endpoint.target, ": GetCapabilities"));
  }
  if (!caps.shared_memory() || caps.shared_memory_prefix().empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        endpoint.target, " does not offer shared memory (GetCapabilities: shared_memory ",
        caps.shared_memory() ? "true" : "false", ", prefix \"", caps.shared_memory_prefix(),
        "\"); lossd offers it on its Unix socket and to loopback TCP clients unless started "
        "with an empty --shared_memory_prefix"));
  }

  // 2. Layout: every kind's inputs, then the output slots.
  int64_t at = 0;
  std::vector<lossd::v1::EvaluateRequest> templates;
  for (const RequestKind& kind : kinds) templates.push_back(kind.request);
  std::vector<std::pair<int64_t, const std::string*>> copies;  // offset, bytes
  for (size_t k = 0; k < kinds.size(); ++k) {
    lossd::v1::EvaluateRequest& r = templates[k];
    const lossd::v1::EvaluateRequest& src = kinds[k].request;
    auto place = [&](lossd::v1::Tensor* t, const lossd::v1::Tensor& from) {
      if (from.data().empty()) return;
      const int64_t size = static_cast<int64_t>(from.data().size());
      copies.emplace_back(at, &from.data());
      t->clear_data();
      auto* ref = t->mutable_ref();
      ref->set_offset(static_cast<uint64_t>(at));
      ref->set_byte_size(static_cast<uint64_t>(size));
      at = AlignUp(at + size);
    };
    place(r.mutable_logits(), src.logits());
    place(r.mutable_targets(), src.targets());
    if (src.has_weight()) place(r.mutable_weight(), src.weight());
    if (src.has_bce_with_logits() && src.bce_with_logits().has_pos_weight()) {
      place(r.mutable_bce_with_logits()->mutable_pos_weight(), src.bce_with_logits().pos_weight());
    }
  }
  plan->input_bytes_ = at;
  // Each kind's outputs within a slot: the loss (when it has more than one value), then the
  // gradients asked for.
  std::vector<PlacedOutputs> within(kinds.size());
  int64_t slot_bytes = 0;
  for (size_t k = 0; k < kinds.size(); ++k) {
    const RequestKind& kind = kinds[k];
    const int64_t item = ItemSize(kind.request.logits().dtype());
    int64_t o = 0;
    if (!kind.expect_failure && LossCount(kind) > 1) {
      within[k].loss = o;
      o = AlignUp(o + LossCount(kind) * item);
    }
    if (kind.request.gradients().logits()) {
      within[k].grad_logits = o;
      o = AlignUp(o + kind.elements * item);
    }
    if (kind.request.gradients().targets()) {
      within[k].grad_targets = o;
      o = AlignUp(o + kind.elements * item);
    }
    slot_bytes = std::max(slot_bytes, o);
  }
  plan->slot_bytes_ = std::max<int64_t>(slot_bytes, kAlign);
  const int64_t total = plan->input_bytes_ + plan->slot_bytes_ * slots;

  // 3. The object: created exclusively under the prefix, memory reserved, mapped, filled.
  static std::atomic<int> counter{0};
  std::mt19937_64 rng(std::random_device{}());
  plan->key_ = absl::StrCat(caps.shared_memory_prefix(), "bench-", getpid(), "-", counter++, "-",
                            absl::StrFormat("%08x", static_cast<uint32_t>(rng())));
  const int fd = shm_open(plan->key_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("shm_open(\"", plan->key_, "\"): ",
                                               std::strerror(errno)));
  }
  auto fail = [&](const std::string& what, int err) {
    close(fd);
    shm_unlink(plan->key_.c_str());
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " (", total, " bytes, \"", plan->key_, "\"): ", std::strerror(err)));
  };
  if (ftruncate(fd, static_cast<off_t>(total)) != 0) return fail("ftruncate", errno);
  if (const int e = posix_fallocate(fd, 0, static_cast<off_t>(total)); e != 0) {
    return fail("posix_fallocate", e);
  }
  void* base = mmap(nullptr, static_cast<size_t>(total), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("mmap", errno);
  close(fd);
  plan->base_ = static_cast<char*>(base);
  plan->bytes_ = static_cast<size_t>(total);
  for (const auto& [offset, bytes] : copies) {
    std::memcpy(plan->base_ + offset, bytes->data(), bytes->size());
  }

  // 4. Registration; the name is not needed after it.
  lossd::v1::RegisterRegionRequest reg;
  reg.set_name("lossd-bench");
  reg.set_kind(lossd::v1::REGION_KIND_SYSTEM);
  reg.set_key(plan->key_);
  reg.set_offset(0);
  reg.set_byte_size(static_cast<uint64_t>(total));
  lossd::v1::RegisterRegionResponse registered;
  {
    grpc::ClientContext ctx;
    Prepare(&ctx, metadata);
    const grpc::Status s =
        lossd::v1::SharedMemory::NewStub(channel)->RegisterRegion(&ctx, reg, &registered);
    shm_unlink(plan->key_.c_str());
    if (!s.ok()) {
      return FromGrpc(s, absl::StrCat(endpoint.target, ": RegisterRegion of \"", plan->key_,
                                      "\" (", total, " bytes)"));
    }
  }
  plan->handle_ = registered.region();
  plan->lease_ms_ = registered.lease_ms();

  // 5. The requests of every (kind, slot).
  plan->serialized_.resize(kinds.size());
  plan->placed_.resize(kinds.size());
  for (size_t k = 0; k < kinds.size(); ++k) {
    lossd::v1::EvaluateRequest r = templates[k];
    auto name_region = [&](lossd::v1::Tensor* t) {
      if (t->has_ref()) t->mutable_ref()->set_region(plan->handle_);
    };
    name_region(r.mutable_logits());
    name_region(r.mutable_targets());
    if (r.has_weight()) name_region(r.mutable_weight());
    if (r.has_bce_with_logits() && r.bce_with_logits().has_pos_weight()) {
      name_region(r.mutable_bce_with_logits()->mutable_pos_weight());
    }
    const int64_t item = ItemSize(kinds[k].request.logits().dtype());
    for (int s = 0; s < slots; ++s) {
      const int64_t slot_at = plan->input_bytes_ + plan->slot_bytes_ * s;
      PlacedOutputs p;
      lossd::v1::EvaluateRequest rs = r;
      // mutable_*() sets a placement: only for the outputs this kind produces.
      auto put = [&](int64_t rel, int64_t values, auto mutable_ref, int64_t* out) {
        if (rel < 0) return;
        *out = slot_at + rel;
        lossd::v1::TensorReference* ref = mutable_ref();
        ref->set_region(plan->handle_);
        ref->set_offset(static_cast<uint64_t>(*out));
        ref->set_byte_size(static_cast<uint64_t>(values * item));
      };
      auto* o = rs.mutable_outputs();
      put(within[k].loss, LossCount(kinds[k]), [o] { return o->mutable_loss(); }, &p.loss);
      put(within[k].grad_logits, kinds[k].elements, [o] { return o->mutable_grad_logits(); },
          &p.grad_logits);
      put(within[k].grad_targets, kinds[k].elements, [o] { return o->mutable_grad_targets(); },
          &p.grad_targets);
      if (p.loss < 0 && p.grad_logits < 0 && p.grad_targets < 0) rs.clear_outputs();
      plan->serialized_[k].push_back(rs.SerializeAsString());
      plan->placed_[k].push_back(p);
    }
  }
  for (int s = slots - 1; s >= 0; --s) plan->free_.push_back(s);
  plan->renewer_ = std::thread([p = plan.get()] { p->RenewLoop(); });
  return plan;
}

void SharedMemoryPlan::RenewLoop() {
  auto stub = lossd::v1::SharedMemory::NewStub(MakeChannel(endpoint_, -2));
  std::unique_lock<std::mutex> lock(renew_mu_);
  bool warned = false;
  for (;;) {
    const auto every = std::chrono::milliseconds(std::max<uint32_t>(lease_ms_ / 3, 100));
    if (renew_cv_.wait_for(lock, every, [&] { return stopping_; })) return;
    lock.unlock();
    lossd::v1::RenewLeaseRequest req;
    req.add_regions(handle_);
    lossd::v1::RenewLeaseResponse reply;
    grpc::ClientContext ctx;
    Prepare(&ctx, metadata_);
    const grpc::Status s = stub->RenewLease(&ctx, req, &reply);
    if (s.ok() && reply.unknown_size() > 0) {
      lost_renewals_.fetch_add(1);
      if (!warned) {
        warned = true;
        std::fprintf(stderr,
                     "lossd-bench: the server no longer knows the shared-memory region (lease "
                     "ended); calls referring to it fail with NOT_FOUND\n");
      }
    } else if (s.ok() && reply.lease_ms() > 0) {
      lease_ms_ = reply.lease_ms();
    }
    lock.lock();
  }
}

SharedMemoryPlan::~SharedMemoryPlan() {
  if (renewer_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(renew_mu_);
      stopping_ = true;
    }
    renew_cv_.notify_all();
    renewer_.join();
  }
  if (!handle_.empty()) {
    lossd::v1::UnregisterRegionRequest req;
    req.set_region(handle_);
    lossd::v1::UnregisterRegionResponse reply;
    grpc::ClientContext ctx;
    Prepare(&ctx, metadata_);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
    const grpc::Status s = lossd::v1::SharedMemory::NewStub(MakeChannel(endpoint_, -2))
                               ->UnregisterRegion(&ctx, req, &reply);
    if (!s.ok()) {
      std::fprintf(stderr, "lossd-bench: UnregisterRegion: %s (the lease ends it)\n",
                   s.error_message().c_str());
    }
  }
  if (base_ != nullptr) munmap(base_, bytes_);
}

std::string SharedMemoryPlan::Materialize(int kind, int slot,
                                          lossd::v1::EvaluateResponse* reply) const {
  const PlacedOutputs& p = placed_[kind][slot];
  struct One {
    const char* name;
    int64_t at;
    lossd::v1::Tensor* t;
  };
  for (const One& o : {One{"loss", p.loss, reply->mutable_loss()},
                       One{"grad_logits", p.grad_logits, reply->mutable_grad_logits()},
                       One{"grad_targets", p.grad_targets, reply->mutable_grad_targets()}}) {
    if (o.at < 0) continue;
    const auto& ref = o.t->ref();
    if (!o.t->has_ref() || ref.region() != handle_ || ref.offset() != static_cast<uint64_t>(o.at) ||
        !o.t->data().empty()) {
      return absl::StrCat(o.name, ": not placed where the request asked (offset ", o.at, ")");
    }
    if (ref.byte_size() > bytes_ - static_cast<size_t>(o.at)) {
      return absl::StrCat(o.name, ": byte_size ", ref.byte_size(), " past the region");
    }
    o.t->set_data(std::string(base_ + o.at, ref.byte_size()));
    o.t->clear_ref();
  }
  return "";
}

int SharedMemoryPlan::Acquire() {
  std::lock_guard<std::mutex> lock(free_mu_);
  if (free_.empty()) return -1;
  const int s = free_.back();
  free_.pop_back();
  return s;
}

void SharedMemoryPlan::Release(int slot) {
  std::lock_guard<std::mutex> lock(free_mu_);
  free_.push_back(slot);
}

std::string SharedMemoryPlan::Describe() const {
  auto size = [](double b) {
    return b >= (1 << 20) ? absl::StrFormat("%.1f MiB", b / (1 << 20))
                          : absl::StrFormat("%.1f KiB", b / 1024);
  };
  return absl::StrFormat("shared memory: one region of %s (inputs %s, %d output slot(s) of %s), "
                         "lease %u ms",
                         size(static_cast<double>(bytes_)),
                         size(static_cast<double>(input_bytes_)), slots_,
                         size(static_cast<double>(slot_bytes_)), lease_ms_);
}

}  // namespace lossd::loadtest
