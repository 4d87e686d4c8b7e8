"""``lossd-cli`` / ``python -m lossd``: evaluate losses on .npy/.npz files, check health,
print capabilities.

Exit codes: 0 success, 1 the server (or the connection) failed (its message is printed),
2 usage or input error (bad arguments, unreadable files, unsupported dtypes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, NoReturn, Optional, Sequence

import numpy as np

from ._channel import RetryPolicy
from ._client import Client
from ._errors import LossdError
from ._options import DEVICES, REDUCTIONS
from ._progress import progress_reporter
from ._types import LossResult

__all__ = ["main"]

EXIT_OK, EXIT_SERVER, EXIT_USAGE = 0, 1, 2
_INPUTS = ("logits", "targets", "weight", "pos_weight")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 already; keep its format
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=os.environ.get("LOSSD_TARGET", "127.0.0.1:50051"),
                   help="server address, a comma-separated list of addresses, or a gRPC "
                        "target such as dns:///host:port (default: $LOSSD_TARGET or "
                        "127.0.0.1:50051)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="deadline of the whole command in seconds (default 60; 0: none)")
    g.add_argument("--token", help="bearer token (prefer --token-file or $LOSSD_TOKEN)")
    g.add_argument("--token-file", help="file holding the bearer token")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    g.add_argument("--ca", metavar="PEM", help="CA certificate(s) to verify the server (TLS)")
    g.add_argument("--cert", metavar="PEM", help="client certificate chain (mutual TLS)")
    g.add_argument("--key", metavar="PEM", help="client private key (mutual TLS)")
    g.add_argument("--server-name", help="host name expected in the server's certificate")
    g.add_argument("--max-message-bytes", type=int, default=None,
                   help="message size limit; larger requests are split (default 256 MiB)")
    g.add_argument("--no-retry", action="store_true", help="do not retry UNAVAILABLE")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lossd-cli", description="Command-line client of a lossd server.")
    parser.add_argument("--version", action="version", version=f"lossd-cli {_version()}",
                        help="print the client's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ev = sub.add_parser("eval", help="evaluate a loss on arrays from .npy/.npz files",
                        description="Evaluate a loss on arrays read from .npy files or the keys "
                                    "of one .npz file. Prints a summary, or writes the results "
                                    "to an .npz with --out.")
    src = ev.add_argument_group("inputs")
    src.add_argument("--npz", help="an .npz holding keys logits, targets[, weight, pos_weight]")
    for name in _INPUTS:
        src.add_argument(f"--{name.replace('_', '-')}", metavar="FILE",
                         help=f"{name} as a .npy file (or FILE.npz:KEY)")
    opt = ev.add_argument_group("loss")
    opt.add_argument("--loss", default="bce_with_logits",
                     choices=["bce_with_logits", "bce", "sigmoid_focal_loss", "focal"],
                     help="the loss (default bce_with_logits; bce and focal are short names)")
    opt.add_argument("--reduction", default="mean", choices=sorted(REDUCTIONS),
                     help="how the per-element losses are reduced (default mean)")
    opt.add_argument("--grad", action="store_true", help="also compute dl/dlogits")
    opt.add_argument("--grad-targets", action="store_true", help="also compute dl/dtargets")
    opt.add_argument("--ignore-index", type=int, metavar="INT",
                     help="elements whose target equals this give loss 0 and gradient 0 "
                          "(paddle's ignore_index; default: none ignored)")
    opt.add_argument("--normalize", action="store_true",
                     help="divide every loss and gradient by the count of elements not "
                          "ignored (paddle's normalize)")
    opt.add_argument("--label-smoothing", type=float, default=0.0, metavar="S",
                     help="targets become y*(1-S)+S/2, S in [0, 1] (Keras; default 0)")
    opt.add_argument("--alpha", type=float, default=0.25, help="focal loss alpha (<0: off)")
    opt.add_argument("--gamma", type=float, default=2.0, help="focal loss gamma")
    opt.add_argument("--device", default="auto", choices=sorted(DEVICES),
                     help="where the server computes (default auto: CUDA when it has a GPU)")
    opt.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"],
                     help="send every tensor in this dtype")
    opt.add_argument("--reject-nan", action="store_true",
                     help="fail (INVALID_ARGUMENT) on a NaN in any input instead of giving "
                          "NaN for the elements it touches")
    opt.add_argument("--request-id",
                     help="id echoed in the reply and the server's logs (default: random)")
    out = ev.add_argument_group("output")
    out.add_argument("--out", help="write loss[, grad, grad_targets] to this .npz")
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    bar = out.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True,
                     default=None,
                     help="a progress bar on stderr for split requests even when stderr is "
                          "not a terminal (default: only on a terminal; tqdm when installed)")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="no progress bar, even on a terminal")
    _connection_args(ev)

    health = sub.add_parser("health", help="grpc.health.v1 check (exit 1 unless SERVING)")
    health.add_argument("--service", default="",
                        help='service name ("" is the whole server; lossd.v1.LossService)')
    _connection_args(health)

    caps = sub.add_parser("capabilities", help="print the server's capabilities as JSON")
    _connection_args(caps)
    return parser


def _client(args: argparse.Namespace) -> Client:
    token = args.token or os.environ.get("LOSSD_TOKEN")
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise _UsageError(f"--token-file: {exc.strerror}: {args.token_file}") from None
    target: Any = args.target
    if "," in target and "://" not in target and not target.startswith(("ipv4:", "ipv6:")):
        target = [t.strip() for t in target.split(",") if t.strip()]
    kwargs: Dict[str, Any] = {}
    if args.max_message_bytes:
        kwargs["max_message_bytes"] = args.max_message_bytes
    try:
        return Client(target, timeout=args.timeout if args.timeout > 0 else None, token=token,
                      root_certificates=args.ca, certificate_chain=args.cert,
                      private_key=args.key, tls=True if args.tls else None,
                      server_name=args.server_name,
                      retry=None if args.no_retry else RetryPolicy(), **kwargs)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _load(spec: str) -> np.ndarray:
    path, key = spec, None
    if ".npz:" in spec:
        path, key = spec.rsplit(":", 1)
    try:
        if key is not None:
            with np.load(path, allow_pickle=False) as data:
                return data[key]
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except KeyError:
        raise _UsageError(f"{path} has no key {key!r}") from None
    except (OSError, ValueError) as exc:
        raise _UsageError(f"cannot read {path}: {exc}") from None


def _inputs(args: argparse.Namespace) -> Dict[str, np.ndarray]:
    arrays: Dict[str, np.ndarray] = {}
    if args.npz:
        try:
            with np.load(args.npz, allow_pickle=False) as data:
                unknown = set(data.files) - set(_INPUTS)
                if unknown:
                    raise _UsageError(f"{args.npz}: unexpected keys {sorted(unknown)}; "
                                      f"expected {', '.join(_INPUTS)}")
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise _UsageError(f"cannot read {args.npz}: {exc}") from None
    for name in _INPUTS:
        spec = getattr(args, name)
        if spec:
            arrays[name] = _load(spec)
    for name in ("logits", "targets"):
        if name not in arrays:
            raise _UsageError(f"missing {name}: give --{name} FILE.npy or --npz with key {name}")
    return arrays


def _summary(r: LossResult, wall_s: float) -> Dict[str, Any]:
    loss = np.asarray(r.loss)
    lf = loss.astype(np.float64)
    out: Dict[str, Any] = {
        "request_id": r.request_id, "num_elements": r.num_elements, "device": r.device,
        "dtype": str(loss.dtype), "loss_shape": list(loss.shape),
        "timing_ns": {"queue": r.timing.queue_ns, "compute": r.timing.compute_ns,
                      "total": r.timing.total_ns},
        "wall_seconds": round(wall_s, 6),
    }
    if loss.ndim == 0:
        out["loss"] = float(lf)
    else:
        finite = lf[np.isfinite(lf)]
        out["loss_stats"] = {"mean": float(finite.mean()) if finite.size else math.nan,
                             "min": float(finite.min()) if finite.size else math.nan,
                             "max": float(finite.max()) if finite.size else math.nan,
                             "nan": int(np.isnan(lf).sum())}
    for name in ("grad", "grad_targets"):
        g = getattr(r, name)
        if g is not None:
            gf = np.asarray(g).astype(np.float64)
            out[name] = {"shape": list(g.shape), "abs_max": float(np.nanmax(np.abs(gf)))
                         if gf.size else 0.0}
    return out


def _eval(args: argparse.Namespace) -> int:
    arrays = _inputs(args)
    focal = args.loss in ("sigmoid_focal_loss", "focal")
    with _client(args) as client, \
            progress_reporter(args.progress, desc="lossd eval") as progress:
        start = time.monotonic()
        try:
            if focal:
                if "pos_weight" in arrays:
                    raise _UsageError("pos_weight is not an option of sigmoid_focal_loss")
                r = client.sigmoid_focal_loss(
                    arrays["logits"], arrays["targets"], weight=arrays.get("weight"),
                    alpha=args.alpha, gamma=args.gamma, reduction=args.reduction,
                    grad=args.grad, device=args.device, reject_nan=args.reject_nan,
                    request_id=args.request_id, dtype=args.dtype, progress=progress)
            else:
                r = client.bce_with_logits(
                    arrays["logits"], arrays["targets"], weight=arrays.get("weight"),
                    pos_weight=arrays.get("pos_weight"), reduction=args.reduction,
                    grad=args.grad, grad_targets=args.grad_targets,
                    ignore_index=args.ignore_index, normalize=args.normalize,
                    label_smoothing=args.label_smoothing, device=args.device,
                    reject_nan=args.reject_nan, request_id=args.request_id, dtype=args.dtype,
                    progress=progress)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
        wall = time.monotonic() - start
    summary = _summary(r, wall)
    if args.out:
        results: Dict[str, Any] = {"loss": np.asarray(r.loss)}
        for name in ("grad", "grad_targets"):
            if getattr(r, name) is not None:
                results[name] = np.asarray(getattr(r, name))
        try:
            np.savez(args.out, **results)
        except OSError as exc:
            raise _UsageError(f"cannot write {args.out}: {exc.strerror}") from None
        summary["out"] = args.out
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(summary)
    return EXIT_OK


def _print_summary(s: Dict[str, Any]) -> None:
    if "loss" in s:
        print(f"loss: {s['loss']!r} ({s['dtype']})")
    else:
        st = s["loss_stats"]
        print(f"loss: shape {s['loss_shape']} {s['dtype']}, mean {st['mean']:.9g}, "
              f"min {st['min']:.9g}, max {st['max']:.9g}, NaN {st['nan']}")
    for name in ("grad", "grad_targets"):
        if name in s:
            print(f"{name}: shape {s[name]['shape']}, max |value| {s[name]['abs_max']:.9g}")
    t = s["timing_ns"]
    print(f"elements: {s['num_elements']}, device: {s['device']}, server time: "
          f"{t['total'] / 1e6:.3f} ms (compute {t['compute'] / 1e6:.3f} ms), wall: "
          f"{s['wall_seconds'] * 1e3:.3f} ms")
    if "out" in s:
        print(f"results written to {s['out']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit code."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            sys.stdout.flush()  # --help and --version printed, then exit
            raise
    except BrokenPipeError:
        return _stdout_closed()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    try:
        if args.command == "eval":
            code = _eval(args)
            sys.stdout.flush()
            return code
        with _client(args) as client:
            if args.command == "health":
                status = client.health(args.service)
                print(status)
                code = EXIT_OK if status == "SERVING" else EXIT_SERVER
            else:
                print(json.dumps(client.capabilities().to_dict(), indent=2, sort_keys=True))
                code = EXIT_OK
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except _UsageError as exc:
        print(f"lossd-cli: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LossdError as exc:
        print(f"lossd-cli: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except KeyboardInterrupt:
        return 130


def _stdout_closed() -> int:
    """The reader of stdout went away (``lossd-cli capabilities | head -2``): end quietly,
    as Unix tools killed by SIGPIPE do, with status 128 + SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush goes nowhere
        os.close(devnull)
    except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
        pass
    return 128 + 13


def entry_point() -> None:
    """Console-script entry point (``lossd-cli``)."""
    sys.exit(main())
