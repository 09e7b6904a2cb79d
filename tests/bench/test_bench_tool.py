"""The bench's pure parts: percentile maths, the table and files it writes, argument parsing, the
fixture's sealed frames, the store counter. No timing is asserted here (numbers belong to bench/)."""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import orjson
import pytest

from agentchat import crypto
from bench import cli, report, workloads
from bench.fixture import client_tag, load_or_make, plaintext_of
from bench.loadgen import client_id_of, socketio_event
from bench.stalls import Lag, Watch
from bench.stalls import report as stalls_report
from bench.stats import Histogram, exact_percentile, latency_summary_ms, ratio
from bench.workloads import Options, fixture_for, parse_prometheus, persistence_cost, source_addresses, split

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------- percentiles


def test_histogram_percentiles_are_within_one_percent_of_exact() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(6, 1.2) for _ in range(20_000)]  # µs, long tail
    hist = Histogram()
    hist.record_many(values)
    for p in (50, 90, 99, 99.9):
        exact = exact_percentile(values, p)
        assert exact is not None
        assert hist.percentile(p) == pytest.approx(exact, rel=0.011)
    assert hist.percentile(100) == max(values)
    assert hist.total == len(values)


def test_histograms_merge_as_if_recorded_together_and_survive_json() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(1, 1001):
        (a if i % 3 else b).record(i * 10.0)
        both.record(i * 10.0)
    merged = Histogram.from_json(json.loads(json.dumps(a.to_json())))
    merged.merge(Histogram.from_json(b.to_json()))
    for p in (1, 50, 99, 99.9, 100):
        assert merged.percentile(p) == both.percentile(p)
    assert merged.total == 1000 and merged.min_us == 10.0


def test_empty_histogram_and_small_values() -> None:
    hist = Histogram()
    assert hist.percentile(99) is None
    assert latency_summary_ms(hist) == {"p50": None, "p99": None, "p999": None, "max": None, "samples": 0}
    hist.record(0.2)
    hist.record(0.5)
    assert hist.percentile(50) == 0.5  # clamped to what was recorded
    with pytest.raises(ValueError):
        hist.percentile(101)


def test_latency_summary_is_in_milliseconds() -> None:
    hist = Histogram()
    hist.record_many([1000.0] * 99 + [50_000.0])
    summary = latency_summary_ms(hist)
    assert summary["p50"] == pytest.approx(1.0, rel=0.01)
    assert summary["max"] == 50.0 and summary["samples"] == 100


def test_ratio() -> None:
    assert ratio(300, 400) == 0.75
    assert ratio(None, 400) is None and ratio(3, 0) is None


# ---------------------------------------------------------------------------------- output


def run_of(rows: list[dict]) -> dict:
    return {"started": "2026-01-01 00:00:00", "machine": {"cpu": "test cpu", "cores": 2, "memory_gb": 1.0,
            "os": "Linux", "python": "3.11", "node": "v20"}, "loadavg_before": [0, 0, 0],
            "loadavg_after": [0, 0, 0], "rows": rows,
            "options": {"server_cpus": "0", "load_cpus": "1", "agents": 200, "group": 10, "payload": 256,
                        "window": 16, "duration": 10, "warmup": 2, "paced_rates": [30000, 90000]}}


ROWS = [
    {"workload": "fanout", "server": "agentchat", "delivered_per_s": 300_000, "sent_per_s": 30_000,
     "latency_ms": {"p50": 1.0, "p99": 2.5, "p999": 4.0}, "server_cpu": 1.0, "load_cpu": 0.8},
    {"workload": "fanout", "server": "node-ws", "delivered_per_s": 400_000, "sent_per_s": 40_000,
     "latency_ms": {"p50": 0.5, "p99": 1.5, "p999": 3.0}, "server_cpu": 0.7, "load_cpu": 0.98,
     "server_core_busy": 0.75},
    {"workload": "idle", "server": "agentchat", "sessions": 1000, "rss_mb": 50.0, "kb_per_session": 12.0},
    {"workload": "idle", "server": "node-ws", "sessions": 1000, "rss_mb": 40.0, "kb_per_session": 8.0,
     "note": "a | b"},
    {"workload": "peek", "server": "agentchat", "note": "not available: the server has no peeks yet"},
    {"workload": "peek", "server": "agentchat", "peeks": 20, "outcomes": {"capturing": 19, "active": 1},
     "late_ms": {"p50": 3.0, "p99": 41.5, "max": 41.5}, "server_late_ms": {"p99": 12.0}, "delivered_per_s": 30000},
    {"workload": "paced", "server": "agentchat", "target_per_s": 30000, "latency_ms": {"p99": 1.0}},
    {"workload": "paced", "server": "node-ws", "target_per_s": 30000, "latency_ms": {"p99": 2.0}},
    {"workload": "paced", "server": "agentchat", "target_per_s": 90000, "latency_ms": {"p99": 9.0},
     "delivered_per_s": 45000},
    {"workload": "paced", "server": "node-ws", "target_per_s": 90000, "latency_ms": {"p99": 3.0}},
]


def test_table_shows_agentchat_ratio_to_each_peer() -> None:
    text = report.table(ROWS, "fanout")
    lines = text.splitlines()
    assert lines[0] == "**fan-out, saturated**"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[0] == "server" and "AgentChat ratio" in header
    node = next(line for line in lines if line.startswith("| node-ws"))
    cells = [c.strip() for c in node.strip("|").split("|")]
    assert cells[1] == "400,000"
    assert cells[header.index("AgentChat ratio")] == "≤ 0.75x", "the peer's generator was its limit: a ceiling"
    assert "load generator saturated (load CPU 0.98, server core 0.75)" in cells[-1]
    idle = report.table(ROWS, "idle")
    assert "1.50x" in idle and "a / b" in idle  # a pipe in a note cannot break the table
    assert report.table(ROWS, "storm") == ""
    paced = report.table(ROWS, "paced")
    assert "**fan-out, paced at 30,000 deliveries/s**" in paced and "**fan-out, paced at 90,000 deliveries/s**" in paced
    assert "0.50x" in paced and "3.00x" in paced
    assert "overloaded: kept 50% of the rate" in paced and paced.count("overloaded") == 1


def test_headline_is_cpu_per_delivery_and_p99_at_equal_load() -> None:
    rows = [
        {"workload": "paced", "server": "agentchat", "target_per_s": 90000, "delivered_per_s": 90000,
         "server_cpu": 0.6, "latency_ms": {"p99": 6.0}},
        {"workload": "paced", "server": "node-ws", "target_per_s": 90000, "delivered_per_s": 90000,
         "server_cpu": 0.8, "latency_ms": {"p99": 3.0}},
        {"workload": "fanout", "server": "agentchat", "delivered_per_s": 300_000, "server_cpu": 0.97,
         "server_core_busy": 0.5, "load_cpu": 0.99},
        {"workload": "fanout", "server": "node-ws", "delivered_per_s": 150_000, "server_cpu": 0.98,
         "server_core_busy": 0.98, "load_cpu": 0.8},
    ]
    text = report.render(run_of(rows))
    top = text.split("**fan-out, saturated**")[0]
    assert "**Headline: equal load (paced fan-out)**" in top
    assert "| 90,000 | agentchat | 6.67 | 6.00 |" in top
    assert "| 90,000 | node-ws | 8.89 | 3.00 | 0.75x | 2.00x |" in top
    assert "2.00x" not in top.split("node-ws")[0], "the saturated ratio is not in the headline"
    # AgentChat's own generator was its limit: its saturated ratio is a floor
    assert "≥ 2.00x" in report.table(rows, "fanout")


def test_sessions_across_processes_table() -> None:
    row = {"workload": "sessions-mp", "server": "agentchat x6 (redis)", "processes": 6, "sessions": 100_000,
           "connect_s": 41.5, "rss_mb": 400.0, "kb_per_session": 2.1}
    text = report.table([row], "sessions-mp")
    assert "| agentchat x6 (redis) | 6 | 100,000 | 41.5 | 400.0 | 2.10 |" in text


def test_render_and_files(tmp_path: Path) -> None:
    run = run_of(ROWS)
    text = report.render(run)
    assert "test cpu, 2 cores" in text and "**peek under load**" in text and "not available" in text
    assert "| agentchat | 20 | active 1, capturing 19 | 3.0 | 41.5 | 41.5 | 12.0 | 30,000 |" in text
    report.write_json(run, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["delivered_per_s"] == 300_000
    pytest.importorskip("matplotlib")
    assert report.chart(run, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------- arguments


def test_arguments() -> None:
    args = cli.build_parser().parse_args(["run", "fanout,idle", "--server", "agentchat,node-ws",
                                          "--duration", "3", "--server-cpus", "none", "--rate", "30000,90000"])
    assert args.workload == ["fanout", "idle"]
    assert args.server == ["agentchat", "node-ws"]
    options = cli.options_from(args)
    assert options.duration == 3 and options.server_cpus is None and options.load_cpus == "1"
    assert options.paced_rates == [30000, 90000]
    everything = cli.build_parser().parse_args(["run", "all"])
    assert everything.server == ["agentchat", "node-ws", "socketio-node", "socketio-py"]
    assert "multiprocess" in everything.workload and "peek" in everything.workload


@pytest.mark.parametrize("argv", [["run", "nope"], ["run", "fanout", "--server", "nginx"], ["run"],
                                  ["run", "paced", "--rate", "fast"]])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv)
    assert "usage:" in capsys.readouterr().err


def test_url_needs_one_server() -> None:
    args = cli.build_parser().parse_args(["run", "fanout", "--url", "ws://127.0.0.1:1"])
    with pytest.raises(SystemExit):
        cli.options_from(args)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_servers("")


# ---------------------------------------------------------------------------------- load pieces


def test_client_ids_are_found_in_every_protocol_shape() -> None:
    send = b'{"type":"send","channel":"ch_x","client_id":"a00001m0000002","envelope":{}}'
    message = b'{"type":"message","seq":7,"channel":"ch_x","sender":"did:x","client_id":"a00001m0000002","ts":1}'
    assert client_id_of(send) == client_id_of(message) == b"a00001m0000002"
    assert client_id_of(socketio_event(send)) == b"a00001m0000002"
    assert socketio_event(b"{}") == b'42["m",{}]'
    assert client_id_of(b"joined") is None


def test_split_and_source_addresses() -> None:
    assert split(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split([1], 4) == [[1]]
    assert source_addresses(10) == []
    assert source_addresses(100_000) == [f"127.0.0.{i}" for i in range(2, 7)]


def test_fixture_frames_are_real_sealed_envelopes(tmp_path: Path) -> None:
    fixture = load_or_make(tmp_path, agents=4, group=2, payload=256, per_agent=3)
    assert len(fixture.channels) == 2 and fixture.per_agent == 3
    agent = fixture.agents[3]
    key = fixture.channels[agent.channel]["epoch_key"]
    frames = fixture.frames_path(3).read_bytes().split(b"\n")[:-1]
    assert len(frames) == 3
    ids = set()
    for raw in frames:
        frame = orjson.loads(raw)
        assert frame["type"] == "send" and frame["channel"] == agent.channel
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", frame["client_id"]) and frame["client_id"].startswith(client_tag(3))
        ids.add(frame["client_id"])
        plaintext = crypto.open_envelope(frame["envelope"], key, channel=agent.channel, sender=agent.keys.did,
                                         client_id=frame["client_id"],
                                         sender_signing_key=crypto.signing_key_from_did(agent.keys.did))
        assert len(plaintext) == 256
    assert len(ids) == 3
    # the cache is reused and extended, never re-keyed
    again = load_or_make(tmp_path, agents=4, group=2, payload=256, per_agent=5)
    assert again.agents[3].keys.did == agent.keys.did
    assert len(again.frames_path(3).read_bytes().split(b"\n")[:-1]) == 5
    assert plaintext_of(256, 12345)[:8] == b'{"kind":'


def test_long_workloads_get_a_pool_that_lasts_them(tmp_path: Path) -> None:
    # 4 agents in channels of 2 at 40 deliveries/s: 5 sends/s per agent, over 1 s of warm-up and 9 s
    options = Options(["agentchat"], agents=4, group=2, warmup=1.0, duration=9.0, cache=tmp_path)
    small = load_or_make(tmp_path, agents=4, group=2, payload=256, per_agent=10)
    bigger = fixture_for(small, options, rate=40, duration=9.0)
    assert bigger.per_agent >= 5 * 10 and len(bigger.frames_path(0).read_bytes().split(b"\n")[:-1]) == bigger.per_agent
    assert bigger.agents[0].keys.did == small.agents[0].keys.did  # the same agents, more messages
    assert fixture_for(bigger, options, rate=40, duration=9.0) is bigger  # enough already: unchanged


def test_stalls_report_splits_lags_into_work_waiting_and_sleep() -> None:
    watch = Watch(threshold_ms=3.0)
    watch.lags = [Lag(1.0, 5.0, 2.0, 1.0), Lag(2.0, 9.0, 9.0, 0.0), Lag(3.0, 4.0, None, None)]
    for generation, took in ((0, 0.0002), (0, 0.002), (2, 0.03)):
        watch.gc_count[generation] += 1
        watch.gc_seconds[generation] += took
        if took > 0.001:
            watch.slow_gcs.append((generation, took * 1000))
    text = stalls_report(watch, 12.0)
    assert "3 lags, 18 ms in all" in text and "max 9.0 ms" in text
    assert "ran 11 ms, waited for its core 1 ms and slept 2 ms" in text  # the lag without /proc figures left out
    assert "young 2 (2 ms), middle 0 (0 ms), full 1 (30 ms)" in text
    assert "young 1, full 1; longest 30.0 ms" in text
    assert "none" in stalls_report(Watch(threshold_ms=3.0), 1.0)


def test_stalls_watch_counts_collections_and_takes_a_census() -> None:
    watch = Watch(threshold_ms=3.0, census=True)
    watch.gc_count[0] = 50
    keep = [(1, b"x") for _ in range(10)]
    watch.on_gc("start", {"generation": 0})
    watch.on_gc("stop", {"generation": 0})
    assert watch.gc_count[0] == 51 and len(watch.young) == 1
    assert all(isinstance(name, str) and count > 0 for name, count in watch.young[0])
    assert keep


def test_persistence_cost_from_two_scrapes_of_metrics() -> None:
    before = parse_prometheus(
        "# HELP agentchat_messages_in_total messages\n# TYPE agentchat_messages_in_total counter\n"
        "agentchat_messages_in_total 100.0\n"
        'agentchat_store_operations_total{op="put"} 40.0\n'
        "agentchat_batch_messages_count 10.0\nagentchat_batch_messages_sum 100.0\n")
    after = parse_prometheus(
        "agentchat_messages_in_total 2100.0\n"
        'agentchat_store_operations_total{op="put"} 42.0\n'
        'agentchat_store_operations_total{op="get"} 1.0\n'
        "agentchat_batch_messages_count 12.0\nagentchat_batch_messages_sum 2100.0\n")
    cost = persistence_cost(before, after)
    assert cost["messages"] == 2000 and cost["store_ops"] == 3
    assert cost["ops_per_1000_messages"] == 1.5
    assert cost["ops"] == {"put": 2, "get": 1}
    assert cost["messages_per_batch"] == 1000.0


def test_bench_pins_match_the_bench_extra() -> None:
    import tomllib

    extra = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"])
    for requirements in (REPO / "bench" / "requirements.txt",
                         REPO / "bench" / "peers" / "socketio-py" / "requirements.txt"):
        lines = [line.strip() for line in requirements.read_text().splitlines()]
        pins = {line for line in lines if line and not line.startswith("#")}
        assert pins <= extra, f"{requirements.name}: {pins - extra} not in the bench extra"


def test_cpu_lists_and_ticks() -> None:
    from bench.servers import cpu_ticks, parse_cpu_list

    assert parse_cpu_list("0") == [0] and parse_cpu_list("0,2-3") == [0, 2, 3] and parse_cpu_list(None) == []
    ticks = cpu_ticks([0])
    assert 0 <= ticks["tasks"] + ticks["irq"] <= ticks["total"] and ticks["total"] > 0


def test_core_usage_separates_other_processes() -> None:
    from bench.servers import core_usage

    before = {"tasks": 0, "irq": 0, "total": 0, "cpus": 1}
    after = {"tasks": 80, "irq": 15, "total": 100, "cpus": 1}
    assert core_usage(before, after, 0.5) == {"server_core_busy": 0.95, "foreign_cpu": 0.3}
    assert core_usage(before, before, 0.5) == {}


def test_repeated_runs_keep_the_median_and_list_every_run() -> None:
    runs = [{"workload": "fanout", "server": "node-ws", "delivered_per_s": v} for v in (300, 100, 200)]
    chosen = cli.median_row(runs, "fanout")
    assert chosen["delivered_per_s"] == 200 and chosen["runs"] == [300, 100, 200]
    assert "median of 300 / 100 / 200" in report.table([chosen], "fanout")
    assert cli.median_row(runs[:1], "fanout") is runs[0]


def test_lean_session_frames() -> None:
    from bench.sessions import client_frame, parse_frames, upgrade_request

    small = client_frame(b"hi")
    assert small == b"\x81\x82\x00\x00\x00\x00hi"  # final text frame, masked with the zero key
    medium = client_frame(b"x" * 300)
    assert medium[1] == 0x80 | 126 and int.from_bytes(medium[2:4], "big") == 300
    buffer = bytearray(b"\x81\x05hello" + b"\x89\x00" + b"\x81\x7e\x01\x2c" + b"y" * 300 + b"\x81\x05par")
    assert parse_frames(buffer) == [(1, b"hello"), (9, b""), (1, b"y" * 300)]
    assert buffer == bytearray(b"\x81\x05par")  # an incomplete frame stays for the next read
    request = upgrade_request("ws://127.0.0.1:8080/socket.io/?EIO=4&transport=websocket")
    assert request.startswith(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
    assert request.endswith(b"\r\n\r\n") and b"Sec-WebSocket-Version: 13" in request


def test_profile_summary_of_collapsed_stacks() -> None:
    from bench.profile import parse, summarize

    text = ("thread (0x1);<module> (agentchat/__main__.py:9);run_app (aiohttp/web.py:1);"
            "send (agentchat/server/hub.py:5) 30\n"
            "thread (0x2);_bootstrap (threading.py:1);_worker (concurrent/futures/thread.py:83);"
            "_put_sync (agentchat/store/local.py:7) 10\n")
    summary = summarize(parse(text), top=5)
    assert "40 samples" in summary
    assert " 75.0%  event loop" in summary and " 25.0%  worker threads (to_thread)" in summary
    assert " 75.0%  agentchat/server/hub.py" in summary
    assert " 75.0%  send (agentchat/server/hub.py)" in summary


def test_merging_runs_replaces_rows_of_the_same_workload_server_and_rate(tmp_path: Path) -> None:
    first = run_of(ROWS)
    first["rows"] = [*first["rows"], {"workload": "multiprocess", "server": "agentchat", "note": "failed: no redis"}]
    later = run_of([{"workload": "peek", "server": "agentchat", "peeks": 5, "late_ms": {"p99": 7.0}},
                    {"workload": "multiprocess", "server": "agentchat x2 (redis)", "delivered_per_s": 5},
                    {"workload": "paced", "server": "node-ws", "target_per_s": 30000, "latency_ms": {"p99": 4.0}}])
    later["started"] = "2026-01-01 01:00:00"
    merged = cli.merge_runs([first, later])
    assert merged["started"] == "2026-01-01 01:00:00"
    assert [s["started"] for s in merged["sources"]] == ["2026-01-01 00:00:00", "2026-01-01 01:00:00"]
    assert "paced at 30,000/s" in merged["sources"][1]["workloads"]
    assert "- run of 2026-01-01 01:00:00" in report.render(merged)
    peeks = [r for r in merged["rows"] if r["workload"] == "peek"]
    assert peeks == [later["rows"][0]]
    paced = {(r["server"], r["target_per_s"]): r["latency_ms"]["p99"]
             for r in merged["rows"] if r["workload"] == "paced"}
    assert paced == {("agentchat", 30000): 1.0, ("node-ws", 30000): 4.0, ("agentchat", 90000): 9.0,
                     ("node-ws", 90000): 3.0}
    assert [r["workload"] for r in merged["rows"]][:2] == ["fanout", "fanout"]
    assert [r["server"] for r in merged["rows"] if r["workload"] == "multiprocess"] == ["agentchat x2 (redis)"]
    a, b = tmp_path / "a", tmp_path / "b"
    for path, run in ((a, first), (b, later)):
        path.mkdir()
        (path / "results.json").write_text(json.dumps(run))
    assert cli.main(["report", str(a), str(b / "results.json"), "--out", str(tmp_path / "merged")]) == 0
    assert "**peek under load**" in (tmp_path / "merged" / "results.md").read_text()


def test_a_measured_peek_row_replaces_an_unavailable_one() -> None:
    first = run_of([{"workload": "peek", "server": "agentchat", "note": "not available"}])
    later = run_of([{"workload": "peek", "server": "agentchat", "target_per_s": 36000, "peeks": 20}])
    assert cli.merge_runs([first, later])["rows"] == later["rows"]


def test_the_chart_title_is_not_clipped_on_a_narrow_chart(tmp_path: Path) -> None:
    """One panel and a long CPU name: the title is wrapped to the chart, never cut off at its edges."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    run = run_of([row for row in ROWS if row["workload"] == "fanout"])
    run["machine"]["cpu"] = "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz with a long marketing name"
    assert report.chart(run, tmp_path / "chart.png")
    pixels = matplotlib.image.imread(str(tmp_path / "chart.png"))
    edges = [pixels[:, :3, :3], pixels[:, -3:, :3]]  # the leftmost and rightmost columns, RGB
    assert all(edge.min() > 0.95 for edge in edges), "something is drawn across the chart's edge"


def test_progress_never_shows_more_than_100_percent() -> None:
    import io

    from bench.progress import Progress

    out = io.StringIO()
    progress = Progress("fan-out", stream=out)
    progress.min_interval = 0  # not a terminal: it would draw every 2 s only
    progress.update(1.09, "overshot")
    progress.update(-0.2, "before the start")
    text = out.getvalue()
    assert "100%" in text and "109%" not in text and "-20%" not in text and "  0%" in text


def test_the_multiprocess_table_puts_the_equal_load_efficiency_beside_the_saturated_ratio() -> None:
    """The Redis bus is compared with the in-process bus at the same paced load (the efficiency) and,
    separately, at each one's saturation: both are shown, neither hidden."""
    row = {"workload": "multiprocess", "server": "agentchat x2 (redis)", "paced_rate": 60000,
           "paced_delivered_per_s": 59990, "paced_p99_ms": 13.7, "paced_inprocess_p99_ms": 5.2,
           "paced_server_cpu_ms_per_1000": 14.1, "paced_redis_cpu_ms_per_1000": 2.55,
           "paced_inprocess_cpu_ms_per_1000": 12.77, "redis_bus_efficiency": 0.767,
           "delivered_per_s": 95533, "inprocess_delivered_per_s": 208333, "server_cpu_ms_per_1000": 8.77,
           "redis_cpu_ms_per_1000": 1.73, "inprocess_cpu_ms_per_1000": 4.72, "saturated_efficiency": 0.45}
    table = report.render(run_of([row]))
    line = next(text for text in table.splitlines() if text.startswith("| agentchat x2 (redis)"))
    assert "| 60,000 | 13.7 (5.2) | 14.10 + 2.55 | 12.77 | 0.77 | 95,533 (208,333) | 8.77 + 1.73 (4.72) | 0.45 |" in line
    assert "efficiency at equal load" in table and "saturated ratio" in table
    assert workloads._efficiency(12.77, {"server_cpu_ms_per_1000": 14.1, "redis_cpu_ms_per_1000": 2.55}) == 0.767
    assert workloads._efficiency(None, {"server_cpu_ms_per_1000": 14.1}) is None
