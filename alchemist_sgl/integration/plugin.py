"""SGLang plugin entry point (group ``sglang.srt.plugins``): our hooks inside SGLang's processes.

``load()`` runs in every SGLang process of the environment (main, scheduler, detokenizer). It is
a no-op unless ``ALCHEMIST_SGL_CONFIG`` is set (Note [config hand-off] in environment.py). When
set, it registers hooks that build a ``Runtime`` inside the scheduler process and route the
scheduler's loop events and status requests to it.

Note [fail loudly, keep serving]: a hook that raises kills SGLang's scheduler. Every hook here
catches, logs with the traceback, disables the feature involved via ``Runtime.disable`` (visible
in ``/alchemist/status.disabled``) and returns SGLang's own result untouched.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from alchemist_sgl.config import Config, config_from_json
from alchemist_sgl.api.control import ControlQueue
from alchemist_sgl.integration import capture_hooks, training
from alchemist_sgl.integration.environment import CONFIG_ENV, CONTROL_DB_ENV, MODEL_PATH_ENV, is_cpu_run
from alchemist_sgl.log import get_logger
from alchemist_sgl.online import commands
from alchemist_sgl.core.prefix import Namespace
from alchemist_sgl.record.export import export_recording
from alchemist_sgl.runtime import Runtime, SchedulerInfo

logger = get_logger(__name__)

RUNTIME_ATTR = "_alchemist_runtime"
STATUS_KEY = "alchemist"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"


def load() -> None:
    """Entry point called by SGLang's ``load_plugins()``."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    config = config_from_json(text)
    if is_cpu_run(config):
        from patches import lora_pin_memory_guard  # noqa: PLC0415

        lora_pin_memory_guard.apply()
    holder = training.ProcessHolder()
    HookRegistry.register(f"{_SCHEDULER}.__init__",
                          functools.partial(_after_scheduler_init, config, holder), HookType.AFTER)
    training.register_hooks(holder)
    HookRegistry.register(f"{_SCHEDULER}.get_next_batch_to_run", _after_get_next_batch, HookType.AFTER)
    HookRegistry.register(f"{_SCHEDULER}.get_internal_state", _after_get_internal_state, HookType.AFTER)


def runtime_of(scheduler: Any) -> Runtime | None:
    return getattr(scheduler, RUNTIME_ATTR, None)


def _after_scheduler_init(config: Config, holder: training.ProcessHolder, result: Any, scheduler: Any,
                          *args: Any, **kwargs: Any) -> None:
    try:
        control_path = os.environ.get(CONTROL_DB_ENV)
        control = ControlQueue(control_path) if control_path else None
        runtime = Runtime(config, _scheduler_info(scheduler, config), control)
        setattr(scheduler, RUNTIME_ATTR, runtime)
    except Exception:
        logger.exception("alchemist runtime could not be built; serving continues without it")
        return None
    def install_recording() -> None:
        runtime.recording = capture_hooks.install(scheduler, runtime)
        if runtime.recording is not None and config.server.enable_debug_commands:
            # Writes only under the server's own var/debug/ (a file name, never a path).
            debug_dir = Path(config.server.cache_dir).parent / "debug"
            runtime.register_command("debug.recording", lambda payload: export_recording(
                runtime.recording.store, payload.get("tokens") or [],
                Namespace(str(runtime.state.weight_version), payload.get("adapter")),
                debug_dir / Path(str(payload.get("name") or "recording.pt")).name))

    def install_training() -> None:
        built = training.install(scheduler, runtime)
        if built is None:
            return
        runtime.loop, runtime.admission = built
        commands.register(runtime, runtime.loop, runtime.admission,
                          var_dir=Path(config.server.cache_dir).parent)
        runtime.add_status_section("train", lambda: runtime.loop.status()["train"])
        runtime.add_status_section("publish", lambda: runtime.loop.status()["publish"])
        runtime.add_status_section("versions", lambda: runtime.loop.registry.status(cap=20))
        if runtime.arbiter is not None:
            runtime.add_status_section("arbiter", runtime.arbiter.status)

    _attach(runtime, "record", install_recording)
    _attach(runtime, "train", install_training)
    holder.runtime = runtime
    return None


def _attach(runtime: Runtime, feature: str, install: Any) -> None:
    """Installs one feature's hooks; a failure disables that feature only (Note [fail loudly...])."""
    try:
        install()
    except Exception as exc:
        logger.exception("installing %s failed", feature)
        runtime.disable(feature, f"install failed: {exc!r}")


def _after_get_next_batch(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    runtime = runtime_of(scheduler)
    if runtime is None:
        return None
    try:
        runtime.on_iteration()
    except Exception as exc:
        logger.exception("alchemist iteration hook failed")
        runtime.disable("runtime", f"iteration hook failed: {exc!r}")
    return None


def _after_get_internal_state(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    runtime = runtime_of(scheduler)
    if runtime is None:
        return None
    try:
        runtime.process_commands()  # Note [control doorbell] in alchemist_sgl/control.py
        result.internal_state[STATUS_KEY] = runtime.status()
    except Exception as exc:
        logger.exception("alchemist status hook failed")
        result.internal_state[STATUS_KEY] = {"error": repr(exc)}
    return None


def _scheduler_info(scheduler: Any, config: Config) -> SchedulerInfo:
    server_args = scheduler.server_args
    device = str(getattr(server_args, "device", "cpu") or "cpu")
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{getattr(scheduler, 'gpu_id', 0)}"
    served = getattr(server_args, "served_model_name", None) or config.server.served_model_name
    return SchedulerInfo(
        pid=os.getpid(),
        device=device,
        model_name=str(served),
        model_path=os.environ.get(MODEL_PATH_ENV, str(getattr(server_args, "model_path", ""))),
    )
