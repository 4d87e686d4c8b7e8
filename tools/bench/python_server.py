#!/usr/bin/env python3
"""The "what a Python team would write" baseline of lossd-bench (--baselines=python): a
lossd.v1 LossService Evaluate server in grpcio and numpy, computing BCE with logits (weight,
pos_weight, reductions NONE/MEAN/SUM, dl/dx and dl/dy) in the request's float dtype with the
numerically stable textbook formulas. Nothing of lossd's server or kernels: only its proto
(the client package's generated classes).

    python_server.py [--port 0] [--workers 8]
prints "python listening on 127.0.0.1:PORT" on stderr once serving. Needs grpcio, numpy and the lossd
client package (the test venv has them).
"""

import argparse
import sys
import time
from concurrent import futures

import grpc
import numpy as np
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT64: np.float64}


def _array(t: "pb.Tensor", dtype: type) -> np.ndarray:
    return np.frombuffer(t.data, dtype=_DTYPES[t.dtype]).astype(dtype, copy=False).reshape(
        tuple(t.shape))


def _tensor(a: np.ndarray, dtype: int) -> "pb.Tensor":
    return pb.Tensor(dtype=dtype, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


class Service(pb_grpc.LossServiceServicer):
    def GetCapabilities(self, request, context):
        return pb.Capabilities(server_version="python baseline")

    def Evaluate(self, request, context):
        start = time.time_ns()
        if request.WhichOneof("loss") not in (None, "bce_with_logits"):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "only bce_with_logits")
        if request.logits.dtype not in _DTYPES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "float32 or float64 only")
        ft = _DTYPES[request.logits.dtype]
        x = _array(request.logits, ft)
        y = _array(request.targets, ft)
        w = _array(request.weight, ft) if request.HasField("weight") else None
        b = request.bce_with_logits
        pw = _array(b.pos_weight, ft) if b.HasField("pos_weight") else None
        # loss = (1 - y) x + (1 + (pw - 1) y) (log1p(exp(-|x|)) + max(-x, 0))
        softplus = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0)
        coef = 1 + (pw - 1) * y if pw is not None else np.ones_like(x)
        loss = (1 - y) * x + coef * softplus
        if w is not None:
            loss = loss * w
        n = x.size
        reduction = request.reduction or pb.REDUCTION_MEAN
        scale = 1.0 / n if reduction == pb.REDUCTION_MEAN else 1.0
        reply = pb.EvaluateResponse(request_id=request.request_id, device=pb.DEVICE_CPU,
                                    num_elements=n)
        if reduction == pb.REDUCTION_NONE:
            reply.loss.CopyFrom(_tensor(loss.astype(ft, copy=False), request.logits.dtype))
        else:
            total = loss.sum(dtype=np.float64) * scale
            reply.loss.CopyFrom(_tensor(np.array(total, dtype=ft), request.logits.dtype))
        if request.gradients.logits or request.gradients.targets:
            sig = 1 / (1 + np.exp(-x))
            wt = w if w is not None else 1
            g = scale if reduction != pb.REDUCTION_NONE else 1
            if request.gradients.logits:
                pwy = pw * y if pw is not None else y
                dx = ((pwy + 1 - y) * sig - pwy) * wt * g
                reply.grad_logits.CopyFrom(_tensor(dx.astype(ft, copy=False),
                                                   request.logits.dtype))
            if request.gradients.targets:
                # d/dy: -x + (pw - 1) softplus  (pw = 1 without pos_weight)
                dy = (-x + ((pw - 1) * softplus if pw is not None else 0)) * wt * g
                reply.grad_targets.CopyFrom(_tensor(np.asarray(dy, dtype=ft),
                                                    request.logits.dtype))
        end = time.time_ns()
        reply.timing.total_ns = max(1, end - start)
        reply.timing.compute_ns = max(1, end - start)
        return reply


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workers", type=int, default=8)
    a = ap.parse_args()
    limit = 256 << 20
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=a.workers),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", limit)])
    pb_grpc.add_LossServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    print(f"python listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
