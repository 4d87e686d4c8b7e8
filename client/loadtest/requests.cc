#include "client/loadtest/requests.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"
#include "client/bench/verify.h"

namespace lossd::loadtest {

namespace {

namespace k = lossd::kernels;

k::DType KernelDType(lossd::v1::DType d) { return static_cast<k::DType>(static_cast<int>(d)); }

bench::ValueType ValueTypeOf(lossd::v1::DType d) {
  switch (d) {
    case lossd::v1::DTYPE_FLOAT64: return bench::ValueType::kFloat64;
    case lossd::v1::DTYPE_FLOAT16: return bench::ValueType::kFloat16;
    case lossd::v1::DTYPE_BFLOAT16: return bench::ValueType::kBFloat16;
    default: return bench::ValueType::kFloat32;
  }
}

lossd::v1::Tensor MakeTensor(lossd::v1::DType dtype, const std::vector<double>& values,
                             const std::vector<int64_t>& shape) {
  lossd::v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  const k::DType kd = KernelDType(dtype);
  std::string data(values.size() * k::ItemSize(kd), '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    k::StoreFromDouble(kd, data.data(), static_cast<int64_t>(i), values[i]);
  }
  t.set_data(std::move(data));
  return t;
}

double At(const lossd::v1::Tensor& t, int64_t i) {
  return k::LoadAsDouble(KernelDType(t.dtype()), t.data().data(), i);
}

std::vector<int64_t> ShapeOf(const lossd::v1::Tensor& t) {
  return std::vector<int64_t>(t.shape().begin(), t.shape().end());
}

}  // namespace

std::vector<int64_t> ShapeFor(int64_t n, int64_t cols) {
  if (cols > 1 && n % cols == 0 && n > cols) return {n / cols, cols};
  return {n};
}

namespace {

// The request of a kind from its logits, targets and (optional, full-shape) weight values:
// pos_weight drawn from `rng` when asked for, then serialized, with the float64 reference when
// asked for. kind.shape, kind.elements and kind.entry are set by the caller.
absl::StatusOr<RequestKind> Assemble(RequestKind kind, const std::vector<double>& x,
                                     const std::vector<double>& y, const std::vector<double>& w,
                                     const std::string& id, const RequestOptions& o,
                                     std::mt19937_64& rng, bool with_reference) {
  const int64_t n = kind.elements;
  const int64_t c = kind.shape.back();
  std::uniform_real_distribution<double> positive(0.5, 2);
  std::vector<double> p;
  auto& r = kind.request;
  r.set_request_id(id);
  *r.mutable_logits() = MakeTensor(o.dtype, x, kind.shape);
  if (kind.expect_failure) {
    // Targets one element short: INVALID_ARGUMENT from any correct server.
    *r.mutable_targets() = MakeTensor(o.dtype, std::vector<double>(n - 1, 0.0), {n - 1});
  } else {
    *r.mutable_targets() = MakeTensor(o.dtype, y, kind.shape);
  }
  const bool has_weight = !w.empty();
  if (has_weight) *r.mutable_weight() = MakeTensor(o.dtype, w, kind.shape);
  if (o.focal) {
    auto* f = r.mutable_sigmoid_focal_loss();
    if (o.alpha) f->set_alpha(*o.alpha);
    if (o.gamma) f->set_gamma(*o.gamma);
  } else {
    auto* b = r.mutable_bce_with_logits();
    if (o.pos_weight) {
      p.resize(c);
      for (double& v : p) v = positive(rng);
      *b->mutable_pos_weight() = MakeTensor(o.dtype, p, {c});
    }
    if (o.ignore_index) b->set_ignore_index(*o.ignore_index);
    b->set_normalize(o.normalize);
    b->set_label_smoothing(o.label_smoothing);
  }
  r.set_reduction(o.reduction);
  r.mutable_gradients()->set_logits(o.grad_logits);
  r.mutable_gradients()->set_targets(o.grad_targets);
  r.set_device(o.device);
  r.set_reject_nan(o.reject_nan);
  r.set_precision(o.precision);
  kind.serialized = r.SerializeAsString();
  kind.oip_serialized = OipRequest(r).SerializeAsString();
  {
    lossd::v1::EvaluateResponse echo;
    *echo.mutable_loss() = r.logits();
    if (o.grad_logits) *echo.mutable_grad_logits() = r.logits();
    if (o.grad_targets) *echo.mutable_grad_targets() = r.logits();
    echo.set_num_elements(n);
    echo.mutable_timing()->set_total_ns(1);
    kind.echo_reply_bytes = static_cast<int64_t>(echo.ByteSizeLong());
  }
  kind.label = absl::StrCat(kind.label, n, " [", absl::StrJoin(kind.shape, ","), "]",
                            kind.expect_failure ? " badshape" : "");
  if (!with_reference || kind.expect_failure) return kind;

  // The reference on the bytes actually sent (values rounded to the dtype).
  k::BceArgs a;
  a.numel = n;
  a.dtype = a.targets_dtype = KernelDType(o.dtype);
  a.logits = r.logits().data().data();
  a.targets = r.targets().data().data();
  if (has_weight) {
    auto op = k::MakeOperand("weight", a.dtype, r.weight().data().data(), kind.shape, kind.shape);
    if (!op.ok()) return op.status();
    a.weight = *op;
  }
  if (!o.focal && o.pos_weight) {
    const auto& pw = r.bce_with_logits().pos_weight();
    auto op = k::MakeOperand("pos_weight", a.dtype, pw.data().data(), ShapeOf(pw), kind.shape);
    if (!op.ok()) return op.status();
    a.pos_weight = *op;
  }
  switch (o.reduction) {
    case lossd::v1::REDUCTION_NONE: a.reduction = k::Reduction::kNone; break;
    case lossd::v1::REDUCTION_SUM: a.reduction = k::Reduction::kSum; break;
    case lossd::v1::REDUCTION_PER_SAMPLE_MEAN: a.reduction = k::Reduction::kPerSampleMean; break;
    default: a.reduction = k::Reduction::kMean; break;
  }
  a.last_dim = c;
  if (o.focal) {
    a.loss = k::Loss::kFocal;
    a.focal_alpha = o.alpha.value_or(0.25);
    a.focal_gamma = o.gamma.value_or(2.0);
  } else {
    a.has_ignore_index = o.ignore_index.has_value();
    a.ignore_index = static_cast<double>(o.ignore_index.value_or(-100));
    a.normalize = o.normalize;
    a.label_smoothing = o.label_smoothing;
  }
  const int64_t loss_count = a.reduction == k::Reduction::kNone          ? n
                             : a.reduction == k::Reduction::kPerSampleMean ? n / c
                                                                          : 1;
  kind.loss.resize(loss_count);
  kind.grad_logits.resize(n);
  kind.grad_targets.resize(n);
  k::ReferenceBce(a, kind.loss.data(), kind.grad_logits.data(), kind.grad_targets.data());
  // Gradient scales: the larger term, divided like the gradient (docs/design.md section 4).
  int64_t kept = n;
  if (a.has_ignore_index) {
    kept = 0;
    for (int64_t i = 0; i < n; ++i) kept += At(r.targets(), i) != a.ignore_index;
  }
  double divisor = a.reduction == k::Reduction::kMean            ? static_cast<double>(n)
                   : a.reduction == k::Reduction::kPerSampleMean ? static_cast<double>(c)
                                                                 : 1.0;
  if (a.normalize) divisor *= static_cast<double>(std::max<int64_t>(kept, 1));
  kind.scale_logits.resize(n);
  kind.scale_targets.resize(n);
  const double s = a.label_smoothing;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = At(r.logits(), i);
    const double yi = At(r.targets(), i) * (1 - s) + s / 2;
    const double wi = has_weight ? At(r.weight(), i) : 1.0;
    const double pi = (!o.focal && o.pos_weight) ? At(r.bce_with_logits().pos_weight(), i % c)
                                                 : 1.0;
    auto [gx, gy] = bench::GradTermScale(xi, yi, wi, pi);
    // The focal gradient is computed in double and rounded once: its own value bounds it.
    kind.scale_logits[i] = o.focal ? 0.0 : gx / divisor;
    kind.scale_targets[i] = gy * (1 - s) / divisor;
  }
  kind.has_reference = true;
  return kind;
}

}  // namespace

absl::StatusOr<RequestKind> BuildKind(const bench::MixEntry& entry, const RequestOptions& o,
                                      uint64_t seed, bool with_reference) {
  RequestKind kind;
  kind.entry = entry;
  kind.expect_failure = entry.variant == "badshape";
  kind.elements = entry.elements;
  kind.shape = ShapeFor(entry.elements, o.cols);
  const int64_t n = entry.elements;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> logit(-8, 8), positive(0.5, 2);
  std::vector<double> x(n), y(n), w;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = logit(rng);
    y[i] = static_cast<double>(rng() % 4) / 3;
  }
  if (o.weight) {
    w.resize(n);
    for (double& v : w) v = positive(rng);
  }
  return Assemble(std::move(kind), x, y, w,
                  absl::StrCat("bench-", entry.elements, "-", entry.variant), o, rng,
                  with_reference);
}

absl::StatusOr<RequestKind> BuildKindFromArrays(const TensorValues& logits,
                                                const TensorValues& targets,
                                                const TensorValues* weight,
                                                const RequestOptions& o, uint64_t seed,
                                                bool with_reference) {
  auto shape_text = [](const std::vector<int64_t>& s) {
    return absl::StrCat("(", absl::StrJoin(s, ", "), ")");
  };
  if (logits.shape.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        logits.name, " holds a 0-d array: the logits need at least one dimension"));
  }
  if (logits.values.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(logits.name, " holds no element"));
  }
  if (targets.shape != logits.shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the targets ", targets.name, " have shape ", shape_text(targets.shape), ", the logits ",
        logits.name, " ", shape_text(logits.shape), ": they must be equal"));
  }
  if (weight != nullptr && weight->shape != logits.shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the weight ", weight->name, " has shape ", shape_text(weight->shape), ", the logits ",
        logits.name, " ", shape_text(logits.shape), ": they must be equal"));
  }
  RequestKind kind;
  kind.entry.elements = static_cast<int64_t>(logits.values.size());
  kind.elements = kind.entry.elements;
  kind.shape = logits.shape;
  kind.label = "file ";
  std::mt19937_64 rng(seed);
  return Assemble(std::move(kind), logits.values, targets.values,
                  weight != nullptr ? weight->values : std::vector<double>(), "bench-file", o,
                  rng, with_reference);
}

namespace {

const char* OipDatatype(lossd::v1::DType d) {
  switch (d) {
    case lossd::v1::DTYPE_FLOAT64: return "FP64";
    case lossd::v1::DTYPE_FLOAT16: return "FP16";
    case lossd::v1::DTYPE_BFLOAT16: return "BF16";
    default: return "FP32";
  }
}

const char* ReductionName(lossd::v1::Reduction r) {
  switch (r) {
    case lossd::v1::REDUCTION_NONE: return "none";
    case lossd::v1::REDUCTION_SUM: return "sum";
    case lossd::v1::REDUCTION_PER_SAMPLE_MEAN: return "per_sample_mean";
    default: return "mean";
  }
}

}  // namespace

inference::ModelInferRequest OipRequest(const lossd::v1::EvaluateRequest& r) {
  inference::ModelInferRequest m;
  const bool focal = r.has_sigmoid_focal_loss();
  m.set_model_name(focal ? "sigmoid_focal_loss" : "bce_with_logits");
  m.set_model_version("1");
  m.set_id(r.request_id());
  auto add = [&](const char* name, const lossd::v1::Tensor& t) {
    auto* in = m.add_inputs();
    in->set_name(name);
    in->set_datatype(OipDatatype(t.dtype()));
    for (int64_t d : t.shape()) in->add_shape(d);
    m.add_raw_input_contents(t.data());
  };
  add("LOGITS", r.logits());
  add("TARGETS", r.targets());
  if (r.has_weight()) add("WEIGHT", r.weight());
  auto& params = *m.mutable_parameters();
  params["reduction"].set_string_param(ReductionName(r.reduction()));
  params["device"].set_string_param(r.device() == lossd::v1::DEVICE_CPU    ? "cpu"
                                    : r.device() == lossd::v1::DEVICE_CUDA ? "cuda"
                                                                           : "auto");
  if (r.reject_nan()) params["reject_nan"].set_bool_param(true);
  if (focal) {
    const auto& f = r.sigmoid_focal_loss();
    if (f.has_alpha()) params["alpha"].set_double_param(f.alpha());
    if (f.has_gamma()) params["gamma"].set_double_param(f.gamma());
  } else {
    const auto& b = r.bce_with_logits();
    if (b.has_pos_weight()) add("POS_WEIGHT", b.pos_weight());
    if (b.has_ignore_index()) params["ignore_index"].set_int64_param(b.ignore_index());
    if (b.normalize()) params["normalize"].set_bool_param(true);
    if (b.label_smoothing() != 0) params["label_smoothing"].set_double_param(b.label_smoothing());
  }
  m.add_outputs()->set_name("LOSS");
  if (r.gradients().logits()) m.add_outputs()->set_name("GRAD_LOGITS");
  if (r.gradients().targets()) m.add_outputs()->set_name("GRAD_TARGETS");
  return m;
}

absl::StatusOr<lossd::v1::EvaluateResponse> FromOipReply(
    const lossd::v1::EvaluateRequest& request, const inference::ModelInferResponse& reply) {
  lossd::v1::EvaluateResponse out;
  if (reply.raw_output_contents_size() != reply.outputs_size()) {
    return absl::InvalidArgumentError(absl::StrCat(reply.outputs_size(), " outputs but ",
                                                   reply.raw_output_contents_size(),
                                                   " raw_output_contents"));
  }
  const std::string want = OipDatatype(request.logits().dtype());
  for (int i = 0; i < reply.outputs_size(); ++i) {
    const auto& o = reply.outputs(i);
    lossd::v1::Tensor* t = o.name() == "LOSS"           ? out.mutable_loss()
                           : o.name() == "GRAD_LOGITS"  ? out.mutable_grad_logits()
                           : o.name() == "GRAD_TARGETS" ? out.mutable_grad_targets()
                                                        : nullptr;
    if (t == nullptr) return absl::InvalidArgumentError(absl::StrCat("output '", o.name(), "'"));
    if (t->dtype() != lossd::v1::DTYPE_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat("output '", o.name(), "' twice"));
    }
    if (o.datatype() != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("output '", o.name(), "' is ", o.datatype(), ", not ", want));
    }
    t->set_dtype(request.logits().dtype());
    for (int64_t d : o.shape()) t->add_shape(d);
    t->set_data(reply.raw_output_contents(i));
  }
  if (!out.has_loss()) return absl::InvalidArgumentError("no output 'LOSS'");
  return out;
}

std::string VerifyReply(const RequestKind& kind, const lossd::v1::EvaluateResponse& reply) {
  if (!kind.has_reference) return "";
  const auto& req = kind.request;
  const bench::ValueType vt = ValueTypeOf(req.logits().dtype());
  const int64_t item = static_cast<int64_t>(k::ItemSize(KernelDType(req.logits().dtype())));
  auto check_tensor = [&](const char* name, const lossd::v1::Tensor& t,
                          const std::vector<double>& ref, const std::vector<double>* scale,
                          bool reduced) -> std::string {
    if (t.dtype() != req.logits().dtype()) {
      return absl::StrCat(name, ": dtype ", t.dtype(), " instead of ", req.logits().dtype());
    }
    if (static_cast<int64_t>(t.data().size()) != static_cast<int64_t>(ref.size()) * item) {
      return absl::StrCat(name, ": ", t.data().size(), " bytes instead of ", ref.size() * item);
    }
    for (size_t i = 0; i < ref.size(); ++i) {
      const double got = At(t, static_cast<int64_t>(i));
      const bool ok = reduced ? bench::ReducedWithinBound(vt, got, ref[i])
                              : bench::ElementWithinBound(vt, got, ref[i],
                                                          scale ? (*scale)[i] : 0.0);
      if (!ok) {
        return absl::StrCat(name, "[", i, "] = ", got, ", reference ", ref[i]);
      }
    }
    return "";
  };
  const bool reduced = req.reduction() != lossd::v1::REDUCTION_NONE;
  std::string why = check_tensor("loss", reply.loss(), kind.loss, nullptr, reduced);
  if (why.empty() && req.gradients().logits()) {
    why = check_tensor("grad_logits", reply.grad_logits(), kind.grad_logits, &kind.scale_logits,
                       false);
  }
  if (why.empty() && req.gradients().targets()) {
    why = check_tensor("grad_targets", reply.grad_targets(), kind.grad_targets,
                       &kind.scale_targets, false);
  }
  return why;
}

std::string VerifyAccumulate(const RequestKind& kind, int batches, double loss) {
  if (!kind.has_reference || kind.loss.size() != 1) return "";
  const double ref = kind.request.reduction() == lossd::v1::REDUCTION_SUM
                         ? kind.loss[0] * batches
                         : kind.loss[0];
  // Accumulate replies a double: the dataset's exact sum rounded once.
  if (bench::ReducedWithinBound(bench::ValueType::kFloat64, loss, ref)) return "";
  return absl::StrCat("accumulated loss ", loss, ", reference ", ref);
}

}  // namespace lossd::loadtest
