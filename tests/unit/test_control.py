"""The SQLite command table and the runtime's command dispatch (no SGLang)."""

from __future__ import annotations

from pathlib import Path

from alchemist_sgl.config import load_config
from alchemist_sgl.api.control import ControlQueue
from alchemist_sgl.runtime import Runtime, SchedulerInfo


def _runtime(tmp_path: Path, *overrides: str) -> tuple[Runtime, ControlQueue]:
    queue = ControlQueue(tmp_path / "control.sqlite")
    runtime = Runtime(load_config(None, list(overrides)), SchedulerInfo(123, "cpu", "m", "/m"),
                      control=queue)
    return runtime, queue


def test_commands_run_in_order_and_report_results(tmp_path: Path) -> None:
    runtime, queue = _runtime(tmp_path)
    seen: list[int] = []
    runtime.register_command("add", lambda p: seen.append(p["x"]) or p["x"] + 1)
    first, second = queue.submit("add", {"x": 1}), queue.submit("add", {"x": 2})
    assert not queue.result(first).is_done
    assert runtime.process_commands() == 2
    assert seen == [1, 2]
    assert queue.result(first).result == 2 and queue.result(second).is_ok
    assert queue.pending() == []


def test_failing_and_unknown_commands_answer_with_errors(tmp_path: Path) -> None:
    runtime, queue = _runtime(tmp_path)
    runtime.register_command("boom", lambda p: 1 / 0)
    boom, ghost = queue.submit("boom", {}), queue.submit("ghost", {})
    runtime.process_commands()
    assert not queue.result(boom).is_ok and "ZeroDivisionError" in queue.result(boom).result["error"]
    assert queue.result(ghost).result["is_unknown"] is True


def test_debug_commands_only_when_enabled(tmp_path: Path) -> None:
    runtime, queue = _runtime(tmp_path)
    cid = queue.submit("debug.ping", {"a": 1})
    runtime.process_commands()
    assert queue.result(cid).result.get("is_unknown")
    runtime, queue = _runtime(tmp_path / "b", "server.enable_debug_commands=true")
    cid = queue.submit("debug.ping", {"a": 1})
    runtime.process_commands()
    assert queue.result(cid).result == {"pid": 123, "echo": {"a": 1}}


def test_status_keeps_working_when_a_section_fails(tmp_path: Path) -> None:
    runtime, _ = _runtime(tmp_path)
    runtime.add_status_section("store", lambda: {"pages": 3})
    runtime.add_status_section("broken", lambda: {}["x"])
    runtime.on_iteration()
    status = runtime.status()
    assert status["iterations"] == 1 and status["store"] == {"pages": 3}
    assert "KeyError" in status["broken"]["error"]
    runtime.disable("record", "test fault")
    assert runtime.status()["disabled"] == {"record": "test fault"}
