"""A run's rows as a table (Markdown, printed and saved), a JSON file and a PNG chart.

Ratios are AgentChat's number divided by each peer's, from the same run: for throughput a ratio
above 1 means AgentChat is ahead; for latency and memory a ratio below 1 does.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import ratio

Row = dict[str, Any]


def machine() -> dict[str, Any]:
    """What the numbers came from."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    node = ""
    if shutil.which("node"):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gb = None
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "memory_gb": memory_gb,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(), "node": node}


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _runs(values: list[Any]) -> str:
    return " / ".join(_num(v, 2 if isinstance(v, float) and v < 100 else 0) for v in values)


def _latency(row: Row, key: str) -> Any:
    return (row.get("latency_ms") or {}).get(key)


def _pair(first: Any, second: Any, digits: int, between: str = " ") -> str | None:
    """``first (second)``, or with ``between`` given ``first<between>second``: two numbers in a cell."""
    if first is None:
        return None
    if between == " ":
        return f"{_num(first, digits)} ({_num(second, digits)})"
    return f"{_num(first, digits)}{between}{_num(second, digits)}"


def _saturated_cpu(row: Row) -> str | None:
    servers, redis = row.get("server_cpu_ms_per_1000"), row.get("redis_cpu_ms_per_1000")
    if servers is None:
        return None
    return f"{_num(servers, 2)} + {_num(redis, 2)} ({_num(row.get('inprocess_cpu_ms_per_1000'), 2)})"


# One table per workload: (title, columns as (header, getter, digits), key metric for the ratio).
Column = tuple[str, Callable[[Row], Any], int]
TABLES: dict[str, tuple[str, list[Column], Callable[[Row], Any]]] = {
    "fanout": ("fan-out, saturated", [
        ("deliveries/s", lambda r: r.get("delivered_per_s"), 0),
        ("sends/s", lambda r: r.get("sent_per_s"), 0),
        ("p50 ms", lambda r: _latency(r, "p50"), 2),
        ("p99 ms", lambda r: _latency(r, "p99"), 2),
        ("p99.9 ms", lambda r: _latency(r, "p999"), 2),
        ("server CPU", lambda r: r.get("server_cpu"), 2),
        ("server core busy", lambda r: r.get("server_core_busy"), 2),
        ("load CPU", lambda r: r.get("load_cpu"), 2),
    ], lambda r: r.get("delivered_per_s")),
    "paced": ("fan-out, paced", [
        ("target/s", lambda r: r.get("target_per_s"), 0),
        ("deliveries/s", lambda r: r.get("delivered_per_s"), 0),
        ("p50 ms", lambda r: _latency(r, "p50"), 2),
        ("p99 ms", lambda r: _latency(r, "p99"), 2),
        ("p99.9 ms", lambda r: _latency(r, "p999"), 2),
        ("server CPU", lambda r: r.get("server_cpu"), 2),
        ("server core busy", lambda r: r.get("server_core_busy"), 2),
    ], lambda r: _latency(r, "p99")),
    "idle": ("idle sessions", [
        ("sessions", lambda r: r.get("sessions"), 0),
        ("server RSS MB", lambda r: r.get("rss_mb"), 1),
        ("KB/session", lambda r: r.get("kb_per_session"), 2),
    ], lambda r: r.get("kb_per_session")),
    "storm": ("connect storm", [
        ("sessions", lambda r: r.get("sessions"), 0),
        ("sessions/s", lambda r: r.get("sessions_per_s"), 0),
        ("p50 ms", lambda r: _latency(r, "p50"), 2),
        ("p99 ms", lambda r: _latency(r, "p99"), 2),
        ("server CPU", lambda r: r.get("server_cpu"), 2),
        ("load CPU", lambda r: r.get("load_cpu"), 2),
    ], lambda r: r.get("sessions_per_s")),
    "persistence": ("persistence cost (paced fan-out)", [
        ("messages", lambda r: r.get("messages"), 0),
        ("store ops", lambda r: r.get("store_ops"), 0),
        ("ops/1,000 msgs", lambda r: r.get("ops_per_1000_messages"), 2),
        ("msgs/batch", lambda r: r.get("messages_per_batch"), 1),
        ("flush ms", lambda r: r.get("flush_ms"), 1),
        ("deliveries/s", lambda r: r.get("delivered_per_s"), 0),
    ], lambda r: r.get("ops_per_1000_messages")),
    "multiprocess": ("multi-process (Redis bus)", [
        ("paced /s", lambda r: r.get("paced_rate"), 0),
        ("p99 ms (in-process)", lambda r: _pair(r.get("paced_p99_ms"), r.get("paced_inprocess_p99_ms"), 1), 0),
        ("servers + redis CPU ms/1,000", lambda r: _pair(r.get("paced_server_cpu_ms_per_1000"),
                                                        r.get("paced_redis_cpu_ms_per_1000"), 2, " + "), 0),
        ("in-process CPU ms/1,000", lambda r: r.get("paced_inprocess_cpu_ms_per_1000"), 2),
        ("efficiency at equal load", lambda r: r.get("redis_bus_efficiency"), 2),
        ("saturated deliveries/s (in-process)", lambda r: _pair(r.get("delivered_per_s"),
                                                               r.get("inprocess_delivered_per_s"), 0), 0),
        ("saturated CPU ms/1,000 servers + redis (in-process)", lambda r: _saturated_cpu(r), 0),
        ("saturated ratio", lambda r: r.get("saturated_efficiency"), 2),
    ], lambda r: r.get("redis_bus_efficiency")),
    "sessions-mp": ("idle sessions across processes (Redis bus)", [
        ("processes", lambda r: r.get("processes"), 0),
        ("sessions", lambda r: r.get("sessions"), 0),
        ("connect s", lambda r: r.get("connect_s"), 1),
        ("servers RSS MB", lambda r: r.get("rss_mb"), 1),
        ("KB/session", lambda r: r.get("kb_per_session"), 2),
    ], lambda r: r.get("kb_per_session")),
    "peek": ("peek under load", [
        ("peeks", lambda r: r.get("peeks"), 0),
        ("outcomes", lambda r: ", ".join(f"{k} {v}" for k, v in sorted((r.get("outcomes") or {}).items())) or None, 0),
        ("late p50 ms", lambda r: (r.get("late_ms") or {}).get("p50"), 1),
        ("late p99 ms", lambda r: (r.get("late_ms") or {}).get("p99"), 1),
        ("late max ms", lambda r: (r.get("late_ms") or {}).get("max"), 1),
        ("server-side p99 ms", lambda r: (r.get("server_late_ms") or {}).get("p99"), 1),
        ("deliveries/s", lambda r: r.get("delivered_per_s"), 0),
    ], lambda r: (r.get("late_ms") or {}).get("p99")),
}


def table(rows: list[Row], workload: str) -> str:
    """The Markdown table(s) of one workload's rows, with AgentChat's ratio to each peer; paced rows
    get one table per target rate."""
    mine = [r for r in rows if r.get("workload") == workload]
    targets = sorted({r["target_per_s"] for r in mine if r.get("target_per_s")})
    if len(targets) > 1:
        return "\n\n".join(_table([r for r in mine if r.get("target_per_s") == t], workload) for t in targets)
    return _table(mine, workload)


def _table(mine: list[Row], workload: str) -> str:
    title, columns, key = TABLES[workload]
    if not mine:
        return ""
    if mine[0].get("target_per_s"):
        title += f" at {mine[0]['target_per_s']:,} deliveries/s"
    ours = next((key(r) for r in mine if r.get("server") == "agentchat"), None)
    show_ratio = ours is not None and any(r.get("server") != "agentchat" for r in mine)
    headers = ["server", *(c[0] for c in columns)] + (["AgentChat ratio"] if show_ratio else []) + ["note"]
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 or h == "note" else "---:" for i, h in enumerate(headers)) + "|"]
    our_row = next((r for r in mine if r.get("server") == "agentchat"), {})
    for r in mine:
        cells = [str(r.get("server", ""))] + [_num(getter(r), digits) for _, getter, digits in columns]
        if show_ratio:
            cell = "" if r.get("server") == "agentchat" else _ratio(ratio(ours, key(r)))
            if workload == "fanout" and cell not in ("", "–"):
                # A side whose load generator was the limit could go faster: AgentChat's ratio is then
                # a floor (its own generator) or a ceiling (the peer's), never a measured ratio.
                cell = {(True, False): "≥ ", (False, True): "≤ ", (True, True): "? "}.get(
                    (generator_limited(our_row), generator_limited(r)), "") + cell
            cells.append(cell)
        note = "; ".join(str(r[k]) for k in ("note", "first_error") if r.get(k))
        load, busy = r.get("load_cpu"), r.get("server_core_busy")
        if workload == "fanout" and generator_limited(r):
            note = (f"load generator saturated (load CPU {load:.2f}, server core {busy:.2f}): "
                    "the server can go faster than this; " + note)
        target, achieved = r.get("target_per_s"), r.get("delivered_per_s")
        if workload == "paced" and target and achieved is not None and achieved < 0.95 * target:
            note = f"overloaded: kept {achieved / target:.0%} of the rate, latency is queueing; " + note
        if r.get("runs"):
            note = (f"median of {_runs(r['runs'])}; " + note).rstrip("; ")
        cells.append(note.replace("|", "/")[:240])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generator_limited(row: Row) -> bool:
    """The load core was full while the server's was not: the server could have gone faster."""
    load, busy = row.get("load_cpu"), row.get("server_core_busy")
    return load is not None and busy is not None and load >= 0.95 and busy < 0.9


def cpu_us_per_delivery(row: Row) -> float | None:
    cpu, delivered = row.get("server_cpu"), row.get("delivered_per_s")
    return cpu * 1e6 / delivered if cpu is not None and delivered else None


def headline(rows: list[Row]) -> str:
    """The bench's headline: at equal paced load, the server CPU each delivery costs and the p99, with
    AgentChat's ratio to each peer (below 1: AgentChat does better). Saturated throughput is no
    headline: with one load core, the generator may be what limited it."""
    paced = [r for r in rows if r.get("workload") == "paced" and r.get("target_per_s")]
    lines = ["**Headline: equal load (paced fan-out)**", "",
             "| deliveries/s | server | server CPU µs/delivery | p99 ms | CPU ratio | p99 ratio | note |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for target in sorted({r["target_per_s"] for r in paced}):
        at = [r for r in paced if r["target_per_s"] == target]
        ours = next((r for r in at if r.get("server") == "agentchat"), None)
        if ours is None:
            continue
        for r in at:
            peer = r is not ours
            achieved = r.get("delivered_per_s")
            note = ("overloaded: not equal load" if achieved is not None and achieved < 0.95 * target else "")
            lines.append("| " + " | ".join([
                f"{target:,}", str(r.get("server")), _num(cpu_us_per_delivery(r), 2), _num(_latency(r, "p99"), 2),
                _ratio(ratio(cpu_us_per_delivery(ours), cpu_us_per_delivery(r))) if peer else "",
                _ratio(ratio(_latency(ours, "p99"), _latency(r, "p99"))) if peer else "", note]) + " |")
    return "\n".join(lines) if len(lines) > 4 else ""


def render(run: dict[str, Any]) -> str:
    m = run["machine"]
    o = run["options"]
    header = [
        f"# AgentChat bench: {run['started']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, Python {m['python']}, "
        f"Node {m['node'] or 'none'}. Server on CPU {o['server_cpus']}, load generators on CPU {o['load_cpus']}."
        + ("" if run.get("sources") else f" Load average {run['loadavg_before']} before, {run['loadavg_after']} "
           "after (other work on the machine)."),
        "",
        f"Fan-out: {o['agents']} agents in channels of {o['group']}, {o['payload']}-byte sealed payloads, "
        f"window {o['window']} per sender, {o['duration']} s measured after {o['warmup']} s warm-up; paced at "
        f"{' and '.join(f'{r:,}' for r in o['paced_rates'])} deliveries/s. "
        "Ratio = AgentChat / peer (throughput: higher is better; latency, "
        "memory: lower is better). Server CPU is the server process's own time (1.00 = one core); server "
        "core busy is its core's user + system + softirq time, where loopback TCP work is charged.",
    ]
    for source in run.get("sources", []):
        header.append(f"- run of {source['started']} (load average {source['loadavg_before']} before, "
                      f"{source['loadavg_after']} after): {', '.join(source['workloads'])}")
    if run.get("sources"):
        header.insert(-len(run["sources"]), "\nThe tables come from these runs, with the same options:\n")
    parts = ["\n".join(header)]
    top = headline(run["rows"])
    if top:
        parts.append(top)
    for workload in TABLES:
        text = table(run["rows"], workload)
        if text:
            parts.append(text)
    return "\n\n".join(parts) + "\n"


def write_json(run: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(run, indent=2) + "\n")


def _fit(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``width_inches`` at ``fontsize`` points (a character is
    about 0.6 of the font size wide): a long CPU name on a one-panel chart wraps instead of running
    off both edges."""
    import textwrap

    chars = max(20, int(width_inches * 72 / (fontsize * 0.6)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def chart(run: dict[str, Any], path: Path) -> bool:
    """The PNG chart: saturated throughput, paced latency percentiles, memory and connect rate per
    server (panels without data are left out). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = run["rows"]
    panels: list[tuple[str, str, list[Row]]] = []
    lowest = min(run["options"]["paced_rates"])
    for workload, label in (("fanout", "fan-out: deliveries/s (saturated)"),
                            ("paced", f"latency at {lowest:,} deliveries/s (ms)"),
                            ("idle", "memory per idle session (KB)"), ("storm", "connect storm: sessions/s")):
        mine = [r for r in rows if r.get("workload") == workload and r.get("server")
                and r.get("target_per_s", lowest) == lowest]
        if mine:
            panels.append((workload, label, mine))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    colors = {"agentchat": "#1f77b4", "node-ws": "#7f7f7f", "socketio-node": "#bcbd22", "socketio-py": "#ff7f0e"}
    for ax, (workload, label, mine) in zip(axes[0], panels):
        names = [r["server"] for r in mine]
        if workload == "paced":
            width = 0.27
            for k, (key, shade) in enumerate((("p50", 1.0), ("p99", 0.7), ("p999", 0.45))):
                values = [_latency(r, key) or 0 for r in mine]
                xs = [i + (k - 1) * width for i in range(len(mine))]
                ax.bar(xs, values, width, label=key, color=[colors.get(n, "#444") for n in names], alpha=shade)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            key = {"fanout": "delivered_per_s", "idle": "kb_per_session", "storm": "sessions_per_s"}[workload]
            values = [r.get(key) or 0 for r in mine]
            bars = ax.bar(range(len(mine)), values, color=[colors.get(n, "#444") for n in names])
            for bar_, value in zip(bars, values):
                ax.annotate(f"{value:,.0f}" if value >= 100 else f"{value:.1f}",
                            (bar_.get_x() + bar_.get_width() / 2, bar_.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_title(_fit(label, 4.2, 9), fontsize=9)
    m = run["machine"]
    width = 4.2 * len(panels)
    fig.suptitle(_fit(f"AgentChat bench {run['started'][:16]} · {m['cpu']} · {m['cores']} cores", width, 9),
                 fontsize=9)
    fig.tight_layout()
    # "tight" takes in every title whole, whatever the fonts' real widths came out as.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return True
