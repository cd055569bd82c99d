"""Process environment for a run: CPU stand-ins, SGLang switches, and the config hand-off.

Owns the environment variables that must be set BEFORE sglang is imported, in the launching
process and (by inheritance) in SGLang's spawned scheduler and detokenizer processes. Imports no
sglang itself, so it can run first.

Note [config hand-off]: the resolved config travels to the scheduler process as JSON in
``ALCHEMIST_SGL_CONFIG``. The plugin entry point loads in every SGLang process of the environment;
without that variable it does nothing, so a plain ``sglang serve`` in the same venv is unaffected.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from alchemist_sgl.config import Config, config_to_json
from alchemist_sgl.errors import ConfigError, ManifestError

CONFIG_ENV = "ALCHEMIST_SGL_CONFIG"
MODEL_PATH_ENV = "ALCHEMIST_SGL_MODEL_PATH"
CONTROL_DB_ENV = "ALCHEMIST_SGL_CONTROL_DB"
CPU_STAND_INS = Path(__file__).resolve().parents[2] / "patches" / "cpu"


def device_of(config: Config) -> str:
    """The device SGLang will run on: ``sglang.device`` or, when absent, cuda if available else cpu."""
    device = config.sglang.get("device")
    if device:
        return str(device)
    try:
        import torch  # noqa: PLC0415

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def is_cpu_run(config: Config) -> bool:
    return device_of(config) == "cpu"


def activate_cpu_stand_ins() -> None:
    """Puts patches/cpu first on sys.path and PYTHONPATH (inherited by spawned processes)."""
    if not (CPU_STAND_INS / "sgl_kernel" / "__init__.py").is_file():
        raise ManifestError(f"CPU stand-ins not found at {CPU_STAND_INS}; run from a checkout of the repository")
    path = str(CPU_STAND_INS)
    if path not in sys.path:
        sys.path.insert(0, path)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if path not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([path, *parts])


def prepare_environment(config: Config, model_path: Path) -> None:
    """Sets every variable the run needs; call before importing sglang."""
    if is_cpu_run(config):
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
        # Spin-waiting OpenMP threads collapse when another process shares the cores.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        activate_cpu_stand_ins()
    os.environ[CONFIG_ENV] = config_to_json(config)
    os.environ[MODEL_PATH_ENV] = str(model_path)
    # The completion log keeps serving-time output log-probs as the reference of the negative
    # objective; untempered (of the model, not of the temperature-scaled sampling distribution).
    os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    # One control table per server process tree (alchemist_sgl/control.py).
    run_dir = Path(tempfile.mkdtemp(prefix="alchemist-run-"))
    os.environ[CONTROL_DB_ENV] = str(run_dir / "control.sqlite")


def check_environment_switches(config: Config) -> None:
    """The switches the design relies on; raises ManifestError naming the one that is wrong."""
    value = os.environ.get("SGLANG_ENABLE_TORCH_INFERENCE_MODE", "").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        raise ManifestError(
            "SGLANG_ENABLE_TORCH_INFERENCE_MODE is on: recorded activations would be inference "
            "tensors that autograd cannot use; unset it")
    if is_cpu_run(config) and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        raise ManifestError("SGLANG_USE_CPU_ENGINE must be 1 for a CPU run (without it is_cpu() is false)")
    check_training_flags(config)
    check_recording_flags(config)


def check_training_flags(config: Config) -> None:
    """Training runs in the scheduler between iterations: it needs SGLang's normal (non-overlap)
    loop, where the point after ``process_batch_result`` is quiescent. Raises ConfigError naming
    the flag."""
    if not config.train.is_enabled:
        return
    sg = {str(k).replace("_", "-"): v for k, v in config.sglang.items()}
    if sg.get("disable-overlap-schedule") is not True:
        raise ConfigError("sglang.disable-overlap-schedule",
                          "must be true while train.enabled is true: the overlap scheduler runs "
                          "batch N+1 while N is processed, so no point between batches is quiescent "
                          "for training (or set train.enabled=false)")
    if sg.get("enable-lora"):
        raise ConfigError("sglang.enable-lora", "serving SGLang LoRA adapters while training in "
                          "merge mode is not supported (set train.enabled=false)")


def check_recording_flags(config: Config) -> None:
    """Note [Eager prefill for recording]: recording reads projection outputs with Python forward
    hooks, which a CUDA graph replay never runs. SGLang 0.5.23 replays decode in graphs (never
    recorded: harmless) and, on CUDA, prefill too: ``cuda_graph_config.prefill.backend`` defaults
    to "breakable" when ``is_cuda()``. So while ``record.enabled`` is true off the CPU, prefill
    graphs must be off: raises ConfigError naming the key to set. The runtime checks behind it are
    in integration/capture_hooks.py, Note [Prefill must run eagerly]."""
    if not config.record.is_enabled or is_cpu_run(config):
        return
    backend = prefill_graph_backend(config.sglang)
    if backend != "disabled":
        raise ConfigError("sglang.cuda-graph-backend-prefill",
                          f"must be 'disabled' while record.enabled is true on {device_of(config)} "
                          f"(the prefill CUDA graph backend resolves to {backend!r}): forward hooks "
                          "do not run in a CUDA graph replay, so prefill would record nothing "
                          "(or set record.enabled=false)")


def prefill_graph_backend(sglang: Mapping[str, Any]) -> str:
    """The prefill CUDA graph backend SGLang 0.5.23 resolves from these ``sglang.*`` keys, for a
    CUDA device and a Llama model: ``--disable-cuda-graph`` < ``--disable-prefill-cuda-graph`` <
    ``--cuda-graph-backend-prefill`` < the ``--cuda-graph-config`` JSON (later wins), default
    "breakable" (sglang/srt/arg_groups/cuda_graph_hook.py)."""
    sg = {str(k).replace("_", "-"): v for k, v in sglang.items()}
    backend = "breakable"
    if _is_true(sg.get("disable-cuda-graph")) or _is_true(sg.get("disable-prefill-cuda-graph")):
        backend = "disabled"
    if sg.get("cuda-graph-backend-prefill") is not None:
        backend = str(sg["cuda-graph-backend-prefill"])
    raw = sg.get("cuda-graph-config")
    if raw is not None:
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise ConfigError("sglang.cuda-graph-config", f"is not JSON: {exc}") from exc
        prefill = parsed.get("prefill") if isinstance(parsed, dict) else None
        if isinstance(prefill, dict) and prefill.get("backend") is not None:
            backend = str(prefill["backend"])
    return backend


def _is_true(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"})
