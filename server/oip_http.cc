#include "server/oip_http.h"

#include <civetweb.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <string_view>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/call_record.h"
#include "server/log.h"
#include "lossd/kernels/dtype.h"
#include "server/message_io.h"
#include "server/oip_models.h"
#include "server/oip_shm.h"
#include "server/oip_statistics.h"

namespace lossd::server {

namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;  // replies keep the protocol's field order
using inference::InferParameter;
using inference::ModelInferRequest;

// Deepest nesting of arrays and objects a request's JSON may have: a tensor of the highest rank
// (8, docs/design.md) as nested arrays is 12 levels deep. Checked before the parse, so that
// nothing recurses on a client's nesting.
constexpr int kMaxJsonDepth = 64;
// Worst case of the parsed document's bytes per byte of JSON: "0," is one 16-byte value in an
// array whose capacity may be twice its size. The parse is charged this much before it runs.
constexpr int64_t kJsonDocumentFactor = 16;
// Worst case of the bytes a JSON reply spends on one element: 24 characters of the shortest
// double ("-1.2345678901234567e-308") and a comma.
constexpr int64_t kJsonElementBytes = 25;
// civetweb worker threads: requests served at once (each holds one connection while it lasts,
// idle keep-alive connections too).
constexpr const char* kThreads = "32";
// mg_write takes at most INT_MAX bytes at once.
constexpr size_t kWriteChunk = size_t{1} << 30;

// What only HTTP can refuse (no status code of its own): the HTTP status, with the status code
// the call counts under in metrics and logs.
struct HttpError {
  int http = 0;  // 0: HttpStatus(status.code())
  absl::Status status;
};

// Admission::Admit's rule (draining, bearer token) for the Authorization header.
absl::Status Admit(const Admission& admission, const HttpRequest& r) {
  const char* header = r.header ? r.header("Authorization") : nullptr;
  return admission.Admit(
      header == nullptr ? std::nullopt : std::optional<std::string_view>(header),
      "\"Authorization: Bearer <token>\" header");
}

// A JSON string literal of `s` (invalid UTF-8 replaced).
std::string Quote(absl::string_view s) {
  return Json(std::string(s)).dump(-1, ' ', false, Json::error_handler_t::replace);
}

// A client's JSON value for a message, cut to 40 characters.
std::string Show(const Json& v) {
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 40) s = absl::StrCat(s.substr(0, 37), "...");
  return s;
}

const char* TypeName(const Json& v) {
  if (v.is_number_float()) return "number";
  if (v.is_number()) return "integer";
  return v.type_name();
}

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 429: return "Too Many Requests";
    case 499: return "Client Closed Request";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Internal Server Error";
  }
}

HttpResponse JsonResponse(int status, std::string body) {
  HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

HttpResponse ErrorResponse(int status, absl::string_view message) {
  HttpResponse r = JsonResponse(status, absl::StrCat("{\"error\":", Quote(message), "}"));
  if (status == 401) r.headers.emplace_back("WWW-Authenticate", "Bearer");
  return r;
}

HttpResponse ErrorResponse(const HttpError& e) {
  return ErrorResponse(e.http != 0 ? e.http : HttpStatus(e.status.code()), e.status.message());
}

// A call that is not ModelInfer: metrics under `method`, a log line when it failed.
void Count(Core* core, const char* method, const HttpRequest& r, const HttpError& e) {
  CallRecord(&core->metrics(), method, r.peer, "http", absl::GetCurrentTimeNanos())
      .Finish(e.status);
}

// ---- routes -----------------------------------------------------------------------------

enum class RouteKind {
  kNone,
  kServerMetadata,
  kLive,
  kReady,
  kModelMetadata,
  kModelReady,
  kInfer,
  kModelStatistics,  // Triton's statistics extension (oip_statistics.h)
  kModelConfig,      // Triton's model configuration extension
  kShmStatus,        // Triton's system shared memory extension (oip_shm.h)
  kShmRegister,
  kShmUnregister
};

struct Route {
  RouteKind kind = RouteKind::kNone;
  std::string model;
  std::string version;
};

Route ParseRoute(absl::string_view path) {
  std::vector<absl::string_view> parts = absl::StrSplit(path, '/');
  Route route;
  // "/v2/x" splits into "", "v2", "x"; a trailing slash adds an empty part.
  if (parts.size() < 2 || !parts[0].empty() || parts[1] != "v2") return route;
  parts.erase(parts.begin());
  if (parts.size() > 1 && parts.back().empty()) parts.pop_back();
  if (parts.size() == 1) {
    route.kind = RouteKind::kServerMetadata;
  } else if (parts[1] == "systemsharedmemory") {
    // /v2/systemsharedmemory[/region/{name}]/{status|register|unregister}; route.model holds
    // the region's name ("" for all).
    absl::string_view action;
    if (parts.size() == 3) {
      action = parts[2];
    } else if (parts.size() == 5 && parts[2] == "region" && !parts[3].empty()) {
      route.model = std::string(parts[3]);
      action = parts[4];
    }
    if (action == "status") route.kind = RouteKind::kShmStatus;
    if (action == "unregister") route.kind = RouteKind::kShmUnregister;
    if (action == "register" && !route.model.empty()) route.kind = RouteKind::kShmRegister;
  } else if (parts[1] == "health" && parts.size() == 3) {
    if (parts[2] == "live") route.kind = RouteKind::kLive;
    if (parts[2] == "ready") route.kind = RouteKind::kReady;
  } else if (parts[1] == "models" && parts.size() == 3 && parts[2] == "stats") {
    route.kind = RouteKind::kModelStatistics;  // every model
  } else if (parts[1] == "models" && parts.size() >= 3) {
    route.model = std::string(parts[2]);
    size_t i = 3;
    if (parts.size() >= 5 && parts[3] == "versions") {
      route.version = std::string(parts[4]);
      i = 5;
    }
    if (i == parts.size()) {
      route.kind = RouteKind::kModelMetadata;
    } else if (i + 1 == parts.size() && parts[i] == "ready") {
      route.kind = RouteKind::kModelReady;
    } else if (i + 1 == parts.size() && parts[i] == "infer") {
      route.kind = RouteKind::kInfer;
    } else if (i + 1 == parts.size() && parts[i] == "stats") {
      route.kind = RouteKind::kModelStatistics;
    } else if (i + 1 == parts.size() && parts[i] == "config") {
      route.kind = RouteKind::kModelConfig;
    }
  }
  return route;
}

// ---- JSON of the replies ------------------------------------------------------------------

std::string ServerMetadataJson() {
  inference::ServerMetadataResponse m;
  FillServerMetadata(&m);
  m.add_extensions("binary_tensor_data");
  OrderedJson j = {
      {"name", m.name()}, {"version", m.version()}, {"extensions", OrderedJson::array()}};
  for (const std::string& e : m.extensions()) j["extensions"].push_back(e);
  return j.dump();
}

std::string ModelMetadataJson(const OipModel& model) {
  inference::ModelMetadataResponse m;
  FillModelMetadata(model, &m);
  auto tensors = [](const auto& list) {
    OrderedJson out = OrderedJson::array();
    for (const auto& t : list) {
      OrderedJson shape = OrderedJson::array();
      for (int64_t d : t.shape()) shape.push_back(d);
      out.push_back({{"name", t.name()}, {"datatype", t.datatype()}, {"shape", shape}});
    }
    return out;
  };
  OrderedJson versions = OrderedJson::array();
  for (const std::string& v : m.versions()) versions.push_back(v);
  OrderedJson j = {{"name", m.name()},
                   {"versions", versions},
                   {"platform", m.platform()},
                   {"inputs", tensors(m.inputs())},
                   {"outputs", tensors(m.outputs())}};
  return j.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

// Appends `v` as a JSON number that parses back to exactly `v` (the shortest decimal of the
// double: exact for every FP32, FP16 and BF16 value too, which are doubles exactly); NaN and
// infinities, which JSON has no numbers for, as the strings "NaN", "Infinity", "-Infinity".
void AppendNumber(double v, std::string* out) {
  if (std::isnan(v)) {
    out->append("\"NaN\"");
  } else if (std::isinf(v)) {
    out->append(v > 0 ? "\"Infinity\"" : "\"-Infinity\"");
  } else {
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof(buf), v);
    out->append(buf, r.ptr);
  }
}

// ---- JSON of an infer request -------------------------------------------------------------

// INVALID_ARGUMENT when arrays and objects nest deeper than kMaxJsonDepth (strings skipped).
absl::Status CheckNesting(absl::string_view text) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the request's JSON nests arrays and objects deeper than ", kMaxJsonDepth,
            " levels (at byte ", i, ")"));
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return absl::OkStatus();
}

// A JSON parameter value as an InferParameter: bool, integer (int64, or uint64 above its
// range), number (double) or string.
absl::Status ToParameter(absl::string_view where, const std::string& key, const Json& v,
                         InferParameter* p) {
  if (v.is_boolean()) {
    p->set_bool_param(v.get<bool>());
  } else if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      p->set_int64_param(static_cast<int64_t>(u));
    } else {
      p->set_uint64_param(u);
    }
  } else if (v.is_number_integer()) {
    p->set_int64_param(v.get<int64_t>());
  } else if (v.is_number_float()) {
    p->set_double_param(v.get<double>());
  } else if (v.is_string()) {
    p->set_string_param(v.get<std::string>());
  } else {
    return absl::InvalidArgumentError(absl::StrCat(where, "parameter '", key,
                                                   "' must be a bool, number or string; got ",
                                                   TypeName(v), " ", Show(v)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> NonNegativeInteger(const Json& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(u);
    }
  } else if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    return v.get<int64_t>();
  }
  return absl::InvalidArgumentError("");
}

// Elements of nested arrays (row-major), or an error naming the first that is not an array or
// an element; `depth` is bounded by CheckNesting.
absl::Status CountElements(const std::string& name, const Json& v, int64_t* n) {
  for (const Json& e : v) {
    if (e.is_array()) {
      if (absl::Status s = CountElements(name, e, n); !s.ok()) return s;
    } else {
      ++*n;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<double> Element(const std::string& name, const Json& e, int64_t index) {
  if (e.is_number()) return e.get<double>();
  if (e.is_string()) {
    const std::string& s = e.get_ref<const std::string&>();
    if (s == "NaN") return std::numeric_limits<double>::quiet_NaN();
    if (s == "Infinity") return std::numeric_limits<double>::infinity();
    if (s == "-Infinity") return -std::numeric_limits<double>::infinity();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "input '", name, "': data element ", index, " is ", TypeName(e), " ", Show(e),
      "; elements are numbers (or \"NaN\", \"Infinity\", \"-Infinity\")"));
}

// Appends the elements of nested arrays `v` to `out` (fp32 or fp64 contents).
template <typename T>
absl::Status AppendElements(const std::string& name, bool check_range, const Json& v,
                            google::protobuf::RepeatedField<T>* out) {
  for (const Json& e : v) {
    if (e.is_array()) {
      if (absl::Status s = AppendElements(name, check_range, e, out); !s.ok()) return s;
      continue;
    }
    auto d = Element(name, e, out->size());
    if (!d.ok()) return d.status();
    const T value = static_cast<T>(*d);
    if (check_range && std::isinf(value) && std::isfinite(*d)) {
      return absl::InvalidArgumentError(absl::StrCat("input '", name, "': data element ",
                                                     out->size(), " (", Show(e),
                                                     ") is outside the range of FP32"));
    }
    out->Add(value);
  }
  return absl::OkStatus();
}

absl::Status UnknownField(absl::string_view where, const std::string& key,
                          absl::string_view fields) {
  return absl::InvalidArgumentError(
      absl::StrCat("unknown field ", Quote(key), " in ", where, "; its fields are ", fields));
}

absl::Status WrongType(absl::string_view what, const Json& v, absl::string_view want) {
  return absl::InvalidArgumentError(
      absl::StrCat(what, " must be ", want, "; got ", TypeName(v), " ", Show(v)));
}

absl::Status ParseInput(const Json& j, int index, Reservation* reservation,
                        ModelInferRequest::InferInputTensor* in, int64_t* binary_size) {
  const std::string where = absl::StrCat("inputs[", index, "]");
  if (!j.is_object()) return WrongType(where, j, "an object");
  const auto name = j.find("name");
  if (name == j.end() || !name->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, " needs a string \"name\""));
  }
  in->set_name(name->get<std::string>());
  const std::string label = absl::StrCat("input '", in->name(), "'");
  const Json* data = nullptr;
  bool has_shape = false, has_datatype = false;
  for (const auto& [key, v] : j.items()) {
    if (key == "name") continue;
    if (key == "datatype") {
      if (!v.is_string()) return WrongType(absl::StrCat(label, ": datatype"), v, "a string");
      in->set_datatype(v.get<std::string>());
      has_datatype = true;
    } else if (key == "shape") {
      if (!v.is_array()) return WrongType(absl::StrCat(label, ": shape"), v, "an array");
      for (size_t k = 0; k < v.size(); ++k) {
        const Json& d = v[k];
        if (d.is_number_unsigned() &&
            d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          return absl::InvalidArgumentError(absl::StrCat(label, ": shape[", k, "] ", Show(d),
                                                         " is above ", INT64_MAX));
        }
        if (!d.is_number_integer()) {
          return WrongType(absl::StrCat(label, ": shape[", k, "]"), d, "an integer");
        }
        in->add_shape(d.get<int64_t>());  // negative: TranslateInferInputs names it
      }
      has_shape = true;
    } else if (key == "parameters") {
      if (!v.is_object()) {
        return WrongType(absl::StrCat(label, ": parameters"), v, "an object");
      }
      for (const auto& [pkey, pv] : v.items()) {
        if (pkey == "binary_data_size") {
          auto size = NonNegativeInteger(pv);
          if (!size.ok()) {
            return WrongType(absl::StrCat(label, ": parameter 'binary_data_size'"), pv,
                             "a non-negative integer");
          }
          *binary_size = *size;
          continue;
        }
        // Any other is refused by TranslateInferInputs, which names it.
        if (absl::Status s = ToParameter(absl::StrCat(label, ": "), pkey, pv,
                                         &(*in->mutable_parameters())[pkey]);
            !s.ok()) {
          return s;
        }
      }
    } else if (key == "data") {
      if (!v.is_array()) return WrongType(absl::StrCat(label, ": data"), v, "an array");
      data = &v;
    } else {
      return UnknownField(absl::StrCat("input '", in->name(), "'"), key,
                          "name, shape, datatype, parameters, data");
    }
  }
  if (!has_shape || !has_datatype) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, " needs \"", has_shape ? "datatype" : "shape", "\""));
  }
  if (data == nullptr) return absl::OkStatus();
  int64_t n = 0;
  if (absl::Status s = CountElements(in->name(), *data, &n); !s.ok()) return s;
  // FP64 elements go to fp64_contents; all others to fp32_contents, where
  // TranslateInferInputs refuses them for any datatype but FP32 (FP16 and BF16 travel as
  // binary data only; others are not served).
  const bool fp64 = in->datatype() == "FP64";
  if (reservation != nullptr && n > 0) {
    if (absl::Status s = reservation->Add(n * (fp64 ? 8 : 4), "the JSON data of the inputs");
        !s.ok()) {
      return s;
    }
  }
  if (fp64) {
    in->mutable_contents()->mutable_fp64_contents()->Reserve(static_cast<int>(
        std::min<int64_t>(n, std::numeric_limits<int>::max())));
    return AppendElements(in->name(), false, *data,
                          in->mutable_contents()->mutable_fp64_contents());
  }
  in->mutable_contents()->mutable_fp32_contents()->Reserve(
      static_cast<int>(std::min<int64_t>(n, std::numeric_limits<int>::max())));
  return AppendElements(in->name(), in->datatype() == "FP32", *data,
                        in->mutable_contents()->mutable_fp32_contents());
}

absl::Status ParseOutput(const Json& j, int index, ModelInferRequest::InferRequestedOutputTensor* out,
                         std::optional<bool>* binary) {
  const std::string where = absl::StrCat("outputs[", index, "]");
  if (!j.is_object()) return WrongType(where, j, "an object");
  const auto name = j.find("name");
  if (name == j.end() || !name->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, " needs a string \"name\""));
  }
  out->set_name(name->get<std::string>());
  const std::string label = absl::StrCat("output '", out->name(), "'");
  for (const auto& [key, v] : j.items()) {
    if (key == "name") continue;
    if (key != "parameters") return UnknownField(label, key, "name, parameters");
    if (!v.is_object()) return WrongType(absl::StrCat(label, ": parameters"), v, "an object");
    for (const auto& [pkey, pv] : v.items()) {
      if (pkey == "binary_data") {
        if (!pv.is_boolean()) {
          return WrongType(absl::StrCat(label, ": parameter 'binary_data'"), pv, "a bool");
        }
        *binary = pv.get<bool>();
      }
      // binary_data is skipped by TranslateInferInputs; any other is refused there.
      if (absl::Status s = ToParameter(absl::StrCat(label, ": "), pkey, pv,
                                       &(*out->mutable_parameters())[pkey]);
          !s.ok()) {
        return s;
      }
    }
  }
  return absl::OkStatus();
}

// Reads exactly `n` body bytes into `out`.
absl::Status ReadBody(const HttpRequest& r, int64_t n, char* out, int64_t* done_total,
                      int64_t content_length) {
  int64_t done = 0;
  while (done < n) {
    const int64_t got = r.read ? r.read(out + done, static_cast<size_t>(std::min<int64_t>(
                                                       n - done, int64_t{1} << 30)))
                               : 0;
    if (got <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the request body ended after ", *done_total + done, " of its Content-Length ",
          content_length, " bytes"));
    }
    done += got;
  }
  *done_total += n;
  return absl::OkStatus();
}

// ---- POST /v2/models/{name}[/versions/{v}]/infer -----------------------------------------

class InferCall {
 public:
  InferCall(Core* core, const OipSharedMemory* shm, const HttpRequest& r)
      : core_(core),
        r_(r),
        shm_(shm, r.peer, OipProtocol::kRest),
        start_ns_(absl::GetCurrentTimeNanos()),
        reservation_(std::make_unique<Reservation>(&core->executor().memory())),
        result_(std::make_unique<ComputeResult>()),
        record_(&core->metrics(), "ModelInfer", r.peer, "http", start_ns_) {
    core_->admission().CallStarted();
  }
  ~InferCall() { core_->admission().CallEnded(); }

  HttpResponse Run(const Route& route) {
    HttpError e;
    e.status = Evaluate(route, &e.http);
    HttpResponse response;
    if (e.status.ok()) e.status = Reply(&response);
    if (e.status.ok()) {
      record_.Ok(result_->device, result_->timing, received_,
                 InferReplyPayloadBytes(translation_.outputs, *result_));
      response.result = std::move(result_);
      response.reservation = std::move(reservation_);
      return response;
    }
    record_.Fail(e.status, id_);
    return ErrorResponse(e);
  }

 private:
  absl::Status Evaluate(const Route& route, int* http) {
    if (absl::Status s = Admit(core_->admission(), r_); !s.ok()) return s;
    // From here on the outcome counts in the model's statistics (none for an unknown model).
    record_.set_statistics(core_->metrics().oip_statistics().Find(route.model, route.version));
    if (const char* enc = r_.header ? r_.header("Content-Encoding") : nullptr;
        enc != nullptr && std::string_view(enc) != "identity") {
      *http = 415;
      return absl::InvalidArgumentError(absl::StrCat(
          "Content-Encoding ", Quote(enc), " is not supported; send the body uncompressed"));
    }
    const int64_t length = r_.content_length;
    if (length < 0) {
      *http = 411;
      return absl::InvalidArgumentError(
          "the request has no Content-Length (chunked bodies are not supported)");
    }
    const int64_t limit = core_->config().max_message_bytes;
    if (limit > 0 && length > limit) {
      *http = 413;
      return absl::ResourceExhaustedError(absl::StrCat(
          "the request body of ", length, " bytes is over the server's limit of ", limit,
          " bytes (--max_message_bytes)"));
    }
    int64_t json_length = length;
    if (const char* h = r_.header ? r_.header("Inference-Header-Content-Length") : nullptr) {
      if (!absl::SimpleAtoi(h, &json_length) || json_length < 0 || json_length > length) {
        return absl::InvalidArgumentError(absl::StrCat(
            "header Inference-Header-Content-Length ", Quote(h),
            " is not a byte count within the body's Content-Length ", length));
      }
    }
    if (absl::Status s = reservation_->Add(length, "the request"); !s.ok()) return s;
    std::string text(static_cast<size_t>(json_length), '\0');
    int64_t read = 0;
    if (absl::Status s = ReadBody(r_, json_length, text.data(), &read, length); !s.ok()) {
      return s;
    }
    ModelInferRequest request;
    HttpInferLayout layout;
    if (absl::Status s = ParseInferRequestJson(text, route.model, route.version,
                                               length - json_length, reservation_.get(),
                                               &request, &layout);
        !s.ok()) {
      id_ = request.id();
      return s;
    }
    id_ = request.id();
    text = std::string();
    // Each input's binary data straight from the socket into its own bytes, which
    // TranslateInferInputs then moves into the lossd.v1 tensor (no copy).
    std::vector<std::string> binary(layout.binary_sizes.size());
    std::vector<std::string*> raw(layout.binary_sizes.size(), nullptr);
    for (size_t i = 0; i < binary.size(); ++i) {
      if (layout.binary_sizes[i] < 0) continue;
      binary[i].resize(static_cast<size_t>(layout.binary_sizes[i]));
      if (absl::Status s = ReadBody(r_, layout.binary_sizes[i], binary[i].data(), &read, length);
          !s.ok()) {
        return s;
      }
      raw[i] = &binary[i];
    }
    v1::EvaluateRequest evaluate;
    if (absl::Status s = TranslateInferInputs(OipProtocol::kRest, &request, raw,
                                              reservation_.get(), &evaluate, &translation_,
                                              &shm_);
        !s.ok()) {
      return s;
    }
    request.Clear();
    binary.clear();
    received_ = PayloadBytes(evaluate);
    output_binary_.clear();
    for (size_t k = 0; k < translation_.outputs.size(); ++k) {
      const std::optional<bool> own =
          k < layout.binary_outputs.size() ? layout.binary_outputs[k] : std::nullopt;
      output_binary_.push_back(own.value_or(layout.binary_output_default));
    }
    auto plan = core_->planner().Prepare(evaluate);
    if (!plan.ok()) return plan.status();
    if (absl::Status s = reservation_->Add(plan->reply_bytes, "the reply"); !s.ok()) return s;
    CallControl control;
    absl::Notification done;
    absl::Status status;
    core_->executor().ComputeThen(control, *std::move(plan), start_ns_, result_.get(),
                                  [&status, &done](absl::Status s) {
                                    status = std::move(s);
                                    done.Notify();
                                  });
    done.WaitForNotification();
    // The inputs are no longer needed: free them (and their share of the reservation) before
    // the reply is written.
    evaluate.Clear();
    reservation_->Release(length);
    return status;
  }

  // The reply: FillInferResponseHeader's message as JSON, each output's data as a JSON array
  // or (binary_data) as binary data after the JSON, in the order of the outputs.
  absl::Status Reply(HttpResponse* response) {
    inference::ModelInferResponse header;
    if (absl::Status s = FillInferResponseHeader(*translation_.model, id_, translation_.outputs,
                                                 *result_, &header);
        !s.ok()) {
      return s;
    }
    int64_t json_elements = 0;
    for (size_t k = 0; k < translation_.outputs.size(); ++k) {
      if (output_binary_[k] || OipOutputTensor(*result_, translation_.outputs[k]).placed) {
        continue;
      }
      const OutputTensor& t = OipOutputTensor(*result_, translation_.outputs[k]);
      json_elements += static_cast<int64_t>(
          t.block.size() / kernels::ItemSize(static_cast<kernels::DType>(t.dtype)));
    }
    if (json_elements > 0) {
      if (absl::Status s = reservation_->Add(json_elements * kJsonElementBytes, "the JSON reply");
          !s.ok()) {
        return s;
      }
    }
    std::string& out = response->body;
    out.reserve(static_cast<size_t>(256 + json_elements * kJsonElementBytes));
    absl::StrAppend(&out, "{\"model_name\":", Quote(header.model_name()),
                    ",\"model_version\":", Quote(header.model_version()));
    if (!header.id().empty()) absl::StrAppend(&out, ",\"id\":", Quote(header.id()));
    out.append(",\"parameters\":{");
    bool first = true;
    for (const auto& [key, p] : header.parameters()) {
      absl::StrAppend(&out, first ? "" : ",", Quote(key), ":", Quote(p.string_param()));
      first = false;
    }
    out.append("},\"outputs\":[");
    for (int k = 0; k < header.outputs_size(); ++k) {
      const auto& o = header.outputs(k);
      const OutputTensor& t = OipOutputTensor(*result_, translation_.outputs[k]);
      absl::StrAppend(&out, k > 0 ? "," : "", "{\"name\":", Quote(o.name()),
                      ",\"datatype\":", Quote(o.datatype()), ",\"shape\":[",
                      absl::StrJoin(o.shape(), ","), "]");
      if (t.placed) {  // written into shared memory: no data (as Triton)
        out.append("}");
        continue;
      }
      if (output_binary_[k]) {
        absl::StrAppend(&out, ",\"parameters\":{\"binary_data_size\":", t.block.size(), "}}");
        response->binary.emplace_back(t.block.size() > 0 ? t.block.data() : "", t.block.size());
        continue;
      }
      out.append(",\"data\":[");
      const auto dtype = static_cast<kernels::DType>(t.dtype);
      const int64_t n = static_cast<int64_t>(t.block.size() / kernels::ItemSize(dtype));
      for (int64_t i = 0; i < n; ++i) {
        if (i > 0) out.push_back(',');
        AppendNumber(kernels::LoadAsDouble(dtype, t.block.data(), i), &out);
      }
      out.append("]}");
    }
    out.append("]}");
    if (!response->binary.empty()) {
      response->content_type = "application/octet-stream";
      response->headers.emplace_back("Inference-Header-Content-Length",
                                     absl::StrCat(out.size()));
    }
    return absl::OkStatus();
  }

  Core* const core_;
  const HttpRequest& r_;
  OipShmCaller shm_;  // regions named by the request's tensors
  const int64_t start_ns_;
  std::unique_ptr<Reservation> reservation_;  // moves into the response
  std::unique_ptr<ComputeResult> result_;     // moves into the response
  CallRecord record_;
  std::string id_;
  int64_t received_ = 0;
  OipTranslation translation_;
  std::vector<bool> output_binary_;  // per reply output
};

// GET /v2/models[/{name}[/versions/{v}]]/stats and /v2/models/{name}[/versions/{v}]/config:
// Triton's JSON of ModelStatistics and ModelConfig (oip_statistics.h).
HttpResponse ServeExtension(Core* core, const HttpRequest& r, const Route& route) {
  const bool stats = route.kind == RouteKind::kModelStatistics;
  HttpError e{0, Admit(core->admission(), r)};
  std::string body;
  if (e.status.ok() && stats) {
    inference::ModelStatisticsResponse m;
    e.status = core->metrics().oip_statistics().Fill(route.model, route.version, &m);
    if (e.status.ok()) body = ModelStatisticsJson(m);
  } else if (e.status.ok()) {
    inference::ModelConfigResponse m;
    e.status = FillModelConfig(route.model, route.version, &m);
    if (e.status.ok()) body = ModelConfigJson(m.config());
  }
  Count(core, stats ? "ModelStatistics" : "ModelConfig", r, e);
  if (!e.status.ok()) return ErrorResponse(e);
  return JsonResponse(200, std::move(body));
}

// Triton's system shared memory extension: GET /v2/systemsharedmemory[/region/{name}]/status,
// POST /v2/systemsharedmemory/region/{name}/register with {"key", "offset", "byte_size"},
// POST /v2/systemsharedmemory[/region/{name}]/unregister.
absl::Status ShmCall(Core* core, OipSharedMemory* shm, const HttpRequest& r, const Route& route,
                     std::string* body) {
  if (absl::Status s = Admit(core->admission(), r); !s.ok()) return s;
  if (shm == nullptr) {
    return absl::FailedPreconditionError(
        "system shared memory is disabled on this server (--shared_memory_prefix is empty)");
  }
  auto uid = shm->Caller(r.peer, OipProtocol::kRest);
  if (!uid.ok()) return uid.status();
  if (route.kind == RouteKind::kShmStatus) {
    auto status = shm->Status(*uid, route.model);
    if (!status.ok()) return status.status();
    // Triton's JSON: an array of regions (by name).
    std::vector<const inference::SystemSharedMemoryStatusResponse::RegionStatus*> regions;
    for (const auto& [name, region] : status->regions()) regions.push_back(&region);
    std::sort(regions.begin(), regions.end(),
              [](const auto* a, const auto* b) { return a->name() < b->name(); });
    OrderedJson j = OrderedJson::array();
    for (const auto* region : regions) {
      j.push_back({{"name", region->name()},
                   {"key", region->key()},
                   {"offset", region->offset()},
                   {"byte_size", region->byte_size()}});
    }
    *body = j.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
    return absl::OkStatus();
  }
  if (route.kind == RouteKind::kShmUnregister) return shm->Unregister(*uid, route.model);
  // Register: a small JSON body.
  constexpr int64_t kMaxBody = 64 << 10;
  if (r.content_length < 0 || r.content_length > kMaxBody) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the register request needs a Content-Length of at most ", kMaxBody, " bytes; got ",
        r.content_length));
  }
  std::string text(static_cast<size_t>(r.content_length), '\0');
  int64_t read = 0;
  if (absl::Status s = ReadBody(r, r.content_length, text.data(), &read, r.content_length);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckNesting(text); !s.ok()) return s;
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        "the register request's body must be a JSON object {\"key\", \"offset\", \"byte_size\"}");
  }
  inference::SystemSharedMemoryRegisterRequest request;
  request.set_name(route.model);
  bool has_key = false;
  bool has_size = false;
  for (const auto& [key, v] : j.items()) {
    if (key == "key") {
      if (!v.is_string()) return WrongType("register: key", v, "a string");
      request.set_key(v.get<std::string>());
      has_key = true;
    } else if (key == "offset" || key == "byte_size") {
      auto n = NonNegativeInteger(v);
      if (!n.ok()) return WrongType(absl::StrCat("register: ", key), v, "a non-negative integer");
      if (key == "offset") {
        request.set_offset(static_cast<uint64_t>(*n));
      } else {
        request.set_byte_size(static_cast<uint64_t>(*n));
        has_size = true;
      }
    } else {
      return UnknownField("the register request", key, "key, offset, byte_size");
    }
  }
  if (!has_key || !has_size) {
    return absl::InvalidArgumentError(absl::StrCat("the register request needs \"",
                                                   has_key ? "byte_size" : "key", "\""));
  }
  return shm->Register(*uid, request);
}

HttpResponse MethodNotAllowed(const HttpRequest& r, const char* allowed) {
  HttpResponse response = ErrorResponse(
      405, absl::StrCat("method ", r.method, " is not allowed on ", r.path, "; use ", allowed));
  response.headers.emplace_back("Allow", allowed);
  return response;
}

}  // namespace

int64_t HttpResponse::content_length() const {
  int64_t n = static_cast<int64_t>(body.size());
  for (absl::string_view b : binary) n += static_cast<int64_t>(b.size());
  return n;
}

int HttpStatus(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
      return 409;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kCancelled:
      return 499;
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

absl::Status ParseInferRequestJson(absl::string_view text, absl::string_view model,
                                   absl::string_view version, int64_t binary_bytes,
                                   Reservation* reservation, ModelInferRequest* request,
                                   HttpInferLayout* layout) {
  request->Clear();
  *layout = HttpInferLayout();
  request->set_model_name(std::string(model));
  request->set_model_version(std::string(version));
  if (absl::Status s = CheckNesting(text); !s.ok()) return s;
  const int64_t document_bytes = static_cast<int64_t>(text.size()) * kJsonDocumentFactor;
  if (reservation != nullptr) {
    if (absl::Status s = reservation->Add(document_bytes, "the parsed JSON of the request");
        !s.ok()) {
      return s;
    }
  }
  absl::Status status = [&]() -> absl::Status {
    Json doc;
    try {
      doc = Json::parse(text.begin(), text.end());
    } catch (const Json::exception& e) {
      // "[json.exception.parse_error.101] parse error at line 1, column 9: ...": the part
      // after the bracket.
      absl::string_view what = e.what();
      if (const size_t at = what.find("] "); at != absl::string_view::npos) {
        what.remove_prefix(at + 2);
      }
      return absl::InvalidArgumentError(
          absl::StrCat("the request's JSON is malformed: ", what));
    }
    if (!doc.is_object()) return WrongType("the request's JSON", doc, "an object");
    bool has_inputs = false;
    for (const auto& [key, v] : doc.items()) {
      if (key == "id") {
        if (!v.is_string()) return WrongType("\"id\"", v, "a string");
        request->set_id(v.get<std::string>());
      } else if (key == "parameters") {
        if (!v.is_object()) return WrongType("\"parameters\"", v, "an object");
        for (const auto& [pkey, pv] : v.items()) {
          if (pkey == "binary_data_output") {
            if (!pv.is_boolean()) {
              return WrongType("parameter 'binary_data_output'", pv, "a bool");
            }
            layout->binary_output_default = pv.get<bool>();
            continue;
          }
          if (absl::Status s =
                  ToParameter("", pkey, pv, &(*request->mutable_parameters())[pkey]);
              !s.ok()) {
            return s;
          }
        }
      } else if (key == "inputs") {
        if (!v.is_array()) return WrongType("\"inputs\"", v, "an array");
        has_inputs = true;
        for (size_t i = 0; i < v.size(); ++i) {
          int64_t size = -1;
          if (absl::Status s =
                  ParseInput(v[i], static_cast<int>(i), reservation, request->add_inputs(), &size);
              !s.ok()) {
            return s;
          }
          layout->binary_sizes.push_back(size);
        }
      } else if (key == "outputs") {
        if (!v.is_array()) return WrongType("\"outputs\"", v, "an array");
        for (size_t i = 0; i < v.size(); ++i) {
          std::optional<bool> binary;
          if (absl::Status s =
                  ParseOutput(v[i], static_cast<int>(i), request->add_outputs(), &binary);
              !s.ok()) {
            return s;
          }
          layout->binary_outputs.push_back(binary);
        }
      } else {
        return UnknownField("the inference request", key, "id, parameters, inputs, outputs");
      }
    }
    if (!has_inputs) {
      return absl::InvalidArgumentError(
          "the inference request has no \"inputs\"; model inputs are LOGITS, TARGETS, ...");
    }
    return absl::OkStatus();
  }();
  // The document is gone; the elements (charged by ParseInput) stay.
  if (reservation != nullptr) reservation->Release(document_bytes);
  if (!status.ok()) return status;
  // The binary data after the JSON is the inputs' binary_data_size, in the order of inputs.
  int64_t sum = 0;
  for (size_t i = 0; i < layout->binary_sizes.size(); ++i) {
    const int64_t size = layout->binary_sizes[i];
    if (size < 0) continue;
    if (size > binary_bytes - sum) {
      return absl::InvalidArgumentError(absl::StrCat(
          "input '", request->inputs(static_cast<int>(i)).name(), "': binary_data_size ", size,
          " is more than the ", binary_bytes - sum,
          " bytes of binary data left after the JSON (", binary_bytes, " in all)"));
    }
    sum += size;
  }
  if (sum != binary_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the request has ", binary_bytes, " bytes of binary data after its JSON but its inputs' "
        "binary_data_size add up to ", sum,
        " (Inference-Header-Content-Length must be the JSON's length)"));
  }
  return absl::OkStatus();
}

HttpResponse HandleOipHttp(Core* core, const HttpRequest& r, OipSharedMemory* shm) {
  const Route route = ParseRoute(r.path);
  const bool get = r.method == "GET";
  switch (route.kind) {
    case RouteKind::kNone:
      return ErrorResponse(
          404, absl::StrCat("no route ", r.method, " ", r.path,
                            "; this server serves GET /v2, /v2/health/live, /v2/health/ready, "
                            "/v2/models/{name}[/versions/{version}][/ready|/config|/stats], "
                            "/v2/models/stats, /v2/systemsharedmemory[/region/{name}]/status and "
                            "POST /v2/models/{name}[/versions/{version}]/infer, "
                            "/v2/systemsharedmemory/region/{name}/register, "
                            "/v2/systemsharedmemory[/region/{name}]/unregister"));
    case RouteKind::kLive:
      if (!get) return MethodNotAllowed(r, "GET");
      Count(core, "ServerLive", r, {});
      return JsonResponse(200, "{\"live\":true}");
    case RouteKind::kReady: {
      if (!get) return MethodNotAllowed(r, "GET");
      Count(core, "ServerReady", r, {});
      // The protocol answers health with the status: 200 true, 4xx false.
      const bool ready = !core->admission().draining();
      return JsonResponse(ready ? 200 : 400, ready ? "{\"ready\":true}" : "{\"ready\":false}");
    }
    case RouteKind::kModelReady: {
      if (!get) return MethodNotAllowed(r, "GET");
      Count(core, "ModelReady", r, {});
      const bool ready = OipModelReady(core->admission().draining(), route.model, route.version);
      return JsonResponse(ready ? 200 : 400,
                          absl::StrCat("{\"name\":", Quote(route.model),
                                       ",\"ready\":", ready ? "true" : "false", "}"));
    }
    case RouteKind::kServerMetadata: {
      if (!get) return MethodNotAllowed(r, "GET");
      HttpError e{0, Admit(core->admission(), r)};
      Count(core, "ServerMetadata", r, e);
      if (!e.status.ok()) return ErrorResponse(e);
      return JsonResponse(200, ServerMetadataJson());
    }
    case RouteKind::kModelMetadata: {
      if (!get) return MethodNotAllowed(r, "GET");
      HttpError e{0, Admit(core->admission(), r)};
      const OipModel* model = nullptr;
      if (e.status.ok()) {
        absl::StatusOr<const OipModel*> found = FindOipModel(route.model, route.version);
        e.status = found.status();
        if (found.ok()) model = *found;
      }
      Count(core, "ModelMetadata", r, e);
      if (!e.status.ok()) return ErrorResponse(e);
      return JsonResponse(200, ModelMetadataJson(*model));
    }
    case RouteKind::kInfer: {
      if (r.method != "POST") return MethodNotAllowed(r, "POST");
      InferCall call(core, shm, r);
      return call.Run(route);
    }
    case RouteKind::kModelStatistics:
    case RouteKind::kModelConfig:
      if (!get) return MethodNotAllowed(r, "GET");
      return ServeExtension(core, r, route);
    case RouteKind::kShmStatus:
    case RouteKind::kShmRegister:
    case RouteKind::kShmUnregister: {
      const bool status = route.kind == RouteKind::kShmStatus;
      if (status ? !get : r.method != "POST") return MethodNotAllowed(r, status ? "GET" : "POST");
      std::string body;
      HttpError e{0, ShmCall(core, shm, r, route, &body)};
      Count(core,
            status ? "SystemSharedMemoryStatus"
                   : route.kind == RouteKind::kShmRegister ? "SystemSharedMemoryRegister"
                                                           : "SystemSharedMemoryUnregister",
            r, e);
      if (!e.status.ok()) return ErrorResponse(e);
      return JsonResponse(200, std::move(body));
    }
  }
  return ErrorResponse(500, "unreachable route");
}

// ---- civetweb ---------------------------------------------------------------------------

namespace {

int LogCivetweb(const mg_connection*, const char* message) {
  Log(LogLevel::kWarning, absl::StrCat("http: ", message));
  return 1;  // handled: civetweb writes nothing itself
}

bool WriteAll(mg_connection* conn, absl::string_view data) {
  while (!data.empty()) {
    const size_t n = std::min(data.size(), kWriteChunk);
    if (mg_write(conn, data.data(), n) <= 0) return false;
    data.remove_prefix(n);
  }
  return true;
}

}  // namespace

int OipHttpServer::Serve(mg_connection* conn, void* self) {
  auto* server = static_cast<OipHttpServer*>(self);
  const mg_request_info* info = mg_get_request_info(conn);
  HttpRequest r;
  r.method = info->request_method != nullptr ? info->request_method : "";
  r.path = info->local_uri != nullptr ? info->local_uri : "";
  r.header = [conn](const char* name) { return mg_get_header(conn, name); };
  r.content_length = info->content_length;
  // A client that sent "Expect: 100-continue" (curl does for bodies over 1 MiB) waits for the
  // interim response before it sends the body: given when the body is first read, so that a
  // request refused before that gets its final response without the body being sent.
  const char* expect = mg_get_header(conn, "Expect");
  bool send_continue = expect != nullptr && std::string_view(expect) == "100-continue";
  r.read = [conn, send_continue](char* buf, size_t n) mutable -> int64_t {
    if (send_continue) {
      send_continue = false;
      if (!WriteAll(conn, "HTTP/1.1 100 Continue\r\n\r\n")) return -1;
    }
    return mg_read(conn, buf, n);
  };
  const bool v6 = std::strchr(info->remote_addr, ':') != nullptr;
  r.peer = absl::StrCat(v6 ? "ipv6:[" : "ipv4:", info->remote_addr, v6 ? "]:" : ":",
                        info->remote_port);
  HttpResponse response;
  try {
    response = HandleOipHttp(server->core_, r, server->shm_);
  } catch (const std::exception& e) {  // std::bad_alloc: never leave the connection unanswered
    response = ErrorResponse(500, absl::StrCat("internal error: ", e.what()));
  }
  std::string head = absl::StrCat("HTTP/1.1 ", response.status, " ", Reason(response.status),
                                  "\r\nContent-Type: ", response.content_type,
                                  "\r\nContent-Length: ", response.content_length(), "\r\n");
  for (const auto& [name, value] : response.headers) {
    absl::StrAppend(&head, name, ": ", value, "\r\n");
  }
  head.append("\r\n");
  if (WriteAll(conn, head) && WriteAll(conn, response.body)) {
    for (absl::string_view b : response.binary) {
      if (!WriteAll(conn, b)) break;
    }
  }
  return response.status;
}

absl::StatusOr<std::unique_ptr<OipHttpServer>> OipHttpServer::Start(Core* core,
                                                                    const std::string& host,
                                                                    int port,
                                                                    OipSharedMemory* shm) {
  static std::once_flag init;
  std::call_once(init, [] { mg_init_library(0); });
  const std::string address = absl::StrCat(
      host.find(':') != std::string::npos ? absl::StrCat("[", host, "]") : host, ":", port);
  const char* options[] = {"listening_ports", address.c_str(), "num_threads", kThreads,
                           "enable_keep_alive", "yes", "tcp_nodelay", "1", nullptr};
  mg_callbacks callbacks{};
  callbacks.log_message = &LogCivetweb;
  std::unique_ptr<OipHttpServer> server(new OipHttpServer(core, shm));
  mg_init_data init_data{};
  init_data.callbacks = &callbacks;
  init_data.user_data = server.get();
  init_data.configuration_options = options;
  char error_text[256] = {0};
  unsigned error_code = 0;
  mg_error_data error{};
  error.code = &error_code;
  error.text = error_text;
  error.text_buffer_size = sizeof(error_text);
  server->context_ = mg_start2(&init_data, &error);
  if (server->context_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", address, ": ",
                                               error_text[0] ? error_text : "civetweb failed"));
  }
  // "**" matches every path: unknown ones get the protocol's JSON 404.
  mg_set_request_handler(server->context_, "**", &OipHttpServer::Serve, server.get());
  mg_server_port ports[4];
  const int n = mg_get_server_ports(server->context_, 4, ports);
  server->port_ = n > 0 ? ports[0].port : 0;
  if (server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", address,
                                               ": civetweb reports no listening port"));
  }
  return server;
}

OipHttpServer::~OipHttpServer() { Stop(); }

void OipHttpServer::Stop() {
  if (context_ != nullptr) {
    mg_stop(context_);
    context_ = nullptr;
  }
}

}  // namespace lossd::server
