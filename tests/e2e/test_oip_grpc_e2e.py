"""End-to-end: lossd's KServe v2 / Open Inference Protocol gRPC API (inference.
GRPCInferenceService, docs/interop.md) called with Triton's own client, tritonclient.grpc.

Every result is compared bit for bit with the lossd.v1 result of the same inputs and options,
computed by the lossd Python client against the same server: the two APIs share one validation
and one compute path, so the bytes must be identical for every dtype, reduction and option.
Bad requests must fail with the protocol's error (a gRPC status) and a message naming the
model, input, output or parameter."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import lossd

tritonclient_grpc = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is pinned in tests/requirements.txt")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
import tritonclient.utils as tritonclient_utils  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from helpers import DTYPE_IDS, DTYPES, OIP_BCE_CASES, REDUCTIONS, assert_counted_once, \
    assert_models_ready, cast, make_inputs, oip_bad_requests, oip_bce_case, oip_datatype, \
    seed_of  # noqa: E402


def _input(name: str, array: np.ndarray):
    """A tritonclient input (BF16 travels as float32 arrays the client truncates: exact for
    values that are bfloat16 already)."""
    dtype = tritonclient_utils.np_to_triton_dtype(array.dtype) if array.dtype.kind == "i" \
        else oip_datatype(array.dtype)
    inp = tritonclient_grpc.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array.astype(np.float32) if dtype == "BF16" else array)
    return inp


@pytest.fixture(scope="module")
def triton(lossd_target: str):
    with tritonclient_grpc.InferenceServerClient(url=lossd_target) as c:
        yield c


def _raw_outputs(result) -> dict:
    """{output name: (datatype, shape, raw bytes)} of a tritonclient InferResult."""
    response = result.get_response()
    assert len(response.outputs) == len(response.raw_output_contents)
    return {o.name: (o.datatype, tuple(o.shape), raw)
            for o, raw in zip(response.outputs, response.raw_output_contents)}


def _expect_same(outputs: dict, name: str, want: np.ndarray, result) -> None:
    datatype, shape, raw = outputs[name]
    assert datatype == oip_datatype(want.dtype), (name, datatype, want.dtype)
    assert shape == want.shape, (name, shape, want.shape)
    assert raw == np.ascontiguousarray(want).tobytes(), f"{name}: bytes differ from lossd.v1"
    got = result.as_numpy(name)
    assert got.shape == want.shape


def _params(reduction: str, **options) -> dict:
    params = {"reduction": reduction, "device": "cpu"}
    for key, v in options.items():
        if key in ("weight", "pos_weight"):
            continue
        params[key] = v
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", sorted(OIP_BCE_CASES))
def test_bce_with_logits_equals_lossd_v1(client, triton, dtype, reduction, case) -> None:
    x, y, w, p, options = oip_bce_case(case, dtype, seed_of("oip", dtype, reduction, case))
    want = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=reduction, grad=True,
                                  grad_targets=True, device="cpu", **options)
    inputs = [_input("LOGITS", x), _input("TARGETS", y)]
    if w is not None:
        inputs.append(_input("WEIGHT", w))
    if p is not None:
        inputs.append(_input("POS_WEIGHT", p))
    outputs = [tritonclient_grpc.InferRequestedOutput(n)
               for n in ("LOSS", "GRAD_LOGITS", "GRAD_TARGETS")]
    result = triton.infer("bce_with_logits", inputs, outputs=outputs, request_id=f"r-{case}",
                          parameters=_params(reduction, **options))
    got = _raw_outputs(result)
    assert list(got) == ["LOSS", "GRAD_LOGITS", "GRAD_TARGETS"]
    _expect_same(got, "LOSS", np.asarray(want.loss), result)
    _expect_same(got, "GRAD_LOGITS", want.grad, result)
    _expect_same(got, "GRAD_TARGETS", want.grad_targets, result)
    response = result.get_response()
    assert response.model_name == "bce_with_logits" and response.model_version == "1"
    assert response.id == f"r-{case}"
    assert response.parameters["device"].string_param == "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.5), (0.7, 0.0)])
def test_sigmoid_focal_loss_equals_lossd_v1(client, triton, dtype, reduction, alpha,
                                            gamma) -> None:
    rng = np.random.default_rng(seed_of("oip-focal", dtype, reduction, alpha, gamma))
    x, y = make_inputs(rng, (4, 9), dtype)
    w = cast(rng.uniform(0, 2, (4, 9)), dtype)
    want = client.sigmoid_focal_loss(x, y, weight=w, alpha=alpha, gamma=gamma,
                                     reduction=reduction, grad=True, device="cpu")
    result = triton.infer(
        "sigmoid_focal_loss", [_input("LOGITS", x), _input("TARGETS", y), _input("WEIGHT", w)],
        outputs=[tritonclient_grpc.InferRequestedOutput("GRAD_LOGITS"),
                 tritonclient_grpc.InferRequestedOutput("LOSS")],
        parameters={"reduction": reduction, "alpha": alpha, "gamma": gamma})
    got = _raw_outputs(result)
    assert list(got) == ["GRAD_LOGITS", "LOSS"]
    _expect_same(got, "LOSS", np.asarray(want.loss), result)
    _expect_same(got, "GRAD_LOGITS", want.grad, result)


def test_defaults_loss_only_mean_and_integer_parameters(client, triton) -> None:
    x = np.array([[0.5, -2.0, 3.0], [1.0, 0.0, -1.0]], np.float32)
    y = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
    result = triton.infer("bce_with_logits", [_input("LOGITS", x), _input("TARGETS", y)])
    got = _raw_outputs(result)
    assert list(got) == ["LOSS"]  # no outputs requested: LOSS only
    _expect_same(got, "LOSS", np.asarray(client.bce_with_logits(x, y).loss), result)
    # An int where a double is expected (tritonclient sends Python ints as int64_param).
    result = triton.infer("sigmoid_focal_loss", [_input("LOGITS", x), _input("TARGETS", y)],
                          parameters={"gamma": 3, "reduction": "sum"})
    want = client.sigmoid_focal_loss(x, y, gamma=3.0, reduction="sum")
    _expect_same(_raw_outputs(result), "LOSS", np.asarray(want.loss), result)


def test_typed_contents_equal_raw_contents(client, lossd_target) -> None:
    """fp32_contents / fp64_contents (the protocol's typed tensors, which tritonclient never
    sends) give the same bytes as raw_input_contents."""
    x = np.array([0.25, -4.0, 7.5, 1e-3], np.float64)
    y = np.array([1.0, 0.0, 0.5, 1.0], np.float64)
    want = client.bce_with_logits(x, y, reduction="none", grad=True)
    request = service_pb2.ModelInferRequest(model_name="bce_with_logits", id="typed")
    for name, a in (("LOGITS", x), ("TARGETS", y.astype(np.float32))):
        t = request.inputs.add(name=name, datatype=oip_datatype(a.dtype), shape=list(a.shape))
        if a.dtype == np.float64:
            t.contents.fp64_contents.extend(a.tolist())
        else:
            t.contents.fp32_contents.extend(a.tolist())
    request.outputs.add(name="LOSS")
    request.outputs.add(name="GRAD_LOGITS")
    request.parameters["reduction"].string_param = "none"
    with grpc.insecure_channel(lossd_target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request,
                                                                                 timeout=30)
    assert [o.name for o in response.outputs] == ["LOSS", "GRAD_LOGITS"]
    assert response.raw_output_contents[0] == want.loss.tobytes()
    assert response.raw_output_contents[1] == want.grad.tobytes()


def test_health_and_metadata(triton) -> None:
    assert_models_ready(triton)
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "lossd" and meta["version"]
    assert meta["extensions"] == ["parameters", "model_configuration", "statistics",
                                  "system_shared_memory"]
    bce = triton.get_model_metadata("bce_with_logits", as_json=True)
    assert bce["name"] == "bce_with_logits" and bce["versions"] == ["1"]
    assert bce["platform"] == "lossd"
    assert [i["name"] for i in bce["inputs"]] == ["LOGITS", "TARGETS", "WEIGHT", "POS_WEIGHT"]
    assert [o["name"] for o in bce["outputs"]] == ["LOSS", "GRAD_LOGITS", "GRAD_TARGETS"]
    focal = triton.get_model_metadata("sigmoid_focal_loss")
    assert [i.name for i in focal.inputs] == ["LOGITS", "TARGETS", "WEIGHT"]
    assert [o.name for o in focal.outputs] == ["LOSS", "GRAD_LOGITS"]
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("cross_entropy")
    assert "NOT_FOUND" in str(e.value.status())
    assert "unknown model 'cross_entropy'" in e.value.message()
    # Triton's extensions other than statistics, model configuration (test_oip_stats_e2e.py)
    # and system shared memory (test_oip_shm_e2e.py) are not served.
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_repository_index()
    assert "UNIMPLEMENTED" in str(e.value.status())


def _infer_error(triton, model, inputs, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        triton.infer(model, inputs, **kwargs)
    return e.value


def test_bad_requests_get_clear_errors(triton) -> None:
    x, y, ok, cases = oip_bad_requests(_input, tritonclient_grpc.InferRequestedOutput,
                                       "NOT_FOUND", "INVALID_ARGUMENT")
    cases += [
        ("bce_with_logits", [ok[0], _input("LABELS", y)], {}, "INVALID_ARGUMENT",
         "unknown input 'LABELS' for model 'bce_with_logits'; its inputs are LOGITS, TARGETS, "
         "WEIGHT, POS_WEIGHT"),
        ("bce_with_logits", [_input("LOGITS", x.astype(np.int32)), ok[1]], {},
         "INVALID_ARGUMENT", "input 'LOGITS': datatype 'INT32' of model 'bce_with_logits' is not "
         "supported; expected one of FP32, FP64, FP16, BF16"),
        ("bce_with_logits", ok, {"parameters": {"gamma": 2.0}}, "INVALID_ARGUMENT",
         "unknown parameter 'gamma' for model 'bce_with_logits'"),
        ("bce_with_logits", ok, {"parameters": {"device": "tpu"}}, "INVALID_ARGUMENT",
         "parameter 'device' 'tpu' is not one of auto, cpu, cuda"),
    ]
    for model, inputs, kwargs, code, message in cases:
        err = _infer_error(triton, model, inputs, **kwargs)
        assert code in str(err.status()), (model, kwargs, err)
        assert message in err.message(), (message, err.message())
    # The server is still serving.
    assert triton.is_server_live() and triton.is_model_ready("bce_with_logits")


def test_token_metrics_and_lossd_v1_share_the_server(server_factory, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("oip-s3cret\n")
    server = server_factory("--auth_token_file", str(token_file), "--metrics_port", "0",
                            "--metrics_host", "127.0.0.1")
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    y = (x > 0).astype(np.float32)
    with tritonclient_grpc.InferenceServerClient(url=server.target) as triton:
        assert triton.is_server_live()  # probes need no token
        err = _infer_error(triton, "bce_with_logits", [_input("LOGITS", x), _input("TARGETS", y)])
        assert "UNAUTHENTICATED" in str(err.status())
        headers = {"authorization": "Bearer oip-s3cret"}
        result = triton.infer("bce_with_logits", [_input("LOGITS", x), _input("TARGETS", y)],
                              headers=headers, parameters={"reduction": "sum"})
    with lossd.Client(server.target, token="oip-s3cret") as c:
        want = c.bce_with_logits(x, y, reduction="sum")
    assert _raw_outputs(result)["LOSS"][2] == np.asarray(want.loss).tobytes()
    assert_counted_once(server, ("ModelInfer", "OK", "cpu"),
                        ("ModelInfer", "UNAUTHENTICATED", "none"), ("Evaluate", "OK", "cpu"))
