"""lossd service benchmark harness (docs/perf.md, "Service path").

Modules, each usable on its own (a load tester reuses them):

* ``payload``: the benchmark's request (arrays, canonical EvaluateRequest bytes) and a minimal
  protobuf reader;
* ``servers``: lossd and the baseline servers (tools/bench/bench_server.cc) as pinned child
  processes; what a lossd build and the installed client support;
* ``load``: closed-loop load from Python client processes (``LoadPool``, ``CallSpec``);
* ``compute``: the local compute baselines (lossd's CPU backend alone, torch CPU);
* ``stats``: medians, per-repetition ratios, tables;
* ``service_bench``: the benchmark itself (``python -m lossd_bench``).
"""
