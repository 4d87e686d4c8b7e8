"""What every part of the soak shares: the generated protobuf module, constants, log()."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
try:
    from lossd._proto.lossd.v1 import lossd_pb2 as pb
except ImportError:  # not installed: use the package's sources in this repository
    sys.path.insert(0, str(REPO_ROOT / "client" / "python" / "src"))
    from lossd._proto.lossd.v1 import lossd_pb2 as pb

__all__ = ["pb", "REPO_ROOT", "EVALUATE", "GET_CAPABILITIES", "MAX_MESSAGE_BYTES", "SMALL_SHAPE",
           "LARGE_SHAPE", "SERVER_DRAIN_S", "SERVER_STOP_GRACE_S", "SEND_GRACE_S", "MIB",
           "WRONG_RESULT", "SKIPPED", "UNFINISHED", "IDLE_BEFORE", "IDLE_AFTER", "SetupError",
           "log"]

EVALUATE = "/lossd.v1.LossService/Evaluate"
GET_CAPABILITIES = "/lossd.v1.LossService/GetCapabilities"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SMALL_SHAPE = (16, 64)      # 1,024 elements
LARGE_SHAPE = (16384, 64)   # 1,048,576 elements
SERVER_DRAIN_S = 5.0        # --drain_timeout of a server started here
SERVER_STOP_GRACE_S = 20.0  # extra wait after the drain before SIGKILL
SEND_GRACE_S = 0.5          # phase 2: sends due before the end may go out this late
MIB = 1024 * 1024

# Outcomes that are not gRPC status codes.
WRONG_RESULT = "WRONG_RESULT"            # OK, but the reply's shapes or bits are wrong
SKIPPED = "SKIPPED_MAX_IN_FLIGHT"        # open loop: not sent, --max-in-flight calls pending
UNFINISHED = "UNFINISHED"                # still pending after the final wait

# Labels of the RSS samples taken at the end of the idle pauses (no call in flight), before
# and after phase 2; the RSS verdict compares these two.
IDLE_BEFORE = "idle-before"
IDLE_AFTER = "idle-after"


class SetupError(Exception):
    """The soak cannot start (exit status 2)."""


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
