// The REST half of the KServe v2 / Open Inference Protocol (docs/interop.md, "HTTP/REST"):
// GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}][/ready],
// Triton's /v2/models[/{name}[/versions/{v}]]/stats and /v2/models/{name}[/versions/{v}]/config,
// Triton's system shared memory extension (/v2/systemsharedmemory[/region/{name}]/status,
// register, unregister; oip_shm.h),
// POST /v2/models/{name}[/versions/{v}]/infer with JSON tensors or Triton's binary tensor data
// extension, served by civetweb (the HTTP server prometheus-cpp already links) on its own port.
//
// One code path with the gRPC front-end (oip_service.h): an infer request's JSON becomes an
// inference::ModelInferRequest (JSON data as typed contents, binary data as the inputs' raw
// bytes), which TranslateInferInputs (oip_models.h) turns into the lossd.v1 EvaluateRequest;
// then the same Planner::Prepare, memory admission, ComputeThen, metrics and drain as ModelInfer.
// The reply is FillInferResponseHeader's message written as JSON, each output's data either as
// a JSON array or as binary data after the JSON.
#ifndef LOSSD_SERVER_OIP_HTTP_H_
#define LOSSD_SERVER_OIP_HTTP_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core.h"
#include "inference/grpc_predict_v2.pb.h"
#include "server/memory.h"

struct mg_connection;  // civetweb.h
struct mg_context;

namespace lossd::server {

// One HTTP request as the handler sees it. The server fills it from civetweb; tests fill it
// directly (no socket).
struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // URL-decoded, without the query string
  // The value of a header (case-insensitive name), or null when absent.
  std::function<const char*(const char* name)> header;
  int64_t content_length = -1;  // -1: no Content-Length (e.g. chunked)
  // Reads up to `n` body bytes into `buf`: the count read, 0 at the end of the body, < 0 on a
  // network error.
  std::function<int64_t(char* buf, size_t n)> read;
  std::string peer;  // "ipv4:127.0.0.1:40000", for logs
};

// The reply: `body` (JSON; the inference header when `binary` is not empty), then the bytes of
// `binary` in order. `result` and `reservation` own what `binary` points into and the call's
// memory until the reply has been written.
struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;  // besides Content-Type/-Length
  std::string body;
  std::vector<absl::string_view> binary;
  std::unique_ptr<ComputeResult> result;
  std::unique_ptr<Reservation> reservation;

  int64_t content_length() const;
};

// Serves one request, whatever its route: never throws; every failure is a JSON body
// {"error": "<message>"} with the status HttpStatus gives for its code (405, 411, 413 and 415
// for what only HTTP has).
// `shm`: Triton's system shared memory extension (oip_shm.h): the routes
// /v2/systemsharedmemory/... and tensors naming a region; null when disabled (they get
// FAILED_PRECONDITION, 400).
class OipSharedMemory;
HttpResponse HandleOipHttp(Core* core, const HttpRequest& request,
                           OipSharedMemory* shm = nullptr);

// The HTTP status of a status code, as google.rpc.Code documents the mapping: OK 200,
// INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE 400, UNAUTHENTICATED 401,
// PERMISSION_DENIED 403, NOT_FOUND 404, ALREADY_EXISTS / ABORTED 409, RESOURCE_EXHAUSTED 429,
// CANCELLED 499, UNIMPLEMENTED 501, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, others 500.
int HttpStatus(absl::StatusCode code);

// What the JSON of an infer request says beyond the ModelInferRequest.
struct HttpInferLayout {
  // Per input (in the order of `inputs`): its bytes in the binary data after the JSON
  // (parameter binary_data_size), or -1 when its elements are in "data".
  std::vector<int64_t> binary_sizes;
  // Per requested output (in the order of `outputs`): its parameter binary_data, if given.
  std::vector<std::optional<bool>> binary_outputs;
  // The request parameter binary_data_output (default false): outputs without their own
  // binary_data go out as binary data when true.
  bool binary_output_default = false;
};

// Parses the JSON of POST /v2/models/{model}[/versions/{version}]/infer into `request` (model
// name and version from the path; JSON data becomes fp32_contents, or fp64_contents for FP64;
// parameters become InferParameters) and `layout`. `binary_bytes` is the size of the binary
// data after the JSON: the inputs' binary_data_size must add up to it. `reservation` (may be
// null) is charged for the parsed document and the elements before they are made.
// INVALID_ARGUMENT naming the field and values for malformed JSON, a wrong type, a negative or
// non-integer shape or binary_data_size, binary sizes that do not add up, an element that is
// not a number (or "NaN", "Infinity", "-Infinity") or out of the FP32 range; the rules of the
// protocol (names, datatypes, element counts) are TranslateInferInputs's.
absl::Status ParseInferRequestJson(absl::string_view json, absl::string_view model,
                                   absl::string_view version, int64_t binary_bytes,
                                   Reservation* reservation,
                                   inference::ModelInferRequest* request,
                                   HttpInferLayout* layout);

// The REST front-end on civetweb: worker threads that each serve one connection at a time.
class OipHttpServer {
 public:
  // Listens on host:port (0 picks a free port). UNAVAILABLE when it cannot bind.
  static absl::StatusOr<std::unique_ptr<OipHttpServer>> Start(Core* core, const std::string& host,
                                                              int port,
                                                              OipSharedMemory* shm = nullptr);
  ~OipHttpServer();  // Stop()

  int port() const { return port_; }
  // Stops listening, closes idle connections and waits for requests being served to finish.
  void Stop();

 private:
  OipHttpServer(Core* core, OipSharedMemory* shm) : core_(core), shm_(shm) {}
  static int Serve(mg_connection* conn, void* self);

  Core* const core_;
  OipSharedMemory* const shm_;
  mg_context* context_ = nullptr;
  int port_ = 0;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_OIP_HTTP_H_
