#!/usr/bin/env python3
"""A KServe Python model server for the comparison in docs/perf.md ("lossd against a KServe
model server"): torch's binary_cross_entropy_with_logits as the v2 model `bce_with_logits`,
with the inputs, parameters and outputs lossd's inference protocol front end takes
(docs/interop.md): LOGITS, TARGETS, optional WEIGHT and POS_WEIGHT; `reduction`; outputs LOSS
and, when asked for, GRAD_LOGITS (torch autograd). Raw tensor contents in and out.

This is what a team would write to serve the loss with KServe; it is not part of lossd.
Runs in a virtual environment of its own with `kserve` and `torch` (the `inference` protobuf
package of kserve and of tritonclient cannot share one process): `make bench-kserve`.

    bce_model_server.py --grpc_port PORT [--http_port PORT] [KServe flags]
prints "kserve listening on 127.0.0.1:PORT" once the gRPC port accepts calls.
"""

import argparse
import os
import socket
import sys
import threading
import time
from typing import Dict, Optional

import kserve
import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

# torch's intra-op threads (KSERVE_TORCH_THREADS, default 1).
torch.set_num_threads(int(os.environ.get("KSERVE_TORCH_THREADS", "1")))

_REDUCTIONS = {"none": "none", "mean": "mean", "sum": "sum"}


class BceWithLogits(Model):
    def __init__(self) -> None:
        super().__init__("bce_with_logits")
        self.ready = True

    def load(self) -> bool:
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers: Optional[Dict[str, str]] = None,
                response_headers: Optional[Dict[str, str]] = None) -> InferResponse:
        inputs = {i.name: i for i in payload.inputs}
        params = payload.parameters or {}

        def param(name: str, default: str) -> str:
            p = params.get(name)
            if p is None:
                return default
            return getattr(p, "string_param", None) or str(p)

        reduction = _REDUCTIONS[param("reduction", "mean").lower()]
        x = torch.from_numpy(np.array(inputs["LOGITS"].as_numpy(), copy=True))
        y = torch.from_numpy(inputs["TARGETS"].as_numpy())
        w = torch.from_numpy(inputs["WEIGHT"].as_numpy()) if "WEIGHT" in inputs else None
        pw = torch.from_numpy(inputs["POS_WEIGHT"].as_numpy()) if "POS_WEIGHT" in inputs else None
        wanted = [o.name for o in payload.request_outputs] if payload.request_outputs else ["LOSS"]
        grad = "GRAD_LOGITS" in wanted
        x.requires_grad_(grad)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            x, y, weight=w, pos_weight=pw, reduction=reduction)
        outputs = []
        loss_np = loss.detach().numpy()
        if grad:
            (gx,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        for name in wanted:
            if name == "LOSS":
                arr = np.ascontiguousarray(loss_np)
            elif name == "GRAD_LOGITS":
                arr = np.ascontiguousarray(gx.numpy())
            else:
                raise kserve.errors.InvalidInput(f"output {name!r} is not served here")
            out = InferOutput(name=name, shape=list(arr.shape), datatype="FP32" if arr.dtype == np.float32 else "FP64")
            out.set_data_from_numpy(arr, binary_data=True)
            outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id,
                             use_binary_outputs=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grpc_port", type=int, required=True)
    ap.add_argument("--http_port", type=int, default=0)
    # KServe's own flags (e.g. --grpc_max_receive_message_length) are read by kserve itself
    # from the same command line.
    a, _ = ap.parse_known_args()
    http_port = a.http_port
    if http_port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http_port = s.getsockname()[1]

    def announce() -> None:
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", a.grpc_port), timeout=0.2):
                    print(f"kserve listening on 127.0.0.1:{a.grpc_port}", flush=True)
                    return
            except OSError:
                time.sleep(0.1)

    threading.Thread(target=announce, daemon=True).start()
    ModelServer(grpc_port=a.grpc_port, http_port=http_port, enable_docs_url=False,
                enable_latency_logging=False).start([BceWithLogits()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
