// lossd-bench: load tester for lossd with baselines measured in the same run (README.md,
// "Load testing with lossd-bench"; docs/design.md section 6).
//
// Without --target it starts lossd (--lossd_binary) and the echo and raw baseline servers
// (tools/bench, lossd_bench_server) as separate processes on loopback and measures them in
// turn at every load point, round after round (the order reversed every other round), so slow
// drifts of a shared machine hit them alike; it prints each server's figures and lossd's ratios
// to the baselines. With --target it loads that server and names it by its GetCapabilities
// reply ("unknown server" when it has none).
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "client/loadtest/driver.h"
#include "client/loadtest/h2_framing.h"
#include "inference/grpc_predict_v2.grpc.pb.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "client/bench/report.h"
#include "client/loadtest/requests.h"
#include "client/bench/npy.h"
#include "client/bench/search.h"
#include "client/loadtest/shm.h"
#include "client/bench/spec.h"

// Servers.
ABSL_FLAG(std::string, target, "",
          "Load this running server instead of starting one: host:port, unix:PATH, or several "
          "host:port separated by commas (balanced round robin). Named by what GetCapabilities "
          "says, else \"unknown server\".");
ABSL_FLAG(std::string, target_service, "lossd",
          "What --target serves: lossd, or echo / raw (lossd_bench_server of tools/bench, "
          "loaded with their own methods).");
ABSL_FLAG(bool, self_check, false,
          "Check that lossd-bench is not the bottleneck (docs/perf.md, \"Is lossd-bench the "
          "bottleneck?\"): against the raw baseline (started here, or --target with "
          "--target_service), measure one lossd-bench process at --concurrency (default 16) "
          "and two processes at once with half the callers each, --rounds times alternately, "
          "and print both calls/s and their ratio.");
ABSL_FLAG(std::string, lossd_binary, "",
          "lossd to start when there is no --target (default: server/lossd of this build).");
ABSL_FLAG(std::string, lossd_args, "",
          "Extra flags for the lossd that lossd-bench starts, separated by spaces "
          "(e.g. \"--workers=2 --inline_elements=0\").");
ABSL_FLAG(std::string, baseline_server, "",
          "lossd_bench_server for the echo and raw baselines (default: tools/bench/ of this "
          "build).");
ABSL_FLAG(std::string, baselines, "auto",
          "Baseline servers measured alternately with lossd at every point, any of echo, raw "
          "and python separated by commas, or none; auto: echo,raw without --target (Evaluate "
          "only), none with it. python: tools/bench/python_server.py, a lossd.v1 Evaluate "
          "server in grpcio and numpy (what a Python team would write), run with --python.");
ABSL_FLAG(std::string, python, "python3",
          "Python for the python baseline (needs grpcio, numpy and the lossd client package, "
          "e.g. the test venv's .venv/bin/python).");
ABSL_FLAG(int, rounds, 2, "Rounds per load point: each server is measured once per round.");
// Load.
ABSL_FLAG(std::string, concurrency, "1",
          "Closed loop: concurrent callers, one value or a sweep (\"1:64:x2\", \"1,4,16\", "
          "\"2:10:+2\").");
ABSL_FLAG(std::string, rps, "",
          "Open loop: calls per second, one value or a sweep (\"500:4000:x2\"); overrides "
          "--concurrency. Latency counts from each call's scheduled time. With --rpc=stream "
          "each call is one batch queued on one of --channels streams; with --rpc=accumulate "
          "one Accumulate call of --batches batches.");
ABSL_FLAG(std::string, arrivals, "poisson", "Open loop arrivals: poisson or fixed (evenly spaced).");
ABSL_FLAG(bool, shared_channel, false,
          "Closed loop: all callers share one channel (one connection) instead of one each.");
ABSL_FLAG(int, client_threads, 0,
          "Unary calls: threads that poll the calls' completion queues, each with many calls in "
          "flight; 0: one per CPU this process may run on (taskset), at most one per caller "
          "(closed loop) or channel (open loop).");
ABSL_FLAG(int, channels, 4,
          "Open loop: channels (connections) the calls are spread over; --rpc=stream: one "
          "stream on each.");
ABSL_FLAG(absl::Duration, warmup, absl::Seconds(1),
          "Warm-up before each measurement; its calls are excluded from every figure.");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(5), "Measured time per server and round.");
ABSL_FLAG(std::string, requests, "0",
          "Measured calls per server and round instead of a duration (0: use --duration).");
ABSL_FLAG(int64_t, max_outstanding, 10000,
          "Open loop: calls in flight at most; the sender waits beyond (their latency still "
          "counts from the schedule).");
// Requests.
ABSL_FLAG(std::string, protocol, "lossd",
          "lossd: the lossd.v1 API; oip: the Open Inference Protocol (KServe v2) front end, "
          "inference.GRPCInferenceService/ModelInfer on model bce_with_logits or "
          "sigmoid_focal_loss with the same tensors and options (docs/interop.md; unary, no "
          "baselines; --target servers are named by ServerMetadata).");
ABSL_FLAG(std::string, rpc, "evaluate",
          "evaluate (unary), stream (EvaluateStream, --stream_window batches in flight per "
          "caller) or accumulate (--batches batches per call; reduction sum or mean).");
ABSL_FLAG(int, stream_window, 4, "EvaluateStream: batches in flight per stream.");
ABSL_FLAG(int, batches, 4, "Accumulate: batches per call.");
ABSL_FLAG(std::string, elements, "1k",
          "Elements per request (exactly this many: shape [n/cols, cols] when cols divides n, "
          "else [n]). Suffixes k, M, Ki, Mi.");
ABSL_FLAG(std::string, mix, "",
          "Weighted request kinds instead of --elements: WEIGHT:ELEMENTS[:VARIANT],... e.g. "
          "\"0.9:1k,0.1:1M\"; variant badshape sends targets of the wrong shape (the server "
          "must refuse them: counted as errors).");
ABSL_FLAG(std::string, logits_npy, "",
          "Send these logits instead of generated ones: a .npy file (little-endian float16, "
          "float32 or float64, C order) whose shape is the request's; needs --targets_npy. "
          "The wire dtype is the file's unless --dtype is given; --mix/--elements do not apply.");
ABSL_FLAG(std::string, targets_npy, "", ".npy file of the targets (the logits' shape).");
ABSL_FLAG(std::string, weight_npy, "",
          ".npy file of a weight tensor (the logits' shape), sent with the file inputs.");
ABSL_FLAG(int64_t, cols, 64, "Last dimension of the tensors (when it divides the count).");
ABSL_FLAG(std::string, dtype, "float32", "float32, float64, float16 or bfloat16.");
ABSL_FLAG(std::string, reduction, "none", "none, mean, sum or per_sample_mean.");
ABSL_FLAG(std::string, loss, "bce", "bce (bce_with_logits) or focal (sigmoid_focal_loss).");
ABSL_FLAG(std::string, grad, "logits", "Gradients to ask for: none, logits, targets or both.");
ABSL_FLAG(bool, weight, false, "Send a full-shape weight tensor.");
ABSL_FLAG(bool, pos_weight, true, "bce: send a pos_weight of shape [cols].");
ABSL_FLAG(std::string, ignore_index, "", "bce: ignore_index (empty: unset).");
ABSL_FLAG(bool, normalize, false, "bce: normalize by the kept elements.");
ABSL_FLAG(double, label_smoothing, 0, "bce: label smoothing in [0, 1].");
ABSL_FLAG(std::string, alpha, "", "focal: alpha (empty: the server's default).");
ABSL_FLAG(std::string, gamma, "", "focal: gamma (empty: the server's default).");
ABSL_FLAG(std::string, device, "auto", "Device to ask for: auto, cpu or cuda.");
ABSL_FLAG(bool, reject_nan, false, "Set reject_nan on every request.");
ABSL_FLAG(std::string, precision, "default",
          "Rounding of the outputs to ask for: default or correctly_rounded (much slower: the "
          "exact value rounded once; lossd.v1 only).");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the tensors, the mix and the Poisson arrivals.");
ABSL_FLAG(bool, shared_memory, false,
          "Pass the tensors through POSIX shared memory (docs/shared-memory.md): the inputs lie "
          "in a region registered with the server's lossd.v1.SharedMemory service (key under "
          "the prefix GetCapabilities names, lease renewed while running, unregistered at the "
          "end), each Evaluate names them by reference and places its outputs in the caller's "
          "own slot of the region, so the zero-copy path is measured; --verify reads the "
          "outputs from there. lossd.v1 unary Evaluate on one server (on its Unix socket or "
          "loopback TCP), no baselines. MB/s then counts the messages only.");
ABSL_FLAG(int, shared_memory_slots, 32,
          "--shared_memory in open loop: output slots, i.e. calls in flight at most (the sender "
          "waits beyond; latency still counts from the schedule). Closed loop: one per caller.");
ABSL_FLAG(bool, verify, false,
          "Check every lossd reply against the float64 reference within lossd's accuracy "
          "bounds (docs/design.md section 4); a wrong reply counts as an error (MISMATCH).");
// Connection.
ABSL_FLAG(std::string, transport, "grpc",
          "What carries the unary calls: grpc (gRPC's C++ client) or h2 (lossd-bench's own "
          "HTTP/2 client on nghttp2: the same calls, counts and report at a fraction of the "
          "client CPU per call, so that one tester core can outrun a server on another; "
          "docs/perf.md, \"Is lossd-bench the bottleneck?\"). h2 speaks plaintext HTTP/2 to "
          "host:port, [IPv6]:port or unix:PATH (names resolved once), unary Evaluate / "
          "ModelInfer / the baselines' methods only; a connection per closed-loop caller (one "
          "with --shared_channel) or --channels connections in open loop, owned by "
          "--client_threads poller threads. No TLS, --rpc=stream/accumulate or several "
          "--target addresses.");
ABSL_FLAG(bool, tls, false, "Use TLS (with --tls_ca, else the system roots).");
ABSL_FLAG(std::string, tls_ca, "", "PEM file of the CA that signed the server (implies --tls).");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for mutual TLS (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM client private key for mutual TLS.");
ABSL_FLAG(std::string, tls_server_name, "", "Server name to check in its certificate.");
ABSL_FLAG(std::string, token_file, "", "File with a bearer token (authorization: Bearer ...).");
ABSL_FLAG(absl::Duration, deadline, absl::ZeroDuration(), "Deadline of each call (0: none).");
ABSL_FLAG(std::string, metadata, "", "Extra call metadata: key=value,key2=value2.");
ABSL_FLAG(std::string, lb_policy, "",
          "gRPC load balancing policy (round_robin is used for several --target addresses).");
// Sustainable-rate search (client/bench/search.h).
ABSL_FLAG(bool, find_max_rps, false,
          "Search the highest open-loop rate (--arrivals) that meets the objective: p99 <= "
          "--slo_p99, errors below --slo_errors and successful calls/s >= --slo_achieved of "
          "the rate offered. Doubles from --search_start_rps, halves if that fails, then "
          "bisects to --search_precision; each rate is measured for --warmup + --duration. "
          "Replaces --rps and --concurrency; baselines only when --baselines names them.");
ABSL_FLAG(absl::Duration, slo_p99, absl::ZeroDuration(),
          "--find_max_rps: the p99 latency objective (e.g. 5ms); required with it.");
ABSL_FLAG(double, slo_errors, 0.001,
          "--find_max_rps: a rate holds only with fewer than this fraction of failed calls.");
ABSL_FLAG(double, slo_achieved, 0.95,
          "--find_max_rps: a rate holds only if successful calls/s reach this fraction of it.");
ABSL_FLAG(std::string, search_start_rps, "100", "--find_max_rps: first rate tried (calls/s).");
ABSL_FLAG(std::string, search_max_rps, "1M", "--find_max_rps: highest rate tried (calls/s).");
ABSL_FLAG(double, search_precision, 0.05,
          "--find_max_rps: stop when the lowest failing rate is within this fraction above the "
          "highest rate that held.");
ABSL_FLAG(int, search_max_points, 20, "--find_max_rps: rates measured at most, per server.");
// Sweep end and output.
ABSL_FLAG(absl::Duration, stop_p99, absl::ZeroDuration(),
          "Stop the sweep after a point where the first server's p99 exceeds this (0: never).");
ABSL_FLAG(double, stop_errors, 0,
          "Stop the sweep after a point where more than this fraction of the first server's "
          "calls failed (0: any failure).");
ABSL_FLAG(std::string, json, "", "Write the report as JSON to this file.");
ABSL_FLAG(std::string, csv, "", "Write one CSV line per server and point to this file.");
ABSL_FLAG(bool, progress, true, "Progress lines on stderr while measuring.");

namespace {

using lossd::bench::RowLabel;
using lossd::bench::RowSummary;
using lossd::bench::RunStats;
using lossd::loadtest::Endpoint;
using lossd::loadtest::RequestKind;
using lossd::loadtest::Service;

std::atomic<bool> g_interrupted{false};

void OnSigint(int) {
  if (g_interrupted.exchange(true)) _exit(130);  // a second Ctrl-C: leave at once
}

[[noreturn]] void Usage(const std::string& message) {
  std::fprintf(stderr, "lossd-bench: %s (lossd-bench --help lists the flags)\n", message.c_str());
  std::exit(2);
}

std::string ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Usage(absl::StrCat("cannot read ", what, " \"", path, "\""));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string SelfDir() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string p(buf, n);
  return p.substr(0, p.rfind('/'));
}

// A server process started by lossd-bench: its own process group (Ctrl-C reaches only
// lossd-bench), ended by SIGTERM, killed with lossd-bench (PR_SET_PDEATHSIG).
class Child {
 public:
  static std::unique_ptr<Child> Start(const std::vector<std::string>& argv, const std::string& name) {
    int fds[2];
    if (pipe(fds) != 0) return nullptr;
    const pid_t pid = fork();
    if (pid < 0) return nullptr;
    if (pid == 0) {
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      dup2(fds[1], 2);
      const int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(devnull, 1);
      close(fds[0]);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());  // a bare name (the python baseline's python3) is searched in PATH
      std::fprintf(stderr, "cannot run %s\n", args[0]);
      _exit(127);
    }
    close(fds[1]);
    auto c = std::unique_ptr<Child>(new Child());
    c->pid_ = pid;
    c->name_ = name;
    c->reader_ = std::thread([c = c.get(), fd = fds[0]] { c->Drain(fd); });
    return c;
  }

  // The address from its "... listening on HOST:PORT" line; empty after `timeout` or an exit.
  std::string WaitListening(std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return !address_.empty() || eof_; });
    return address_;
  }

  std::string Tail() {
    std::lock_guard<std::mutex> lock(mu_);
    return absl::StrJoin(lines_, "\n");
  }

  ~Child() {
    kill(pid_, SIGTERM);
    int status = 0;
    for (int i = 0; i < 100 && waitpid(pid_, &status, WNOHANG) == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (waitpid(pid_, &status, WNOHANG) == 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
    }
    if (reader_.joinable()) reader_.join();
  }

 private:
  Child() = default;
  void Drain(int fd) {
    static const std::regex kListening(R"(listening on ([^\s:]+:\d+)\s*$)");
    FILE* f = fdopen(fd, "r");
    char line[4096];
    while (f != nullptr && std::fgets(line, sizeof(line), f) != nullptr) {
      std::lock_guard<std::mutex> lock(mu_);
      std::string s(line);
      std::smatch m;
      if (address_.empty() && std::regex_search(s, m, kListening)) {
        address_ = m[1];
        cv_.notify_all();
      }
      lines_.push_back(std::string(absl::StripTrailingAsciiWhitespace(s)));
      if (lines_.size() > 20) lines_.erase(lines_.begin());
    }
    if (f != nullptr) fclose(f);
    std::lock_guard<std::mutex> lock(mu_);
    eof_ = true;
    cv_.notify_all();
  }

  pid_t pid_ = 0;
  std::string name_;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string address_;
  std::vector<std::string> lines_;
  bool eof_ = false;
};

struct Server {
  std::string name;
  Service service = Service::kLossd;
  Endpoint endpoint;
  std::unique_ptr<Child> process;
};

// What the server says it is: "lossd <version>", or "unknown server".
std::string NameByCapabilities(const Endpoint& e, const std::vector<std::pair<std::string,
                                                                           std::string>>& md) {
  auto stub = lossd::v1::LossService::NewStub(lossd::loadtest::MakeChannel(e, -1));
  grpc::ClientContext ctx;
  for (const auto& [k, v] : md) ctx.AddMetadata(k, v);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  lossd::v1::Capabilities caps;
  const grpc::Status s = stub->GetCapabilities(&ctx, lossd::v1::GetCapabilitiesRequest(), &caps);
  if (!s.ok() || caps.server_version().empty()) return "unknown server";
  return absl::StrCat("lossd ", caps.server_version());
}

// What an Open Inference Protocol server says it is: "<name> <version>", or "unknown server".
std::string NameByServerMetadata(const Endpoint& e,
                                 const std::vector<std::pair<std::string, std::string>>& md) {
  auto stub = inference::GRPCInferenceService::NewStub(lossd::loadtest::MakeChannel(e, -1));
  grpc::ClientContext ctx;
  for (const auto& [k, v] : md) ctx.AddMetadata(k, v);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  inference::ServerMetadataResponse meta;
  const grpc::Status s = stub->ServerMetadata(&ctx, inference::ServerMetadataRequest(), &meta);
  if (!s.ok() || meta.name().empty()) return "unknown server";
  return absl::StrCat(meta.name(), " ", meta.version(), " (oip)");
}

template <typename T>
T Choose(const std::string& flag, const std::string& value,
         const std::vector<std::pair<std::string, T>>& choices) {
  std::vector<std::string> names;
  for (const auto& [name, v] : choices) {
    if (name == value) return v;
    names.push_back(name);
  }
  Usage(absl::StrCat("--", flag, "=", value, ": expected one of ", absl::StrJoin(names, ", ")));
}

std::optional<double> OptionalDouble(const std::string& flag, const std::string& text) {
  if (text.empty()) return std::nullopt;
  double v = 0;
  if (!absl::SimpleAtod(text, &v)) Usage(absl::StrCat("--", flag, "=", text, ": not a number"));
  return v;
}

// Whether --NAME (or --noNAME, -NAME) is among the arguments: flags whose default means
// something else with file inputs.
std::vector<std::string> g_args;
bool OnCommandLine(const std::string& name) {
  for (const std::string& a : g_args) {
    absl::string_view v = a;
    if (!absl::ConsumePrefix(&v, "--")) absl::ConsumePrefix(&v, "-");
    if (v == name || absl::StartsWith(v, name + "=") || v == "no" + name) return true;
  }
  return false;
}

// A .npy input of --logits_npy/--targets_npy/--weight_npy; exits with a message naming the flag.
// `dtype` (optional) receives the file's dtype.
lossd::loadtest::TensorValues ReadInput(const char* flag, const std::string& path,
                                        lossd::bench::NpyArray::DType* dtype = nullptr) {
  auto a = lossd::bench::ReadNpy(path);
  if (!a.ok()) Usage(absl::StrCat("--", flag, "=", path, ": ", a.status().message()));
  if (dtype != nullptr) *dtype = a->dtype;
  lossd::loadtest::TensorValues t;
  t.name = path;
  t.shape = a->shape;
  t.values = std::move(a->values);
  return t;
}

// --self_check: lossd-bench processes started with `args` at once, each writing its CSV report
// to its own file; returns the sum of their calls/s and client CPU (cores), or nullopt.
struct SelfCheckFigures {
  double qps = 0, cpu_cores = 0;
  int64_t errors = 0;
};
std::optional<SelfCheckFigures> RunTesters(const std::vector<std::vector<std::string>>& args,
                                           const std::string& csv_prefix) {
  std::vector<pid_t> pids;
  std::vector<std::string> files;
  for (size_t i = 0; i < args.size(); ++i) {
    files.push_back(absl::StrCat(csv_prefix, "-", i, ".csv"));
    std::vector<std::string> a = args[i];
    a.insert(a.begin(), "/proc/self/exe");
    a.push_back(absl::StrCat("--csv=", files.back()));
    const pid_t pid = fork();
    if (pid < 0) return std::nullopt;
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      const int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(devnull, 1);
      std::vector<char*> argv;
      for (const std::string& x : a) argv.push_back(const_cast<char*>(x.c_str()));
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    pids.push_back(pid);
  }
  bool ok = true;
  for (pid_t pid : pids) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  SelfCheckFigures f;
  for (const std::string& file : files) {
    std::ifstream in(file);
    std::string header, line;
    std::getline(in, header);
    std::getline(in, line);
    unlink(file.c_str());
    const std::vector<std::string> names = absl::StrSplit(header, ',');
    const std::vector<std::string> values = absl::StrSplit(line, ',');
    if (!ok || names.size() != values.size()) return std::nullopt;
    for (size_t i = 0; i < names.size(); ++i) {
      double v = 0;
      if (!absl::SimpleAtod(values[i], &v)) continue;
      if (names[i] == "qps") f.qps += v;
      if (names[i] == "client_cpu_cores") f.cpu_cores += v;
      if (names[i] == "errors") f.errors += static_cast<int64_t>(v);
    }
  }
  return f;
}

std::string PointName(const lossd::loadtest::LoadPoint& p) {
  return p.open ? absl::StrCat(p.rate, "/s") : absl::StrCat("c", p.concurrency);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Load tester for lossd with same-run baselines. Usage: lossd-bench [--flags]\n"
      "Example: lossd-bench --concurrency=1:16:x2 --elements=1k --duration=3s --json=r.json");
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "client/loadtest/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  usage.normalize_filename = [](absl::string_view file) {
    const size_t at = file.rfind("client/loadtest/main.cc");
    return std::string(at == absl::string_view::npos ? file : file.substr(at));
  };
  absl::SetFlagsUsageConfig(usage);
  g_args.assign(argv + 1, argv + argc);
  const std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  // gRPC's locks are absl::Mutex; Debian's absl checks every lock for cycles (a graph update
  // per lock and per mutex destroyed), about 5% of the client's CPU per call (docs/perf.md,
  // "Is lossd-bench the bottleneck?").
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  if (rest.size() > 1) Usage(absl::StrCat("unexpected argument \"", rest[1], "\""));

  // ---- Flags, checked before anything starts.
  namespace v1 = lossd::v1;
  using lossd::loadtest::Rpc;
  const Rpc rpc = Choose<Rpc>("rpc", absl::GetFlag(FLAGS_rpc),
                              {{"evaluate", Rpc::kEvaluate}, {"stream", Rpc::kStream},
                               {"accumulate", Rpc::kAccumulate}});
  const bool oip = Choose<bool>("protocol", absl::GetFlag(FLAGS_protocol),
                                {{"lossd", false}, {"oip", true}});
  using lossd::loadtest::Transport;
  const Transport transport =
      Choose<Transport>("transport", absl::GetFlag(FLAGS_transport),
                        {{"grpc", Transport::kGrpc}, {"h2", Transport::kH2}});
  const bool h2 = transport == Transport::kH2;
  if (h2 && rpc != Rpc::kEvaluate) {
    Usage(absl::StrCat("--transport=h2 sends unary calls only: --rpc=", absl::GetFlag(FLAGS_rpc),
                       " needs --transport=grpc"));
  }
  if (oip && rpc != Rpc::kEvaluate) {
    Usage("--protocol=oip sends unary ModelInfer calls: leave --rpc at evaluate");
  }
  lossd::loadtest::RequestOptions ro;
  ro.dtype = Choose<v1::DType>("dtype", absl::GetFlag(FLAGS_dtype),
                               {{"float32", v1::DTYPE_FLOAT32}, {"float64", v1::DTYPE_FLOAT64},
                                {"float16", v1::DTYPE_FLOAT16}, {"bfloat16", v1::DTYPE_BFLOAT16}});
  ro.reduction = Choose<v1::Reduction>(
      "reduction", absl::GetFlag(FLAGS_reduction),
      {{"none", v1::REDUCTION_NONE}, {"mean", v1::REDUCTION_MEAN}, {"sum", v1::REDUCTION_SUM},
       {"per_sample_mean", v1::REDUCTION_PER_SAMPLE_MEAN}});
  ro.focal = Choose<bool>("loss", absl::GetFlag(FLAGS_loss), {{"bce", false}, {"focal", true}});
  const int grad = Choose<int>("grad", absl::GetFlag(FLAGS_grad),
                               {{"none", 0}, {"logits", 1}, {"targets", 2}, {"both", 3}});
  ro.grad_logits = grad & 1;
  ro.grad_targets = grad & 2;
  ro.weight = absl::GetFlag(FLAGS_weight);
  ro.pos_weight = absl::GetFlag(FLAGS_pos_weight) && !ro.focal;
  // File inputs: the file's dtype unless --dtype is given, and no generated pos_weight unless
  // --pos_weight is given.
  const std::string logits_npy = absl::GetFlag(FLAGS_logits_npy);
  const std::string targets_npy = absl::GetFlag(FLAGS_targets_npy);
  const std::string weight_npy = absl::GetFlag(FLAGS_weight_npy);
  std::optional<lossd::loadtest::TensorValues> file_logits, file_targets, file_weight;
  std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  if (logits_npy.empty() != targets_npy.empty()) {
    Usage("--logits_npy and --targets_npy go together");
  }
  if (!weight_npy.empty() && logits_npy.empty()) Usage("--weight_npy needs --logits_npy");
  if (!logits_npy.empty()) {
    if (!absl::GetFlag(FLAGS_mix).empty() || OnCommandLine("elements")) {
      Usage("--logits_npy replaces --mix and --elements: give one or the other");
    }
    if (ro.weight) Usage("--weight generates a weight: with --logits_npy use --weight_npy");
    using D = lossd::bench::NpyArray::DType;
    D d = D::kFloat32;
    file_logits = ReadInput("logits_npy", logits_npy, &d);
    file_targets = ReadInput("targets_npy", targets_npy);
    if (!weight_npy.empty()) file_weight = ReadInput("weight_npy", weight_npy);
    if (!OnCommandLine("dtype")) {
      ro.dtype = d == D::kFloat16 ? v1::DTYPE_FLOAT16
                 : d == D::kFloat64 ? v1::DTYPE_FLOAT64 : v1::DTYPE_FLOAT32;
      dtype_name = d == D::kFloat16 ? "float16" : d == D::kFloat64 ? "float64" : "float32";
    }
    if (!OnCommandLine("pos_weight")) ro.pos_weight = false;
  }
  if (const std::string ii = absl::GetFlag(FLAGS_ignore_index); !ii.empty()) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(ii, &v)) Usage(absl::StrCat("--ignore_index=", ii, ": not an integer"));
    ro.ignore_index = v;
  }
  ro.normalize = absl::GetFlag(FLAGS_normalize);
  ro.label_smoothing = absl::GetFlag(FLAGS_label_smoothing);
  if (!(ro.label_smoothing >= 0 && ro.label_smoothing <= 1)) {
    Usage("--label_smoothing must be in [0, 1]");
  }
  ro.alpha = OptionalDouble("alpha", absl::GetFlag(FLAGS_alpha));
  ro.gamma = OptionalDouble("gamma", absl::GetFlag(FLAGS_gamma));
  ro.device = Choose<v1::Device>("device", absl::GetFlag(FLAGS_device),
                                 {{"auto", v1::DEVICE_AUTO}, {"cpu", v1::DEVICE_CPU},
                                  {"cuda", v1::DEVICE_CUDA}});
  ro.reject_nan = absl::GetFlag(FLAGS_reject_nan);
  ro.precision = Choose<v1::Precision>(
      "precision", absl::GetFlag(FLAGS_precision),
      {{"default", v1::PRECISION_DEFAULT}, {"correctly_rounded", v1::PRECISION_CORRECTLY_ROUNDED}});
  if (oip && ro.precision != v1::PRECISION_DEFAULT) {
    Usage("--precision: the inference protocol front end takes the default rounding only");
  }
  ro.cols = absl::GetFlag(FLAGS_cols);
  if (ro.cols < 1) Usage("--cols must be >= 1");
  if (rpc == Rpc::kAccumulate && ro.reduction != v1::REDUCTION_SUM &&
      ro.reduction != v1::REDUCTION_MEAN) {
    Usage("--rpc=accumulate needs --reduction=sum or mean");
  }
  if (rpc == Rpc::kAccumulate && (ro.grad_logits || ro.grad_targets)) {
    ro.grad_logits = ro.grad_targets = false;  // Accumulate returns no gradients
  }

  std::string mix_text = absl::GetFlag(FLAGS_mix);
  if (mix_text.empty()) mix_text = absl::GetFlag(FLAGS_elements);
  auto mix = lossd::bench::ParseMix(mix_text);
  if (!mix.ok()) Usage(absl::StrCat("--mix/--elements: ", mix.status().message()));
  auto requests = lossd::bench::ParseCount(absl::GetFlag(FLAGS_requests));
  if (!requests.ok()) Usage(absl::StrCat("--requests: ", requests.status().message()));

  const bool find_max = absl::GetFlag(FLAGS_find_max_rps);
  const std::string rps_text = absl::GetFlag(FLAGS_rps);
  if (find_max && !rps_text.empty()) Usage("--find_max_rps chooses the rates: leave out --rps");
  if (find_max && OnCommandLine("concurrency")) {
    Usage("--find_max_rps loads in open loop: leave out --concurrency");
  }
  const bool open = !rps_text.empty() || find_max;
  const bool poisson = Choose<bool>("arrivals", absl::GetFlag(FLAGS_arrivals),
                                    {{"poisson", true}, {"fixed", false}});
  auto points_raw = lossd::bench::ParseRange(
      find_max ? "1" : open ? rps_text : absl::GetFlag(FLAGS_concurrency));
  if (!points_raw.ok()) {
    Usage(absl::StrCat(open ? "--rps: " : "--concurrency: ", points_raw.status().message()));
  }
  lossd::bench::SearchOptions search;
  if (find_max) {
    search.slo_p99_ns = absl::ToInt64Nanoseconds(absl::GetFlag(FLAGS_slo_p99));
    if (search.slo_p99_ns <= 0) Usage("--find_max_rps needs --slo_p99 > 0 (e.g. --slo_p99=5ms)");
    search.max_error_fraction = absl::GetFlag(FLAGS_slo_errors);
    search.min_achieved_fraction = absl::GetFlag(FLAGS_slo_achieved);
    search.precision = absl::GetFlag(FLAGS_search_precision);
    search.max_points = absl::GetFlag(FLAGS_search_max_points);
    for (auto [flag, text, out] :
         {std::tuple{"search_start_rps", absl::GetFlag(FLAGS_search_start_rps), &search.start_rps},
          std::tuple{"search_max_rps", absl::GetFlag(FLAGS_search_max_rps), &search.max_rps}}) {
      auto v = lossd::bench::ParseAmount(text);
      if (!v.ok()) Usage(absl::StrCat("--", flag, ": ", v.status().message()));
      *out = *v;
    }
    search.min_rps = std::min(1.0, search.start_rps);
    if (!(search.max_error_fraction > 0 && search.max_error_fraction <= 1)) {
      Usage(absl::StrCat("--slo_errors=", search.max_error_fraction, ": must be in (0, 1]"));
    }
    if (!(search.min_achieved_fraction > 0 && search.min_achieved_fraction <= 1)) {
      Usage(absl::StrCat("--slo_achieved=", search.min_achieved_fraction, ": must be in (0, 1]"));
    }
    if (!(search.precision > 0 && search.precision < 1)) {
      Usage(absl::StrCat("--search_precision=", search.precision, ": must be in (0, 1)"));
    }
    if (search.max_points < 1) {
      Usage(absl::StrCat("--search_max_points=", search.max_points, ": must be >= 1"));
    }
    if (search.max_rps < search.start_rps) {
      Usage(absl::StrCat("--search_max_rps=", absl::GetFlag(FLAGS_search_max_rps),
                         " is below --search_start_rps=", absl::GetFlag(FLAGS_search_start_rps)));
    }
    if (const absl::Status st = lossd::bench::ValidateSearchOptions(search); !st.ok()) {
      Usage(absl::StrCat("--find_max_rps: ", st.message()));
    }
  }
  std::vector<lossd::loadtest::LoadPoint> points;
  for (double v : *points_raw) {
    lossd::loadtest::LoadPoint p;
    p.open = open;
    p.poisson = poisson;
    if (open) {
      p.rate = v;
    } else {
      if (v != static_cast<double>(static_cast<int>(v)) || v > 100000) {
        Usage(absl::StrCat("--concurrency: ", v, " is not a whole number of callers"));
      }
      p.concurrency = static_cast<int>(v);
    }
    points.push_back(p);
  }

  lossd::loadtest::DriverOptions o;
  o.rpc = rpc;
  o.transport = transport;
  o.stream_window = absl::GetFlag(FLAGS_stream_window);
  o.accumulate_batches = absl::GetFlag(FLAGS_batches);
  o.warmup = absl::GetFlag(FLAGS_warmup);
  o.duration = absl::GetFlag(FLAGS_duration);
  o.requests = *requests;
  o.shared_channel = absl::GetFlag(FLAGS_shared_channel);
  o.channels = absl::GetFlag(FLAGS_channels);
  o.client_threads = absl::GetFlag(FLAGS_client_threads);
  o.verify = absl::GetFlag(FLAGS_verify);
  o.deadline = absl::GetFlag(FLAGS_deadline);
  o.max_outstanding = absl::GetFlag(FLAGS_max_outstanding);
  o.seed = absl::GetFlag(FLAGS_seed);
  if (o.stream_window < 1) Usage("--stream_window must be >= 1");
  if (o.accumulate_batches < 1) Usage("--batches must be >= 1");
  if (o.warmup < absl::ZeroDuration()) Usage("--warmup must be >= 0");
  if (o.requests == 0 && o.duration <= absl::ZeroDuration()) {
    Usage("--duration must be > 0 (or give --requests)");
  }
  if (o.channels < 1) Usage("--channels must be >= 1");
  if (o.client_threads < 0) Usage("--client_threads must be >= 0");
  if (o.max_outstanding < 1) Usage("--max_outstanding must be >= 1");
  if (o.deadline < absl::ZeroDuration()) Usage("--deadline must be >= 0");
  const int rounds = absl::GetFlag(FLAGS_rounds);
  if (rounds < 1) Usage("--rounds must be >= 1");
  if (const std::string md = absl::GetFlag(FLAGS_metadata); !md.empty()) {
    for (absl::string_view kv : absl::StrSplit(md, ',')) {
      std::pair<std::string, std::string> p = absl::StrSplit(kv, absl::MaxSplits('=', 1));
      if (p.first.empty() || kv.find('=') == absl::string_view::npos) {
        Usage(absl::StrCat("--metadata: \"", kv, "\" is not key=value"));
      }
      o.metadata.push_back(p);
    }
  }
  if (const std::string tf = absl::GetFlag(FLAGS_token_file); !tf.empty()) {
    const std::string token(absl::StripAsciiWhitespace(ReadFile(tf, "--token_file")));
    o.metadata.emplace_back("authorization", absl::StrCat("Bearer ", token));
  }
  lossd::bench::StopRule stop;
  stop.max_p99_ns = absl::ToInt64Nanoseconds(absl::GetFlag(FLAGS_stop_p99));
  stop.max_error_fraction = absl::GetFlag(FLAGS_stop_errors);
  if (stop.max_error_fraction < 0 || stop.max_error_fraction > 1) {
    Usage("--stop_errors must be in [0, 1]");
  }

  // Connection settings shared by every server.
  Endpoint base;
  const bool tls = absl::GetFlag(FLAGS_tls) || !absl::GetFlag(FLAGS_tls_ca).empty() ||
                   !absl::GetFlag(FLAGS_tls_cert).empty();
  if (h2 && (tls || !absl::GetFlag(FLAGS_tls_server_name).empty())) {
    Usage("--transport=h2 speaks plaintext HTTP/2 only: leave out --tls, --tls_ca, --tls_cert, "
          "--tls_key and --tls_server_name, or use --transport=grpc");
  }
  if (h2 && !absl::GetFlag(FLAGS_lb_policy).empty()) {
    Usage(absl::StrCat("--transport=h2 connects to one address: --lb_policy=",
                       absl::GetFlag(FLAGS_lb_policy), " needs --transport=grpc"));
  }
  if (h2 && absl::StrContains(absl::GetFlag(FLAGS_target), ",")) {
    Usage("--transport=h2 connects to one address: several --target addresses (balanced round "
          "robin) need --transport=grpc");
  }
  if (h2 && !absl::GetFlag(FLAGS_target).empty()) {
    if (auto t = lossd::loadtest::h2::ParseTarget(absl::GetFlag(FLAGS_target)); !t.ok()) {
      Usage(std::string(t.status().message()));
    }
  }
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    if (const std::string ca = absl::GetFlag(FLAGS_tls_ca); !ca.empty()) {
      ssl.pem_root_certs = ReadFile(ca, "--tls_ca");
    }
    const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key);
    if (cert.empty() != key.empty()) Usage("--tls_cert and --tls_key go together");
    if (!cert.empty()) {
      ssl.pem_cert_chain = ReadFile(cert, "--tls_cert");
      ssl.pem_private_key = ReadFile(key, "--tls_key");
    }
    base.credentials = grpc::SslCredentials(ssl);
    base.authority_override = absl::GetFlag(FLAGS_tls_server_name);
  }
  base.lb_policy = absl::GetFlag(FLAGS_lb_policy);

  const std::string target = absl::GetFlag(FLAGS_target);
  const Service target_service = Choose<Service>(
      "target_service", absl::GetFlag(FLAGS_target_service),
      {{"lossd", Service::kLossd}, {"echo", Service::kEcho}, {"raw", Service::kRaw}});
  if (target_service != Service::kLossd && (target.empty() || rpc != Rpc::kEvaluate || oip)) {
    Usage("--target_service=echo/raw needs --target, --rpc=evaluate and --protocol=lossd");
  }
  const bool self_check = absl::GetFlag(FLAGS_self_check);
  if (self_check) {
    if (open || rpc != Rpc::kEvaluate || oip || file_logits) {
      Usage("--self_check sends closed-loop lossd.v1 Evaluate calls of generated tensors: leave "
            "out --rps, --find_max_rps, --rpc, --protocol and --logits_npy");
    }
    if (target.empty() && absl::GetFlag(FLAGS_baselines) != "auto" &&
        absl::GetFlag(FLAGS_baselines) != "raw" && absl::GetFlag(FLAGS_baselines) != "echo") {
      Usage(absl::StrCat("--self_check measures one baseline: --baselines=raw or echo, not ",
                         absl::GetFlag(FLAGS_baselines)));
    }
    if (!target.empty() && target_service == Service::kLossd) {
      Usage("--self_check measures the raw or echo baseline: give --target_service with --target");
    }
    if (!OnCommandLine("concurrency")) points[0].concurrency = 16;
    if (points.size() != 1 || points[0].concurrency < 2) {
      Usage("--self_check needs one --concurrency of at least 2 (it splits the callers)");
    }
  }
  std::string baselines = absl::GetFlag(FLAGS_baselines);
  if (baselines == "auto") {
    baselines = self_check && target.empty() ? "raw"
                : target.empty() && rpc == Rpc::kEvaluate && !find_max && !self_check && !oip &&
                        !absl::GetFlag(FLAGS_shared_memory)
                    ? "echo,raw"
                    : "none";
  }
  std::vector<std::string> baseline_names;
  if (baselines != "none") {
    for (absl::string_view b : absl::StrSplit(baselines, ',')) {
      if (b != "echo" && b != "raw" && b != "python") {
        Usage(absl::StrCat("--baselines=", baselines, ": \"", b,
                           "\" is not a baseline (echo, raw, python or none)"));
      }
      if (std::find(baseline_names.begin(), baseline_names.end(), b) == baseline_names.end()) {
        baseline_names.emplace_back(b);
      }
    }
  }
  if (!baseline_names.empty() && oip) {
    Usage("the baselines serve lossd.v1-shaped calls: --baselines=none with --protocol=oip");
  }
  if (!baseline_names.empty() && rpc != Rpc::kEvaluate) {
    Usage("the baselines serve unary calls only: --baselines=none with --rpc");
  }
  const bool shared_memory = absl::GetFlag(FLAGS_shared_memory);
  const int shm_slots = absl::GetFlag(FLAGS_shared_memory_slots);
  if (shared_memory) {
    if (oip || rpc != Rpc::kEvaluate || self_check || target_service != Service::kLossd) {
      Usage("--shared_memory sends lossd.v1 unary Evaluate calls: leave out --protocol, --rpc, "
            "--self_check and --target_service");
    }
    if (!baseline_names.empty()) {
      Usage("--shared_memory measures lossd alone: --baselines=none (the baselines take bytes)");
    }
    if (absl::StrContains(target, ",")) {
      Usage("--shared_memory registers its region with one server: give one --target");
    }
    if (shm_slots < 1) Usage("--shared_memory_slots must be >= 1");
    if (open) o.max_outstanding = std::min<int64_t>(o.max_outstanding, shm_slots);
  }

  // ---- Requests.
  std::vector<RequestKind> kinds;
  if (file_logits) {
    mix->resize(1);
    (*mix)[0] = lossd::bench::MixEntry{1, static_cast<int64_t>(file_logits->values.size()), "ok"};
    auto k = lossd::loadtest::BuildKindFromArrays(*file_logits, *file_targets,
                                                  file_weight ? &*file_weight : nullptr, ro,
                                                  o.seed, o.verify);
    if (!k.ok()) Usage(absl::StrCat("--logits_npy: ", k.status().message()));
    kinds.push_back(*std::move(k));
  }
  for (size_t i = 0; i < mix->size() && !file_logits; ++i) {
    auto k = lossd::loadtest::BuildKind((*mix)[i], ro, o.seed + i, o.verify);
    if (!k.ok()) Usage(std::string(k.status().message()));
    kinds.push_back(*std::move(k));
  }
  const lossd::bench::MixPicker picker(*mix);

  // ---- Servers.
  signal(SIGPIPE, SIG_IGN);
  std::vector<Server> servers;
  auto start_process = [&](const std::string& name, std::vector<std::string> args) -> bool {
    auto child = Child::Start(args, name);
    if (!child) {
      std::fprintf(stderr, "lossd-bench: cannot start %s\n", args[0].c_str());
      return false;
    }
    const std::string address = child->WaitListening(std::chrono::seconds(30));
    if (address.empty()) {
      std::fprintf(stderr, "lossd-bench: %s did not start (%s); its output:\n%s\n", name.c_str(),
                   args[0].c_str(), child->Tail().c_str());
      return false;
    }
    Server s;
    s.name = name;
    s.service = name == "echo"  ? Service::kEcho
                : name == "raw" ? Service::kRaw
                : oip           ? Service::kOip
                                : Service::kLossd;
    s.endpoint = base;
    s.endpoint.target = address;
    s.endpoint.credentials = nullptr;  // processes started here serve plaintext on loopback
    s.endpoint.authority_override.clear();
    s.process = std::move(child);
    servers.push_back(std::move(s));
    return true;
  };
  const std::string build_dir = SelfDir() + "/../..";
  if (target.empty() && self_check) {
    // The self-check loads the raw baseline only (started below).
  } else if (target.empty()) {
    std::string bin = absl::GetFlag(FLAGS_lossd_binary);
    if (bin.empty()) bin = build_dir + "/server/lossd";
    std::vector<std::string> args = {bin, "--host=127.0.0.1", "--port=0", "--device=cpu",
                                     "--drain_timeout=2s"};
    for (absl::string_view a : absl::StrSplit(absl::GetFlag(FLAGS_lossd_args), ' ',
                                             absl::SkipEmpty())) {
      args.emplace_back(a);
    }
    if (!start_process("lossd", args)) return 1;
  } else {
    Server s;
    s.endpoint = base;
    std::vector<std::string> addrs = absl::StrSplit(target, ',', absl::SkipEmpty());
    if (addrs.size() > 1) {
      s.endpoint.target = absl::StrCat("ipv4:", absl::StrJoin(addrs, ","));
      if (s.endpoint.lb_policy.empty()) s.endpoint.lb_policy = "round_robin";
    } else {
      s.endpoint.target = target;
    }
    s.service = oip ? Service::kOip : target_service;
    s.name = oip ? NameByServerMetadata(s.endpoint, o.metadata)
             : target_service == Service::kLossd ? NameByCapabilities(s.endpoint, o.metadata)
                                                 : absl::GetFlag(FLAGS_target_service);
    servers.push_back(std::move(s));
  }
  for (const std::string& b : baseline_names) {
    if (b == "python") {
      // Copied into the build tree by tools/bench/CMakeLists.txt.
      if (!start_process(b, {absl::GetFlag(FLAGS_python),
                             build_dir + "/tools/bench/python_server.py", "--port=0"})) {
        return 1;
      }
      continue;
    }
    std::string bin = absl::GetFlag(FLAGS_baseline_server);
    if (bin.empty()) bin = build_dir + "/tools/bench/lossd_bench_server";
    if (!start_process(b, {bin, absl::StrCat("--service=", b), "--port=0"})) return 1;
  }

  // ---- --transport=h2: each server's address, resolved once for every run.
  for (Server& s : servers) {
    if (!h2) break;
    if (const absl::Status st = lossd::loadtest::ResolveForH2(&s.endpoint); !st.ok()) {
      std::fprintf(stderr, "lossd-bench: %s\n", std::string(st.message()).c_str());
      return 1;
    }
  }

  // ---- Shared memory (--shared_memory): one region for the server, sized for the most
  // callers of the sweep (closed loop) or --shared_memory_slots (open loop).
  std::unique_ptr<lossd::loadtest::SharedMemoryPlan> shm_plan;
  if (shared_memory) {
    int slots = shm_slots;
    if (!open) {
      slots = 1;
      for (const auto& p : points) slots = std::max(slots, p.concurrency);
    }
    auto plan = lossd::loadtest::SharedMemoryPlan::Create(servers[0].endpoint, o.metadata, kinds,
                                                          slots);
    if (!plan.ok()) {
      std::fprintf(stderr, "lossd-bench: --shared_memory: %s\n",
                   std::string(plan.status().message()).c_str());
      return 1;
    }
    shm_plan = *std::move(plan);
    o.shm = shm_plan.get();
  }

  // ---- Header.
  std::vector<std::string> kind_text;
  for (size_t i = 0; i < kinds.size(); ++i) {
    kind_text.push_back(absl::StrCat(kinds.size() > 1 ? absl::StrCat((*mix)[i].weight, " x ") : "",
                                     kinds[i].label));
  }
  const char* rpc_name = rpc == Rpc::kEvaluate ? "Evaluate"
                         : rpc == Rpc::kStream ? "EvaluateStream"
                                               : "Accumulate";
  const std::string config = absl::StrCat(
      oip ? "ModelInfer (oip)" : rpc_name,
      rpc == Rpc::kStream ? (open ? absl::StrCat(" (", o.channels, " streams)")
                                  : absl::StrCat(" (window ", o.stream_window, ")"))
                          : "",
      rpc == Rpc::kAccumulate ? absl::StrCat(" (", o.accumulate_batches, " batches)") : "", ", ",
      dtype_name, " ", absl::StrJoin(kind_text, " + "), ", ", absl::GetFlag(FLAGS_loss),
      " reduction ", absl::GetFlag(FLAGS_reduction), ", grad ", absl::GetFlag(FLAGS_grad),
      ro.precision == v1::PRECISION_DEFAULT ? "" : ", precision correctly_rounded",
      find_max ? absl::StrCat(", rate search for p99 <= ", absl::FormatDuration(
                                  absl::GetFlag(FLAGS_slo_p99)), " (", poisson ? "poisson" : "fixed", ")")
      : open ? absl::StrCat(", open loop (", poisson ? "poisson" : "fixed", ")")
           : absl::StrCat(", closed loop (", o.shared_channel ? "one shared channel" : "a channel per caller", ")"),
      ", warm-up ", absl::FormatDuration(o.warmup), ", ",
      o.requests > 0 ? absl::StrCat(o.requests, " calls") : absl::FormatDuration(o.duration),
      " per run, ", rounds, " round(s)", shared_memory ? ", shared memory" : "",
      h2 ? ", h2 transport" : "",
      o.verify ? ", verified" : "");
  std::printf("lossd-bench: %s\n", config.c_str());
  for (const Server& s : servers) {
    std::printf("  %-6s %s%s\n", s.name.c_str(), s.endpoint.target.c_str(),
                s.process ? " (started here)" : "");
  }
  if (shm_plan) std::printf("  %s\n", shm_plan->Describe().c_str());
  if (!self_check) std::printf("%s\n", lossd::bench::TableHeader().c_str());
  std::fflush(stdout);

  struct sigaction sa {};
  sa.sa_handler = OnSigint;
  sigaction(SIGINT, &sa, nullptr);

  // ---- Self-check (docs/perf.md, "Is lossd-bench the bottleneck?").
  if (self_check) {
    const Server& srv = servers[0];
    const int c = points[0].concurrency;
    auto tester = [&](int callers) {
      return std::vector<std::string>{
          absl::StrCat("--target=", srv.endpoint.target),
          absl::StrCat("--target_service=", srv.service == Service::kEcho ? "echo" : "raw"),
          absl::StrCat("--concurrency=", callers), absl::StrCat("--mix=", mix_text),
          absl::StrCat("--dtype=", dtype_name), absl::StrCat("--grad=", absl::GetFlag(FLAGS_grad)),
          absl::StrCat("--shared_channel=", o.shared_channel ? "true" : "false"),
          absl::StrCat("--client_threads=", o.client_threads),
          absl::StrCat("--transport=", absl::GetFlag(FLAGS_transport)),
          absl::StrCat("--warmup=", absl::FormatDuration(o.warmup)),
          absl::StrCat("--duration=", absl::FormatDuration(o.duration)), "--rounds=1",
          "--baselines=none", "--progress=false"};
    };
    const std::string prefix = absl::StrCat("/tmp/lossd-bench-self-check-", getpid());
    SelfCheckFigures one, two;
    bool failed = false;
    for (int r = 0; r < rounds && !g_interrupted && !failed; ++r) {
      for (int k = 0; k < 2 && !failed; ++k) {
        const bool pair = (r % 2 == 0) == (k == 1);  // one, two, two, one, ...
        if (absl::GetFlag(FLAGS_progress)) {
          std::fprintf(stderr, "self-check round %d/%d: %s\n", r + 1, rounds,
                       pair ? "two processes" : "one process");
        }
        const auto f = pair ? RunTesters({tester(c / 2), tester(c - c / 2)}, prefix)
                            : RunTesters({tester(c)}, prefix);
        if (!f) {
          failed = true;
          break;
        }
        SelfCheckFigures& sum = pair ? two : one;
        sum.qps += f->qps / rounds;
        sum.cpu_cores += f->cpu_cores / rounds;
        sum.errors += f->errors;
      }
    }
    if (failed || g_interrupted) {
      std::fprintf(stderr, "lossd-bench: the self-check %s\n",
                   g_interrupted ? "was interrupted" : "failed: a tester process did not finish");
      return g_interrupted ? 130 : 1;
    }
    const double ratio = one.qps > 0 ? two.qps / one.qps : 0;
    std::printf("self-check against %s at c%d: one process %.0f calls/s (client cpu %.0f%%), two "
                "processes %.0f calls/s (client cpu %.0f%%), errors %lld; two/one %.3f\n",
                srv.name.c_str(), c, one.qps, 100 * one.cpu_cores, two.qps, 100 * two.cpu_cores,
                static_cast<long long>(one.errors + two.errors), ratio);
    // Client CPU per successful call: independent of how much CPU the scheduler gave the
    // tester, so it tells what one fully used core could drive on a busy machine too.
    const double cpu_us_one = one.qps > 0 ? 1e6 * one.cpu_cores / one.qps : 0;
    const double cpu_us_two = two.qps > 0 ? 1e6 * two.cpu_cores / two.qps : 0;
    std::printf("  client cpu per call: %.1f us (one process), %.1f us (two): one core drives "
                "about %.0f calls/s\n",
                cpu_us_one, cpu_us_two, cpu_us_one > 0 ? 1e6 / cpu_us_one : 0.0);
    std::printf("%s\n", ratio <= 1.1 ? "  one lossd-bench process drives this server as fast as "
                                       "two (within 10%): it is not the bottleneck at this load"
                                     : "  two processes drove more than 10% more: at this load one "
                                       "lossd-bench process limits the figures (where client and "
                                       "server share few cores, they also compete for them)");
    if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
      std::ofstream out(path);
      out << "{\"tool\": \"lossd-bench\", \"config\": \"" << config
          << "\", \"self_check\": {\"server\": \"" << srv.name << "\", \"concurrency\": " << c
          << ", \"rounds\": " << rounds << ", \"one_process_qps\": " << one.qps
          << ", \"one_process_cpu_cores\": " << one.cpu_cores
          << ", \"two_processes_qps\": " << two.qps
          << ", \"two_processes_cpu_cores\": " << two.cpu_cores
          << ", \"errors\": " << one.errors + two.errors << ", \"two_over_one\": " << ratio
          << ", \"client_cpu_us_per_call_one\": " << cpu_us_one
          << ", \"client_cpu_us_per_call_two\": " << cpu_us_two
          << "}}\n";
    }
    return 0;
  }

  // ---- Sweep.
  std::vector<RowSummary> rows;
  std::vector<std::string> ratio_json;
  std::string stopped;
  const char* load_name = open ? (poisson ? "open-poisson" : "open-fixed") : "closed";
  std::vector<std::string> search_json;
  if (find_max) {
    // The sustainable-rate search (client/bench/search.h), server after server; each rate
    // tried is a row of the report like a sweep's.
    points.clear();
    for (size_t i = 0; i < servers.size() && !g_interrupted; ++i) {
      auto measure = [&](double rate) {
        lossd::loadtest::LoadPoint point;
        point.open = true;
        point.poisson = poisson;
        point.rate = rate;
        RunStats total;
        for (int r = 0; r < rounds && !g_interrupted; ++r) {
          lossd::loadtest::DriverOptions oi = o;
          oi.seed = o.seed + r;
          if (absl::GetFlag(FLAGS_progress)) {
            oi.progress_label = absl::StrCat(servers[i].name, " ", PointName(point), " round ",
                                             r + 1, "/", rounds);
            std::fprintf(stderr, "%s: measuring\n", oi.progress_label.c_str());
          }
          total.Merge(lossd::loadtest::RunLoad(servers[i].endpoint, servers[i].service, kinds,
                                               picker, point, oi, &g_interrupted));
        }
        RowLabel label{servers[i].name, load_name, 0.0, rate, rounds};
        rows.push_back(lossd::bench::Summarize(label, total));
        const RowSummary& row = rows.back();
        lossd::bench::SearchMeasurement m;
        m.p99_ns = static_cast<int64_t>(row.p99_us * 1000);
        m.sent = row.sent;
        m.errors = row.errors;
        m.achieved_rps = row.qps;
        m.interrupted = g_interrupted.load();
        const std::string verdict =
            m.interrupted ? "interrupted" : lossd::bench::SearchVerdict(search, rate, m);
        std::printf("%s  %s\n", lossd::bench::TableRow(row).c_str(),
                    verdict.empty() ? "holds" : absl::StrCat("fails: ", verdict).c_str());
        for (const auto& [code, n] : row.codes) {
          std::printf("    %s: %lld\n", code.c_str(), static_cast<long long>(n));
        }
        std::fflush(stdout);
        return m;
      };
      const lossd::bench::SearchResult result = lossd::bench::FindMaxRate(search, measure);
      if (result.best_rps > 0) {
        std::printf("%s: sustainable rate %.0f calls/s (p99 <= %s, errors < %g%%, achieved >= "
                    "%g of offered); %s%s\n",
                    servers[i].name.c_str(), result.best_rps,
                    absl::FormatDuration(absl::GetFlag(FLAGS_slo_p99)).c_str(),
                    100 * search.max_error_fraction, search.min_achieved_fraction,
                    result.failed_rps > 0
                        ? absl::StrFormat("%.0f/s failed; ", result.failed_rps).c_str()
                        : "",
                    result.end.c_str());
      } else {
        std::printf("%s: no sustainable rate found (%s)\n", servers[i].name.c_str(),
                    result.end.c_str());
      }
      std::fflush(stdout);
      search_json.push_back(lossd::bench::SearchJson(search, result, servers[i].name));
    }
    if (g_interrupted) stopped = "interrupted (SIGINT): the figures above cover what was measured";
  }
  for (const auto& point : points) {
    std::vector<RunStats> totals(servers.size());
    for (int r = 0; r < rounds && !g_interrupted; ++r) {
      for (size_t j = 0; j < servers.size() && !g_interrupted; ++j) {
        const size_t i = r % 2 == 0 ? j : servers.size() - 1 - j;  // A B B A ...
        lossd::loadtest::DriverOptions oi = o;
        oi.seed = o.seed + r;
        if (absl::GetFlag(FLAGS_progress)) {
          oi.progress_label = absl::StrCat(servers[i].name, " ", PointName(point), " round ",
                                           r + 1, "/", rounds);
          std::fprintf(stderr, "%s: measuring\n", oi.progress_label.c_str());
        }
        totals[i].Merge(lossd::loadtest::RunLoad(servers[i].endpoint, servers[i].service, kinds,
                                                 picker, point, oi, &g_interrupted));
      }
    }
    std::vector<RowSummary> here;
    for (size_t i = 0; i < servers.size(); ++i) {
      RowLabel label{servers[i].name, load_name, open ? 0.0 : static_cast<double>(point.concurrency),
                     open ? point.rate : 0.0, rounds};
      here.push_back(lossd::bench::Summarize(label, totals[i]));
      std::printf("%s\n", lossd::bench::TableRow(here.back()).c_str());
      for (const auto& [code, n] : here.back().codes) {
        std::printf("    %s: %lld\n", code.c_str(), static_cast<long long>(n));
      }
    }
    for (size_t i = 1; i < here.size(); ++i) {
      const auto ratio = lossd::bench::Compare(here[0], here[i]);
      std::printf("  %s/%s at %s: calls/s %.3f, p50 %.2fx (%+.1f us), p99 %.2fx\n",
                  here[0].label.server.c_str(), here[i].label.server.c_str(),
                  PointName(point).c_str(), ratio.qps_ratio, ratio.p50_ratio, ratio.p50_diff_us,
                  ratio.p99_ratio);
      ratio_json.push_back(absl::StrCat(
          "{\"load\": \"", load_name, "\", \"concurrency\": ", open ? 0 : point.concurrency,
          ", \"rate\": ", open ? point.rate : 0.0, ", \"ratio\": ", lossd::bench::RatioJson(ratio), "}"));
    }
    std::fflush(stdout);
    rows.insert(rows.end(), here.begin(), here.end());
    if (g_interrupted) {
      stopped = "interrupted (SIGINT): the figures above cover what was measured";
      break;
    }
    stopped = lossd::bench::StopReason(stop, static_cast<int64_t>(here[0].p99_us * 1000),
                                       here[0].sent, here[0].errors);
    if (!stopped.empty()) {
      stopped = absl::StrCat("sweep stopped after ", PointName(point), ": ", stopped);
      break;
    }
  }
  if (!stopped.empty()) std::printf("%s\n", stopped.c_str());

  // ---- Files.
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream out(path);
    std::vector<std::string> row_json, server_json;
    for (const auto& r : rows) row_json.push_back(lossd::bench::RowJson(r));
    for (const auto& s : servers) {
      server_json.push_back(absl::StrCat("{\"name\": \"", s.name, "\", \"target\": \"",
                                         s.endpoint.target, "\", \"started\": ",
                                         s.process ? "true" : "false", "}"));
    }
    std::string stopped_json = stopped;
    for (char& c : stopped_json) {
      if (c == '"' || c == '\\') c = '\'';
    }
    out << "{\"tool\": \"lossd-bench\", \"config\": \"" << config << "\", \"servers\": ["
        << absl::StrJoin(server_json, ", ") << "],\n \"rows\": [\n  "
        << absl::StrJoin(row_json, ",\n  ") << "],\n \"ratios\": [\n  "
        << absl::StrJoin(ratio_json, ",\n  ") << "],\n \"search\": ["
        << absl::StrJoin(search_json, ",\n  ") << "],\n \"stopped\": \"" << stopped_json
        << "\", \"interrupted\": " << (g_interrupted ? "true" : "false") << "}\n";
    if (!out) std::fprintf(stderr, "lossd-bench: cannot write %s\n", path.c_str());
  }
  if (const std::string path = absl::GetFlag(FLAGS_csv); !path.empty()) {
    std::ofstream out(path);
    out << lossd::bench::CsvHeader() << "\n";
    for (const auto& r : rows) out << lossd::bench::CsvRow(r) << "\n";
    if (!out) std::fprintf(stderr, "lossd-bench: cannot write %s\n", path.c_str());
  }
  shm_plan.reset();  // unregisters the region while its server still runs
  servers.clear();  // stops the processes started here
  return g_interrupted ? 130 : 0;
}
