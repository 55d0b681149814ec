"""Training variants: named, parameterised changes to how a suite is trained.

A variant is a config entry ``name: {kind: <kind>, ...parameters}``; a *kind* is one small
function registered in :data:`KINDS` that turns the parameters into a :class:`Variant` (an
initialisation hook and/or an extra loss term). Built-in kinds:

- ``baseline``: no change;
- ``rank_regulariser``: adds ``lambda * mean_m(-H(p_m))`` to the loss, ``H(p) = -sum p log p``
  the entropy of the normalised singular values ``p = s / sum(s)`` of each targeted write
  matrix ``m`` (differentiable through :func:`torch.linalg.svdvals`). ``lambda > 0`` rewards
  entropy, i.e. raises the effective rank ``exp(H)``; ``lambda < 0`` is the negative control
  (the same term, sign flipped), which lowers it. The mean over matrices keeps ``lambda``
  comparable across depths;
- ``orthogonal_init``: initialises the targeted write matrices as scaled semi-orthogonal
  matrices (every singular value equal: proportional effective rank 1 at step 0) with the
  Frobenius norm the default N(0, 0.02^2) initialisation has in expectation. It raises rank
  without adding any gradient signal, which separates "rank" from "an extra loss term".

``targets``: ``attention`` (``attention.dense``), ``mlp`` (``mlp.dense_4h_to_h``) or ``both``:
the write matrices of :func:`lmdynamics.extraction.passes.write_modules`, whose PER the paper
relates
to convergence.

Adding a kind: write ``def my_kind(params) -> Variant``, decorate it with
``@register("my_kind", allowed={"param": type})`` and name it in a config entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lmdynamics.extraction.passes import write_modules

__all__ = ["KINDS", "TARGETS", "Variant", "build_variant", "entropy_penalty",
           "normalised_entropy", "orthogonal_write_init", "register", "target_matrices"]

#: Which write matrices a variant acts on.
TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",), "mlp": ("mlp",), "both": ("attention", "mlp")}


@dataclass(frozen=True)
class Variant:
    """One training variant.

    ``init(model)`` runs once after the model is built (before step 0 is recorded);
    ``loss(model)`` returns a scalar tensor added to the language-modelling loss at every
    update (it is not part of the recorded training loss). Either may be None.
    """

    name: str
    kind: str
    params: Mapping[str, Any]
    init: Callable[[torch.nn.Module], None] | None = None
    loss: Callable[[torch.nn.Module], torch.Tensor] | None = None


#: kind -> (builder, allowed parameters and their types).
KINDS: dict[str, tuple[Callable[[str, Mapping[str, Any]], Variant], dict[str, type]]] = {}


def register(kind: str, allowed: Mapping[str, type | tuple[type, ...]]):
    """Register ``builder(name, params) -> Variant`` as variant kind ``kind``."""
    def wrap(func):
        KINDS[kind] = (func, dict(allowed))
        return func
    return wrap


def build_variant(name: str, spec: Mapping[str, Any]) -> Variant:
    """The :class:`Variant` of config entry ``name: spec`` (``spec`` holds ``kind``).

    Raises ValueError naming the variant and key for an unknown kind, an unknown or missing
    parameter or a value of the wrong type.
    """
    where = f"interventions.variants.{name}"
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"{where}: must be a mapping with a 'kind' key; allowed kinds: "
                         f"{', '.join(KINDS)}")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    builder, allowed = KINDS[kind]
    params = {k: v for k, v in spec.items() if k != "kind"}
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(f"{where}.{key}: not a parameter of kind {kind!r}; allowed: "
                             f"{', '.join(allowed) or 'none'}")
        if isinstance(value, bool) or not isinstance(value, allowed[key]):
            raise ValueError(f"{where}.{key}: {value!r} has the wrong type for kind {kind!r}")
    missing = set(allowed) - set(params)
    if missing:
        raise ValueError(f"{where}: kind {kind!r} needs {', '.join(sorted(missing))}")
    return builder(name, params)


def target_matrices(model: torch.nn.Module, targets: str) -> list[torch.Tensor]:
    """The weight tensors of the write matrices named by ``targets`` (:data:`TARGETS`)."""
    if targets not in TARGETS:
        raise ValueError(f"targets={targets!r}: allowed {', '.join(TARGETS)}")
    modules = write_modules(model)
    return [m.weight for comp in TARGETS[targets] for m in modules[comp]]


def normalised_entropy(matrix: torch.Tensor) -> torch.Tensor:
    """Entropy ``H(p)`` (nats) of ``p = s / sum(s)``, ``s`` the singular values of ``matrix``.

    ``matrix``: (m, n) or a stack (..., m, n); returns shape (...).

    ``exp(H)`` is the effective rank (Roy & Vetterli 2007) that
    :func:`lmdynamics.estimators.rank.effective_rank` computes in float64 for the analysis; here it
    is
    differentiable (:func:`torch.linalg.svdvals`), in the matrix's dtype, with ``0 log 0 = 0``
    (zero singular values contribute nothing to the value and a finite gradient).
    """
    s = torch.linalg.svdvals(matrix)
    p = s / s.sum(dim=-1, keepdim=True)
    # p log max(p, tiny): the same value (0 log 0 = 0) with a finite gradient at p = 0,
    # where d(p log p)/dp = log p + 1 diverges (xlogy's gradient is NaN there)
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=-1)


def entropy_penalty(matrices: list[torch.Tensor], strength: float) -> torch.Tensor:
    """``strength * mean(-H(p_m))`` over ``matrices``: minimising it raises effective rank
    for ``strength > 0`` and lowers it for ``strength < 0``. Matrices of one shape go
    through one batched :func:`torch.linalg.svdvals` call (one per shape on a GPU)."""
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for w in matrices:
        by_shape.setdefault(tuple(w.shape), []).append(w)
    entropies = torch.cat([normalised_entropy(torch.stack(ws)) for ws in by_shape.values()])
    return -strength * entropies.mean()


def _targets(name: str, params: Mapping[str, Any]) -> str:
    targets = params["targets"]
    if targets not in TARGETS:
        raise ValueError(f"interventions.variants.{name}.targets: {targets!r}; allowed "
                         f"{', '.join(TARGETS)}")
    return targets


@register("baseline", allowed={})
def baseline(name: str, params: Mapping[str, Any]) -> Variant:
    """Training unchanged."""
    return Variant(name, "baseline", dict(params))


@register("rank_regulariser", allowed={"strength": (int, float), "targets": str})
def rank_regulariser(name: str, params: Mapping[str, Any]) -> Variant:
    """Effective-rank regulariser (``strength`` > 0) or its negative control (< 0)."""
    strength, targets = float(params["strength"]), _targets(name, params)
    if not math.isfinite(strength) or strength == 0.0:
        raise ValueError(f"interventions.variants.{name}.strength: {strength!r}; must be a "
                         "finite non-zero number (use kind baseline for no regulariser)")
    return Variant(name, "rank_regulariser", dict(params),
                   loss=lambda model: entropy_penalty(target_matrices(model, targets),
                                                      strength))


def orthogonal_write_init(model: torch.nn.Module, targets: str, std: float) -> None:
    """Re-initialise the ``targets`` write matrices (m, n) as semi-orthogonal matrices times
    ``std * sqrt(max(m, n))``: all singular values equal, Frobenius norm ``std * sqrt(m n)``,
    the expectation's square root under N(0, std^2) entries. Uses the global torch RNG
    (seeded by the caller), so a seed gives the same matrices."""
    with torch.no_grad():
        for w in target_matrices(model, targets):
            torch.nn.init.orthogonal_(w, gain=std * math.sqrt(max(w.shape)))


@register("orthogonal_init", allowed={"targets": str})
def orthogonal_init(name: str, params: Mapping[str, Any]) -> Variant:
    """Semi-orthogonal (maximal effective rank) initialisation of the write matrices."""
    targets = _targets(name, params)
    return Variant(name, "orthogonal_init", dict(params),
                   init=lambda model: orthogonal_write_init(
                       model, targets, model.config.initializer_range))
