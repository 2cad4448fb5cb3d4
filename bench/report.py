"""Turn a run's figures into verdicts on the issue's targets, `latest.json`, `REPORT.md` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLOTS = ("latency.png", "throughput.png", "streams.png", "rss.png")


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 4)


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #8: the measured value, its reference, the ratio, met or missed and by how much."""
    scenarios = results["scenarios"]
    cores = results["machine"]["cores"] or 1
    targets = []

    added = _get(scenarios, "latency", "paths", "full", "added_p50_ms")
    floor_added = _get(scenarios, "latency", "paths", "floor", "added_p50_ms")
    targets.append(
        _verdict(
            "full_added_p50",
            "full path: added p50, one request at a time ≤ 0.7 ms",
            measured=added,
            unit="ms",
            reference=floor_added,
            reference_label="nginx floor's added p50",
            # nginx adds ~0.05 ms, within noise of zero: a ratio against it only means something when positive
            ratio=_ratio(added, floor_added) if floor_added and floor_added > 0.005 else None,
            met=None if added is None else added <= 0.7,
            miss=None if added is None else f"{added - 0.7:.3f} ms over (x{added / 0.7:.1f} the budget)",
        )
    )

    full_rps = _get(scenarios, "throughput", "full", "requests_per_s")
    floor_rps = _get(scenarios, "throughput", "floor", "requests_per_s")
    ratio = _ratio(full_rps, floor_rps)
    refused = _get(scenarios, "throughput", "full", "non_2xx") or 0
    paired = scenarios.get("throughput_paired") or {}
    paired_label = ""
    if paired.get("median_ratio") is not None:
        # The back-to-back rounds judge the target: a machine that drifts between two long runs moves a round alike.
        rounds = paired["rounds"]
        median = next(r for r in rounds if r["ratio"] == paired["median_ratio"])  # its own figures, its own share
        full_rps, floor_rps, ratio = median["path_rps"], median["reference_rps"], median["ratio"]
        refused = sum(r["non_2xx"] for r in rounds)
        paired_label = (
            f", median of {len(rounds)} back-to-back rounds of {paired['duration_s']:g} s "
            f"(shares {paired['min_ratio']:.1%}-{paired['max_ratio']:.1%})"
        )
    elif paired.get("rounds"):
        refused = sum(r["non_2xx"] for r in paired["rounds"]) or refused
    miss = None
    if refused:
        # 429s (rate limits) or errors are answered fast and would inflate req/s: the figure does not count
        miss = f"{refused} non-2xx answers on the full path (rate limited? raise the bench key's limits with --env)"
        ratio = None
    elif ratio is not None and full_rps:
        needed = 0.11 * floor_rps
        miss = (
            f"{needed - full_rps:.0f} req/s short ({ratio:.1%} of the floor, 11% needed): CPU per request must fall "
            f"from ≈{cores * 1000 / full_rps:.2f} ms to ≈{cores * 1000 / needed:.2f} ms of the {cores} cores"
        )
    # The floor figures disagree with each other: its 11,900 req/s is what Debian's default proxy does here,
    # its 0.05 ms added is closer to the keep-alive proxy. The target is judged on the first; the second is shown.
    floor_label = f"nginx floor req/s (Debian's default proxy_pass){paired_label}"
    keepalive_rps = _get(scenarios, "throughput", "floor_keepalive", "requests_per_s")
    if full_rps and keepalive_rps:
        floor_label += f"; full is {full_rps / keepalive_rps:.1%} of the keep-alive proxy's {keepalive_rps:,.0f}"
    targets.append(
        _verdict(
            "full_throughput",
            "full path: throughput at 32 connections ≥ 11% of the nginx floor",
            measured=full_rps,
            unit="req/s",
            reference=floor_rps,
            reference_label=floor_label,
            ratio=ratio,
            met=False if refused else (None if ratio is None else ratio >= 0.11),
            miss=miss,
        )
    )

    full_slow = _get(scenarios, "slow_upstream", "full", "ok_per_s")
    direct_slow = _get(scenarios, "slow_upstream", "direct", "ok_per_s")
    ratio = _ratio(full_slow, direct_slow)
    targets.append(
        _verdict(
            "slow_upstream",
            "2-second upstream, 4x more in flight than workers: gateway ≥ 0.95 x direct",
            measured=full_slow,
            unit="req/s",
            reference=direct_slow,
            reference_label="direct to the provider req/s",
            ratio=ratio,
            met=None if ratio is None else ratio >= 0.95,
            miss=None if ratio is None else f"{0.95 - ratio:.3f} of direct short",
        )
    )

    streams = scenarios.get("streams") or {}
    goal = streams.get("target_level", 2000)
    held = streams.get("held_streams") or {}
    full_held = held.get("full") or {}
    peak = full_held.get("peak_open")
    added_ttft = held.get("added_ttft_p99_ms")
    met = None
    if peak is not None and added_ttft is not None:
        met = peak >= goal and not full_held.get("failed") and added_ttft < 50
    problems = []
    if peak is not None and peak < goal:
        problems.append(f"{peak} of {goal} streams open at once")
    if full_held.get("failed"):
        problems.append(f"{full_held['failed']} streams failed")
    if added_ttft is not None and added_ttft >= 50:
        problems.append(f"added TTFT p99 {added_ttft:.1f} ms ≥ 50 ms")
    targets.append(
        _verdict(
            "streams_held",
            f"≥ {goal} concurrent streams through the gateway, added TTFT p99 < 50 ms",
            measured=peak,
            unit="streams open at once",
            reference=_get(held, "direct", "ttft", "p99_ms"),
            reference_label=f"direct TTFT p99 (ms), {held.get('arrivals_per_s', '-')} arrivals/s; "
            f"added: {added_ttft} ms",
            ratio=_ratio(peak, goal),
            met=met,
            miss="; ".join(problems) or None,
            extra={"added_ttft_p99_ms": added_ttft, "arrivals_per_s": held.get("arrivals_per_s")},
        )
    )

    items = _get(scenarios, "batch", "platform", "items_per_s")
    raw = _get(scenarios, "batch", "raw_pika", "messages_per_s")
    ratio = _ratio(items, raw)
    targets.append(
        _verdict(
            "batch",
            "batch items/s end to end ≥ 0.5 x the raw pika publish-and-consume loop",
            measured=items,
            unit="items/s",
            reference=raw,
            reference_label="raw pika messages/s",
            ratio=ratio,
            met=None if ratio is None else ratio >= 0.5,
            miss=None if ratio is None else f"{0.5 * raw - items:.0f} items/s short",
        )
    )

    rss = _get(scenarios, "rss_idle", "total_rss_mb")
    targets.append(
        _verdict(
            "idle_rss",
            "whole platform idle at `make run`'s worker counts: RSS ≤ 310 MB",
            measured=rss,
            unit="MB",
            reference=310.0,
            reference_label="the budget",
            ratio=_ratio(rss, 310.0),
            met=None if rss is None else rss <= 310,
            miss=None if rss is None else f"{rss - 310:.0f} MB over",
        )
    )
    return targets


def _verdict(
    key: str,
    description: str,
    *,
    measured: float | None,
    unit: str,
    reference: float | None,
    reference_label: str,
    ratio: float | None,
    met: bool | None,
    miss: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": key,
        "target": description,
        "measured": measured,
        "unit": unit,
        "reference": reference,
        "reference_label": reference_label,
        "ratio": ratio,
        "met": met,
        "status": "not measured" if met is None else ("met" if met else "missed"),
        "missed_by": miss if met is False else None,
        **(extra or {}),
    }


def budget_lines(s: dict[str, Any]) -> list[str]:
    """The CPU each missed throughput target leaves per request or item (2 cores), next to what is spent now."""
    lines: list[str] = []
    full = _get(s, "throughput", "full", "cpu_us_per_request") or {}
    floor = _get(s, "throughput", "floor", "requests_per_s")
    if full and floor:
        allowed = 2e6 / (0.11 * floor)
        spent = ", ".join(f"{name} {us}" for name, us in full.items() if name != "total")
        lines.append(
            f"- Full path CPU per request now {full['total']} µs ({spent}); 11% of the floor allows {allowed:.0f} µs "
            f"for everything, the load generator included."
        )
    item = _get(s, "batch", "platform", "cpu_us_per_item") or {}
    raw = _get(s, "batch", "raw_pika", "messages_per_s")
    if item and raw:
        allowed = 2e6 / (0.5 * raw)
        spent = ", ".join(f"{name} {us}" for name, us in item.items() if name != "total")
        lines.append(
            f"- Batch CPU per item now {item['total']} µs ({spent}); half the pika rate allows {allowed:.0f} µs."
        )
    return lines


def cpu_table(throughput: dict[str, Any]) -> list[str]:
    """CPU microseconds per request by process during each wrk run: the budget both cores share, split by hop."""
    paths = {name: r["cpu_us_per_request"] for name, r in throughput.items() if r.get("cpu_us_per_request")}
    if not paths:
        return []
    columns = sorted(
        {c for per in paths.values() for c in per} - {"total"}, key=lambda c: -max(p.get(c, 0) for p in paths.values())
    )
    lines = [
        "",
        "CPU per request during these runs (µs of CPU, user + system, from /proc; backing services included):",
        "",
        "| path | " + " | ".join(columns) + " | total |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for name, per in paths.items():
        lines.append(f"| {name} | " + " | ".join(str(per.get(c, 0)) for c in columns) + f" | {per['total']} |")
    return lines


# ----- writing ---------------------------------------------------------------------------------------------------


def write(results: dict[str, Any], out_dir: Path) -> None:
    """latest.json, the plots, then REPORT.md (which links them)."""
    results["plots"] = plots(results, out_dir)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    (out_dir / "REPORT.md").write_text(markdown(results))


def plots(results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Four PNGs: added latency, throughput, streams by concurrency, RSS per service."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = results["scenarios"]
    made: dict[str, Any] = {}

    def save(figure: Any, name: str) -> None:
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=110)
        plt.close(figure)
        made[name] = name

    figure, axis = plt.subplots(figsize=(7, 4))
    paths = [
        p
        for p in ("floor", "floor_keepalive", "llm", "full")
        if _get(scenarios, "latency", "paths", p, "added_p50_ms") is not None
    ]
    p50 = [scenarios["latency"]["paths"][p]["added_p50_ms"] for p in paths]
    p99 = [scenarios["latency"]["paths"][p].get("added_p99_ms") or 0 for p in paths]
    xs = range(len(paths))
    axis.bar([x - 0.2 for x in xs], p50, width=0.4, label="added p50")
    axis.bar([x + 0.2 for x in xs], p99, width=0.4, label="added p99")
    axis.axhline(0.7, color="red", linestyle="--", label="target p50 ≤ 0.7 ms")
    axis.set_xticks(list(xs), paths)
    axis.set_ylabel("ms added over direct")
    axis.set_title("One request at a time: added latency")
    axis.legend()
    save(figure, "latency.png")

    figure, axis = plt.subplots(figsize=(7, 4))
    paths = [
        p
        for p in ("direct", "floor", "floor_keepalive", "llm", "full")
        if _get(scenarios, "throughput", p, "requests_per_s")
    ]
    axis.bar(paths, [scenarios["throughput"][p]["requests_per_s"] for p in paths], color="tab:green")
    axis.set_yscale("log")
    axis.set_ylabel("requests/s (log)")
    axis.set_title("Throughput at 32 connections (wrk)")
    save(figure, "throughput.png")

    figure, axis = plt.subplots(figsize=(7, 4))
    levels = _get(scenarios, "streams", "levels") or []
    xs = [lv["concurrency"] for lv in levels]
    for path, color in (("direct", "tab:blue"), ("full", "tab:orange")):
        p99 = [lv[path]["ttft"]["p99_ms"] or 0 for lv in levels]
        p50 = [lv[path]["ttft"]["p50_ms"] or 0 for lv in levels]
        axis.plot(xs, p99, "o-", color=color, label=f"{path} TTFT p99")
        axis.plot(xs, p50, "o--", color=color, alpha=0.6, label=f"{path} TTFT p50")
    failed = [(lv["concurrency"], lv["full"]["failed"]) for lv in levels if lv["full"]["failed"]]
    for x, count in failed:
        axis.annotate(f"{count} failed", (x, 0), color="red")
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("ms")
    axis.set_title("Stream bursts (each level started within 1 s): time to first chunk")
    axis.legend()
    save(figure, "streams.png")

    figure, axis = plt.subplots(figsize=(8, 4))
    phases = [
        (label, scenarios.get(key))
        for label, key in (("idle", "rss_idle"), ("32-conn load", "rss_load"), ("streams", "rss_streams"))
    ]
    phases = [(label, data) for label, data in phases if data and "per_service" in data]
    services = sorted({name for _, data in phases for name in data["per_service"]})
    bottoms = [0.0] * len(phases)
    for name in services:
        values = [data["per_service"].get(name, {}).get("rss_mb", 0) for _, data in phases]
        axis.bar([label for label, _ in phases], values, bottom=bottoms, label=name)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    axis.axhline(310, color="red", linestyle="--", label="idle budget 310 MB")
    axis.set_ylabel("RSS MB (sum of processes)")
    axis.set_title("Whole-platform RSS")
    axis.legend(fontsize="small", loc="upper left")
    save(figure, "rss.png")
    return made


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


NOT_RUN = {"error": "not run (--only)"}


def held_stream_lines(held: dict[str, Any]) -> list[str]:
    """The held-streams run (the target's): how many were open at once, and TTFT over all of them."""
    if not held:
        return []
    direct, full = held["direct"], held["full"]
    return [
        f"Held: {held['streams']} streams arriving at {held['arrivals_per_s']}/s, each {held['stream_seconds']} s "
        f"(one event a second), so all are open together at the end of the ramp. Open at once, direct "
        f"{direct['peak_open']}, full **{full['peak_open']}**; failed: direct {direct['failed']}, full "
        f"{full['failed']}. TTFT p99: direct {_fmt(direct['ttft']['p99_ms'])} ms, full "
        f"{_fmt(full['ttft']['p99_ms'])} ms, **added {_fmt(held['added_ttft_p99_ms'])} ms**; full inter-event p99 "
        f"{_fmt(full['inter_chunk']['p99_ms'])} ms; platform RSS {_fmt(held['rss_mb'])} MB.",
    ]


def markdown(results: dict[str, Any]) -> str:
    """The human report: verdicts first, then every figure next to its reference, then the profile."""
    s = results["scenarios"]
    lines = [
        f"# Parley benchmark ({results['mode']} run)",
        "",
        f"Started {results['started_at']}, finished {results['finished_at']}. "
        "Every figure below was measured in this one run, on this machine, next to its reference.",
    ]
    if results["mode"] == "smoke":
        lines += ["", "**Smoke run: minimal sizes to check the harness. The figures mean nothing.**"]
    lines += [
        "",
        "## Targets (issue #8)",
        "",
        "| target | measured | reference | ratio | verdict | missed by |",
        "|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['target']} | {_fmt(t['measured'])} {t['unit']} | {_fmt(t['reference'])} ({t['reference_label']}) "
            f"| {_fmt(t['ratio'], 4)} | **{t['status']}** | {t['missed_by'] or ''} |"
        )

    m, v, w = results["machine"], results.get("versions", {}), results.get("workers", {})
    lines += [
        "",
        "## Machine, versions, workers",
        "",
        f"- CPU: {m['cpu']} x {m['cores']} cores; {m['memory_gb']} GB; kernel {m['kernel']}; "
        f"Python {m['python']}; load average at start {m['load_average_at_start']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Workers (configured, `make run`'s counts): {w.get('configured')}; environment {w.get('environment')}; "
        f"extra env: {w.get('extra_env')}; nginx workers {w.get('nginx_worker_processes')}",
        "- Served as (from each master's command line): "
        + "; ".join(f"{name} {flags}" for name, flags in (w.get("served") or {}).items()),
        "- Paths: **direct** client → upstream; **floor** client → nginx proxy → upstream, as Debian's nginx "
        "proxies out of the box (`proxy_pass` alone: a new upstream connection per request; the issue's reference, "
        "which it measured at 11,900 req/s here); **floor_keepalive** the same with keep-alive to the upstream (a "
        "tuned proxy, reported beside it); **llm** client → "
        "llm → upstream (a real user access token); **full** client → gateway → llm → upstream (an API key; "
        "authentication, rate limits and the ledger as in production, PostgreSQL). Upstream: nginx's static "
        "chat.completion for overhead runs, the fake provider for streams and the slow upstream.",
        f"- Sizes: `{json.dumps(results['sizes'])}`",
    ]

    lines += ["", "## One request at a time (paired rounds)", "", "![latency](latency.png)", ""]
    lat = s.get("latency", NOT_RUN)
    if "paths" in lat:
        lines += [
            f"{lat['rounds']} rounds x {lat['per_round']} requests per path, interleaved in shuffled order; "
            "added = path - direct per round, median over rounds.",
            "",
            "| path | p50 ms | p99 ms | added p50 ms | added p99 ms | failures |",
            "|---|---|---|---|---|---|",
        ]
        for name, p in lat["paths"].items():
            lines.append(
                f"| {name} | {_fmt(p['p50_ms'])} | {_fmt(p['p99_ms'])} | {_fmt(p.get('added_p50_ms'))} "
                f"| {_fmt(p.get('added_p99_ms'))} | {p['failures']} |"
            )
    else:
        lines.append(f"Error: {lat.get('error')}")

    lines += ["", "## Throughput at 32 connections (wrk)", "", "![throughput](throughput.png)", ""]
    tp = s.get("throughput", NOT_RUN)
    floor = _get(tp, "floor", "requests_per_s")
    if "error" not in tp:
        lines += [
            "| path | req/s | % of floor | p50 ms | p99 ms | non-2xx | socket errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in tp.items():
            share = _ratio(r.get("requests_per_s"), floor)
            lines.append(
                f"| {name} | {_fmt(r.get('requests_per_s'))} | {_fmt(share and share * 100, 1)} "
                f"| {_fmt(r.get('p50_ms'))} | {_fmt(r.get('p99_ms'))} | {r.get('non_2xx')} | {r.get('socket_errors')} |"
            )
        lines += cpu_table(tp)
    else:
        lines.append(f"Error: {tp['error']}")
    paired = s.get("throughput_paired", NOT_RUN)
    if "error" not in paired:
        lines += [
            "",
            f"The floor and the full path back to back, {paired['duration_s']:g} s each, the order swapped every round "
            "(the throughput target's share is the median of these):",
            "",
            "| round | floor req/s | full req/s | full / floor | non-2xx |",
            "|---|---|---|---|---|",
        ]
        for number, r in enumerate(paired["rounds"], 1):
            share = "—" if r["ratio"] is None else f"{r['ratio']:.1%}"
            lines.append(
                f"| {number} | {_fmt(r['reference_rps'])} | {_fmt(r['path_rps'])} | {share} | {r['non_2xx']} |"
            )
    else:
        lines.append(f"Paired rounds: {paired['error']}")

    slow = s.get("slow_upstream", NOT_RUN)
    lines += ["", "## Slow upstream", ""]
    if "error" not in slow:
        lines += [
            f"Upstream latency {slow.get('upstream_latency_ms')} ms, {slow.get('in_flight')} requests in flight "
            "(4 x the gateway's + llm's workers), closed loop.",
            "",
            "| path | completed/s | completed | statuses | errors | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("direct", "full"):
            r = slow.get(name, {})
            lines.append(
                f"| {name} | {_fmt(r.get('ok_per_s'))} | {r.get('ok')} | {r.get('statuses')} | {r.get('errors')} "
                f"| {_fmt(_get(r, 'latency', 'p50_ms'))} | {_fmt(_get(r, 'latency', 'p99_ms'))} |"
            )
    else:
        lines.append(f"Error: {slow['error']}")

    st = s.get("streams", NOT_RUN)
    lines += ["", "## Streams", "", "![streams](streams.png)", ""]
    if "error" not in st:
        paired = st.get("paired", {})
        full = _get(paired, "paths", "full") or {}
        direct = _get(paired, "paths", "direct") or {}
        lines += [
            f"One stream at a time ({paired.get('rounds')} rounds x {paired.get('per_round')}, paired): "
            f"TTFT p50 direct {_fmt(direct.get('ttft_p50_ms'))} ms, full {_fmt(full.get('ttft_p50_ms'))} ms "
            f"(added p50 {_fmt(full.get('added_ttft_p50_ms'))}, added p99 {_fmt(full.get('added_ttft_p99_ms'))} ms); "
            f"inter-chunk added p50 {_fmt(full.get('added_gap_p50_ms'))} ms, "
            f"p99 {_fmt(full.get('added_gap_p99_ms'))} ms.",
            "",
            *held_stream_lines(st.get("held_streams") or {}),
            "",
            f"Bursts: every stream of a level started within one second ({st.get('stream_seconds')} s each, an "
            f"arrival rate far above what the path serves, so TTFT here is mostly queueing), stepped up until the "
            f"full path fails; held with no errors: **{st.get('burst_held')}**.",
            "",
            "| streams | direct failed | full failed | direct TTFT p99 ms | full TTFT p99 ms | added TTFT p99 ms "
            "| full inter-chunk p99 ms | platform RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for lv in st.get("levels", []):
            lines.append(
                f"| {lv['concurrency']} | {lv['direct']['failed']} | {lv['full']['failed']} "
                f"| {_fmt(lv['direct']['ttft']['p99_ms'])} | {_fmt(lv['full']['ttft']['p99_ms'])} "
                f"| {_fmt(lv['added_ttft_p99_ms'])} | {_fmt(lv['full']['inter_chunk']['p99_ms'])} "
                f"| {_fmt(lv['rss_mb'])} |"
            )
    else:
        lines.append(f"Error: {st['error']}")

    b = s.get("batch", NOT_RUN)
    lines += ["", "## Batch", ""]
    if "error" not in b:
        p, r = b["platform"], b["raw_pika"]
        lines += [
            f"- Platform (upload → batch → relay → RabbitMQ → worker → llm → static upstream → output): "
            f"{p['completed']}/{p['items']} items in {p['elapsed_s']} s = **{_fmt(p['items_per_s'])} items/s** "
            f"(status {p['status']}, failed {p['failed']}).",
            f"- Raw pika loop (persistent messages, publisher confirms, quorum queue, consumer prefetch "
            f"{r['prefetch']}, manual acks): {r['consumed']}/{r['messages']} in {r['elapsed_s']} s = "
            f"**{_fmt(r['messages_per_s'])} messages/s**.",
        ]
        if p.get("cpu_us_per_item"):
            per = ", ".join(f"{name} {us}" for name, us in p["cpu_us_per_item"].items())
            lines.append(f"- CPU per item (µs, from /proc, while the batch ran): {per}.")
    else:
        lines.append(f"Error: {b['error']}")

    lines += [
        "",
        "## Memory (RSS summed over every process, gunicorn workers included)",
        "",
        "![rss](rss.png)",
        "",
        "| phase | total RSS MB | total PSS MB | processes | per service RSS MB |",
        "|---|---|---|---|---|",
    ]
    for label, key in (
        ("idle", "rss_idle"),
        ("32-connection load", "rss_load"),
        ("streams (largest level)", "rss_streams"),
    ):
        data = s.get(key) or {}
        if "per_service" in data:
            per = ", ".join(f"{n} {d['rss_mb']}" for n, d in data["per_service"].items())
            lines.append(f"| {label} | {data['total_rss_mb']} | {data['total_pss_mb']} | {data['processes']} | {per} |")
    lines.append("")
    lines.append(
        "PSS shares pages between forked workers fairly; RSS (the target's measure) counts them once per process."
    )

    scrape = s.get("metrics_scrape", NOT_RUN)
    lines += ["", "## /metrics scrape time (after load)", ""]
    if "error" not in scrape:
        lines += ["| service | p50 ms | p99 ms | bytes |", "|---|---|---|---|"]
        for name, r in scrape.items():
            lines.append(f"| {name} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {r['bytes']} |")
    else:
        lines.append(f"Error: {scrape['error']}")

    prof = s.get("profile", NOT_RUN)
    lines += ["", "## Profile of the full path under load (py-spy)", ""]
    if "error" in prof:
        lines.append(f"Error: {prof['error']}")
    for label in ("gateway", "llm"):
        entry = prof.get(label)
        if not entry:
            continue
        graph = entry.get("flamegraph")
        lines += [
            f"### {label} worker",
            "",
            f"Flame graph: [{graph}]({graph})" if graph else f"Flame graph failed: {entry.get('flamegraph_error')}",
        ]
        hot = entry.get("hot")
        if hot:
            lines += [
                "",
                f"{hot['samples']} samples. Most samples on top of the stack (self) and anywhere in it (inclusive):",
                "",
                "| self | share | inclusive | share |",
                "|---|---|---|---|",
            ]
            for own, incl in zip(hot["self"], hot["inclusive"], strict=False):
                lines.append(f"| `{own['frame']}` | {own['share']:.1%} | `{incl['frame']}` | {incl['share']:.1%} |")
        lines.append("")

    missed = [t for t in results["targets"] if t["met"] is False]
    if missed:
        lines += ["## Where targets are missed", ""]
        for t in missed:
            lines.append(f"- {t['target']}: {t['missed_by']}.")
        lines += budget_lines(s)
        lines += [
            "",
            "Read the self-time tables above for where the CPU per request goes; the flame graphs show "
            "the call paths behind them.",
        ]

    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {name}: {error}" for name, error in results["errors"].items()]
    return "\n".join(lines) + "\n"
