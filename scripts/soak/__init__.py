"""The lossd soak test (entry point: scripts/soak.py; docs/soak.md).

Modules:

* ``common``: the generated protobuf module, constants, outcome and RSS sample labels, log();
* ``mix``: the request kinds (serialized once), the mix order and the check of good replies;
* ``server``: starting and stopping a lossd, reading RSS, scraping metrics, loopback targets;
* ``results``: the tally of a phase, the RSS samples and the state of a run;
* ``run``: the precheck, phase 1, the idle pauses and phase 2;
* ``report``: the verdict, the JSON result and the text report;
* ``cli``: the options and main().
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main
    return cli_main(argv)
