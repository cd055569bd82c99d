"""Training objectives on per-token response log-probs: SFT, unlikelihood, KTO (negatives only).

Owns the per-sample losses the trainer averages (weighted by ``Sample.weight``). Imports only torch.

* Positive samples (thumbs-up, and corrections, whose response IS the correction): SFT, the mean
  negative log-likelihood of the response tokens.
* Unpaired negatives (thumbs-down), chosen by ``train.objective_negative``:
  - ``unlikelihood`` (Welleck et al. 2019, token level): mean of -log(1 - p(y_t)). Needs no
    reference: it pushes down the probability of the disliked tokens and saturates as p -> 0, so
    it cannot run away like maximising NLL would.
  - ``kto`` (Ethayarajh et al. 2024, undesirable branch): 1 - sigmoid(beta * (z_ref - r)) with
    r = sum_t [log pi(y_t) - log pi_ref(y_t)] and z_ref a detached estimate of KL(pi || pi_ref),
    clamped at 0 (the trainer keeps an EMA of the batch mean of r over earlier steps).

Note [Reference log-probs]: KTO's pi_ref is, in order of preference, (1) ``Sample.ref_logprobs``,
which the runtime fills from the completion log: the log-probs SGLang returned at serving time
(``return_logprob`` with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, otherwise they are of the
temperature-scaled distribution and must not be used); they belong to the version that served the
completion, a MOVING reference that trails the trainer by the publish lag; or (2) when absent, the
trainer computes them itself with the adapter disabled: the current BASE (every merged publish
included, the unmerged adapter excluded), an extra no-grad forward. Neither is the initial model;
that would need a retained copy of the original weights.
"""

from __future__ import annotations

import torch

KTO_BETA = 0.1


def sft_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the response tokens. logprobs [R] fp32."""
    return -logprobs.mean()


def unlikelihood_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Mean -log(1 - p) over response tokens (p clamped below 1 for a finite loss)."""
    p = logprobs.exp().clamp(max=1.0 - 1e-6)
    return -torch.log1p(-p).mean()


def kto_negative_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_estimate: float,
                      beta: float = KTO_BETA) -> torch.Tensor:
    """KTO's undesirable-example loss: 1 - sigmoid(beta * (z_ref - r)), r the summed log ratio."""
    ratio = (logprobs - ref_logprobs.to(logprobs)).sum()
    return 1.0 - torch.sigmoid(beta * (max(kl_estimate, 0.0) - ratio))


def sample_loss(kind: str, objective_negative: str, logprobs: torch.Tensor,
                ref_logprobs: torch.Tensor | None = None, kl_estimate: float = 0.0) -> torch.Tensor:
    """The loss of one sample by kind. Raises ValueError on an unknown kind/objective, or KTO
    without reference log-probs."""
    if kind == "positive":
        return sft_loss(logprobs)
    if kind != "negative":
        raise ValueError(f"unknown sample kind {kind!r}")
    if objective_negative == "unlikelihood":
        return unlikelihood_loss(logprobs)
    if objective_negative == "kto":
        if ref_logprobs is None:
            raise ValueError("the kto objective needs reference log-probs")
        return kto_negative_loss(logprobs, ref_logprobs, kl_estimate)
    raise ValueError(f"unknown train.objective_negative {objective_negative!r}")
