"""End-to-end: lossd's KServe v2 / Open Inference Protocol REST API (docs/interop.md,
"HTTP/REST") on its own port (--http_port 0, read from the "lossd http on HOST:PORT" line),
called with Triton's own client, tritonclient.http, and with plain HTTP (http.client).

Every result is checked against the independent float64 reference (bce_reference.py) through
the lossd.v1 result of the same inputs and options, and the REST result must equal that lossd.v1
result bit for bit, in binary data and in JSON numbers alike. Bad requests must get the
protocol's HTTP status with a JSON body {"error": ...} naming the field and the values."""

from __future__ import annotations

import http.client
import json
import subprocess
import zlib

import numpy as np
import pytest

import lossd

tritonclient_http = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] is pinned in tests/requirements.txt")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import lossd_binary, start_server  # noqa: E402
from helpers import BF16, DTYPE_IDS, DTYPES, OIP_BCE_CASES, REDUCTIONS, assert_counted_once, \
    assert_models_ready, cast, check_result, http_address, make_inputs, oip_bad_requests, \
    oip_bce_case, oip_datatype, seed_of  # noqa: E402


@pytest.fixture(scope="module")
def rest_server():
    server = start_server("--http_port", "0", "--metrics_port", "0", "--metrics_host",
                          "127.0.0.1")
    try:
        yield server
    finally:
        rc = server.stop()
    assert rc == 0, f"lossd exited with status {rc}; stderr:\n{server.stderr_text()}"


@pytest.fixture(scope="module")
def address(rest_server) -> str:
    return http_address(rest_server)


@pytest.fixture(scope="module")
def triton(address):
    c = tritonclient_http.InferenceServerClient(url=address, network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def v1(rest_server):
    with lossd.Client(rest_server.target, timeout=60) as c:
        yield c


def _input(name: str, array: np.ndarray, binary: bool = True):
    """A tritonclient input; BF16 travels as float32 arrays the client truncates (exact for
    values that are bfloat16 already)."""
    dtype = oip_datatype(array.dtype)
    inp = tritonclient_http.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array.astype(np.float32) if dtype == "BF16" else array,
                            binary_data=binary)
    return inp


def _same(result, name: str, want: np.ndarray) -> None:
    """The REST output equals lossd.v1's bit for bit (BF16 arrives as float32, exactly)."""
    want = np.asarray(want)
    out = result.get_output(name)
    assert out["datatype"] == oip_datatype(want.dtype), (name, out["datatype"], want.dtype)
    assert tuple(out["shape"]) == want.shape, (name, out["shape"], want.shape)
    got = result.as_numpy(name)
    if BF16 is not None and want.dtype == BF16:
        want = want.astype(np.float32)
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes(), \
        f"{name}: REST values differ from lossd.v1"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(OIP_BCE_CASES))
def test_bce_with_logits_matches_reference_and_lossd_v1(v1, triton, dtype, reduction,
                                                       case) -> None:
    x, y, w, p, options = oip_bce_case(case, dtype, seed_of("rest", dtype, reduction, case))
    want = v1.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=reduction, grad=True,
                              grad_targets=True, device="cpu", **options)
    check_result(want, x, y, w, p, reduction, **options)  # the independent float64 reference
    # JSON tensors are FP32/FP64 only (FP16 and BF16 travel as binary data).
    json_ok = dtype in (np.float32, np.float64)
    for binary in (True, False) if json_ok else (True,):
        inputs = [_input("LOGITS", x, binary), _input("TARGETS", y, binary)]
        if w is not None:
            inputs.append(_input("WEIGHT", w, binary))
        if p is not None:
            inputs.append(_input("POS_WEIGHT", p))  # always binary: both kinds in one request
        outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary)
                   for n in ("LOSS", "GRAD_LOGITS", "GRAD_TARGETS")]
        result = triton.infer("bce_with_logits", inputs, outputs=outputs, request_id=f"r-{case}",
                              parameters={"reduction": reduction, "device": "cpu", **options})
        response = result.get_response()
        assert [o["name"] for o in response["outputs"]] == ["LOSS", "GRAD_LOGITS",
                                                            "GRAD_TARGETS"]
        assert all(("data" in o) != binary for o in response["outputs"])
        _same(result, "LOSS", want.loss)
        _same(result, "GRAD_LOGITS", want.grad)
        _same(result, "GRAD_TARGETS", want.grad_targets)
        assert response["model_name"] == "bce_with_logits" and response["model_version"] == "1"
        assert response["id"] == f"r-{case}"
        assert response["parameters"] == {"device": "cpu"}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_loss_matches_reference_and_lossd_v1(v1, triton, dtype,
                                                          reduction) -> None:
    alpha, gamma = 0.25, 1.5
    rng = np.random.default_rng(seed_of("rest-focal", dtype, reduction))
    x, y = make_inputs(rng, (4, 9), dtype)
    w = cast(rng.uniform(0, 2, (4, 9)), dtype)
    want = v1.sigmoid_focal_loss(x, y, weight=w, alpha=alpha, gamma=gamma, reduction=reduction,
                                 grad=True, device="cpu")
    check_result(want, x, y, w, None, reduction, grad_targets=False, focal=(alpha, gamma))
    result = triton.infer(
        "sigmoid_focal_loss", [_input("LOGITS", x), _input("TARGETS", y), _input("WEIGHT", w)],
        outputs=[tritonclient_http.InferRequestedOutput("GRAD_LOGITS"),
                 tritonclient_http.InferRequestedOutput("LOSS", binary_data=False)],
        parameters={"reduction": reduction, "alpha": alpha, "gamma": gamma})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["GRAD_LOGITS", "LOSS"]
    _same(result, "LOSS", want.loss)
    _same(result, "GRAD_LOGITS", want.grad)


def test_defaults_loss_only_in_binary(v1, triton) -> None:
    """No outputs named: tritonclient asks for binary_data_output, lossd sends LOSS (mean)."""
    x = np.array([[0.5, -2.0, 3.0], [1.0, 0.0, -1.0]], np.float32)
    y = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
    result = triton.infer("bce_with_logits", [_input("LOGITS", x), _input("TARGETS", y)])
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["LOSS"]
    assert response["outputs"][0]["parameters"] == {"binary_data_size": 4}
    want = v1.bce_with_logits(x, y)
    check_result(want, x, y, reduction="mean", grad=False, grad_targets=False)
    _same(result, "LOSS", want.loss)
    # Python ints where doubles are expected.
    result = triton.infer("sigmoid_focal_loss", [_input("LOGITS", x), _input("TARGETS", y)],
                          parameters={"gamma": 3, "reduction": "sum"})
    _same(result, "LOSS", v1.sigmoid_focal_loss(x, y, gamma=3.0, reduction="sum").loss)


def test_health_and_metadata(triton) -> None:
    assert_models_ready(triton)
    meta = triton.get_server_metadata()
    assert meta["name"] == "lossd" and meta["version"]
    assert meta["extensions"] == ["parameters", "model_configuration", "statistics",
                                  "system_shared_memory",
                                  "binary_tensor_data"]
    bce = triton.get_model_metadata("bce_with_logits")
    assert bce["name"] == "bce_with_logits" and bce["versions"] == ["1"]
    assert bce["platform"] == "lossd"
    assert [i["name"] for i in bce["inputs"]] == ["LOGITS", "TARGETS", "WEIGHT", "POS_WEIGHT"]
    assert [o["name"] for o in bce["outputs"]] == ["LOSS", "GRAD_LOGITS", "GRAD_TARGETS"]
    focal = triton.get_model_metadata("sigmoid_focal_loss", model_version="1")
    assert [i["name"] for i in focal["inputs"]] == ["LOGITS", "TARGETS", "WEIGHT"]
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("cross_entropy")
    assert e.value.status() == "404"
    assert "unknown model 'cross_entropy'" in e.value.message()


def test_bad_requests_get_clear_errors(triton) -> None:
    x, _, ok, cases = oip_bad_requests(_input, tritonclient_http.InferRequestedOutput, "404",
                                       "400")
    cases += [
        ("bce_with_logits", [_input("LOGITS", x.astype(np.float16), binary=False), ok[1]], {},
         "400", "input 'LOGITS': datatype FP16 has no JSON data in the protocol; send its bytes "
         "as binary data"),
        ("bce_with_logits", ok, {"parameters": {"device": "cuda"}}, "400",
         "device CUDA was requested but this server has no usable CUDA device"),
    ]
    for model, inputs, kwargs, status, message in cases:
        with pytest.raises(InferenceServerException) as e:
            triton.infer(model, inputs, **kwargs)
        assert e.value.status() == status, (model, kwargs, e.value)
        assert message in e.value.message(), (message, e.value.message())
    assert triton.is_server_live() and triton.is_model_ready("bce_with_logits")


# ---- plain HTTP: every route and error, the bytes on the wire ----------------------------

def _request(address: str, method: str, path: str, body: bytes = b"", headers=None,
             conn: http.client.HTTPConnection | None = None):
    """(status, headers, body) of one request; `conn` reuses a keep-alive connection."""
    own = conn is None
    if own:
        host, port = address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body if method == "POST" else None,
                     headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        if own:
            conn.close()


def _json(body: bytes) -> dict:
    return json.loads(body)


def _error(address, method, path, status, part, body=b"", headers=None) -> None:
    got, hdrs, data = _request(address, method, path, body, headers)
    assert got == status, (path, got, data)
    assert hdrs["Content-Type"] == "application/json"
    message = _json(data)["error"]
    assert part in message, (part, message)


INFER = "/v2/models/bce_with_logits/infer"
X = [[0.5, -2.0, 3.0], [1.0, 0.0, -1.0]]
Y = [[1.0, 0.0, 0.25], [0.0, 1.0, 1.0]]


def _json_request(**extra) -> dict:
    return {"inputs": [
        {"name": "LOGITS", "datatype": "FP64", "shape": [2, 3], "data": X},
        {"name": "TARGETS", "datatype": "FP32", "shape": [2, 3],
         "data": [v for row in Y for v in row]}], **extra}


def test_plain_json_routes(address, v1) -> None:
    status, headers, body = _request(address, "GET", "/v2/health/live")
    assert (status, _json(body)) == (200, {"live": True})
    assert headers["Content-Type"] == "application/json"
    assert _request(address, "GET", "/v2/health/ready")[0] == 200
    assert _request(address, "GET", "/v2/models/bce_with_logits/ready")[0] == 200
    assert _request(address, "GET", "/v2/models/bce_with_logits/versions/1/ready")[0] == 200
    assert _request(address, "GET", "/v2/models/nope/ready")[0] == 400
    assert _json(_request(address, "GET", "/v2")[2])["name"] == "lossd"
    meta = _json(_request(address, "GET", "/v2/models/sigmoid_focal_loss/versions/1")[2])
    assert meta["outputs"] == [{"name": "LOSS", "datatype": "FP32", "shape": [-1]},
                               {"name": "GRAD_LOGITS", "datatype": "FP32", "shape": [-1]}]
    # An infer with JSON tensors and JSON outputs, as curl sends it.
    request = _json_request(id="plain", parameters={"reduction": "none", "label_smoothing": 0.2},
                            outputs=[{"name": "LOSS"}, {"name": "GRAD_TARGETS"}])
    status, headers, body = _request(address, "POST", INFER, json.dumps(request).encode(),
                                     {"Content-Type": "application/json"})
    assert status == 200, body
    assert "Inference-Header-Content-Length" not in headers
    reply = _json(body)
    x = np.array(X, np.float64)
    y = np.array(Y, np.float32)
    want = v1.bce_with_logits(x, y, reduction="none", label_smoothing=0.2, grad=True,
                              grad_targets=True)
    check_result(want, x, y, reduction="none", label_smoothing=0.2)
    assert reply["id"] == "plain"
    assert [o["name"] for o in reply["outputs"]] == ["LOSS", "GRAD_TARGETS"]
    loss, grad_targets = reply["outputs"]
    assert loss["datatype"] == "FP64" and loss["shape"] == [2, 3]
    # JSON numbers are exact: they parse back to the same float64 bits.
    assert np.array(loss["data"], np.float64).tobytes() == want.loss.tobytes()
    assert np.array(grad_targets["data"], np.float64).tobytes() == want.grad_targets.tobytes()


def test_plain_binary_request_and_reply(address, v1) -> None:
    """Triton's binary tensor data extension byte by byte: JSON, then each input's bytes;
    the reply's Inference-Header-Content-Length splits its JSON from the outputs' bytes."""
    x = np.array(X, np.float32)
    y = np.array(Y, np.float32)
    header = json.dumps({
        "inputs": [{"name": "LOGITS", "datatype": "FP32", "shape": [2, 3],
                    "parameters": {"binary_data_size": x.nbytes}},
                   {"name": "TARGETS", "datatype": "FP32", "shape": [2, 3],
                    "parameters": {"binary_data_size": y.nbytes}}],
        "parameters": {"reduction": "per_sample_mean"},
        "outputs": [{"name": "GRAD_LOGITS", "parameters": {"binary_data": True}},
                    {"name": "LOSS", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = _request(
        address, "POST", INFER, header + x.tobytes() + y.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)),
         "Content-Type": "application/octet-stream"})
    assert status == 200, body
    assert headers["Content-Type"] == "application/octet-stream"
    n = int(headers["Inference-Header-Content-Length"])
    reply = _json(body[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in reply["outputs"]]
    assert sizes == [24, 8] and len(body) == n + 32
    want = v1.bce_with_logits(x, y, reduction="per_sample_mean", grad=True)
    check_result(want, x, y, reduction="per_sample_mean", grad_targets=False)
    assert body[n:n + 24] == want.grad.tobytes()
    assert body[n + 24:] == want.loss.tobytes()


def test_plain_errors(address) -> None:
    _error(address, "GET", "/v2/models/cross_entropy", 404, "unknown model 'cross_entropy'")
    _error(address, "GET", "/v1/whatever", 404, "no route GET /v1/whatever")
    _error(address, "GET", INFER, 405, "method GET is not allowed")
    _error(address, "POST", "/v2/health/ready", 405, "use GET")
    _error(address, "POST", INFER, 400, "the request's JSON is malformed", b'{"inputs": [')
    _error(address, "POST", INFER, 400, "unknown field \"input\" in the inference request",
           b'{"input": []}')
    good = json.dumps(_json_request()).encode()
    _error(address, "POST", "/v2/models/sigmoid_focal_loss/versions/9/infer", 404,
           "model 'sigmoid_focal_loss' has no version '9'", good)
    _error(address, "POST", INFER, 400, "header Inference-Header-Content-Length \"99999\" is not "
           "a byte count within the body's Content-Length", good,
           {"Inference-Header-Content-Length": "99999"})
    _error(address, "POST", INFER, 400, "header Inference-Header-Content-Length \"-5\"", good,
           {"Inference-Header-Content-Length": "-5"})
    bad_size = json.dumps({"inputs": [
        {"name": "LOGITS", "datatype": "FP32", "shape": [2],
         "parameters": {"binary_data_size": -8}},
        {"name": "TARGETS", "datatype": "FP32", "shape": [2], "data": [1, 0]}]}).encode()
    _error(address, "POST", INFER, 400, "parameter 'binary_data_size' must be a non-negative "
           "integer; got integer -8", bad_size + bytes(8),
           {"Inference-Header-Content-Length": str(len(bad_size))})
    big_size = bad_size.replace(b"-8", b"4096")
    _error(address, "POST", INFER, 400, "binary_data_size 4096 is more than the 8 bytes",
           big_size + bytes(8), {"Inference-Header-Content-Length": str(len(big_size))})
    _error(address, "POST", INFER, 415, "Content-Encoding \"gzip\" is not supported",
           zlib.compress(good), {"Content-Encoding": "gzip"})
    shape = json.dumps(_json_request()).replace('"shape": [2, 3]', '"shape": [2, -3]', 1)
    _error(address, "POST", INFER, 400, "input 'LOGITS': shape [2,-3] has negative dimension 1",
           shape.encode())


def test_body_limit_length_and_keep_alive(server_factory) -> None:
    server = server_factory("--http_port", "0", "--max_message_bytes", "4096")
    address = http_address(server)
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        # Refused requests keep the connection usable (their unread body is skipped).
        big = json.dumps(_json_request(id="x" * 5000)).encode()
        status, _, body = _request(address, "POST", INFER, big, conn=conn)
        assert status == 413 and "over the server's limit of 4096 bytes" in _json(body)["error"]
        status, _, body = _request(address, "POST", INFER, b"{", conn=conn)
        assert status == 400
        status, _, body = _request(address, "POST", INFER, json.dumps(_json_request()).encode(),
                                   conn=conn)
        assert status == 200, body
        # No Content-Length (a chunked body).
        conn.putrequest("POST", INFER)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"2\r\n{}\r\n0\r\n\r\n")
        reply = conn.getresponse()
        assert reply.status == 411 and "no Content-Length" in _json(reply.read())["error"]
    finally:
        conn.close()


def test_token_drain_and_metrics(server_factory, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("rest-s3cret\n")
    server = server_factory("--http_port", "0", "--auth_token_file", str(token_file),
                            "--metrics_port", "0", "--metrics_host", "127.0.0.1")
    address = http_address(server)
    body = json.dumps(_json_request(parameters={"reduction": "sum"})).encode()
    assert _request(address, "GET", "/v2/health/ready")[0] == 200  # probes need no token
    status, headers, data = _request(address, "POST", INFER, body)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert "missing \"Authorization: Bearer <token>\" header" in _json(data)["error"]
    _error(address, "GET", "/v2", 401, "invalid bearer token",
           headers={"Authorization": "Bearer nope"})
    client = tritonclient_http.InferenceServerClient(url=address)
    try:
        inputs = [_input("LOGITS", np.array(X, np.float32)),
                  _input("TARGETS", np.array(Y, np.float32))]
        result = client.infer("bce_with_logits", inputs, parameters={"reduction": "sum"},
                              headers={"Authorization": "Bearer rest-s3cret"})
    finally:
        client.close()
    with lossd.Client(server.target, token="rest-s3cret") as c:
        want = c.bce_with_logits(np.array(X, np.float32), np.array(Y, np.float32),
                                 reduction="sum")
    _same(result, "LOSS", want.loss)
    assert_counted_once(server, ("ModelInfer", "OK", "cpu"),
                        ("ModelInfer", "UNAUTHENTICATED", "none"), ("ServerReady", "OK", "none"))
    # SIGTERM: the server drains and exits 0 (server_factory checks the exit status).
    assert server.stop() == 0


def test_http_port_refused_with_tls(tmp_path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not used: the flags are refused first\n")
    proc = subprocess.run([str(lossd_binary()), "--port", "0", "--host", "127.0.0.1",
                           "--http_port", "0", "--tls_cert", str(pem), "--tls_key", str(pem)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "cannot be combined with TLS" in proc.stderr, proc.stderr

