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
trainer computes them itself with the adapter disabled: the served weights W_pub as they are (the
last published version; forward.py, Note [Published adapter]), an extra no-grad forward. Neither
is the initial model; that would need a retained copy of the original weights.

Note [Chunked loss]: the work units (units.py) run the LM head over chunks of response rows.
SFT and unlikelihood are means of per-token terms, so the sample loss is the sum over chunks of
``token_loss_sum(chunk) / R``. KTO is a function of the summed ratio r over all tokens; its
gradient w.r.t. every log-prob is the same number dL/dr (``kto_loss_and_coefficient``), so once r
is known (a no-grad pass over the chunks) the chunk loss ``dL/dr * sum(logp_chunk)`` has exactly
KTO's gradients; the loss value is reported from r.
"""

from __future__ import annotations

import torch

KTO_BETA = 0.1


def sft_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the response tokens. logprobs [R] fp32."""
    return -logprobs.mean()


def unlikelihood_terms(logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token -log(1 - p) of response tokens (p clamped below 1 for a finite loss); the one
    formula of ``unlikelihood_loss`` and ``token_loss_sum``. logprobs [R] fp32 -> [R]."""
    return -torch.log1p(-logprobs.exp().clamp(max=1.0 - 1e-6))


def unlikelihood_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """Mean -log(1 - p) over response tokens."""
    return unlikelihood_terms(logprobs).mean()


def kto_negative_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_estimate: float,
                      beta: float = KTO_BETA) -> torch.Tensor:
    """KTO's undesirable-example loss: 1 - sigmoid(beta * (z_ref - r)), r the summed log ratio."""
    ratio = (logprobs - ref_logprobs.to(logprobs)).sum()
    return kto_loss_and_coefficient(ratio, kl_estimate, beta)[0]


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


def token_loss_sum(kind: str, objective_negative: str, logprobs: torch.Tensor) -> torch.Tensor:
    """Sum over the given response tokens of the per-token loss of SFT or unlikelihood (Note
    [Chunked loss]); divide by R for the sample loss. Raises ValueError for KTO (not per-token)."""
    if kind == "positive":
        return -logprobs.sum()
    if kind == "negative" and objective_negative == "unlikelihood":
        return unlikelihood_terms(logprobs).sum()
    raise ValueError(f"no per-token loss for kind {kind!r} with objective {objective_negative!r}")


def kto_loss_and_coefficient(ratio: torch.Tensor, kl_estimate: float,
                             beta: float = KTO_BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """(KTO loss, dL/dr) for a summed log ratio ``ratio`` (0-d; the loss carries the ratio's grad
    when it has one); the one KTO formula of ``kto_negative_loss`` and the work units."""
    sig = torch.sigmoid(beta * (max(kl_estimate, 0.0) - ratio))
    return 1.0 - sig, beta * sig * (1.0 - sig)
