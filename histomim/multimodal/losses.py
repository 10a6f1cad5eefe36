"""Survival losses: Cox partial likelihood (Breslow and Efron ties) and the discrete-time censored NLL.

Conventions shared by every survival module in histomim:

- ``risk`` is "higher = worse" (a log hazard ratio for Cox models);
- ``event`` is ``True`` when the event (death, progression) was observed and ``False`` when the
  patient was censored. Tables that store a *censorship* flag instead (PORPOISE/SurvPath:
  ``censorship = 1`` means censored) are converted in :mod:`histomim.survival.labels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TIES = ("breslow", "efron")


def _check_1d(name: str, value: Tensor, size: int) -> None:
    if value.ndim != 1 or value.shape[0] != size:
        raise ValueError(f"`{name}` must have shape ({size},), got {tuple(value.shape)}")


def cox_partial_likelihood_loss(risk: Tensor, time: Tensor, event: Tensor, ties: str = "efron") -> Tensor:
    """Negative Cox log partial likelihood, averaged over the observed events.

    The risk set of an event at time ``t`` is every sample with ``time >= t``; all risk sums are
    computed in log space so that large risk scores do not overflow.

    Args:
        risk: ``(B,)`` log hazard ratios, higher = worse.
        time: ``(B,)`` follow-up times.
        event: ``(B,)`` ``True`` where the event was observed.
        ties: ``"breslow"`` or ``"efron"`` handling of tied event times.

    Returns:
        A scalar. When the batch has no events the partial likelihood is undefined; the loss is then
        ``0`` (still attached to the graph so that ``backward`` works).
    """
    if ties not in TIES:
        raise ValueError(f"`ties` must be one of {TIES}, got {ties!r}")
    if risk.ndim == 2 and risk.shape[1] == 1:
        risk = risk.squeeze(1)
    _check_1d("risk", risk, risk.shape[0])
    _check_1d("time", time, risk.shape[0])
    _check_1d("event", event, risk.shape[0])
    event = event.bool()
    num_events = int(event.sum())
    if num_events == 0:
        return risk.sum() * 0.0

    # 1. sort by time: the risk set of the sample at position i is then positions i, i+1, ...
    order = torch.argsort(time, stable=True)
    risk, time, event = risk[order], time[order], event[order]  # (B,)

    # 2. group tied times; `first` is the position where each group (and so its risk set) starts
    _, group, group_size = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    first = torch.cumsum(group_size, 0) - group_size  # (T,)

    # 3. log sum_{k in R_j} exp(risk_k) for every distinct time j: reverse log-cumsum-exp
    log_risk_set = torch.logcumsumexp(risk.flip(0), 0).flip(0)[first]  # (T,)

    event_risk = risk[event]  # (E,)
    event_group = group[event]  # (E,) non-decreasing because samples are sorted by time
    log_denominator = log_risk_set[event_group]  # (E,) Breslow: the full risk set for every tied event

    if ties == "efron":
        # Efron removes the l-th fraction (l = 0..d-1) of the tied events' hazard from the risk set:
        # log(S - (l/d) * E) = log S + log1p(-(l/d) * E / S), with E the tied events' summed hazard.
        num_groups = group_size.shape[0]
        max_tied = torch.full((num_groups,), float("-inf"), dtype=risk.dtype, device=risk.device)
        max_tied = max_tied.scatter_reduce(0, event_group, event_risk.detach(), reduce="amax")  # (T,)
        shift = max_tied[event_group]  # (E,)
        tied_sum = torch.zeros(num_groups, dtype=risk.dtype, device=risk.device)
        tied_sum = tied_sum.scatter_add(0, event_group, torch.exp(event_risk - shift))  # (T,)
        log_tied = torch.log(tied_sum[event_group]) + shift  # (E,)

        num_tied = torch.bincount(event_group, minlength=num_groups)  # (T,)
        first_tied = torch.cumsum(num_tied, 0) - num_tied  # (T,)
        rank = torch.arange(num_events, device=risk.device) - first_tied[event_group]  # (E,) l = 0..d-1
        fraction = rank.to(risk.dtype) / num_tied[event_group].to(risk.dtype)  # (E,)
        log_denominator = log_denominator + torch.log1p(-fraction * torch.exp(log_tied - log_denominator))

    return -(event_risk - log_denominator).sum() / num_events


def discrete_time_nll_loss(logits: Tensor, bin_index: Tensor, event: Tensor, alpha: float = 0.0) -> Tensor:
    """Censored negative log-likelihood of a discrete-time hazard model (PORPOISE/SurvPath ``NLLSurvLoss``).

    With hazards ``h_k = sigmoid(logits_k)`` and survival ``S_k = prod_{j<=k} (1 - h_j)`` (``S_{-1} = 1``),
    a patient whose time falls in bin ``y``

    - with an observed event contributes ``-log S_{y-1} - log h_y`` (survived bins before ``y``, died in ``y``);
    - censored contributes ``-log S_y`` (known to have survived through bin ``y``).

    The loss is ``(1 - alpha) * (censored + uncensored) + alpha * uncensored`` averaged over the batch, so
    ``alpha > 0`` up-weights the uncensored term as in PORPOISE. Everything is computed with
    ``logsigmoid`` so that saturated logits stay finite.

    Args:
        logits: ``(B, K)`` hazard logits.
        bin_index: ``(B,)`` integer bin of each patient's time, in ``[0, K)``.
        event: ``(B,)`` ``True`` where the event was observed.
        alpha: weight of the extra uncensored term, in ``[0, 1]``.
    """
    if logits.ndim != 2:
        raise ValueError(f"`logits` must have shape (B, K), got {tuple(logits.shape)}")
    batch, num_bins = logits.shape
    _check_1d("bin_index", bin_index, batch)
    _check_1d("event", event, batch)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
    bin_index = bin_index.long()
    if batch and (bin_index.min() < 0 or bin_index.max() >= num_bins):
        raise ValueError(
            f"`bin_index` must lie in [0, {num_bins}), got values in [{int(bin_index.min())}, {int(bin_index.max())}]"
        )
    event = event.to(logits.dtype)

    log_hazard = F.logsigmoid(logits)  # (B, K) log h_k
    log_survival = torch.cumsum(F.logsigmoid(-logits), dim=1)  # (B, K) log S_k
    log_survival = F.pad(log_survival, (1, 0))  # (B, K + 1) log S_{k-1}, with S_{-1} = 1

    y = bin_index.unsqueeze(1)  # (B, 1)
    uncensored = -event * (log_survival.gather(1, y) + log_hazard.gather(1, y)).squeeze(1)  # (B,)
    censored = -(1.0 - event) * log_survival.gather(1, y + 1).squeeze(1)  # (B,)
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored  # (B,)
    return loss.mean()
