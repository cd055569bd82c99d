"""The hook-point manifest: every SGLang name this project touches, checked at startup.

An upgrade of SGLang that moves or renames one of these fails loudly, naming the entry and the
pinned version, instead of silently doing nothing (a HookRegistry target that does not resolve is
only logged by SGLang). Add an entry here whenever code touches a new SGLang name.
"""

from __future__ import annotations

import importlib
import re
import pkgutil
from dataclasses import dataclass

from alchemist_sgl.errors import ManifestError
from alchemist_sgl.integration import capture_hooks, served_model, shutdown, training

PINNED_SGLANG_VERSION = "0.5.23"


@dataclass(frozen=True)
class HookPoint:
    name: str  # dotted path resolvable by pkgutil.resolve_name
    used_for: str
    cpu_only: bool = False


MANIFEST: tuple[HookPoint, ...] = (
    HookPoint("sglang.srt.server_args.ServerArgs", "server arguments record"),
    HookPoint("sglang.srt.server_args.ServerArgs.add_cli_args", "validating and building sglang.* config keys"),
    HookPoint("sglang.srt.server_args.prepare_server_args", "building ServerArgs from the sglang section"),
    HookPoint("sglang.srt.entrypoints.http_server.launch_server", "launch seam"),
    HookPoint("sglang.srt.entrypoints.http_server.app", "extra HTTP routes declared before launch"),
    HookPoint("sglang.srt.entrypoints.http_server._global_state", "reaching the TokenizerManager from routes"),
    HookPoint("sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.get_internal_state",
              "control channel to the scheduler (status)"),
    HookPoint("sglang.srt.plugins.hook_registry.HookRegistry.register", "plugin hooks"),
    HookPoint("sglang.srt.utils.auth.auth_level", "admin routes follow --admin-api-key"),
    HookPoint("sglang.srt.utils.auth.AuthLevel", "admin routes follow --admin-api-key"),
    HookPoint("sglang.srt.managers.tokenizer_manager.TokenizerManager.record_config_updates",
              "tokenizer-side weight_version follows the serving version"),
    HookPoint("sglang.srt.managers.tokenizer_manager.TokenizerManager.config_value",
              "reading the tokenizer-side weight_version"),
    HookPoint("sglang.srt.plugins.hook_registry.HookType", "plugin hook kinds"),
    HookPoint("sglang.srt.managers.scheduler.Scheduler.__init__", "building the runtime in the scheduler process"),
    HookPoint("sglang.srt.managers.scheduler.Scheduler.get_internal_state", "status payload from the scheduler"),
    HookPoint("sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run", "counting scheduler iterations"),
    HookPoint("sglang.srt.managers.scheduler.Scheduler.tp_worker", "reaching the model runner", cpu_only=False),
    HookPoint("sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func",
              "calls the sgl_kernel CPU stand-in on every extend", cpu_only=True),
    HookPoint("sglang.srt.lora.layers.torch", "LoRA pin_memory guard (patches/lora_pin_memory_guard.py)",
              cpu_only=True),
)

# Recording (integration/capture_hooks.py keeps its lists beside the code that uses them).
_known = {p.name for p in MANIFEST}
MANIFEST += tuple(HookPoint(name, "recording prefill activations")
                  for name in (*capture_hooks.SGLANG_NAMES, *capture_hooks.SGLANG_INSTANCE_ATTRIBUTES)
                  if name not in _known)

# The online loop (integration/training.py, integration/served_model.py).
_known = {p.name for p in MANIFEST}
MANIFEST += tuple(HookPoint(name, "online loop: training slot, version stamp, completion log")
                  for name in (*training.SGLANG_NAMES, *training.SGLANG_INSTANCE_ATTRIBUTES,
                               *served_model.SGLANG_NAMES)
                  if name not in _known)

# Stopping the server (integration/shutdown.py, Note [Ctrl-C]).
_known = {p.name for p in MANIFEST}
MANIFEST += tuple(HookPoint(name, "stopping the engine on SIGINT") for name in shutdown.SGLANG_NAMES
                  if name not in _known)

# Names that exist only on instances: set as ``self.x = ...`` in the class's module, or dataclass
# fields without a default (neither resolves as a class attribute).
_INSTANCE_ATTRIBUTES = {"sglang.srt.managers.scheduler.Scheduler.tp_worker",
                        *capture_hooks.SGLANG_INSTANCE_ATTRIBUTES, *training.SGLANG_INSTANCE_ATTRIBUTES}


def check_manifest(*, is_cpu: bool, extra: tuple[HookPoint, ...] = ()) -> list[str]:
    """Resolves every entry; raises ManifestError listing the missing ones. Returns the names checked."""
    import sglang  # noqa: PLC0415

    version = getattr(sglang, "__version__", "unknown")
    if version != PINNED_SGLANG_VERSION:
        raise ManifestError(
            f"sglang {version} is installed, alchemist-sgl is pinned to sglang=={PINNED_SGLANG_VERSION}; "
            f"run `make setup`")
    missing: list[str] = []
    checked: list[str] = []
    for point in MANIFEST + extra:
        if point.cpu_only and not is_cpu:
            continue
        checked.append(point.name)
        if not _resolves(point.name):
            missing.append(f"{point.name} ({point.used_for})")
    if is_cpu and _has_weight_repacking_cpu_kernel():
        raise ManifestError(
            "a weight-repacking CPU kernel is installed (sgl_kernel with AMX support): SGLang would "
            "keep packed copies of the weights, and the online loop's in-place publishes would not "
            "reach them; use the project's CPU stand-in (make setup) or set train.enabled=false")
    if missing:
        raise ManifestError(
            f"SGLang names missing in sglang=={version} (alchemist-sgl is pinned to "
            f"{PINNED_SGLANG_VERSION}): " + "; ".join(missing))
    return checked


def _resolves(name: str) -> bool:
    if name in _INSTANCE_ATTRIBUTES:
        owner, _, attr = name.rpartition(".")
        try:
            cls = pkgutil.resolve_name(owner)
        except (ImportError, AttributeError, ValueError):
            return False
        import dataclasses  # noqa: PLC0415
        import inspect  # noqa: PLC0415

        if dataclasses.is_dataclass(cls) and attr in {f.name for f in dataclasses.fields(cls)}:
            return True
        if attr in getattr(cls, "__annotations__", {}) or attr in getattr(cls, "__struct_fields__", ()):
            return True
        source = inspect.getsource(importlib.import_module(cls.__module__))
        # `self.x = ...`, `self.x: T = ...`, or a line of a tuple unpacking `(self.x,\n ...) = ...`
        return re.search(rf"self\.{re.escape(attr)}\s*(=[^=]|:|,\s*\n)", source) is not None
    try:
        pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError):
        return False
    return True


def _has_weight_repacking_cpu_kernel() -> bool:
    """SGLang repacks CPU weights only when ``cpu_has_amx_support()`` (a real sgl_kernel op)."""
    from sglang.srt.utils.common import cpu_has_amx_support  # noqa: PLC0415

    return bool(cpu_has_amx_support())
