"""SGLang plugin entry point (group ``sglang.srt.plugins``): our hooks inside SGLang's processes.

``load()`` runs in every SGLang process of the environment (main, scheduler, detokenizer). It is
a no-op unless ``ALCHEMIST_SGL_CONFIG`` is set (Note [config hand-off] in environment.py). When
set, it registers hooks that build a ``Runtime`` inside the scheduler process (``build_runtime``,
runtime.py, over the views built here) and route the scheduler's loop events and status requests
to it.

Note [fail loudly, keep serving]: a hook that raises kills SGLang's scheduler. Every hook here
catches, logs with the traceback, disables the feature involved via ``Runtime.disable`` (visible
in ``/alchemist/status.disabled``) and returns SGLang's own result untouched.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, TypeVar

from alchemist_sgl.config import Config, config_from_json
from alchemist_sgl.api.control import ControlQueue
from alchemist_sgl.integration import capture_hooks, training
from alchemist_sgl.integration.shutdown import ignore_sigint_in_children
from alchemist_sgl.integration.environment import CONFIG_ENV, CONTROL_DB_ENV, MODEL_PATH_ENV, is_cpu_run
from alchemist_sgl.log import get_logger
from alchemist_sgl.runtime import Runtime, RuntimeState, SchedulerInfo, build_runtime

logger = get_logger(__name__)
T = TypeVar("T")

RUNTIME_ATTR = "_alchemist_runtime"
STATUS_KEY = "alchemist"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"


def load() -> None:
    """Entry point called by SGLang's ``load_plugins()``."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    ignore_sigint_in_children()  # Note [Ctrl-C] in shutdown.py
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
    runtime: Runtime | None = getattr(scheduler, RUNTIME_ATTR, None)
    return runtime


def _after_scheduler_init(config: Config, holder: training.ProcessHolder, result: Any, scheduler: Any,
                          *args: Any, **kwargs: Any) -> None:
    """Hooks recording into the model and views the served model for training (each failure
    disables that feature only, Note [fail loudly, keep serving]), then builds the runtime over
    them (runtime.py, the composition root)."""
    state = RuntimeState()
    recording = _attach(state, "record", lambda: capture_hooks.install(scheduler, config, state))
    served = _attach(state, "train", lambda: training.served_model(scheduler, config, state))
    try:
        control_path = os.environ.get(CONTROL_DB_ENV)
        control = ControlQueue(control_path) if control_path else None
        runtime = build_runtime(config, _scheduler_info(scheduler, config), state, control=control,
                                recording=recording, served=served)
        setattr(scheduler, RUNTIME_ATTR, runtime)
    except Exception:
        logger.exception("alchemist runtime could not be built; serving continues without it")
        if recording is not None:
            recording.remove()  # nothing would read what it records
        return None
    holder.runtime = runtime
    return None


def _attach(state: RuntimeState, feature: str, install: Callable[[], T | None]) -> T | None:
    """Installs one feature's hooks or views; a failure disables that feature only (Note [fail
    loudly, keep serving]) and gives None."""
    try:
        return install()
    except Exception as exc:
        logger.exception("installing %s failed", feature)
        state.disable(feature, f"install failed: {exc!r}")
        return None


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
        runtime.process_commands()  # Note [control doorbell] in api/control.py
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
