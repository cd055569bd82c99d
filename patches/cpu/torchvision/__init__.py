"""Import-only stand-in for `torchvision`, for sglang==0.5.23 with the CPU torch only.

Answers: sglang/srt/multimodal/ (imported for every model, e.g. `import torchvision.transforms`
via the multimodal processor utils), and `timm`, which imports torchvision at module load.
Why: PyPI's torchvision wheels link the CUDA torch; beside the CPU torch 2.13.0 wheel they fail
to import ('operator torchvision::nms does not exist'). Text models never call torchvision.
Retire when: a CPU torchvision build matching the CPU torch is on PyPI, or sglang stops importing
it for text-only models.

Any attribute used at run time raises `NotImplementedError` naming itself.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.0.0+alchemist-cpu-stand-in"
IS_ALCHEMIST_STAND_IN = True


class _Unimplemented:
    """Stands for any torchvision object; calling it, or using it as a base, fails loudly."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"{self._name} is not available: torchvision is an import-only stand-in on CPU "
            f"(patches/cpu/torchvision); text models do not need it"
        )

    def __getattr__(self, attr: str) -> "_Unimplemented":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unimplemented(f"{self._name}.{attr}")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)

    def __repr__(self) -> str:
        return f"<unimplemented {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> object:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unimplemented(f"{self.__name__}.{attr}")


_SUBMODULES = ("transforms", "transforms.functional", "transforms.v2", "transforms.v2.functional",
               "transforms.InterpolationMode", "io", "ops", "models", "utils", "datasets", "_meta_registrations")

for _sub in _SUBMODULES:
    _full = f"{__name__}.{_sub}"
    if _full not in sys.modules:
        _mod = _StubModule(_full)
        _mod.__path__ = []  # a package, so deeper imports resolve through sys.modules
        sys.modules[_full] = _mod
        _parent_name, _, _leaf = _full.rpartition(".")
        setattr(sys.modules[_parent_name], _leaf, _mod)


def __getattr__(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unimplemented(f"torchvision.{name}")
