"""End-to-end: Triton's statistics and model configuration extensions of lossd's KServe v2 /
Open Inference Protocol API (docs/interop.md, "Statistics and configuration"), called with
Triton's own clients over both protocols: tritonclient.grpc (ModelStatistics, ModelConfig) and
tritonclient.http (GET /v2/models[/{name}]/stats, GET /v2/models/{name}/config), against one
server whose counters start at zero.

The project's proto declares only the subset of Triton's messages that lossd fills; its field
names, numbers and types are checked here against the descriptors of the installed
tritonclient, so that the real client parses what lossd sends."""

from __future__ import annotations

import time

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is pinned in tests/requirements.txt")
tritonclient_http = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] is pinned in tests/requirements.txt")
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import REPO  # noqa: E402
from helpers import http_address  # noqa: E402

X = np.array([[0.5, -2.0, 3.0], [0.0, 1.5, -0.25]], np.float32)
Y = np.array([[1.0, 0.0, 0.25], [1.0, 0.0, 1.0]], np.float32)


def _inputs(module, x=X, y=Y):
    out = []
    for name, a in (("LOGITS", x), ("TARGETS", y)):
        inp = module.InferInput(name, list(a.shape), "FP32")
        inp.set_data_from_numpy(a)
        out.append(inp)
    return out


def _fails(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kwargs)
    return e.value


def _ms() -> int:
    return time.time_ns() // 1_000_000


def test_proto_matches_tritonclient(tmp_path) -> None:
    """Every message, field, enum value and call of proto/inference/grpc_predict_v2.proto has
    the name, number, type and label of tritonclient's (which has more fields)."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "oip.pb"
    assert protoc.main(["protoc", f"-I{REPO / 'proto'}", f"--descriptor_set_out={out}",
                        str(REPO / "proto/inference/grpc_predict_v2.proto")]) == 0
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    (ours,) = fds.file
    theirs = {}
    for module in (service_pb2, model_config_pb2):
        fp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fp)
        theirs.update({m.name: m for m in fp.message_type})
        theirs.update({e.name: e for e in fp.enum_type})
    assert ours.package == "inference"

    def check(msg, their) -> None:
        fields = {f.name: f for f in their.field}
        for f in msg.field:
            assert f.name in fields, f"{msg.name}.{f.name} is not in tritonclient's proto"
            t = fields[f.name]
            assert (f.number, f.type, f.label, f.type_name) == \
                (t.number, t.type, t.label, t.type_name), (msg.name, f, t)
        nested = {n.name: n for n in their.nested_type}
        for n in msg.nested_type:
            check(n, nested[n.name])

    for msg in ours.message_type:
        check(msg, theirs[msg.name])
    for enum in ours.enum_type:
        assert [(v.name, v.number) for v in enum.value] == \
            [(v.name, v.number) for v in theirs[enum.name].value]
    methods = {m.name: m for m in service_pb2.DESCRIPTOR.services_by_name[
        "GRPCInferenceService"].methods}
    (service,) = ours.service
    for m in service.method:
        t = methods[m.name]
        assert (m.input_type, m.output_type) == \
            ("." + t.input_type.full_name, "." + t.output_type.full_name), m.name
    assert {"ModelStatistics", "ModelConfig", "SystemSharedMemoryStatus",
            "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"} <= \
        {m.name for m in service.method}
    # The system shared memory messages are declared whole: every field of tritonclient's.
    ours_by_name = {m.name: m for m in ours.message_type}
    for name in ("SystemSharedMemoryStatusRequest", "SystemSharedMemoryStatusResponse",
                 "SystemSharedMemoryRegisterRequest", "SystemSharedMemoryRegisterResponse",
                 "SystemSharedMemoryUnregisterRequest", "SystemSharedMemoryUnregisterResponse"):
        assert name in ours_by_name, f"{name} is not declared"

        def fields(m):
            return sorted((f.name, f.number, f.type, f.label, f.type_name) for f in m.field)

        def whole(msg, their) -> None:
            assert fields(msg) == fields(their), msg.name
            assert sorted(n.name for n in msg.nested_type) == \
                sorted(n.name for n in their.nested_type), msg.name
            nested = {n.name: n for n in their.nested_type}
            for n in msg.nested_type:
                whole(n, nested[n.name])
                assert n.options.map_entry == nested[n.name].options.map_entry, n.name

        whole(ours_by_name[name], theirs[name])


def test_statistics_count_infers_of_both_protocols(server_factory) -> None:
    server = server_factory("--http_port", "0")
    g = tritonclient_grpc.InferenceServerClient(url=server.target)
    h = tritonclient_http.InferenceServerClient(url=http_address(server))
    try:
        # Nothing yet: every model at zero.
        before = g.get_inference_statistics()
        assert [m.name for m in before.model_stats] == ["bce_with_logits", "sigmoid_focal_loss"]
        for m in before.model_stats:
            assert m.version == "1"
            assert m.inference_count == m.execution_count == m.last_inference == 0
            assert m.inference_stats.success.count == m.inference_stats.fail.count == 0
        start_ms = _ms()
        # bce_with_logits: 3 successes and 2 failures over gRPC, 2 and 1 over REST.
        for _ in range(3):
            g.infer("bce_with_logits", _inputs(tritonclient_grpc),
                    parameters={"reduction": "none"})
        _fails(g.infer, "bce_with_logits", _inputs(tritonclient_grpc),
               parameters={"reduction": "avg"})
        _fails(g.infer, "bce_with_logits", _inputs(tritonclient_grpc, y=Y[:1]))
        for _ in range(2):
            h.infer("bce_with_logits", _inputs(tritonclient_http))
        _fails(h.infer, "bce_with_logits", _inputs(tritonclient_http),
               parameters={"label_smoothing": 2.0})
        # sigmoid_focal_loss: 1 success over REST.
        h.infer("sigmoid_focal_loss", _inputs(tritonclient_http))
        # Unknown models count for no model.
        _fails(g.infer, "cross_entropy", _inputs(tritonclient_grpc))
        _fails(h.infer, "cross_entropy", _inputs(tritonclient_http))
        end_ms = _ms()

        # gRPC, as the message.
        stats = g.get_inference_statistics("bce_with_logits")
        (bce,) = stats.model_stats
        assert (bce.name, bce.version) == ("bce_with_logits", "1")
        assert bce.inference_count == 5 and bce.execution_count == 5
        assert start_ms <= bce.last_inference <= end_ms
        s = bce.inference_stats
        assert s.success.count == 5 and s.fail.count == 3
        assert s.success.ns > 0 and s.fail.ns > 0
        assert s.queue.count == 5 and s.compute_infer.count == 5
        assert 0 < s.compute_infer.ns <= s.success.ns
        assert s.compute_input.count == 0 and s.compute_output.count == 0
        assert [b.batch_size for b in bce.batch_stats] == [1]
        assert bce.batch_stats[0].compute_infer.count == 5

        # gRPC as JSON (protobuf's JSON: 64-bit integers as strings), every model.
        everything = g.get_inference_statistics(as_json=True)["model_stats"]
        assert [m["name"] for m in everything] == ["bce_with_logits", "sigmoid_focal_loss"]
        assert everything[0]["inference_count"] == "5"
        focal = everything[1]
        assert focal["inference_count"] == "1" and focal["execution_count"] == "1"
        assert focal["inference_stats"]["success"]["count"] == "1"
        assert "count" not in focal["inference_stats"].get("fail", {})  # zero: left out

        # REST: Triton's JSON, the same counts.
        rest = h.get_inference_statistics("bce_with_logits")["model_stats"]
        assert len(rest) == 1
        r = rest[0]
        assert (r["name"], r["version"]) == ("bce_with_logits", "1")
        assert r["inference_count"] == 5 and r["execution_count"] == 5
        assert start_ms <= r["last_inference"] <= end_ms
        assert r["inference_stats"]["success"]["count"] == 5
        assert r["inference_stats"]["fail"]["count"] == 3
        assert r["inference_stats"]["success"]["ns"] >= s.success.ns
        assert r["inference_stats"]["compute_output"] == {"count": 0, "ns": 0}
        rest_all = h.get_inference_statistics()["model_stats"]
        assert [m["name"] for m in rest_all] == ["bce_with_logits", "sigmoid_focal_loss"]
        assert rest_all[1]["inference_count"] == 1
        assert rest_all[1]["inference_stats"]["fail"]["count"] == 0
        assert h.get_inference_statistics("sigmoid_focal_loss",
                                          model_version="1")["model_stats"][0]["name"] == \
            "sigmoid_focal_loss"

        # Unknown models and versions.
        e = _fails(g.get_inference_statistics, "cross_entropy")
        assert "NOT_FOUND" in str(e.status())
        assert "unknown model 'cross_entropy'; this server has models bce_with_logits, " \
            "sigmoid_focal_loss" in e.message()
        e = _fails(g.get_inference_statistics, "bce_with_logits", model_version="2")
        assert "has no version '2'" in e.message()
        e = _fails(h.get_inference_statistics, "cross_entropy")
        assert "unknown model 'cross_entropy'" in e.message()
    finally:
        g.close()
        h.close()


def test_model_config_over_both_protocols(server_factory) -> None:
    server = server_factory("--http_port", "0")
    g = tritonclient_grpc.InferenceServerClient(url=server.target)
    h = tritonclient_http.InferenceServerClient(url=http_address(server))
    try:
        config = g.get_model_config("bce_with_logits").config
        assert isinstance(config, model_config_pb2.ModelConfig)
        assert (config.name, config.platform, config.backend) == \
            ("bce_with_logits", "lossd", "lossd")
        assert config.max_batch_size == 0
        assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
            ("LOGITS", model_config_pb2.TYPE_FP32, [-1], False),
            ("TARGETS", model_config_pb2.TYPE_FP32, [-1], False),
            ("WEIGHT", model_config_pb2.TYPE_FP32, [-1], True),
            ("POS_WEIGHT", model_config_pb2.TYPE_FP32, [-1], True)]
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
            ("LOSS", model_config_pb2.TYPE_FP32, [-1]),
            ("GRAD_LOGITS", model_config_pb2.TYPE_FP32, [-1]),
            ("GRAD_TARGETS", model_config_pb2.TYPE_FP32, [-1])]
        assert config.parameters["datatypes"].string_value == "FP32,FP64,FP16,BF16"
        as_json = g.get_model_config("sigmoid_focal_loss", model_version="1", as_json=True)
        assert [i["name"] for i in as_json["config"]["input"]] == ["LOGITS", "TARGETS", "WEIGHT"]
        assert {i["data_type"] for i in as_json["config"]["input"]} == {"TYPE_FP32"}

        rest = h.get_model_config("bce_with_logits")
        assert (rest["name"], rest["platform"], rest["backend"]) == \
            ("bce_with_logits", "lossd", "lossd")
        assert rest["max_batch_size"] == 0
        assert rest["input"][0] == {"name": "LOGITS", "data_type": "TYPE_FP32", "dims": [-1],
                                    "optional": False}
        assert [i["name"] for i in rest["input"]] == ["LOGITS", "TARGETS", "WEIGHT", "POS_WEIGHT"]
        assert [o["name"] for o in rest["output"]] == ["LOSS", "GRAD_LOGITS", "GRAD_TARGETS"]
        assert {o["data_type"] for o in rest["output"]} == {"TYPE_FP32"}
        assert [o["name"] for o in h.get_model_config("sigmoid_focal_loss")["output"]] == \
            ["LOSS", "GRAD_LOGITS"]

        e = _fails(g.get_model_config, "cross_entropy")
        assert "NOT_FOUND" in str(e.status())
        assert "unknown model 'cross_entropy'" in e.message()
        e = _fails(h.get_model_config, "cross_entropy")
        assert "unknown model 'cross_entropy'" in e.message()
        e = _fails(h.get_model_config, "bce_with_logits", model_version="3")
        assert "has no version '3'" in e.message()
        # Triton's other extensions are still not served.
        e = _fails(g.get_model_repository_index)
        assert "UNIMPLEMENTED" in str(e.status())
        assert "statistics" in g.get_server_metadata().extensions
        assert "model_configuration" in h.get_server_metadata()["extensions"]
    finally:
        g.close()
        h.close()


def test_extensions_need_the_token(server_factory, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("st4ts\n")
    server = server_factory("--http_port", "0", "--auth_token_file", str(token))
    g = tritonclient_grpc.InferenceServerClient(url=server.target)
    h = tritonclient_http.InferenceServerClient(url=http_address(server))
    auth = {"Authorization": "Bearer st4ts"}
    try:
        assert "UNAUTHENTICATED" in str(_fails(g.get_inference_statistics).status())
        assert "UNAUTHENTICATED" in str(_fails(g.get_model_config, "bce_with_logits").status())
        assert "missing" in _fails(h.get_inference_statistics).message()
        assert "missing" in _fails(h.get_model_config, "bce_with_logits").message()
        # A refused infer is no failure of the model.
        _fails(g.infer, "bce_with_logits", _inputs(tritonclient_grpc))
        g.infer("bce_with_logits", _inputs(tritonclient_grpc), headers={
            "authorization": "Bearer st4ts"})
        stats = g.get_inference_statistics("bce_with_logits",
                                           headers={"authorization": "Bearer st4ts"})
        assert stats.model_stats[0].inference_count == 1
        assert stats.model_stats[0].inference_stats.fail.count == 0
        assert h.get_model_config("bce_with_logits", headers=auth)["name"] == "bce_with_logits"
    finally:
        g.close()
        h.close()
