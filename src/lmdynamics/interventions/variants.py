"""Training variants: named, parameterised changes to how one targeted layer is trained.

A study targets one write matrix, ``target: {component, layer}`` (``attention`` is
``attention.dense``, ``mlp`` is ``mlp.dense_4h_to_h``; the matrices of
:func:`lmdynamics.extraction.passes.write_modules` whose PER the paper relates to
convergence); the other layers of the same run are its within-run control. A variant is a
config entry ``name: {kind: <kind>, ...parameters}``; a *kind* is one small function
registered in :data:`KINDS` that turns the parameters into a :class:`Variant`: an
initialisation hook, an extra loss term and/or an update rule. Built-in kinds:

- ``baseline``: no change;
- ``rank_regulariser`` ``{strength}``: adds ``strength * (-H(p))`` to the loss, ``H(p) = -sum
  p log p`` the entropy of the normalised singular values ``p = s / sum(s)`` of the targeted
  write matrix (differentiable through :func:`torch.linalg.svdvals`, in float64).
  ``strength > 0`` rewards entropy, i.e. raises the *weights'* effective rank ``exp(H)``;
  ``strength < 0`` (the same term, sign flipped) lowers it;
- ``update_spectrum`` ``{exponent}``: every optimizer update ``D = U S V^T`` of the targeted
  write matrix is replaced by ``U S^p V^T``, rescaled to the Frobenius norm of ``D`` (in
  float64): ``p < 1`` flattens the update's spectrum (raises the effective rank of what the
  layer learns per step; ``p = 0`` is the orthogonalised update), ``p > 1`` sharpens it. Same
  step length, different rank: the intervention on *update* rank;
- ``lr_scale`` ``{factor}``: the targeted layer's block (the attention or MLP module holding
  the write matrix, all its parameters) takes ``factor`` times every update, exactly a
  learning rate ``factor`` times the schedule's (AdamW's step is linear in the learning rate,
  its decoupled weight decay included): the positive control, a change known to alter how the
  layer converges;
- ``orthogonal_init``: initialises the targeted write matrix as a scaled semi-orthogonal
  matrix (every singular value equal: PER 1 at step 0) with the Frobenius norm the default
  N(0, 0.02^2) initialisation has in expectation: rank without any extra gradient signal.

Adding a kind: write ``def my_kind(name, params, target) -> Variant``, decorate it with
``@register("my_kind", allowed={"param": type})`` and name it in a config entry (its parameters
also go into workflow/schemas/interventions.schema.yaml).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lmdynamics.extraction.passes import COMPONENTS, write_modules

__all__ = ["KINDS", "STUDY_KEYS", "Target", "UpdateRule", "Variant", "build_variant",
           "entropy_penalty", "normalised_entropy", "orthogonal_write_init", "register",
           "spectrum_update", "target_block", "target_matrix"]

#: Keys of a variant entry that the study reads (not parameters of its kind).
STUDY_KEYS = ("kind", "seeds")


@dataclass(frozen=True)
class Target:
    """The targeted write matrix: ``component`` (``attention`` | ``mlp``) of ``layer``."""

    component: str
    layer: int

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"interventions.target.component: {self.component!r}; allowed "
                             f"{', '.join(COMPONENTS)}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"interventions.target.layer: {self.layer!r}; must be an "
                             "integer >= 0")


@dataclass(frozen=True)
class UpdateRule:
    """``apply(previous, proposed) -> new`` replaces the optimizer's proposal for each tensor
    of ``parameters(model)`` after every update (``previous``: its value before the update)."""

    parameters: Callable[[torch.nn.Module], list[torch.Tensor]]
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """One training variant.

    ``init(model)`` runs once after the model is built (before step 0 is recorded);
    ``loss(model)`` returns a scalar tensor added to the language-modelling loss at every
    update (it is not part of the recorded training loss); ``update`` rewrites every update
    of some parameters. Any of them may be None.
    """

    name: str
    kind: str
    params: Mapping[str, Any]
    target: Target
    init: Callable[[torch.nn.Module], None] | None = None
    loss: Callable[[torch.nn.Module], torch.Tensor] | None = None
    update: UpdateRule | None = None


#: kind -> (builder, allowed parameters and their types).
KINDS: dict[str, tuple[Callable[[str, Mapping[str, Any], Target], Variant],
                       dict[str, type | tuple[type, ...]]]] = {}


def register(kind: str, allowed: Mapping[str, type | tuple[type, ...]]):
    """Register ``builder(name, params, target) -> Variant`` as variant kind ``kind``."""
    def wrap(func):
        KINDS[kind] = (func, dict(allowed))
        return func
    return wrap


def build_variant(name: str, spec: Mapping[str, Any], target: Target) -> Variant:
    """The :class:`Variant` of config entry ``name: spec`` (``spec`` holds ``kind``; its
    :data:`STUDY_KEYS` are the study's), acting on ``target``.

    Raises ValueError naming the variant and key for an unknown kind, an unknown or missing
    parameter or a value of the wrong type or range.
    """
    where = f"interventions.variants.{name}"
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"{where}: must be a mapping with a 'kind' key; allowed kinds: "
                         f"{', '.join(KINDS)}")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    builder, allowed = KINDS[kind]
    params = {k: v for k, v in spec.items() if k not in STUDY_KEYS}
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(f"{where}.{key}: not a parameter of kind {kind!r}; allowed: "
                             f"{', '.join(allowed) or 'none'}")
        if isinstance(value, bool) or not isinstance(value, allowed[key]):
            raise ValueError(f"{where}.{key}: {value!r} has the wrong type for kind {kind!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}.{key}: {value!r}; must be finite")
    missing = set(allowed) - set(params)
    if missing:
        raise ValueError(f"{where}: kind {kind!r} needs {', '.join(sorted(missing))}")
    return builder(name, params, target)


def target_matrix(model: torch.nn.Module, target: Target) -> torch.Tensor:
    """The weight (out, in) of the targeted write matrix."""
    layers = write_modules(model)[target.component]
    if target.layer >= len(layers):
        raise ValueError(f"interventions.target.layer: {target.layer}; the model has "
                         f"{len(layers)} layers (0..{len(layers) - 1})")
    return layers[target.layer].weight


def target_block(model: torch.nn.Module, target: Target) -> torch.nn.Module:
    """The module that holds the targeted write matrix (e.g. GPT-NeoX ``layers.1.mlp``)."""
    weight = target_matrix(model, target)
    for name, module in model.named_modules():
        if any(p is weight for p in module.parameters(recurse=False)):
            return model.get_submodule(name.rpartition(".")[0])
    raise ValueError(f"{target}: its write matrix is not a parameter of the model")


def normalised_entropy(matrix: torch.Tensor) -> torch.Tensor:
    """Entropy ``H(p)`` (nats) of ``p = s / sum(s)``, ``s`` the singular values of ``matrix``.

    ``matrix``: (m, n) or a stack (..., m, n); returns shape (...).

    ``exp(H)`` is the effective rank (Roy & Vetterli 2007) that
    :func:`lmdynamics.estimators.rank.effective_rank` computes in float64 for the analysis;
    here it is differentiable (:func:`torch.linalg.svdvals`), in the matrix's dtype, with
    ``0 log 0 = 0`` (zero singular values contribute nothing to the value and a finite
    gradient).
    """
    s = torch.linalg.svdvals(matrix)
    p = s / s.sum(dim=-1, keepdim=True)
    # p log max(p, tiny): the same value (0 log 0 = 0) with a finite gradient at p = 0,
    # where d(p log p)/dp = log p + 1 diverges (xlogy's gradient is NaN there)
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=-1)


def entropy_penalty(matrices: list[torch.Tensor], strength: float) -> torch.Tensor:
    """``strength * mean(-H(p_m))`` over ``matrices``, computed in float64: minimising it
    raises effective rank for ``strength > 0`` and lowers it for ``strength < 0``. Matrices
    of one shape go through one batched :func:`torch.linalg.svdvals` call."""
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for w in matrices:
        by_shape.setdefault(tuple(w.shape), []).append(w)
    entropies = torch.cat([normalised_entropy(torch.stack(ws).double())
                           for ws in by_shape.values()])
    return -strength * entropies.mean()


def spectrum_update(previous: torch.Tensor, proposed: torch.Tensor,
                    exponent: float) -> torch.Tensor:
    """``previous + D'`` where ``D = proposed - previous = U S V^T`` and ``D' = U S^p V^T``
    scaled to ``||D||_F`` (``p = exponent``; in float64, returned in ``proposed``'s dtype).

    Singular values at or below ``max(S) * max(m, n) * eps`` count as zero and stay zero
    (``0^0`` would otherwise give every null direction a full step when ``p = 0``). A zero
    update stays zero.
    """
    delta = (proposed - previous).double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if not bool(s.max() > 0):
        return proposed
    keep = s > s.max() * max(delta.shape) * torch.finfo(torch.float64).eps
    shaped = torch.where(keep, s.clamp_min(torch.finfo(torch.float64).tiny) ** exponent,
                         torch.zeros_like(s))
    shaped = shaped * (torch.linalg.vector_norm(s) / torch.linalg.vector_norm(shaped))
    return (previous.double() + (u * shaped) @ vh).to(proposed.dtype)


def _value(name: str, params: Mapping[str, Any], key: str, allowed: Callable[[float], bool],
           what: str) -> float:
    """``params[key]`` as a float, or ValueError naming the key and ``what`` is allowed."""
    value = float(params[key])
    if not allowed(value):
        raise ValueError(f"interventions.variants.{name}.{key}: {value!r}; must be {what} "
                         "(kind baseline trains unchanged)")
    return value


@register("baseline", allowed={})
def baseline(name: str, params: Mapping[str, Any], target: Target) -> Variant:
    """Training unchanged."""
    return Variant(name, "baseline", dict(params), target)


@register("rank_regulariser", allowed={"strength": (int, float)})
def rank_regulariser(name: str, params: Mapping[str, Any], target: Target) -> Variant:
    """Effective-rank regulariser of the targeted write matrix (``strength`` > 0 raises the
    rank, < 0 lowers it)."""
    strength = _value(name, params, "strength", lambda v: v != 0.0, "non-zero")
    return Variant(name, "rank_regulariser", dict(params), target,
                   loss=lambda model: entropy_penalty([target_matrix(model, target)],
                                                      strength))


@register("update_spectrum", allowed={"exponent": (int, float)})
def update_spectrum(name: str, params: Mapping[str, Any], target: Target) -> Variant:
    """Spectrum-reshaped updates of the targeted write matrix (:func:`spectrum_update`)."""
    exponent = _value(name, params, "exponent", lambda v: v >= 0.0 and v != 1.0,
                      ">= 0 and not 1")
    return Variant(name, "update_spectrum", dict(params), target, update=UpdateRule(
        parameters=lambda model: [target_matrix(model, target)],
        apply=lambda prev, new: spectrum_update(prev, new, exponent)))


@register("lr_scale", allowed={"factor": (int, float)})
def lr_scale(name: str, params: Mapping[str, Any], target: Target) -> Variant:
    """The targeted layer's block trained at ``factor`` times the learning rate."""
    factor = _value(name, params, "factor", lambda v: v > 0.0 and v != 1.0, "> 0 and not 1")
    return Variant(name, "lr_scale", dict(params), target, update=UpdateRule(
        parameters=lambda model: list(target_block(model, target).parameters()),
        apply=lambda prev, new: prev + factor * (new - prev)))


def orthogonal_write_init(matrix: torch.Tensor, std: float) -> None:
    """Re-initialise ``matrix`` (m, n) in place as a semi-orthogonal matrix times ``std *
    sqrt(max(m, n))``: all singular values equal, Frobenius norm ``std * sqrt(m n)``, the
    expectation's square root under N(0, std^2) entries. Uses the global torch RNG (seeded by
    the caller), so a seed gives the same matrix."""
    with torch.no_grad():
        torch.nn.init.orthogonal_(matrix, gain=std * math.sqrt(max(matrix.shape)))


@register("orthogonal_init", allowed={})
def orthogonal_init(name: str, params: Mapping[str, Any], target: Target) -> Variant:
    """Semi-orthogonal (maximal effective rank) initialisation of the targeted matrix."""
    return Variant(name, "orthogonal_init", dict(params), target,
                   init=lambda model: orthogonal_write_init(
                       target_matrix(model, target), model.config.initializer_range))
