#include "server/oip_models.h"

#include <grpcpp/support/slice.h>

#include <climits>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "lossd/kernels/checked_math.h"
#include "lossd/kernels/dtype.h"
#include "server/message_io.h"

namespace lossd::server {

namespace {

using inference::InferParameter;
using inference::ModelInferRequest;

constexpr absl::string_view kLogits = "LOGITS";
constexpr absl::string_view kTargets = "TARGETS";
constexpr absl::string_view kWeight = "WEIGHT";
constexpr absl::string_view kPosWeight = "POS_WEIGHT";

std::vector<absl::string_view> InputNames(const OipModel& m) {
  if (m.focal) return {kLogits, kTargets, kWeight};
  return {kLogits, kTargets, kWeight, kPosWeight};
}

std::vector<OipOutput> OutputsOf(const OipModel& m) {
  if (m.focal) return {OipOutput::kLoss, OipOutput::kGradLogits};
  return {OipOutput::kLoss, OipOutput::kGradLogits, OipOutput::kGradTargets};
}

std::vector<absl::string_view> ParameterNames(const OipModel& m) {
  if (m.focal) return {"reduction", "alpha", "gamma", "reject_nan", "device"};
  return {"reduction", "ignore_index", "normalize", "label_smoothing", "reject_nan", "device"};
}

// Accepted for compatibility with Triton clients and ignored (docs/interop.md).
bool IgnoredParameter(absl::string_view key) { return key == "priority" || key == "timeout"; }

std::string OutputList(const OipModel& m) {
  std::vector<absl::string_view> names;
  for (OipOutput o : OutputsOf(m)) names.push_back(OipOutputName(o));
  return absl::StrJoin(names, ", ");
}

// The protocol's datatype names of the dtypes lossd takes.
constexpr std::pair<v1::DType, absl::string_view> kDatatypes[] = {
    {v1::DTYPE_FLOAT32, "FP32"},
    {v1::DTYPE_FLOAT64, "FP64"},
    {v1::DTYPE_FLOAT16, "FP16"},
    {v1::DTYPE_BFLOAT16, "BF16"}};

std::optional<v1::DType> ParseDatatype(absl::string_view s) {
  for (const auto& [dtype, name] : kDatatypes) {
    if (s == name) return dtype;
  }
  return std::nullopt;
}

// The parameter's kind and value, e.g. "int64 3" or "string 'x'".
std::string KindAndValue(const InferParameter& p) {
  switch (p.parameter_choice_case()) {
    case InferParameter::kBoolParam:
      return p.bool_param() ? "bool true" : "bool false";
    case InferParameter::kInt64Param:
      return absl::StrCat("int64 ", p.int64_param());
    case InferParameter::kStringParam:
      return absl::StrCat("string '", p.string_param(), "'");
    case InferParameter::kDoubleParam:
      return absl::StrCat("double ", p.double_param());
    case InferParameter::kUint64Param:
      return absl::StrCat("uint64 ", p.uint64_param());
    default:
      return "unset";
  }
}

absl::Status WrongType(absl::string_view key, const InferParameter& p, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("parameter '", key, "' must be ", want,
                                                 "; got ", KindAndValue(p)));
}

absl::StatusOr<bool> BoolParam(absl::string_view key, const InferParameter& p) {
  if (p.parameter_choice_case() != InferParameter::kBoolParam) return WrongType(key, p, "a bool");
  return p.bool_param();
}

absl::StatusOr<double> DoubleParam(absl::string_view key, const InferParameter& p) {
  switch (p.parameter_choice_case()) {
    case InferParameter::kDoubleParam:
      return p.double_param();
    case InferParameter::kInt64Param:
      return static_cast<double>(p.int64_param());
    case InferParameter::kUint64Param:
      return static_cast<double>(p.uint64_param());
    default:
      return WrongType(key, p, "a number (double or int64)");
  }
}

absl::StatusOr<int64_t> IntParam(absl::string_view key, const InferParameter& p) {
  switch (p.parameter_choice_case()) {
    case InferParameter::kInt64Param:
      return p.int64_param();
    case InferParameter::kUint64Param:
      if (p.uint64_param() > static_cast<uint64_t>(INT64_MAX)) {
        return absl::InvalidArgumentError(absl::StrCat("parameter '", key, "' ",
                                                       p.uint64_param(), " is above ", INT64_MAX));
      }
      return static_cast<int64_t>(p.uint64_param());
    default:
      return WrongType(key, p, "an integer (int64)");
  }
}

absl::StatusOr<std::string> StringParam(absl::string_view key, const InferParameter& p) {
  if (p.parameter_choice_case() != InferParameter::kStringParam) {
    return WrongType(key, p, "a string");
  }
  return p.string_param();
}

// Parses p with `parse` (BoolParam, IntParam, DoubleParam) and hands the value to `set`.
template <typename Parse, typename Set>
absl::Status SetParam(absl::string_view key, const InferParameter& p, Parse parse, Set set) {
  auto v = parse(key, p);
  if (!v.ok()) return v.status();
  set(*v);
  return absl::OkStatus();
}

// A string parameter naming one of `values`; the error lists them.
template <typename E, typename Set>
absl::Status EnumParam(absl::string_view key, const InferParameter& p,
                       std::initializer_list<std::pair<absl::string_view, E>> values, Set set) {
  auto v = StringParam(key, p);
  if (!v.ok()) return v.status();
  std::vector<absl::string_view> names;
  for (const auto& [name, value] : values) {
    if (*v == name) {
      set(value);
      return absl::OkStatus();
    }
    names.push_back(name);
  }
  return absl::InvalidArgumentError(absl::StrCat("parameter '", key, "' '", *v,
                                                 "' is not one of ", absl::StrJoin(names, ", ")));
}

absl::Status ApplyParameter(const OipModel& model, const std::string& key,
                            const InferParameter& p, v1::EvaluateRequest* out) {
  if (key == "reduction") {
    return EnumParam<v1::Reduction>(key, p,
                                    {{"none", v1::REDUCTION_NONE},
                                     {"mean", v1::REDUCTION_MEAN},
                                     {"sum", v1::REDUCTION_SUM},
                                     {"per_sample_mean", v1::REDUCTION_PER_SAMPLE_MEAN}},
                                    [&](v1::Reduction r) { out->set_reduction(r); });
  }
  if (key == "device") {
    return EnumParam<v1::Device>(
        key, p, {{"auto", v1::DEVICE_AUTO}, {"cpu", v1::DEVICE_CPU}, {"cuda", v1::DEVICE_CUDA}},
        [&](v1::Device d) { out->set_device(d); });
  }
  if (key == "reject_nan") {
    return SetParam(key, p, BoolParam, [&](bool v) { out->set_reject_nan(v); });
  }
  if (!model.focal) {
    v1::BceWithLogits* bce = out->mutable_bce_with_logits();
    if (key == "ignore_index") {
      return SetParam(key, p, IntParam, [&](int64_t v) { bce->set_ignore_index(v); });
    }
    if (key == "normalize") {
      return SetParam(key, p, BoolParam, [&](bool v) { bce->set_normalize(v); });
    }
    if (key == "label_smoothing") {
      return SetParam(key, p, DoubleParam, [&](double v) { bce->set_label_smoothing(v); });
    }
  } else {
    v1::SigmoidFocalLoss* focal = out->mutable_sigmoid_focal_loss();
    if (key == "alpha" || key == "gamma") {
      return SetParam(key, p, DoubleParam, [&](double v) {
        key == "alpha" ? focal->set_alpha(v) : focal->set_gamma(v);
      });
    }
  }
  if (IgnoredParameter(key)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown parameter '", key, "' for model '", model.name,
                   "'; its parameters are ", absl::StrJoin(ParameterNames(model), ", ")));
}

// Elements of the typed contents other than `expected` (which the datatype selects).
int64_t OtherContents(const inference::InferTensorContents& c, v1::DType dtype) {
  int64_t n = c.bool_contents_size() + c.int_contents_size() + c.int64_contents_size() +
              c.uint_contents_size() + c.uint64_contents_size() + c.bytes_contents_size();
  if (dtype != v1::DTYPE_FLOAT32) n += c.fp32_contents_size();
  if (dtype != v1::DTYPE_FLOAT64) n += c.fp64_contents_size();
  return n;
}

int64_t AllContents(const inference::InferTensorContents& c) {
  return OtherContents(c, v1::DTYPE_UNSPECIFIED);
}

// The fields messages cite, per front-end (docs/interop.md, "HTTP/REST").
std::string RawName(OipProtocol protocol, int index) {
  if (protocol == OipProtocol::kRest) return "binary data";
  return absl::StrCat("raw_input_contents[", index, "]");
}

const char* ContentsName(OipProtocol protocol, bool fp32) {
  if (protocol == OipProtocol::kRest) return "data";
  return fp32 ? "fp32_contents" : "fp64_contents";
}

const char* RawAdvice(OipProtocol protocol) {
  return protocol == OipProtocol::kRest ? "as binary data (parameter binary_data_size)"
                                        : "in raw_input_contents";
}

// The parameters of Triton's system shared memory extension on an input or output.
constexpr absl::string_view kShmRegion = "shared_memory_region";
constexpr absl::string_view kShmByteSize = "shared_memory_byte_size";
constexpr absl::string_view kShmOffset = "shared_memory_offset";

struct ShmParams {
  bool present = false;
  std::string region;
  uint64_t byte_size = 0;
  uint64_t offset = 0;
};

bool IsShmParameter(absl::string_view key) {
  return key == kShmRegion || key == kShmByteSize || key == kShmOffset;
}

// The shared-memory parameters of `params` (the others are ignored here). `what` names the
// tensor ("input 'LOGITS'").
absl::StatusOr<ShmParams> ParseShmParams(
    const std::string& what, const google::protobuf::Map<std::string, InferParameter>& params) {
  ShmParams shm;
  bool has_size = false;
  bool has_offset = false;
  for (const auto& [key, p] : params) {
    if (!IsShmParameter(key)) continue;
    const std::string label = absl::StrCat(what, ": ", key);
    if (key == kShmRegion) {
      auto v = StringParam(label, p);
      if (!v.ok()) return v.status();
      shm.region = *v;
      shm.present = true;
      continue;
    }
    auto v = IntParam(label, p);
    if (!v.ok()) return v.status();
    if (*v < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": parameter '", key, "' ", *v, " is negative"));
    }
    (key == kShmByteSize ? shm.byte_size : shm.offset) = static_cast<uint64_t>(*v);
    (key == kShmByteSize ? has_size : has_offset) = true;
  }
  if (!shm.present && (has_size || has_offset)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " has parameter '", has_size ? kShmByteSize : kShmOffset, "' but no '", kShmRegion,
        "'"));
  }
  if (shm.present && !has_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has parameter '", kShmRegion,
                                                   "' but no '", kShmByteSize, "'"));
  }
  return shm;
}

absl::StatusOr<v1::TensorReference> ShmReference(const OipShmLookup* lookup,
                                                 const std::string& what, const ShmParams& p) {
  if (lookup == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " names shared_memory_region '", p.region,
        "' but system shared memory is disabled on this server (--shared_memory_prefix is "
        "empty)"));
  }
  return lookup->Reference(what, p.region, p.offset, p.byte_size);
}

// One input into `t`: datatype, shape and bytes (moved from raw, or copied from contents).
absl::Status TranslateInput(OipProtocol protocol, const OipModel& model,
                            ModelInferRequest::InferInputTensor* in, std::string* raw,
                            int raw_index, Reservation* reservation, const OipShmLookup* lookup,
                            v1::Tensor* t) {
  const std::string& name = in->name();
  auto dtype = ParseDatatype(in->datatype());
  if (!dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat("input '", name, "': datatype '", in->datatype(), "' of model '",
                     model.name, "' is not supported; expected one of FP32, FP64, FP16, BF16"));
  }
  for (const auto& [key, value] : in->parameters()) {
    if (IsShmParameter(key)) continue;
    return absl::InvalidArgumentError(absl::StrCat(
        "input '", name, "': parameter '", key, "' is not supported (inputs take no parameters ",
        protocol == OipProtocol::kRest ? "but binary_data_size and " : "but ",
        "shared_memory_region, shared_memory_byte_size, shared_memory_offset)"));
  }
  const std::string what = absl::StrCat("input '", name, "'");
  auto shm = ParseShmParams(what, in->parameters());
  if (!shm.ok()) return shm.status();
  std::vector<int64_t> shape(in->shape().begin(), in->shape().end());
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("input '", name, "': shape ",
                                                     ShapeString(shape), " has negative dimension ",
                                                     i, " (", shape[i], ")"));
    }
  }
  const std::optional<int64_t> numel = kernels::CheckedProduct(shape);
  const size_t item = kernels::ItemSize(static_cast<kernels::DType>(*dtype));
  const std::optional<int64_t> bytes =
      numel ? kernels::CheckedMul(*numel, static_cast<int64_t>(item)) : std::nullopt;
  if (!bytes) {
    return absl::InvalidArgumentError(absl::StrCat("input '", name, "': shape ",
                                                   ShapeString(shape),
                                                   " has more elements than int64 can count"));
  }
  t->set_dtype(*dtype);
  for (int64_t d : shape) t->add_shape(d);
  if (shm->present) {
    if (raw != nullptr || (in->has_contents() && AllContents(in->contents()) > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " names shared_memory_region '", shm->region, "' and also has ",
          raw != nullptr ? RawName(protocol, raw_index) : ContentsName(protocol, true),
          "; its bytes come from the region only"));
    }
    if (shm->byte_size != static_cast<uint64_t>(*bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": shared_memory_byte_size ", shm->byte_size, " is not the tensor's ", *bytes,
          " bytes (shape ", ShapeString(shape), " of ", in->datatype(), ")"));
    }
    auto ref = ShmReference(lookup, what, *shm);
    if (!ref.ok()) return ref.status();
    *t->mutable_ref() = *std::move(ref);
    return absl::OkStatus();
  }
  if (raw != nullptr) {
    if (in->has_contents() && AllContents(in->contents()) > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input '", name, "' has both ",
          protocol == OipProtocol::kRest ? "data" : "contents", " and ",
          RawName(protocol, raw_index), "; send its elements in one of them"));
    }
    if (static_cast<int64_t>(raw->size()) != *bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input '", name, "': ", RawName(protocol, raw_index), " has ", raw->size(),
          " bytes, expected ", *bytes, " for shape ", ShapeString(shape), " of ",
          in->datatype()));
    }
    t->mutable_data()->swap(*raw);  // no copy
    return absl::OkStatus();
  }
  const inference::InferTensorContents& c = in->contents();
  if (*dtype == v1::DTYPE_FLOAT16 || *dtype == v1::DTYPE_BFLOAT16) {
    if (*numel == 0 && AllContents(c) == 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "input '", name, "': datatype ", in->datatype(), " has no ",
        protocol == OipProtocol::kRest ? "JSON data" : "typed contents",
        " in the protocol; send its bytes ", RawAdvice(protocol)));
  }
  const bool fp32 = *dtype == v1::DTYPE_FLOAT32;
  const int64_t given = fp32 ? c.fp32_contents_size() : c.fp64_contents_size();
  const char* field = ContentsName(protocol, fp32);
  if (const int64_t other = OtherContents(c, *dtype); other > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input '", name, "': datatype ", in->datatype(), " takes its elements in ", field,
        "; ", other, " elements are in other contents fields"));
  }
  if (given != *numel) {
    return absl::InvalidArgumentError(absl::StrCat("input '", name, "': ", field, " has ", given,
                                                   " elements, expected ", *numel, " for shape ",
                                                   ShapeString(shape)));
  }
  if (reservation != nullptr && *bytes > 0) {
    if (absl::Status s = reservation->Add(*bytes, "a copy of typed contents"); !s.ok()) return s;
  }
  // Little-endian hosts only (as all of lossd): the elements' bytes are the tensor's bytes.
  const void* src = fp32 ? static_cast<const void*>(c.fp32_contents().data())
                         : static_cast<const void*>(c.fp64_contents().data());
  t->set_data(src, static_cast<size_t>(*bytes));
  in->clear_contents();
  return absl::OkStatus();
}

// Elements of `output` for the translated inputs and reduction of `out`; nullopt when the
// inputs are invalid (the Planner then names the error).
std::optional<int64_t> OutputElements(OipOutput output, const v1::EvaluateRequest& out) {
  std::vector<int64_t> shape(out.logits().shape().begin(), out.logits().shape().end());
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
  }
  const std::optional<int64_t> numel = kernels::CheckedProduct(shape);
  if (!numel) return std::nullopt;
  if (output != OipOutput::kLoss) return numel;
  switch (out.reduction()) {
    case v1::REDUCTION_NONE:
      return numel;
    case v1::REDUCTION_PER_SAMPLE_MEAN:
      if (shape.empty()) return std::nullopt;
      shape.pop_back();
      return kernels::CheckedProduct(shape);
    default:
      return 1;
  }
}

// An output written into shared memory: the OutputPlacement of `output` in `out`, covering
// the output's bytes at the start of the given range (which may be larger, as with Triton).
absl::Status PlaceOutput(OipOutput output, const std::string& what, const ShmParams& p,
                         const OipShmLookup* lookup, v1::EvaluateRequest* out) {
  uint64_t size = p.byte_size;
  const std::optional<int64_t> n = OutputElements(output, *out);
  if (n) {
    const int64_t item = static_cast<int64_t>(
        kernels::ItemSize(static_cast<kernels::DType>(out->logits().dtype())));
    const std::optional<int64_t> bytes = kernels::CheckedMul(*n, item);
    if (bytes) {
      if (p.byte_size < static_cast<uint64_t>(*bytes)) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, ": shared_memory_byte_size ", p.byte_size, " is less than the output's ",
            *bytes, " bytes (", *n, " elements of ", OipDatatype(out->logits().dtype()), ")"));
      }
      size = static_cast<uint64_t>(*bytes);
    }
  }
  auto ref = ShmReference(lookup, what, p);
  if (!ref.ok()) return ref.status();
  ref->set_byte_size(size);
  v1::OutputPlacement* placement = out->mutable_outputs();
  switch (output) {
    case OipOutput::kLoss:
      *placement->mutable_loss() = *std::move(ref);
      break;
    case OipOutput::kGradLogits:
      *placement->mutable_grad_logits() = *std::move(ref);
      break;
    case OipOutput::kGradTargets:
      *placement->mutable_grad_targets() = *std::move(ref);
      break;
  }
  return absl::OkStatus();
}

}  // namespace

const std::vector<OipModel>& OipModels() {
  static const std::vector<OipModel> models = {{"bce_with_logits", false},
                                               {"sigmoid_focal_loss", true}};
  return models;
}

absl::StatusOr<const OipModel*> FindOipModel(absl::string_view name, absl::string_view version) {
  for (const OipModel& m : OipModels()) {
    if (m.name != name) continue;
    if (!version.empty() && version != kOipModelVersion) {
      return absl::NotFoundError(absl::StrCat("model '", name, "' has no version '", version,
                                              "'; its only version is '", kOipModelVersion,
                                              "'"));
    }
    return &m;
  }
  std::vector<absl::string_view> names;
  for (const OipModel& m : OipModels()) names.push_back(m.name);
  return absl::NotFoundError(absl::StrCat("unknown model '", name, "'; this server has models ",
                                          absl::StrJoin(names, ", ")));
}

absl::string_view OipOutputName(OipOutput output) {
  static constexpr absl::string_view kNames[] = {"LOSS", "GRAD_LOGITS", "GRAD_TARGETS"};
  static_assert(static_cast<int>(OipOutput::kGradTargets) == 2, "one name per OipOutput");
  return kNames[static_cast<int>(output)];
}

absl::string_view OipDatatype(v1::DType dtype) {
  for (const auto& [d, name] : kDatatypes) {
    if (d == dtype) return name;
  }
  return "";
}

void FillModelMetadata(const OipModel& model, inference::ModelMetadataResponse* response) {
  response->Clear();
  response->set_name(std::string(model.name));
  response->add_versions(std::string(kOipModelVersion));
  response->set_platform(std::string(kOipPlatform));
  // Any shape (up to the server's rank limit) and any of FP32, FP64, FP16, BF16; the metadata
  // lists FP32 and one dimension of any size (docs/interop.md).
  for (absl::string_view name : InputNames(model)) {
    auto* t = response->add_inputs();
    t->set_name(std::string(name));
    t->set_datatype("FP32");
    t->add_shape(-1);
  }
  for (OipOutput o : OutputsOf(model)) {
    auto* t = response->add_outputs();
    t->set_name(std::string(OipOutputName(o)));
    t->set_datatype("FP32");
    t->add_shape(-1);
  }
}

void FillServerMetadata(inference::ServerMetadataResponse* response) {
  response->Clear();
  response->set_name("lossd");
  response->set_version(LOSSD_VERSION);
  response->add_extensions("parameters");
  // Triton's extensions served (oip_statistics.h), under Triton's names.
  response->add_extensions("model_configuration");
  response->add_extensions("statistics");
  response->add_extensions("system_shared_memory");
}

bool OipModelReady(bool draining, absl::string_view name, absl::string_view version) {
  return !draining && FindOipModel(name, version).ok();
}

bool UsesSharedMemory(const ModelInferRequest::InferInputTensor& input) {
  return input.parameters().contains(std::string(kShmRegion));
}

absl::Status TranslateInferRequest(ModelInferRequest* request, Reservation* reservation,
                                   v1::EvaluateRequest* out, OipTranslation* translation,
                                   const OipShmLookup* shm) {
  const int num_raw = request->raw_input_contents_size();
  // Inputs in shared memory have no raw_input_contents entry (as with Triton).
  int num_bytes_inputs = 0;
  for (const auto& in : request->inputs()) num_bytes_inputs += UsesSharedMemory(in) ? 0 : 1;
  if (num_raw > 0 && num_raw != num_bytes_inputs) {
    out->Clear();
    *translation = OipTranslation();
    // The model is named first when it is unknown (NOT_FOUND before INVALID_ARGUMENT).
    auto model = FindOipModel(request->model_name(), request->model_version());
    if (!model.ok()) return model.status();
    return absl::InvalidArgumentError(absl::StrCat(
        "raw_input_contents has ", num_raw, " entries for ", num_bytes_inputs,
        " inputs", num_bytes_inputs != request->inputs_size() ? " not in shared memory" : "",
        "; send one entry per input (in the order of inputs), or none and put each "
        "input's elements in its contents"));
  }
  std::vector<std::string*> raw(static_cast<size_t>(request->inputs_size()), nullptr);
  for (int i = 0, k = 0; i < request->inputs_size() && k < num_raw; ++i) {
    if (!UsesSharedMemory(request->inputs(i))) raw[i] = request->mutable_raw_input_contents(k++);
  }
  return TranslateInferInputs(OipProtocol::kGrpc, request, raw, reservation, out, translation,
                              shm);
}

absl::Status TranslateInferInputs(OipProtocol protocol, ModelInferRequest* request,
                                  const std::vector<std::string*>& raw,
                                  Reservation* reservation, v1::EvaluateRequest* out,
                                  OipTranslation* translation, const OipShmLookup* shm) {
  out->Clear();
  *translation = OipTranslation();
  auto model = FindOipModel(request->model_name(), request->model_version());
  if (!model.ok()) return model.status();
  const OipModel& m = **model;
  translation->model = &m;
  out->set_request_id(request->id());
  if (m.focal) {
    out->mutable_sigmoid_focal_loss();
  } else {
    out->mutable_bce_with_logits();
  }
  if (raw.size() != static_cast<size_t>(request->inputs_size())) {
    return absl::InternalError(absl::StrCat("TranslateInferInputs: ", raw.size(),
                                            " raw entries for ", request->inputs_size(),
                                            " inputs"));
  }
  const std::vector<absl::string_view> names = InputNames(m);
  for (int i = 0; i < request->inputs_size(); ++i) {
    ModelInferRequest::InferInputTensor* in = request->mutable_inputs(i);
    v1::Tensor* t = nullptr;
    if (in->name() == kLogits) {
      t = out->mutable_logits();
    } else if (in->name() == kTargets) {
      t = out->mutable_targets();
    } else if (in->name() == kWeight) {
      t = out->mutable_weight();
    } else if (in->name() == kPosWeight && !m.focal) {
      t = out->mutable_bce_with_logits()->mutable_pos_weight();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown input '", in->name(), "' for model '", m.name,
                       "'; its inputs are ", absl::StrJoin(names, ", ")));
    }
    if (t->dtype() != v1::DTYPE_UNSPECIFIED) {
      return absl::InvalidArgumentError(
          absl::StrCat("input '", in->name(), "' is given more than once"));
    }
    if (absl::Status s = TranslateInput(protocol, m, in, raw[i], i, reservation, shm, t);
        !s.ok()) {
      return s;
    }
  }
  for (absl::string_view required : {kLogits, kTargets}) {
    const bool present = required == kLogits ? out->has_logits() : out->has_targets();
    if (!present) {
      return absl::InvalidArgumentError(absl::StrCat("missing input '", required,
                                                     "'; model '", m.name,
                                                     "' needs LOGITS and TARGETS"));
    }
  }
  for (const auto& [key, value] : request->parameters()) {
    if (absl::Status s = ApplyParameter(m, key, value, out); !s.ok()) return s;
  }
  if (request->outputs_size() == 0) {
    translation->outputs = {OipOutput::kLoss};
  }
  for (const auto& requested : request->outputs()) {
    std::optional<OipOutput> found;
    for (OipOutput o : OutputsOf(m)) {
      if (requested.name() == OipOutputName(o)) found = o;
    }
    if (!found) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown output '", requested.name(), "' for model '", m.name,
                       "'; its outputs are ", OutputList(m)));
    }
    for (const OipOutput o : translation->outputs) {
      if (o == *found) {
        return absl::InvalidArgumentError(
            absl::StrCat("output '", requested.name(), "' is requested more than once"));
      }
    }
    for (const auto& [key, value] : requested.parameters()) {
      if (key == "binary_data") continue;  // a REST notion; gRPC replies are always raw
      if (IsShmParameter(key)) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          "output '", requested.name(), "': parameter '", key,
          "' is not supported (outputs take no parameters but binary_data, "
          "shared_memory_region, shared_memory_byte_size, shared_memory_offset; "
          "classification is not served)"));
    }
    const std::string what = absl::StrCat("output '", requested.name(), "'");
    auto placement = ParseShmParams(what, requested.parameters());
    if (!placement.ok()) return placement.status();
    if (placement->present) {
      if (absl::Status s = PlaceOutput(*found, what, *placement, shm, out); !s.ok()) return s;
    }
    translation->outputs.push_back(*found);
    if (*found == OipOutput::kGradLogits) out->mutable_gradients()->set_logits(true);
    if (*found == OipOutput::kGradTargets) out->mutable_gradients()->set_targets(true);
  }
  return absl::OkStatus();
}

namespace {

constexpr uint8_t kLen = 2;  // wire type of length-delimited fields

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

}  // namespace

const OutputTensor& OipOutputTensor(const ComputeResult& r, OipOutput o) {
  switch (o) {
    case OipOutput::kGradLogits:
      return r.grad_logits;
    case OipOutput::kGradTargets:
      return r.grad_targets;
    default:
      return r.loss;
  }
}

// The reply without raw_output_contents (field 6, the last field: EncodeInferReply appends
// its bytes).
absl::Status FillInferResponseHeader(const OipModel& model, const std::string& id,
                                     const std::vector<OipOutput>& outputs,
                                     const ComputeResult& result,
                                     inference::ModelInferResponse* response) {
  response->Clear();
  response->set_model_name(std::string(model.name));
  response->set_model_version(std::string(kOipModelVersion));
  response->set_id(id);
  (*response->mutable_parameters())["device"].set_string_param(DeviceLabel(result.device));
  for (OipOutput o : outputs) {
    const OutputTensor& t = OipOutputTensor(result, o);
    if (!t.present) {
      return absl::InternalError(absl::StrCat("output ", OipOutputName(o), " was not computed"));
    }
    auto* out = response->add_outputs();
    out->set_name(std::string(OipOutputName(o)));
    out->set_datatype(std::string(OipDatatype(t.dtype)));
    for (int64_t d : t.shape) out->add_shape(d);
  }
  return absl::OkStatus();
}

int64_t InferReplyPayloadBytes(const std::vector<OipOutput>& outputs,
                               const ComputeResult& result) {
  int64_t n = 0;
  for (OipOutput o : outputs) n += static_cast<int64_t>(OipOutputTensor(result, o).block.size());
  return n;
}

absl::Status BuildInferResponse(const OipModel& model, const std::string& id,
                                const std::vector<OipOutput>& outputs,
                                const ComputeResult& result,
                                inference::ModelInferResponse* response) {
  if (absl::Status s = FillInferResponseHeader(model, id, outputs, result, response); !s.ok()) return s;
  for (OipOutput o : outputs) {
    const OutputTensor& t = OipOutputTensor(result, o);
    response->add_raw_output_contents(t.block.empty() ? "" : t.block.data(), t.block.size());
  }
  return absl::OkStatus();
}

absl::Status EncodeInferReply(const OipModel& model, const std::string& id,
                              const std::vector<OipOutput>& outputs, ComputeResult* result,
                              grpc::ByteBuffer* out) {
  inference::ModelInferResponse header;
  if (absl::Status s = FillInferResponseHeader(model, id, outputs, *result, &header); !s.ok()) return s;
  std::string text;
  header.SerializeToString(&text);
  size_t total = text.size();
  for (OipOutput o : outputs) total += OipOutputTensor(*result, o).block.size() + 11;
  if (total > static_cast<size_t>(INT_MAX)) {
    return absl::InternalError(
        absl::StrCat("cannot serialize the reply: ", total, " bytes is over 2 GiB"));
  }
  std::vector<grpc::Slice> slices;
  for (OipOutput o : outputs) {
    OutputTensor& t = const_cast<OutputTensor&>(OipOutputTensor(*result, o));
    text.push_back(static_cast<char>((6 << 3) | kLen));
    AppendVarint(t.block.size(), &text);
    if (t.block.size() >= kZeroCopyBytes) {
      slices.emplace_back(text);
      text.clear();
      slices.push_back(std::move(t.block).ToSlice());
    } else {
      if (t.block.size() > 0) text.append(t.block.data(), t.block.size());
      t.block.Reset();
    }
  }
  if (!text.empty()) slices.emplace_back(text);
  grpc::ByteBuffer buffer(slices.data(), slices.size());
  out->Swap(&buffer);
  return absl::OkStatus();
}

}  // namespace lossd::server
