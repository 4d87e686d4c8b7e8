// libFuzzer target for request validation and CPU computation: the path every LossService
// call takes from a parsed lossd.v1.EvaluateRequest to its reply (server/service.cc,
// server/stream_reactors.cc), built with ASan and UBSan (tests/fuzz/README.md).
//
// LLVMFuzzerTestOneInput parses the input as an EvaluateRequest both with protobuf and with the
// server's own parse of received slices (server/message_io.h), which must agree (inputs that do
// not parse are rejected and never enter the corpus), prepares it with the Planner of a Core
// configured like a small CPU server, computes it with its Executor, and traps when a result
// breaks the contract of request.h, planner.h and executor.h: an error code Prepare/Compute may
// not return, a plan whose sizes disagree with its shapes or exceed the limits, or a reply
// whose tensors do not have the planned sizes. Requests that Accumulate would take are also
// sized and computed as Accumulate does (reduction NONE, the per-element loss values).
//
// LLVMFuzzerCustomMutator mutates the parsed request instead of its bytes: extreme dimensions,
// targets and operand shapes derived from the logits' shape, data of exactly numel * itemsize
// bytes, dtypes, reductions and loss options. A request has to get all of these right at once
// to reach the output sizing and the kernels, which byte-level mutation almost never does.

#include <grpc/grpc.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "server/core.h"
#include "google/protobuf/stubs/logging.h"
#include "lossd/kernels/checked_math.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/v1/lossd.pb.h"
#include "server/message_io.h"
#include "server/metrics.h"
#include "server/request.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

using lossd::kernels::CheckedMul;
using lossd::kernels::CheckedProduct;
using lossd::server::EvaluatePlan;
using lossd::server::Limits;
using lossd::v1::EvaluateRequest;
using lossd::v1::EvaluateResponse;
using lossd::v1::Tensor;
using Rng = std::mt19937_64;

// Small enough that every accepted input is computed in milliseconds.
constexpr int64_t kMaxElements = int64_t{1} << 20;
constexpr int64_t kMaxReplyBytes = int64_t{64} << 20;
// Largest tensor data the mutator writes.
constexpr int64_t kMaxDataBytes = int64_t{64} << 10;
// One more than Limits::max_rank, so that the rank check is reached too.
constexpr int kMaxMutatedRank = 9;

// Prints `what` and traps: an invariant of the code under test does not hold.
[[noreturn]] void Fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "evaluate_fuzzer: invariant violated: %s (%s)\n", what, detail.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

#define FUZZ_REQUIRE(cond, detail)      \
  do {                                  \
    if (!(cond)) Fail(#cond, (detail)); \
  } while (false)

// ---------------------------------------------------------------------------------------------
// The target.

lossd::server::Core& TheCore() {
  // Built once and never destroyed: no destruction-order issues at exit, still reachable for
  // LeakSanitizer.
  static lossd::server::Core* const core = [] {
    static lossd::server::Metrics* const metrics = new lossd::server::Metrics();
    lossd::server::CoreConfig config;
    config.limits.max_elements = kMaxElements;
    config.limits.max_reply_bytes = kMaxReplyBytes;
    config.workers = 1;
    return new lossd::server::Core(config, lossd::kernels::MakeCpuBackend({1}), nullptr, "",
                                   metrics);
  }();
  return *core;
}

std::string Describe(const EvaluatePlan& plan) {
  return "shape " + lossd::server::ShapeString(plan.shape) + ", numel " +
         std::to_string(plan.args.numel) + ", reduction " +
         std::to_string(static_cast<int>(plan.args.reduction)) + ", loss_count " +
         std::to_string(plan.loss_count) + ", reply_bytes " + std::to_string(plan.reply_bytes);
}

// The plan's sizes follow from its shapes and stay within the limits (request.h).
void CheckPlan(const EvaluatePlan& plan, const Limits& limits) {
  const std::string detail = Describe(plan);
  FUZZ_REQUIRE(static_cast<int>(plan.shape.size()) <= limits.max_rank, detail);
  for (int64_t d : plan.shape) FUZZ_REQUIRE(d >= 0, detail);
  const std::optional<int64_t> numel = CheckedProduct(plan.shape);
  FUZZ_REQUIRE(numel.has_value() && *numel == plan.args.numel, detail);
  FUZZ_REQUIRE(plan.args.numel <= limits.max_elements, detail);
  const std::optional<int64_t> loss_count = CheckedProduct(plan.LossShape());
  FUZZ_REQUIRE(loss_count.has_value() && *loss_count == plan.loss_count, detail);
  FUZZ_REQUIRE(plan.loss_count >= 0 && plan.loss_count <= limits.max_elements, detail);
  if (plan.args.reduction == lossd::kernels::Reduction::kPerSampleMean) {
    FUZZ_REQUIRE(plan.args.last_dim == (plan.shape.empty() ? 1 : plan.shape.back()), detail);
  }
  const int64_t item = static_cast<int64_t>(lossd::kernels::ItemSize(plan.args.dtype));
  FUZZ_REQUIRE(item > 0, detail);
  const int64_t grads = int64_t{plan.grad_logits} + int64_t{plan.grad_targets};
  // Both counts are <= max_elements (checked above): no overflow.
  FUZZ_REQUIRE(plan.reply_bytes == (plan.loss_count + grads * plan.args.numel) * item, detail);
  FUZZ_REQUIRE(limits.max_reply_bytes <= 0 || plan.reply_bytes <= limits.max_reply_bytes, detail);
}

bool SameShape(const Tensor& t, const std::vector<int64_t>& shape) {
  return std::vector<int64_t>(t.shape().begin(), t.shape().end()) == shape;
}

// An OK reply carries exactly the tensors the plan sized.
void CheckResponse(const EvaluatePlan& plan, const EvaluateResponse& response) {
  const std::string detail = Describe(plan);
  const size_t item = lossd::kernels::ItemSize(plan.args.dtype);
  const auto dtype = static_cast<lossd::v1::DType>(plan.args.dtype);
  FUZZ_REQUIRE(response.loss().dtype() == dtype, detail);
  FUZZ_REQUIRE(SameShape(response.loss(), plan.LossShape()), detail);
  FUZZ_REQUIRE(response.loss().data().size() == static_cast<size_t>(plan.loss_count) * item,
               detail);
  FUZZ_REQUIRE(response.has_grad_logits() == plan.grad_logits, detail);
  FUZZ_REQUIRE(response.has_grad_targets() == plan.grad_targets, detail);
  auto check_gradient = [&](bool requested, const Tensor& grad) {
    if (!requested) return;
    FUZZ_REQUIRE(grad.dtype() == dtype, detail);
    FUZZ_REQUIRE(SameShape(grad, plan.shape), detail);
    FUZZ_REQUIRE(grad.data().size() == static_cast<size_t>(plan.args.numel) * item, detail);
  };
  check_gradient(plan.grad_logits, response.grad_logits());
  check_gradient(plan.grad_targets, response.grad_targets());
  FUZZ_REQUIRE(response.num_elements() == plan.args.numel, detail);
  FUZZ_REQUIRE(response.device() == lossd::v1::DEVICE_CPU, detail);
  FUZZ_REQUIRE(lossd::server::PayloadBytes(response) == plan.reply_bytes, detail);
}

// Compute on the CPU fails only when reject_nan finds a NaN (no deadline, never cancelled).
void CheckComputeStatus(const EvaluatePlan& plan, const absl::Status& s) {
  if (s.ok()) return;
  FUZZ_REQUIRE(plan.reject_nan && s.code() == absl::StatusCode::kInvalidArgument,
               std::string(s.ToString()));
}

// What Accumulate does with a batch (server/stream_reactors.cc): same plan, reduction NONE,
// no normalize, no gradients, resized, computed with the per-element loss values.
void AccumulateBatch(lossd::server::Core& core, const EvaluateRequest& request,
                     const EvaluatePlan& plan) {
  const lossd::v1::Reduction red = request.reduction();
  if (red != lossd::v1::REDUCTION_UNSPECIFIED && red != lossd::v1::REDUCTION_MEAN &&
      red != lossd::v1::REDUCTION_SUM) {
    return;
  }
  if (request.gradients().logits() || request.gradients().targets()) return;
  if (request.precision() == lossd::v1::PRECISION_CORRECTLY_ROUNDED) return;  // refused first
  EvaluatePlan batch = plan;
  batch.args.reduction = lossd::kernels::Reduction::kNone;
  batch.args.normalize = false;
  batch.grad_logits = batch.grad_targets = false;
  const absl::Status sized = lossd::server::SizeOutputs(core.config().limits, &batch);
  if (!sized.ok()) {
    FUZZ_REQUIRE(sized.code() == absl::StatusCode::kResourceExhausted ||
                     sized.code() == absl::StatusCode::kInvalidArgument,
                 std::string(sized.ToString()));
    return;
  }
  CheckPlan(batch, core.config().limits);
  FUZZ_REQUIRE(batch.loss_count == batch.args.numel, Describe(batch));
  std::vector<double> values(static_cast<size_t>(batch.args.numel));
  lossd::server::CallControl control;
  EvaluateResponse scratch;
  const absl::Status s = core.executor().Compute(control, batch, 0, &scratch, values.data());
  CheckComputeStatus(batch, s);
  if (s.ok()) CheckResponse(batch, scratch);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  // A request_id that is not UTF-8 makes protobuf log one line per parse; drop them.
  google::protobuf::SetLogHandler(nullptr);
  grpc_init();  // slices
  TheCore();
  return 0;
}

// The input as gRPC hands it to the server: slices of a length derived from the input (one
// slice for a third of the inputs), so that tensor data lies in one slice or spans several.
grpc::ByteBuffer AsReceived(const uint8_t* data, size_t size) {
  std::vector<grpc::Slice> slices;
  const size_t piece = size % 3 == 0 ? size + 1 : 1 + size % 4093;
  for (size_t at = 0; at < size; at += piece) {
    slices.emplace_back(data + at, std::min(piece, size - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

bool IsSharedMemoryRequest(const EvaluateRequest& r) {
  return r.has_outputs() || r.logits().has_ref() || r.targets().has_ref() ||
         r.weight().has_ref() || r.bce_with_logits().pos_weight().has_ref();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The server's parse (server/message_io.h) must agree with protobuf's on every input.
  EvaluateRequest request;
  const bool parses = request.ParseFromArray(data, static_cast<int>(size));
  grpc::ByteBuffer received = AsReceived(data, size);
  lossd::server::ReceivedRequest parsed;
  lossd::server::Core& core = TheCore();
  const absl::Status read =
      lossd::server::ParseEvaluateRequest(&received, &core.executor().pool(), nullptr, &parsed);
  FUZZ_REQUIRE(read.ok() == parses, std::string(read.ToString()));
  if (!parses) {
    FUZZ_REQUIRE(read.code() == absl::StatusCode::kInvalidArgument, std::string(read.ToString()));
    return -1;
  }
  FUZZ_REQUIRE(parsed.data(lossd::server::kLogitsData) == request.logits().data(), "logits");
  FUZZ_REQUIRE(parsed.data(lossd::server::kTargetsData) == request.targets().data(), "targets");
  FUZZ_REQUIRE(parsed.data(lossd::server::kWeightData) == request.weight().data(), "weight");
  FUZZ_REQUIRE(parsed.data(lossd::server::kPosWeightData) ==
                   request.bce_with_logits().pos_weight().data(),
               "pos_weight");
  auto plan = core.planner().Prepare(parsed.message(), parsed.views());
  if (!plan.ok()) {
    // Prepare's contract: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, or FAILED_PRECONDITION for
    // CUDA or shared memory on a server without them.
    const absl::StatusCode code = plan.status().code();
    FUZZ_REQUIRE(code == absl::StatusCode::kInvalidArgument ||
                     code == absl::StatusCode::kResourceExhausted ||
                     (code == absl::StatusCode::kFailedPrecondition &&
                      (request.device() == lossd::v1::DEVICE_CUDA ||
                       IsSharedMemoryRequest(request))),
                 std::string(plan.status().ToString()));
    FUZZ_REQUIRE(!plan.status().message().empty(), std::string(plan.status().ToString()));
    return 0;
  }
  CheckPlan(*plan, core.config().limits);
  lossd::server::CallControl control;
  lossd::server::ComputeResult result;
  const absl::Status s = core.executor().Compute(control, *plan, 0, &result);
  CheckComputeStatus(*plan, s);
  if (s.ok()) {
    // The reply as the server sends it, read back by protobuf.
    grpc::ByteBuffer reply;
    const absl::Status encoded =
        lossd::server::EncodeEvaluateReply(request.request_id(), false, &result, &reply);
    FUZZ_REQUIRE(encoded.ok(), std::string(encoded.ToString()));
    grpc::Slice flat;
    FUZZ_REQUIRE(reply.DumpToSingleSlice(&flat).ok(), "reply");
    EvaluateResponse response;
    FUZZ_REQUIRE(response.ParseFromArray(flat.begin(), static_cast<int>(flat.size())),
                 "the encoded reply does not parse");
    FUZZ_REQUIRE(response.request_id() == request.request_id(), "request_id");
    CheckResponse(*plan, response);
  }
  AccumulateBatch(core, request, *plan);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// The structure-aware mutator.

namespace {

// Dimensions on the edges of int32, uint32 and int64 arithmetic, and the small ones that make
// shapes match and broadcast.
constexpr int64_t kExtremeDims[] = {0,
                                    1,
                                    2,
                                    3,
                                    7,
                                    64,
                                    (int64_t{1} << 31) - 1,
                                    int64_t{1} << 31,
                                    (int64_t{1} << 32) - 1,
                                    int64_t{1} << 32,
                                    int64_t{1} << 40,
                                    int64_t{1} << 62,
                                    std::numeric_limits<int64_t>::max(),
                                    -1,
                                    std::numeric_limits<int64_t>::min()};

// Dimensions on the edges of this target's limits: a count just inside or just past
// max_elements, and the element counts at which a float64/float32/float16 reply reaches
// max_reply_bytes.
constexpr int64_t kLimitDims[] = {kMaxElements - 1,   kMaxElements,           kMaxElements + 1,
                                  2 * kMaxElements,   kMaxReplyBytes / 8,     kMaxReplyBytes / 4,
                                  kMaxReplyBytes / 2, kMaxReplyBytes / 2 + 1, kMaxReplyBytes};

enum class Which { kLogits, kTargets, kWeight, kPosWeight };

uint64_t Below(Rng& rng, uint64_t n) { return rng() % n; }
bool OneIn(Rng& rng, uint64_t n) { return rng() % n == 0; }

// One of `values`, uniformly.
template <typename T, size_t N>
T Pick(Rng& rng, const T (&values)[N]) {
  return values[Below(rng, N)];
}

// An optional field: one time in four clear(), else set() with one of `values`.
template <typename T, size_t N, typename Clear, typename Set>
void ClearOrPick(Rng& rng, const T (&values)[N], Clear clear, Set set) {
  if (OneIn(rng, 4)) {
    clear();
  } else {
    set(Pick(rng, values));
  }
}

int64_t PickDim(Rng& rng) {
  switch (Below(rng, 8)) {
    case 0:  // any power of two, and its neighbours: products land on every size class
      return int64_t{1} << Below(rng, 63);
    case 1:
      return (int64_t{1} << Below(rng, 63)) + static_cast<int64_t>(Below(rng, 3)) - 1;
    case 2:
      return static_cast<int64_t>(Below(rng, 17));
    case 3:
      return Pick(rng, kLimitDims);
    default:
      return Pick(rng, kExtremeDims);
  }
}

Which PickTensor(Rng& rng) {
  switch (Below(rng, 8)) {
    case 0:
    case 1:
    case 2:
      return Which::kLogits;
    case 3:
      return Which::kTargets;
    case 4:
    case 5:
      return Which::kWeight;
    default:
      return Which::kPosWeight;
  }
}

// The tensor, created when unset (pos_weight makes the loss BCE).
Tensor* Mutable(EvaluateRequest* r, Which which) {
  switch (which) {
    case Which::kLogits:
      return r->mutable_logits();
    case Which::kTargets:
      return r->mutable_targets();
    case Which::kWeight:
      return r->mutable_weight();
    case Which::kPosWeight:
      return r->mutable_bce_with_logits()->mutable_pos_weight();
  }
  return r->mutable_logits();
}

std::vector<int64_t> ShapeOf(const Tensor& t) { return {t.shape().begin(), t.shape().end()}; }

void SetShape(Tensor* t, const std::vector<int64_t>& shape) {
  t->clear_shape();
  for (int64_t d : shape) t->add_shape(d);
}

// A value for tensor data: mostly ordinary logits (or 0/1 targets), sometimes the values at
// the edges of the math (NaN, infinities, ignore_index -100, huge, tiny).
double PickValue(Rng& rng, bool target, bool specials) {
  if (specials || OneIn(rng, 64)) {
    constexpr double kSpecial[] = {std::numeric_limits<double>::quiet_NaN(),
                                   std::numeric_limits<double>::infinity(),
                                   -std::numeric_limits<double>::infinity(),
                                   -100.0,
                                   1e30,
                                   -1e30,
                                   1e-310,
                                   -0.0,
                                   0.5,
                                   90.0,
                                   -90.0,
                                   65504.0,
                                   1e300};
    return Pick(rng, kSpecial);
  }
  if (target) return static_cast<double>(Below(rng, 2));
  return std::uniform_real_distribution<double>(-20.0, 20.0)(rng);
}

// numel * itemsize of `t` when its dtype is known, its dims are >= 0 and the result fits
// kMaxDataBytes; nullopt otherwise.
std::optional<int64_t> ExactBytes(const Tensor& t) {
  for (int64_t d : t.shape()) {
    if (d < 0) return std::nullopt;
  }
  const std::optional<int64_t> numel = CheckedProduct(ShapeOf(t));
  if (!numel) return std::nullopt;
  const int64_t item =
      static_cast<int64_t>(lossd::kernels::ItemSize(static_cast<lossd::kernels::DType>(t.dtype())));
  const std::optional<int64_t> bytes = CheckedMul(*numel, item);
  if (!bytes || *bytes > kMaxDataBytes) return std::nullopt;
  return bytes;
}

// Rewrites the data of `t` with exactly numel * itemsize bytes of values of its dtype, when
// ExactBytes allows; leaves it unchanged otherwise.
void FixData(Tensor* t, bool target, Rng& rng) {
  const std::optional<int64_t> bytes = ExactBytes(*t);
  if (!bytes) return;
  const auto dtype = static_cast<lossd::kernels::DType>(t->dtype());
  const size_t item = lossd::kernels::ItemSize(dtype);
  std::string data(static_cast<size_t>(*bytes), '\0');
  const bool specials = OneIn(rng, 8);
  for (size_t i = 0; item > 0 && i < data.size() / item; ++i) {
    const double v = PickValue(rng, target, specials && OneIn(rng, 4));
    lossd::kernels::StoreFromDouble(dtype, data.data(), static_cast<int64_t>(i), v);
  }
  t->set_data(std::move(data));
}

bool IsTarget(Which which) { return which == Which::kTargets; }

// Fixes the data of every tensor present whose length is not exact.
void FixAllData(EvaluateRequest* r, Rng& rng) {
  auto fix = [&](Tensor* t, bool target) {
    const std::optional<int64_t> bytes = ExactBytes(*t);
    if (bytes && static_cast<int64_t>(t->data().size()) != *bytes) FixData(t, target, rng);
  };
  if (r->has_logits()) fix(r->mutable_logits(), false);
  if (r->has_targets()) fix(r->mutable_targets(), true);
  if (r->has_weight()) fix(r->mutable_weight(), false);
  if (r->has_bce_with_logits() && r->bce_with_logits().has_pos_weight()) {
    fix(r->mutable_bce_with_logits()->mutable_pos_weight(), false);
  }
}

// An operand shape that broadcasts to `shape` in one of the patterns MakeOperand
// distinguishes: one contiguous group of full dims (a view), independent dims (an expansion),
// or the trailing dims only ([C]).
std::vector<int64_t> DeriveOperandShape(const std::vector<int64_t>& shape, Rng& rng) {
  std::vector<int64_t> out = shape;
  const size_t rank = out.size();
  switch (Below(rng, 3)) {
    case 0:
      if (rank > 0) {
        const size_t lo = Below(rng, rank);
        const size_t hi = lo + 1 + Below(rng, rank - lo);
        for (size_t k = 0; k < rank; ++k) {
          if (k < lo || k >= hi) out[k] = 1;
        }
      }
      break;
    case 1:
      for (int64_t& d : out) {
        if (OneIn(rng, 2)) d = 1;
      }
      break;
    default:
      break;
  }
  // Drop leading dims: a lower-rank operand aligned on the trailing dims.
  if (OneIn(rng, 2) && !out.empty()) out.erase(out.begin(), out.begin() + Below(rng, rank + 1));
  return out;
}

// Options of the losses, with the values on the edges of their validation.
void MutateOptions(EvaluateRequest* r, Rng& rng) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  switch (Below(rng, 6)) {
    case 0: {
      constexpr int64_t kIgnore[] = {-100,
                                     0,
                                     1,
                                     -1,
                                     (int64_t{1} << 53) + 1,
                                     std::numeric_limits<int64_t>::min(),
                                     std::numeric_limits<int64_t>::max()};
      lossd::v1::BceWithLogits* bce = r->mutable_bce_with_logits();
      ClearOrPick(rng, kIgnore, [bce] { bce->clear_ignore_index(); },
                  [bce](int64_t v) { bce->set_ignore_index(v); });
      break;
    }
    case 1:
      r->mutable_bce_with_logits()->set_normalize(!r->bce_with_logits().normalize());
      break;
    case 2: {
      constexpr double kSmoothing[] = {
          0.0, 0.1, 0.5, 1.0, kNaN, -1.0, 2.0, kInf, -0.0, 1e-300, 1.0000000000000002};
      r->mutable_bce_with_logits()->set_label_smoothing(Pick(rng, kSmoothing));
      break;
    }
    case 3: {
      constexpr double kAlpha[] = {0.25, 0.0,   1.0,    -1.0, kNaN, kInf, -kInf, 1.0000000000000002,
                                   -0.0, 1e308, -1e308, 0.5};
      lossd::v1::SigmoidFocalLoss* focal = r->mutable_sigmoid_focal_loss();
      ClearOrPick(rng, kAlpha, [focal] { focal->clear_alpha(); },
                  [focal](double v) { focal->set_alpha(v); });
      break;
    }
    case 4: {
      constexpr double kGamma[] = {0.0,  0.5,  1.0,  1.5,  2.0,    3.0,  1e4, 10000.000000000002,
                                   kNaN, kInf, -0.0, -1.0, 1e-300, 100.0};
      lossd::v1::SigmoidFocalLoss* focal = r->mutable_sigmoid_focal_loss();
      ClearOrPick(rng, kGamma, [focal] { focal->clear_gamma(); },
                  [focal](double v) { focal->set_gamma(v); });
      break;
    }
    default:
      switch (Below(rng, 3)) {
        case 0:
          r->mutable_bce_with_logits();
          break;
        case 1:
          r->mutable_sigmoid_focal_loss();
          break;
        default:
          r->clear_loss();
          break;
      }
      break;
  }
}

// One structured change of `r`.
void MutateOnce(EvaluateRequest* r, Rng& rng) {
  switch (Below(rng, 22)) {
    case 0:
    case 1:
    case 2:
    case 3: {  // one dim to an extreme value
      const Which which = PickTensor(rng);
      Tensor* t = Mutable(r, which);
      if (t->shape_size() == 0) {
        t->add_shape(PickDim(rng));
      } else {
        t->set_shape(static_cast<int>(Below(rng, t->shape_size())), PickDim(rng));
      }
      if (OneIn(rng, 2)) FixData(t, IsTarget(which), rng);
      break;
    }
    case 4: {  // insert a dim
      const Which which = PickTensor(rng);
      Tensor* t = Mutable(r, which);
      if (t->shape_size() >= kMaxMutatedRank) break;
      std::vector<int64_t> shape = ShapeOf(*t);
      shape.insert(shape.begin() + Below(rng, shape.size() + 1), PickDim(rng));
      SetShape(t, shape);
      if (OneIn(rng, 2)) FixData(t, IsTarget(which), rng);
      break;
    }
    case 5: {  // remove a dim
      const Which which = PickTensor(rng);
      Tensor* t = Mutable(r, which);
      if (t->shape_size() == 0) break;
      std::vector<int64_t> shape = ShapeOf(*t);
      shape.erase(shape.begin() + Below(rng, shape.size()));
      SetShape(t, shape);
      if (OneIn(rng, 2)) FixData(t, IsTarget(which), rng);
      break;
    }
    case 6: {  // a fresh logits shape of extreme dims
      std::vector<int64_t> shape(Below(rng, 6));
      for (int64_t& d : shape) d = PickDim(rng);
      SetShape(r->mutable_logits(), shape);
      if (OneIn(rng, 2)) {
        SetShape(r->mutable_targets(), shape);
        FixAllData(r, rng);
      }
      break;
    }
    case 7:
    case 8:
    case 9: {  // targets take the logits' shape (and often dtype): required to get further
      Tensor* targets = r->mutable_targets();
      SetShape(targets, ShapeOf(r->logits()));
      if (OneIn(rng, 2) || targets->dtype() == lossd::v1::DTYPE_UNSPECIFIED) {
        targets->set_dtype(r->logits().dtype());
      }
      FixData(targets, true, rng);
      break;
    }
    case 10:
    case 11: {  // weight or pos_weight broadcast from the logits' shape
      Tensor* t = Mutable(r, OneIn(rng, 2) ? Which::kWeight : Which::kPosWeight);
      SetShape(t, DeriveOperandShape(ShapeOf(r->logits()), rng));
      if (t->dtype() == lossd::v1::DTYPE_UNSPECIFIED || OneIn(rng, 4)) {
        t->set_dtype(static_cast<lossd::v1::DType>(1 + Below(rng, 4)));
      }
      FixData(t, false, rng);
      break;
    }
    case 12: {  // dtype 0..5 (1..4 are valid)
      const Which which = PickTensor(rng);
      Tensor* t = Mutable(r, which);
      t->set_dtype(static_cast<lossd::v1::DType>(Below(rng, 6)));
      if (!OneIn(rng, 4)) FixData(t, IsTarget(which), rng);
      break;
    }
    case 13:
    case 14:
    case 15: {  // exact data length
      const Which which = PickTensor(rng);
      FixData(Mutable(r, which), IsTarget(which), rng);
      break;
    }
    case 16: {  // data length off by a few bytes
      Tensor* t = Mutable(r, PickTensor(rng));
      std::string* data = t->mutable_data();
      const size_t k = 1 + Below(rng, 8);
      if (OneIn(rng, 2) && data->size() >= k) {
        data->resize(data->size() - k);
      } else if (data->size() + k <= static_cast<size_t>(kMaxDataBytes)) {
        for (size_t i = 0; i < k; ++i) data->push_back(static_cast<char>(rng()));
      }
      break;
    }
    case 17: {  // reduction 0..5; PER_SAMPLE_MEAN (4) a little more often
      const int red =
          OneIn(rng, 4) ? lossd::v1::REDUCTION_PER_SAMPLE_MEAN : static_cast<int>(Below(rng, 6));
      r->set_reduction(static_cast<lossd::v1::Reduction>(red));
      break;
    }
    case 18:
      MutateOptions(r, rng);
      break;
    case 19: {  // gradients, reject_nan, device 0..3 (2 = CUDA, 3 unknown)
      switch (Below(rng, 3)) {
        case 0:
          r->mutable_gradients()->set_logits(OneIn(rng, 2));
          r->mutable_gradients()->set_targets(OneIn(rng, 2));
          break;
        case 1:
          r->set_reject_nan(!r->reject_nan());
          break;
        default:
          r->set_device(
              static_cast<lossd::v1::Device>(OneIn(rng, 2) ? Below(rng, 2) : Below(rng, 4)));
          break;
      }
      if (OneIn(rng, 4)) {  // a part of a larger request: whole counts near and past the edges
        const int64_t dims[] = {0, 1, 7, int64_t{1} << 31, int64_t{1} << 62,
                                std::numeric_limits<int64_t>::max(), -1};
        lossd::v1::WholeRequest* whole = r->mutable_whole();
        whole->set_num_elements(Pick(rng, dims));
        if (OneIn(rng, 2)) whole->set_num_kept(Pick(rng, dims));
        if (OneIn(rng, 4)) r->clear_whole();
      }
      break;
    }
    case 20:  // drop an operand
      if (OneIn(rng, 2)) {
        r->clear_weight();
      } else if (r->has_bce_with_logits()) {
        r->mutable_bce_with_logits()->clear_pos_weight();
      }
      break;
    default: {  // a tensor of the same shape as the logits, data fixed: weight, targets
      const Which which = OneIn(rng, 2) ? Which::kWeight : Which::kTargets;
      Tensor* t = Mutable(r, which);
      SetShape(t, ShapeOf(r->logits()));
      if (t->dtype() == lossd::v1::DTYPE_UNSPECIFIED) t->set_dtype(r->logits().dtype());
      FixData(t, IsTarget(which), rng);
      break;
    }
  }
}

// A small valid request: BCE, float32 [2,3], MEAN.
EvaluateRequest DefaultRequest(Rng& rng) {
  EvaluateRequest r;
  for (Tensor* t : {r.mutable_logits(), r.mutable_targets()}) {
    t->set_dtype(lossd::v1::DTYPE_FLOAT32);
    t->add_shape(2);
    t->add_shape(3);
  }
  FixData(r.mutable_logits(), false, rng);
  FixData(r.mutable_targets(), true, rng);
  r.mutable_bce_with_logits();
  r.set_reduction(lossd::v1::REDUCTION_MEAN);
  return r;
}

// Writes `r` into data when it fits max_size; returns its size, or 0 when it does not fit.
size_t Emit(const EvaluateRequest& r, uint8_t* data, size_t max_size) {
  std::string out;
  if (!r.SerializeToString(&out) || out.size() > max_size) return 0;
  std::memcpy(data, out.data(), out.size());
  return out.size();
}

}  // namespace

// Contract (libFuzzer): mutates data[0, size) in place into at most max_size bytes and returns
// the new size; deterministic for a given seed.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  Rng rng(seed);
  if (OneIn(rng, 8)) return LLVMFuzzerMutate(data, size, max_size);
  EvaluateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) request = DefaultRequest(rng);
  const int mutations = 1 + static_cast<int>(Below(rng, 3));
  for (int i = 0; i < mutations; ++i) MutateOnce(&request, rng);
  // Exact data lengths are what gets a request past DecodeTensor to the deep code.
  if (OneIn(rng, 2)) FixAllData(&request, rng);
  const size_t out = Emit(request, data, max_size);
  return out > 0 ? out : LLVMFuzzerMutate(data, size, max_size);
}

// Contract (libFuzzer): writes a combination of the two inputs into out (at most max_out_size
// bytes) and returns its size; 0 when there is none.
extern "C" size_t LLVMFuzzerCustomCrossOver(const uint8_t* data1, size_t size1,
                                            const uint8_t* data2, size_t size2, uint8_t* out,
                                            size_t max_out_size, unsigned int seed) {
  Rng rng(seed);
  EvaluateRequest a;
  EvaluateRequest b;
  if (!a.ParseFromArray(data1, static_cast<int>(size1)) ||
      !b.ParseFromArray(data2, static_cast<int>(size2))) {
    return 0;
  }
  if (OneIn(rng, 2)) *a.mutable_logits() = b.logits();
  if (OneIn(rng, 2)) *a.mutable_targets() = b.targets();
  if (OneIn(rng, 2)) {
    if (b.has_weight()) {
      *a.mutable_weight() = b.weight();
    } else {
      a.clear_weight();
    }
  }
  if (OneIn(rng, 2)) {
    if (b.has_bce_with_logits()) {
      *a.mutable_bce_with_logits() = b.bce_with_logits();
    } else if (b.has_sigmoid_focal_loss()) {
      *a.mutable_sigmoid_focal_loss() = b.sigmoid_focal_loss();
    } else {
      a.clear_loss();
    }
  }
  if (OneIn(rng, 2)) a.set_reduction(b.reduction());
  if (OneIn(rng, 2)) *a.mutable_gradients() = b.gradients();
  return Emit(a, out, max_out_size);
}
