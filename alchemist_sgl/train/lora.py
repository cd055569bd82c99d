"""The trained LoRA adapter: separate A/B per target in PEFT's layout, over SGLang's fused base.

Owns ``LoraAdapter`` (an ``nn.Module`` whose parameters are the only trained tensors),
``FrozenLora`` (a detached fp32 snapshot of one: the published adapter, forward.py Note
[Published adapter]). The merge into the served weights is online/publish.py's ``merged_tensor``.

Note [PEFT layout over a fused base]: SGLang fuses q|k|v and gate|up, PEFT keeps one LoRA pair per
HF module. We keep PEFT's pairs (names ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``,
A [r, d_in], B [d_out, r]) so an adapter saved from here loads in PEFT and in SGLang's LoRA manager,
and compute the pairs that share a fused input together: one ``x @ cat(A_q, A_k, A_v).T`` matmul,
then one small ``@ B_t.T`` per target, each added to its column block of the fused output (the
forward splits q/k/v and gate/up anyway, so this adds no copies). ``scale = alpha / rank``
(PEFT's default, no rsLoRA) is applied to the rank-r activation, not the wide output.
Imports only torch.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from alchemist_sgl.train.spec import ALL_TARGETS, TARGET_TO_PROJECTION, LlamaSpec

_PEFT_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}


def peft_name(layer: int, target: str, which: str) -> str:
    """PEFT state-dict name (as saved in ``adapter_model.safetensors``); ``which``: "A" or "B"."""
    return f"base_model.model.model.layers.{layer}.{_PEFT_MODULE[target]}.lora_{which}.weight"


class LoraAdapter(nn.Module):
    """LoRA pairs for every (layer, target). Parameters live in ``self.a[key]`` / ``self.b[key]``
    with ``key = f"{layer}_{target}"``; A [r, d_in], B [d_out, r], in ``dtype`` on ``device``.

    Initialisation follows PEFT: A kaiming-uniform (a = sqrt(5)), B zeros, so a fresh adapter is
    the identity (see Note [Staleness] in samples.py for why that matters to replay).
    """

    def __init__(self, spec: LlamaSpec, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                 targets: Iterable[str] = ALL_TARGETS, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0) -> None:
        super().__init__()
        targets = tuple(targets)
        bad = [t for t in targets if t not in ALL_TARGETS]
        if bad or rank < 1:
            raise ValueError(f"bad LoRA targets {bad} or rank {rank}")
        self.spec, self.rank, self.alpha, self.dropout = spec, rank, float(alpha), float(dropout)
        self.targets = tuple(t for t in ALL_TARGETS if t in targets)  # canonical order
        self.scale = self.alpha / rank
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for layer in range(spec.layers):
            for t in self.targets:
                d_in, d_out = spec.target_dims(t)
                bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
                a = (torch.rand(rank, d_in, generator=gen) * 2 - 1) * bound
                self.a[f"{layer}_{t}"] = nn.Parameter(a.to(device=device, dtype=dtype))
                self.b[f"{layer}_{t}"] = nn.Parameter(torch.zeros(d_out, rank, device=device, dtype=dtype))

    def pairs(self, layer: int, projection: str) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """The (target, A, B) pairs that live in one fused projection, in column order."""
        return [(t, self.a[f"{layer}_{t}"], self.b[f"{layer}_{t}"])
                for t in self.targets if TARGET_TO_PROJECTION[t] == projection]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached tensors under PEFT's saved names (no adapter name in the key)."""
        out: dict[str, torch.Tensor] = {}
        for layer in range(self.spec.layers):
            for t in self.targets:
                out[peft_name(layer, t, "A")] = self.a[f"{layer}_{t}"].detach()
                out[peft_name(layer, t, "B")] = self.b[f"{layer}_{t}"].detach()
        return out

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies PEFT-named tensors in (``.default`` adapter segments in names are accepted)."""
        state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
        for layer in range(self.spec.layers):
            for t in self.targets:
                self.a[f"{layer}_{t}"].copy_(state[peft_name(layer, t, "A")])
                self.b[f"{layer}_{t}"].copy_(state[peft_name(layer, t, "B")])

    def peft_config_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` fields PEFT and SGLang need."""
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "bias": "none", "task_type": "CAUSAL_LM",
                "target_modules": [_PEFT_MODULE[t].split(".")[1] for t in self.targets]}

    def snapshot(self) -> "FrozenLora":
        """A detached fp32 copy of every A/B (bitwise the adapter's values when it is fp32)."""
        return FrozenLora(self.spec, self.rank, self.alpha, self.targets,
                          {k: v.detach().float().clone() for k, v in self.a.items()},
                          {k: v.detach().float().clone() for k, v in self.b.items()})

    @torch.no_grad()
    def reset(self, seed: int = 0) -> None:
        """A fresh adapter (PEFT init) in place; parameters keep their identity."""
        fresh = LoraAdapter(self.spec, self.rank, self.alpha, self.dropout, self.targets,
                            seed=seed)
        for k in self.a:
            self.a[k].copy_(fresh.a[k])
            self.b[k].zero_()


class FrozenLora:
    """An immutable LoRA adapter: fp32 tensors without grad, ``a[key]`` [r, d_in], ``b[key]``
    [d_out, r] with ``key = f"{layer}_{target}"``. Same ``pairs`` / ``scale`` / ``rank`` /
    ``targets`` / ``peft_state_dict`` API as ``LoraAdapter``, so the forward and the merge read
    either. The trainer keeps the published adapter as one (forward.py, Note [Published adapter]).
    Never mutate its tensors: make a new snapshot instead.
    """

    def __init__(self, spec: LlamaSpec, rank: int, alpha: float, targets: Iterable[str],
                 a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
        targets = tuple(targets)
        self.spec, self.rank, self.alpha = spec, int(rank), float(alpha)
        self.targets = tuple(t for t in ALL_TARGETS if t in targets)
        self.scale = self.alpha / self.rank
        want = {f"{layer}_{t}" for layer in range(spec.layers) for t in self.targets}
        if set(a) != want or set(b) != want:
            raise ValueError(f"a frozen adapter needs A and B for exactly {len(want)} (layer, target) keys")
        for key in want:
            t = key.split("_", 1)[1]
            d_in, d_out = spec.target_dims(t)
            if tuple(a[key].shape) != (self.rank, d_in) or tuple(b[key].shape) != (d_out, self.rank):
                raise ValueError(f"LoRA pair {key}: A {tuple(a[key].shape)}, B {tuple(b[key].shape)}; "
                                 f"expected ({self.rank}, {d_in}) and ({d_out}, {self.rank})")
        self.a = {k: v.detach().float() for k, v in a.items()}
        self.b = {k: v.detach().float() for k, v in b.items()}

    @classmethod
    def from_peft_state_dict(cls, spec: LlamaSpec, rank: int, alpha: float,
                             targets: Iterable[str], state: dict[str, torch.Tensor]) -> "FrozenLora":
        """From PEFT-named tensors (``.default`` segments accepted); raises KeyError naming a
        missing tensor and ValueError on a wrong shape. Tensors are copied to fp32."""
        state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
        targets = tuple(targets)
        a: dict[str, torch.Tensor] = {}
        b: dict[str, torch.Tensor] = {}
        for layer in range(spec.layers):
            for t in targets:
                for which, out in (("A", a), ("B", b)):
                    name = peft_name(layer, t, which)
                    if name not in state:
                        raise KeyError(f"PEFT tensor '{name}' is missing")
                    out[f"{layer}_{t}"] = state[name].detach().float().clone()
        return cls(spec, rank, alpha, targets, a, b)

    def pairs(self, layer: int, projection: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The (target, A, B) pairs that live in one fused projection, in column order."""
        return [(t, self.a[f"{layer}_{t}"], self.b[f"{layer}_{t}"])
                for t in self.targets if TARGET_TO_PROJECTION[t] == projection]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's saved names (references: do not mutate)."""
        return {peft_name(layer, t, w): (self.a if w == "A" else self.b)[f"{layer}_{t}"]
                for layer in range(self.spec.layers) for t in self.targets for w in ("A", "B")}

    def state(self) -> dict[str, Any]:
        """A checkpointable dict (rank, alpha, targets, PEFT-named tensors); ``from_state`` inverts."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "tensors": self.peft_state_dict()}

    @classmethod
    def from_state(cls, spec: LlamaSpec, state: dict[str, Any]) -> "FrozenLora":
        return cls.from_peft_state_dict(spec, state["rank"], state["alpha"], state["targets"],
                                        state["tensors"])

    def to(self, device: str | torch.device) -> "FrozenLora":
        """The same snapshot on ``device`` (fp32 kept)."""
        return FrozenLora(self.spec, self.rank, self.alpha, self.targets,
                          {k: v.to(device) for k, v in self.a.items()},
                          {k: v.to(device) for k, v in self.b.items()})

    def equals(self, adapter: "LoraAdapter | FrozenLora") -> bool:
        """Bitwise equality of every A/B with ``adapter``'s (compared in fp32); a host sync."""
        if (adapter.targets, adapter.rank, float(adapter.alpha)) != (self.targets, self.rank, self.alpha):
            return False
        return all(torch.equal(self.a[k], adapter.a[k].detach().float().to(self.a[k].device))
                   and torch.equal(self.b[k], adapter.b[k].detach().float().to(self.b[k].device))
                   for k in self.a)


