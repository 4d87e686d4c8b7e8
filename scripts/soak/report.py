"""The result of a soak (the verdict, the JSON document) and its text report."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import IDLE_AFTER, IDLE_BEFORE, SKIPPED, UNFINISHED, WRONG_RESULT
from .results import State


IDLE_LABELS = (IDLE_BEFORE, IDLE_AFTER)


def rss_trend_mib_per_min(state: State) -> float | None:
    """Least-squares slope of RSS over the second half of phase 2, samples under load and the
    end sample (information only; the idle samples are left out)."""
    half = state.args.duration / 2
    points = [(r.t_s, r.rss_kib / 1024) for r in state.rss
              if r.t_s >= half - 1e-6 and r.label not in IDLE_LABELS]
    if len(points) < 5:
        return None
    t, m = np.array(points).T
    if np.ptp(t) <= 0:
        return None
    return float(np.polyfit(t, m, 1)[0] * 60)


def _rss_rule(state: State, later: str, earlier: str) -> str:
    a = state.args
    return f"{later} <= {earlier} * {1 + a.rss_growth:.2f} + {a.rss_slack_mib:g} MiB"


def _rss_limit(state: State, earlier_mib: float) -> float:
    return earlier_mib * (1 + state.args.rss_growth) + state.args.rss_slack_mib


def rss_verdict(state: State) -> dict[str, Any]:
    """The leak test: RSS after --idle-seconds without calls, after phase 2 against before it.

    Both samples are taken with no call in flight, once the server had the time to return
    freed memory to the OS, so they do not depend on the load level (the allocator keeps what
    the peak of concurrent large calls needed while calls keep coming)."""
    rule = _rss_rule(state, IDLE_AFTER, IDLE_BEFORE)
    by_label = {r.label: r for r in state.rss if r.label}
    if state.pid is None:
        return {"status": "SKIPPED", "rule": rule,
                "reason": "the server's process is unknown (--target without --pid)"}
    missing = [label for label in IDLE_LABELS if label not in by_label]
    if missing:
        return {"status": "INCOMPLETE", "rule": rule,
                "reason": f"no {' and no '.join(missing)} sample: the soak stopped early"}
    before = by_label[IDLE_BEFORE].rss_kib / 1024
    after = by_label[IDLE_AFTER].rss_kib / 1024
    limit = _rss_limit(state, before)
    return {"status": "PASS" if after <= limit else "FAIL", "rule": rule,
            "idle_before_mib": round(before, 2), "idle_after_mib": round(after, 2),
            "limit_mib": round(limit, 2)}


def rss_under_load(state: State) -> dict[str, Any] | None:
    """The former rule, end <= middle * (1 + --rss-growth) + --rss-slack-mib, as information:
    both samples follow the load (the middle one is taken under load), not only leaks."""
    by_label = {r.label: r for r in state.rss if r.label}
    if "middle" not in by_label or "end" not in by_label:
        return None
    middle = by_label["middle"].rss_kib / 1024
    end = by_label["end"].rss_kib / 1024
    limit = _rss_limit(state, middle)
    return {"rule": _rss_rule(state, "end", "middle"), "within": end <= limit,
            "middle_mib": round(middle, 2), "end_mib": round(end, 2),
            "limit_mib": round(limit, 2)}


def build_result(state: State) -> dict[str, Any]:
    a = state.args
    rss = rss_verdict(state)
    unexpected = 0
    reasons: list[str] = []
    if state.precheck_ok is False:
        reasons.append("precheck failed")
    for tally in (state.phase1, state.phase2):
        if tally is not None:
            unexpected += tally.unexpected()
    if unexpected:
        reasons.append(f"{unexpected} unexpected results")
    if state.server_exited_during_run:
        reasons.append("the server exited during the run")
    if state.interrupted:
        reasons.append("interrupted")
    if state.phase2 is None and not reasons:
        reasons.append("the soak (phase 2) did not run")
    errors_ok = not reasons
    by_label = {r.label: r.to_json() for r in state.rss if r.label}
    phase2: dict[str, Any] | None = None
    if state.phase2 is not None:
        window = state.phase2_window_s or a.duration
        phase2 = {
            "target_rate": state.rate, "duration_s": a.duration, "window_s": window,
            "due": state.phase2_due, "sent": state.phase2_sent,
            "achieved_rate": state.phase2_sent / window if window > 0 else None,
            "send_lag_ms": state.phase2_lag_ms, "max_in_flight": state.phase2_max_in_flight,
            **state.phase2.to_json()}
    server = state.own_server
    result = {
        "target": state.target,
        "server": {
            "started_here": server is not None,
            "command": server.args if server else None,
            "log": str(server.log_path) if server else None,
            "pid": state.pid, "exit_status": server.exit_code if server else None,
            "exited_during_run": state.server_exited_during_run,
            **state.capabilities},
        "config": {k: v for k, v in vars(a).items() if k not in ("json",)},
        "mix": [{"kind": k.name, "class": "good" if k.good else "bad", "request": k.description,
                 "share": round(k.weight, 4), "expected": k.expected,
                 "request_bytes": len(k.payload)} for k in state.kinds],
        "precheck": state.precheck,
        "phase1": None if state.phase1 is None else {
            "concurrency": a.concurrency, "duration_s": a.phase1_duration,
            "measured_window_s": state.phase1_window_s, "max_qps": state.phase1_qps,
            "rate_by_kind": state.phase1_kind_rates, **state.phase1.to_json()},
        "phase2": phase2,
        "rss": {"samples": [r.to_json() for r in state.rss], "start": by_label.get("start"),
                "middle": by_label.get("middle"), "end": by_label.get("end"),
                "idle_seconds": a.idle_seconds, "idle_before": by_label.get(IDLE_BEFORE),
                "idle_after": by_label.get(IDLE_AFTER),
                "second_half_trend_mib_per_min": rss_trend_mib_per_min(state),
                "under_load": rss_under_load(state)},
        "metrics": {"before_phase2": state.metrics_before, "after_phase2": state.metrics_after},
        "replies_verified": state.verifier.checked if state.verifier else 0,
        "verdict": {
            "rss": rss,
            "errors": {"status": "PASS" if errors_ok else "FAIL", "unexpected": unexpected,
                       "reasons": reasons},
        },
    }
    passed = errors_ok and rss["status"] in ("PASS", "SKIPPED")
    result["verdict"]["result"] = "PASS" if passed else "FAIL"
    result["exit_status"] = 0 if passed else 1
    return result


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _tally_lines(tally_json: dict[str, Any]) -> list[str]:
    lines = [f"    {'kind':<16} {'class':<5} {'expected':<17} {'code':<22} {'count':>9}"]
    for row in tally_json["counts"]:
        mark = "" if row["code"] == row["expected"] else "   <-- unexpected"
        lines.append(f"    {row['kind']:<16} {row['class']:<5} {row['expected']:<17} "
                     f"{row['code']:<22} {row['count']:>9}{mark}")
    for u in tally_json["unexpected_detail"]:
        for example in u["examples"]:
            lines.append(f"    ! {u['kind']} {u['code']}: {example}")
    return lines


def _metrics_line(result: dict[str, Any]) -> str | None:
    before, after = result["metrics"]["before_phase2"], result["metrics"]["after_phase2"]
    if not before or not after or result["phase2"] is None:
        return None
    server: dict[str, int] = {}
    for code in set(before["evaluate_calls"]) | set(after["evaluate_calls"]):
        n = after["evaluate_calls"].get(code, 0) - before["evaluate_calls"].get(code, 0)
        if n:
            server[code] = n
    client: dict[str, int] = {}
    for row in result["phase2"]["counts"]:
        if row["code"] not in (SKIPPED, UNFINISHED, WRONG_RESULT):
            client[row["code"]] = client.get(row["code"], 0) + row["count"]
        elif row["code"] == WRONG_RESULT:
            client["OK"] = client.get("OK", 0) + row["count"]
    same = "the client's counts match" if server == client else \
        f"the client counted {_codes(client)}"
    def gauge(name: str) -> str:
        value = after.get(name)
        return "?" if value is None else f"{value:g}"
    gauges = (f"in flight {gauge('lossd_in_flight_calls')}, queued "
              f"{gauge('lossd_queued_requests')} after phase 2")
    return f"  server metrics  : phase 2 Evaluate calls {_codes(server)} ({same}); {gauges}"


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "none"


def format_report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    srv = result["server"]
    out = ["", "lossd soak report", "================="]
    where = f"started here (pid {srv['pid']})" if srv["started_here"] else \
        (f"pid {srv['pid']}" if srv["pid"] is not None else "pid unknown")
    out.append(f"  server          : {result['target']}, {where}, version "
               f"{srv.get('server_version', '?')}, devices {', '.join(srv.get('devices', []))}")
    mix = ", ".join(f"{m['kind']} {100 * m['share']:.1f}%" for m in result["mix"])
    out.append(f"  mix             : {mix} (float32, BCE with logits, mean, dl/dlogits)")
    if result["precheck"]:
        out.append("  precheck        :")
        for name, p in result["precheck"].items():
            status = "ok" if p["code"] == p["expected"] else "FAILED"
            detail = f" ({p['detail']})" if p["detail"] else ""
            out.append(f"    {name:<16} {p['code']:<17} {status}{detail}")
    p1 = result["phase1"]
    if p1 is not None:
        measured = f"measured over the last {p1['measured_window_s']:g} s" \
            if p1["max_qps"] is not None else "stopped early, no QPS"
        out.append(f"Phase 1: closed loop, concurrency {p1['concurrency']}, "
                   f"{p1['duration_s']:g} s ({measured})")
        if p1["max_qps"] is not None:
            by_kind = ", ".join(f"{k} {v:.1f}/s" for k, v in p1["rate_by_kind"].items())
            out.append(f"  max QPS         : {p1['max_qps']:.1f} calls/s ({by_kind})")
        lat = p1["latency"]["all_good"]
        out.append(f"  latency (good)  : p50 {_fmt_ms(lat['p50_ms'])}, p99 {_fmt_ms(lat['p99_ms'])}")
        out.append(f"  results         : {p1['total']} calls, {p1['unexpected']} unexpected")
        out.extend(_tally_lines(p1))
    elif cfg["qps"] is not None:
        out.append(f"Phase 1: skipped (--qps {cfg['qps']:g})")
    p2 = result["phase2"]
    if p2 is not None:
        achieved = p2["achieved_rate"] or 0.0
        out.append(f"Phase 2: open loop at {100 * cfg['rate_fraction']:.0f}% for "
                   f"{p2['duration_s']:g} s")
        out.append(f"  target rate     : {p2['target_rate']:.1f} calls/s ({p2['due']} calls due)")
        share = 100 * achieved / p2["target_rate"] if p2["target_rate"] else 0.0
        out.append(f"  achieved rate   : {achieved:.1f} calls/s sent ({share:.1f}% of target; "
                   f"{p2['sent']} sent over {p2['window_s']:.1f} s, at most "
                   f"{p2['max_in_flight']} in flight)")
        if share < 95.0:
            out.append("  note            : under 95% of the target rate was sent: this client "
                       "could not keep the schedule (CPU-bound?) or the run stopped early")
        lag = p2["send_lag_ms"] or {}
        out.append(f"  send lag        : p50 {_fmt_ms(lag.get('p50'))}, p99 "
                   f"{_fmt_ms(lag.get('p99'))}, max {_fmt_ms(lag.get('max'))} behind schedule")
        for name, lat in p2["latency"].items():
            out.append(f"  latency {name:<8}: p50 {_fmt_ms(lat['p50_ms'])}, p99 "
                       f"{_fmt_ms(lat['p99_ms'])} ({lat['n']} OK calls)")
        by_class = p2["by_class"]
        out.append(f"  good requests   : {_codes(by_class['good'])}")
        out.append(f"  bad requests    : {_codes(by_class['bad'])}")
        out.append(f"  results         : {p2['total']} calls, {p2['unexpected']} unexpected")
        out.extend(_tally_lines(p2))
        if (line := _metrics_line(result)) is not None:
            out.append(line)
    out.append(f"  replies verified: {result['replies_verified']} (shapes, finite loss, same bits "
               f"as the first reply)")
    rss = result["rss"]
    if rss["samples"]:
        def mib(sample: dict[str, Any] | None) -> str:
            return "-" if sample is None else f"{sample['rss_mib']:.1f}"
        peak = max(s["hwm_mib"] for s in rss["samples"])
        out.append(f"  RSS (MiB)       : start {mib(rss['start'])}, middle {mib(rss['middle'])}, "
                   f"end {mib(rss['end'])}; peak (VmHWM) {peak:.1f}")
        series = " ".join(f"{s['rss_mib']:.1f}@{s['t_s']:.0f}s" for s in rss["samples"]
                          if s["label"] not in IDLE_LABELS)
        if series:
            out.append(f"  RSS samples     : {series}")
        if (trend := rss["second_half_trend_mib_per_min"]) is not None:
            out.append(f"  RSS trend       : {trend:+.2f} MiB/min over the second half "
                       "(least squares; information only)")
        if (u := rss["under_load"]) is not None:
            out.append(f"  RSS under load  : end {u['end_mib']:.1f} MiB "
                       f"{'<=' if u['within'] else '>'} middle {u['middle_mib']:.1f} * "
                       f"{1 + cfg['rss_growth']:.2f} + {cfg['rss_slack_mib']:g} = "
                       f"{u['limit_mib']:.1f} MiB (information only: follows the load level)")
        out.append(f"  RSS idle (MiB)  : before phase 2 {mib(rss['idle_before'])}, after phase 2 "
                   f"{mib(rss['idle_after'])} (each after {rss['idle_seconds']:g} s without "
                   "calls)")
        if cfg["qps"] is not None and rss["idle_before"] is not None:
            out.append("  note            : phase 1 was skipped (--qps): idle-before follows only "
                       "the precheck, so the server's warm-up (allocator arenas, buffers) "
                       "counts as growth")
    else:
        out.append("  RSS             : not measured")
    v = result["verdict"]
    out.append("Verdict")
    r = v["rss"]
    if r["status"] == "SKIPPED" or "idle_after_mib" not in r:
        out.append(f"  RSS flat        : {r['status']} ({r.get('reason', '')}; rule {r['rule']})")
    else:
        out.append(f"  RSS flat        : {r['status']} ({IDLE_AFTER} {r['idle_after_mib']:.1f} MiB "
                   f"{'<=' if r['status'] == 'PASS' else '>'} {IDLE_BEFORE} "
                   f"{r['idle_before_mib']:.1f} * {1 + cfg['rss_growth']:.2f} + "
                   f"{cfg['rss_slack_mib']:g} = {r['limit_mib']:.1f} MiB)")
    e = v["errors"]
    reasons = "; ".join(e["reasons"]) if e["reasons"] else "no unexpected result"
    out.append(f"  errors          : {e['status']} ({reasons})")
    if srv["exited_during_run"]:
        out.append(f"  server exited   : {srv['exited_during_run']}")
    out.append(f"  result          : {v['result']} (exit status {result['exit_status']})")
    return "\n".join(out)


