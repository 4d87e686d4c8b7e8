#include "server/request.h"

#include <cmath>
#include <limits>
#include <optional>

#include "lossd/kernels/checked_math.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lossd::server {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

namespace {

// The data pointer of an empty tensor (never read; kernels and operands want a valid pointer).
const char kNoBytes[1] = {0};

absl::Status SharedMemoryOff(const std::string& field) {
  return absl::FailedPreconditionError(absl::StrCat(
      field, ": shared memory is not enabled on this server (start lossd with "
      "--shared_memory_prefix)"));
}

bool Overlaps(const RegionSpan& a, const RegionSpan& b) {
  if (a.bytes <= 0 || b.bytes <= 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a.data);
  const auto b0 = reinterpret_cast<uintptr_t>(b.data);
  return a0 < b0 + static_cast<uintptr_t>(b.bytes) && b0 < a0 + static_cast<uintptr_t>(a.bytes);
}

// EvaluateRequest.outputs (docs/data-path.md section 5): resolves each placed output, after
// SizeOutputs sized them, and rejects placements of outputs that are not produced and spans
// that overlap another output or an input.
absl::Status PlaceOutputs(const v1::EvaluateRequest& request, const RegionResolver* regions,
                          EvaluatePlan* plan) {
  const v1::OutputPlacement& o = request.outputs();
  const int64_t item = static_cast<int64_t>(kernels::ItemSize(plan->args.dtype));
  struct Output {
    const char* field;
    bool placed;
    const v1::TensorReference& ref;
    bool produced;
    const char* why_not;
    int64_t values;
    void** out;
    uint32_t device_bit;  // kernels::on_device
  };
  const Output outputs[] = {
      {"outputs.loss", o.has_loss(), o.loss(), true, "", plan->loss_count, &plan->loss_out,
       kernels::on_device::kLoss},
      {"outputs.grad_logits", o.has_grad_logits(), o.grad_logits(), plan->grad_logits,
       "gradients.logits is not requested", plan->args.numel, &plan->grad_logits_out,
       kernels::on_device::kGradLogits},
      {"outputs.grad_targets", o.has_grad_targets(), o.grad_targets(), plan->grad_targets,
       "gradients.targets is not requested", plan->args.numel, &plan->grad_targets_out,
       kernels::on_device::kGradTargets},
  };
  const size_t inputs = plan->spans.size();
  for (const Output& out : outputs) {
    if (!out.placed) continue;
    if (!out.produced) {
      return absl::InvalidArgumentError(
          absl::StrCat(out.field, " is set but the request produces no such output (",
                       out.why_not, ")"));
    }
    if (regions == nullptr) return SharedMemoryOff(out.field);
    // values <= max_elements (SizeOutputs): no overflow.
    auto span = regions->Resolve(out.field, out.ref, out.values * item, true);
    if (!span.ok()) return span.status();
    for (size_t k = 0; k < plan->spans.size(); ++k) {
      if (Overlaps(*span, plan->spans[k].span)) {
        return absl::InvalidArgumentError(absl::StrCat(
            out.field, " overlaps ", plan->spans[k].field, " in shared memory (",
            k < inputs ? "an output may not overwrite an input" : "outputs must be disjoint",
            ")"));
      }
    }
    *out.out = span->data != nullptr ? span->data : const_cast<char*>(kNoBytes);
    if (span->device) plan->out_on_device |= out.device_bit;
    plan->spans.push_back(HeldSpan{out.field, *std::move(span)});
  }
  return absl::OkStatus();
}

// The kernels' reduction for a request's (UNSPECIFIED is MEAN); none for an unknown value.
std::optional<kernels::Reduction> KernelReduction(v1::Reduction r) {
  switch (r) {
    case v1::REDUCTION_UNSPECIFIED:
    case v1::REDUCTION_MEAN: return kernels::Reduction::kMean;
    case v1::REDUCTION_SUM: return kernels::Reduction::kSum;
    case v1::REDUCTION_NONE: return kernels::Reduction::kNone;
    case v1::REDUCTION_PER_SAMPLE_MEAN: return kernels::Reduction::kPerSampleMean;
    default: return std::nullopt;
  }
}

}  // namespace

absl::StatusOr<TensorView> DecodeTensor(const std::string& field, const v1::Tensor& t,
                                        const Limits& limits, const std::string_view* data,
                                        const RegionResolver* regions,
                                        std::vector<HeldSpan>* spans) {
  TensorView v;
  switch (t.dtype()) {
    case v1::DTYPE_FLOAT32:
    case v1::DTYPE_FLOAT64:
    case v1::DTYPE_FLOAT16:
    case v1::DTYPE_BFLOAT16:
      v.dtype = static_cast<kernels::DType>(t.dtype());
      break;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError(absl::StrCat(field, ": dtype is unset"));
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": dtype ", static_cast<int>(t.dtype()), " is not a known DType"));
  }
  if (t.shape_size() > limits.max_rank) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": rank ", t.shape_size(),
                                                   " exceeds the maximum ", limits.max_rank));
  }
  v.shape.assign(t.shape().begin(), t.shape().end());
  for (int64_t d : v.shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": shape ", ShapeString(v.shape), " has a negative dimension"));
    }
  }
  const std::optional<int64_t> count = kernels::CheckedProduct(v.shape);
  if (!count) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": shape ", ShapeString(v.shape), " has too many elements (overflow)"));
  }
  const int64_t numel = *count;
  if (numel > limits.max_elements) {
    return absl::ResourceExhaustedError(absl::StrCat(field, " has ", numel,
                                                     " elements, more than the limit ",
                                                     limits.max_elements, " per request"));
  }
  // numel <= max_elements, which the server caps far below 2^61: no overflow.
  const uint64_t expected = static_cast<uint64_t>(numel) * kernels::ItemSize(v.dtype);
  const std::string_view bytes = data != nullptr ? *data : std::string_view(t.data());
  v.numel = numel;
  if (t.has_ref()) {
    // docs/data-path.md section 5: the bytes lie in a registered region.
    if (!bytes.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": both data (", bytes.size(), " bytes) and ref are set; a tensor in shared "
          "memory must have empty data"));
    }
    if (regions == nullptr) return SharedMemoryOff(field + ".ref");
    auto span = regions->Resolve(field + ".ref", t.ref(), static_cast<int64_t>(expected), false);
    if (!span.ok()) return span.status();
    v.data = span->data != nullptr ? span->data : kNoBytes;
    v.device = span->device;
    if (spans != nullptr) spans->push_back(HeldSpan{field + ".ref", *std::move(span)});
    return v;
  }
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": data has ", bytes.size(), " bytes, expected ", expected, " (",
        kernels::DTypeName(v.dtype), " ", ShapeString(v.shape), ")"));
  }
  v.data = bytes.data() != nullptr ? bytes.data() : kNoBytes;
  return v;
}

// Sizes every output before anything is allocated. The loss output can hold more values than
// the inputs: a PER_SAMPLE_MEAN over a zero-size last axis has 0 elements and prod(leading
// dims) NaN means, so it is counted against the same limits as an input tensor.
absl::Status SizeOutputs(const Limits& limits, EvaluatePlan* plan) {
  const std::vector<int64_t> loss_shape = plan->LossShape();
  const std::optional<int64_t> loss_count = kernels::CheckedProduct(loss_shape);
  if (!loss_count) {
    return absl::InvalidArgumentError(absl::StrCat("the loss output shape ",
                                                   ShapeString(loss_shape),
                                                   " has too many elements (overflow)"));
  }
  if (*loss_count > limits.max_elements) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the loss output (shape ", ShapeString(loss_shape), ") has ", *loss_count,
        " values, more than the limit ", limits.max_elements, " per request"));
  }
  const int64_t item = static_cast<int64_t>(kernels::ItemSize(plan->args.dtype));
  // Outputs placed in shared memory (plan->placed) do not travel in the reply.
  const int64_t grads = int64_t{plan->grad_logits && !plan->placed.has_grad_logits()} +
                        int64_t{plan->grad_targets && !plan->placed.has_grad_targets()};
  // Each count is <= max_elements, so with a sane limit these cannot overflow; check anyway.
  std::optional<int64_t> values = kernels::CheckedMul(grads, plan->args.numel);
  if (values && !plan->placed.has_loss()) values = kernels::CheckedAdd(*values, *loss_count);
  const std::optional<int64_t> bytes = values ? kernels::CheckedMul(*values, item) : values;
  if (!bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("the reply's size overflows (loss shape ", ShapeString(loss_shape), ", ",
                     grads, " gradients of ", plan->args.numel, " elements)"));
  }
  if (limits.max_reply_bytes > 0 && *bytes > limits.max_reply_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the reply would carry ", *bytes, " tensor bytes (loss shape ", ShapeString(loss_shape),
        ", ", grads, " gradients of shape ", ShapeString(plan->shape),
        "), more than the message limit ", limits.max_reply_bytes,
        "; split the request or ask for fewer gradients"));
  }
  plan->loss_count = *loss_count;
  plan->reply_bytes = *bytes;
  return absl::OkStatus();
}

absl::StatusOr<EvaluatePlan> PlanEvaluate(const v1::EvaluateRequest& request,
                                          const Limits& limits, const TensorDataViews& views,
                                          const RegionResolver* regions) {
  EvaluatePlan plan;
  if (!request.has_logits()) return absl::InvalidArgumentError("logits: missing");
  if (!request.has_targets()) return absl::InvalidArgumentError("targets: missing");
  auto logits =
      DecodeTensor("logits", request.logits(), limits, views.logits, regions, &plan.spans);
  if (!logits.ok()) return logits.status();
  auto targets =
      DecodeTensor("targets", request.targets(), limits, views.targets, regions, &plan.spans);
  if (!targets.ok()) return targets.status();
  if (targets->shape != logits->shape) {
    return absl::InvalidArgumentError(absl::StrCat("targets shape ", ShapeString(targets->shape),
                                                   " != logits shape ",
                                                   ShapeString(logits->shape)));
  }
  if (request.loss_case() != v1::EvaluateRequest::kBceWithLogits &&
      request.loss_case() != v1::EvaluateRequest::kSigmoidFocalLoss) {
    return absl::InvalidArgumentError(
        "loss is not set or not supported by this server; expected one of: bce_with_logits, "
        "sigmoid_focal_loss");
  }
  const std::optional<kernels::Reduction> reduction = KernelReduction(request.reduction());
  if (!reduction) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reduction ", static_cast<int>(request.reduction()), " is not a known Reduction"));
  }
  plan.args.reduction = *reduction;
  switch (request.device()) {
    case v1::DEVICE_AUTO:
    case v1::DEVICE_CPU:
    case v1::DEVICE_CUDA:
      plan.device = request.device();
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("device ", static_cast<int>(request.device()), " is not a known Device"));
  }
  plan.shape = logits->shape;
  plan.args.numel = logits->numel;
  plan.args.dtype = logits->dtype;
  plan.args.logits = logits->data;
  plan.args.targets_dtype = targets->dtype;
  plan.args.targets = targets->data;
  if (logits->device) plan.args.on_device |= kernels::on_device::kLogits;
  if (targets->device) plan.args.on_device |= kernels::on_device::kTargets;
  plan.nan_checked = {*logits, *targets};
  plan.nan_names = {"logits", "targets"};

  auto operand = [&](const char* name, const v1::Tensor& t, const std::string_view* data,
                     kernels::Operand* out, uint32_t device_bit) -> absl::Status {
    auto view = DecodeTensor(name, t, limits, data, regions, &plan.spans);
    if (!view.ok()) return view.status();
    if (view->device) plan.args.on_device |= device_bit;
    // The host cannot expand an operand in device memory (kernels/include/lossd/kernels/operand.h).
    auto op = kernels::MakeOperand(name, view->dtype, view->data, view->shape, plan.shape,
                                   /*may_copy=*/!view->device);
    if (!op.ok()) {
      if (!view->device) return op.status();
      return absl::Status(op.status().code(),
                          absl::StrCat(name, ".ref: ", op.status().message(),
                                       " (CUDA IPC tensors are not supported there); send ", name,
                                       " as bytes, or expand it"));
    }
    *out = *std::move(op);
    plan.nan_checked.push_back(*view);
    plan.nan_names.push_back(name);
    return absl::OkStatus();
  };
  if (request.has_weight()) {
    if (absl::Status s = operand("weight", request.weight(), views.weight, &plan.args.weight,
                                 kernels::on_device::kWeight);
        !s.ok()) {
      return s;
    }
  }
  plan.grad_logits = request.gradients().logits();
  plan.grad_targets = request.gradients().targets();
  if (request.has_bce_with_logits()) {
    const v1::BceWithLogits& bce = request.bce_with_logits();
    plan.args.loss = kernels::Loss::kBce;
    if (bce.has_pos_weight()) {
      if (absl::Status s =
              operand("pos_weight", bce.pos_weight(), views.pos_weight, &plan.args.pos_weight,
                      kernels::on_device::kPosWeight);
          !s.ok()) {
        return s;
      }
    }
    if (bce.has_ignore_index()) {
      plan.args.has_ignore_index = true;
      plan.args.ignore_index = static_cast<double>(bce.ignore_index());
    }
    plan.args.normalize = bce.normalize();
    const double s = bce.label_smoothing();
    if (!(s >= 0.0 && s <= 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bce_with_logits.label_smoothing ", s, " is outside [0, 1]"));
    }
    plan.args.label_smoothing = s;
  } else {
    const v1::SigmoidFocalLoss& focal = request.sigmoid_focal_loss();
    plan.args.loss = kernels::Loss::kFocal;
    plan.args.focal_alpha = focal.has_alpha() ? focal.alpha() : 0.25;
    plan.args.focal_gamma = focal.has_gamma() ? focal.gamma() : 2.0;
    if (!std::isfinite(plan.args.focal_alpha) || plan.args.focal_alpha > 1.0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sigmoid_focal_loss.alpha ", plan.args.focal_alpha,
          " must be in [0, 1], or negative to disable alpha weighting"));
    }
    if (!(plan.args.focal_gamma >= 0.0 && plan.args.focal_gamma <= 1e4)) {
      return absl::InvalidArgumentError(absl::StrCat("sigmoid_focal_loss.gamma ",
                                                     plan.args.focal_gamma,
                                                     " is outside [0, 10000]"));
    }
    if (plan.grad_targets) {
      return absl::InvalidArgumentError(
          "gradients.targets is not available for sigmoid_focal_loss (only gradients.logits)");
    }
  }
  switch (request.precision()) {
    case v1::PRECISION_DEFAULT:
      break;
    case v1::PRECISION_CORRECTLY_ROUNDED:
      // Computed on the host whatever the device (docs/kernels.md section 8).
      if (plan.args.loss != kernels::Loss::kBce) {
        return absl::InvalidArgumentError(
            "precision PRECISION_CORRECTLY_ROUNDED is only offered for bce_with_logits, not "
            "sigmoid_focal_loss");
      }
      plan.args.precision = kernels::Precision::kCorrectlyRounded;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "precision ", static_cast<int>(request.precision()), " is not a known Precision"));
  }
  if (plan.args.reduction == kernels::Reduction::kPerSampleMean) {
    plan.args.last_dim = plan.shape.empty() ? 1 : plan.shape.back();
  }
  plan.reject_nan = request.reject_nan();
  if (request.has_whole()) {
    const v1::WholeRequest& whole = request.whole();
    if (whole.num_elements() < plan.args.numel) {
      return absl::InvalidArgumentError(absl::StrCat(
          "whole.num_elements ", whole.num_elements(), " is less than this part's ",
          plan.args.numel, " elements (logits shape ", ShapeString(plan.shape), ")"));
    }
    plan.args.whole_numel = whole.num_elements();
    if (whole.has_num_kept()) {
      if (whole.num_kept() < 0 || whole.num_kept() > whole.num_elements()) {
        return absl::InvalidArgumentError(absl::StrCat("whole.num_kept ", whole.num_kept(),
                                                       " is outside [0, whole.num_elements ",
                                                       whole.num_elements(), "]"));
      }
      plan.args.whole_kept = whole.num_kept();
    } else if (plan.args.normalize && plan.args.has_ignore_index) {
      return absl::InvalidArgumentError(
          "whole.num_kept is required with normalize and ignore_index (the whole request's "
          "elements whose target is not ignore_index)");
    }
  }
  if (request.has_outputs()) plan.placed = request.outputs();
  if (absl::Status s = SizeOutputs(limits, &plan); !s.ok()) return s;
  if (request.has_outputs()) {
    if (absl::Status s = PlaceOutputs(request, regions, &plan); !s.ok()) return s;
  }
  if (plan.on_device()) {
    // docs/shared-memory.md, "CUDA IPC regions": device tensors are computed in place by the
    // CUDA backend; nothing that reads tensors on the host may see them.
    std::string field;
    for (const HeldSpan& held : plan.spans) {
      if (held.span.device) {
        field = held.field;
        break;
      }
    }
    if (plan.device == v1::DEVICE_CPU) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": the region is CUDA device memory (REGION_KIND_CUDA_IPC); device CPU "
          "cannot read it; use device AUTO or CUDA"));
    }
    if (plan.args.precision == kernels::Precision::kCorrectlyRounded) {
      return absl::InvalidArgumentError(absl::StrCat(
          "precision PRECISION_CORRECTLY_ROUNDED computes on the host and is not supported "
          "with CUDA IPC tensors (", field, " is CUDA device memory)"));
    }
    if (plan.reject_nan) {
      return absl::InvalidArgumentError(absl::StrCat(
          "reject_nan scans the tensors on the host and is not supported with CUDA IPC "
          "tensors (", field, " is CUDA device memory)"));
    }
  }
  return plan;
}

absl::Status CheckSpans(const EvaluatePlan& plan) {
  for (const HeldSpan& held : plan.spans) {
    if (held.span.damaged != nullptr && held.span.damaged->load()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "region of ", held.field, " shrank during the request (its shared-memory object was "
          "truncated); the results are not valid"));
    }
  }
  return absl::OkStatus();
}

std::vector<int64_t> EvaluatePlan::LossShape() const {
  switch (args.reduction) {
    case kernels::Reduction::kNone:
      return shape;
    case kernels::Reduction::kPerSampleMean:
      return shape.empty() ? std::vector<int64_t>{}
                           : std::vector<int64_t>(shape.begin(), shape.end() - 1);
    default:
      return {};
  }
}

absl::Status CheckNoNan(const EvaluatePlan& plan) {
  for (size_t k = 0; k < plan.nan_checked.size(); ++k) {
    const TensorView& v = plan.nan_checked[k];
    if (v.device) {
      return absl::InvalidArgumentError(absl::StrCat(
          plan.nan_names[k], " is CUDA device memory: reject_nan is not supported for it"));
    }
    for (int64_t i = 0; i < v.numel; ++i) {
      if (std::isnan(kernels::LoadAsDouble(v.dtype, v.data, i))) {
        return absl::InvalidArgumentError(
            absl::StrCat(plan.nan_names[k], " contains NaN at flat index ", i,
                         " (the request asked to reject NaN)"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace lossd::server
