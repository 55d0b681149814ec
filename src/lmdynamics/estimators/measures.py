"""The measure registry: every measure beyond CKA and the write matrices' PER, declared once.

A :class:`Measure` is one function plus what the workflow needs to know about it: the data it
applies to (:data:`DATA_KINDS`: the write matrices' weights and gradients, the layers'
activations, each attention head's OV circuit), what the function takes (:data:`INPUTS`: a
singular-value spectrum, a matrix's element statistics, or a pair of activation matrices for
a comparative measure), its unit and range (axis labels and colour scales) and where its
definition comes from. The config section ``measures`` (src/lmdynamics/schemas/config.schema.yaml)
picks, per measure, the data (``data``; empty = off) and, for comparative measures, the
reference steps (``reference``: the final step and/or every step, ``pairwise``); a measure's
schema entry lists exactly the data kinds declared here (``tests/test_options.py`` checks).

Adding a measure is one function (in this package, float64, NaN when undefined), one entry of
:data:`MEASURES`, its schema entry and a float64 reference test: the reduction
(:mod:`lmdynamics.reduction.measures`) then stores ``<name>_<data>`` over (component, layer,
step) in the metrics datasets and ``metrics.csv``, and the workflow draws
``figures/measure_<name>.png`` (:mod:`lmdynamics.report.measures`).

Data. ``weights`` / ``gradients``: the write matrices (attention output, MLP output: the
``component`` dimension), the gradients of the LM loss on the eval batch; ``activations``:
what each layer writes to the residual stream at the sampled tokens, uncentred for
single-checkpoint measures (as pico-analyze takes them; the comparative ones centre);
``ov_circuit``: ``W_O^h W_V^h`` of each attention head h (d x d, rank <= head_dim; Elhage et al.
2021, "A Mathematical Framework for Transformer Circuits"), whose spectrum the extraction takes
from the factors (:func:`lmdynamics.extraction.measure_data.factored_singular_values`); the
metrics hold the mean over heads (component ``attention``) and every head
(``<name>_ov_heads``). pico-analyze's ``ov_circuit`` component multiplies the same factors the
other way round (``W_V^h W_O^h``, head_dim x head_dim), whose singular values differ.

pico-analyze's metrics (github.com/pico-lm/pico-analyze, ``src/metrics/``) and where they are
here: ``cka`` -> the core reduction (``cka``, ``cka_debiased``); ``pwcca`` -> :data:`MEASURES`
``pwcca`` (and ``svcca``, Raghu et al. 2017); ``per`` -> ``per_weight``, ``per_grad`` (core) and
``per`` of activations and OV circuits; ``condition_number``; ``norm`` (frobenius, nuclear,
inf) -> ``frobenius_norm``, ``nuclear_norm``, ``max_norm`` (the ``inf`` norm of a flattened
tensor, ``max |x|``), plus ``spectral_norm``; ``gini``; ``hoyer``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np

from lmdynamics.estimators import cca, sparsity, spectral
from lmdynamics.estimators.rank import proportional_effective_rank

__all__ = [
    "DATA_KINDS",
    "DATA_SUFFIX",
    "INPUTS",
    "MEASURES",
    "REFERENCES",
    "Measure",
    "SpectrumContext",
    "chosen",
]

#: What a measure can apply to (config ``measures.<name>.data``), pico-analyze's data types
#: plus its OV-circuit component.
DATA_KINDS: tuple[str, ...] = ("weights", "gradients", "activations", "ov_circuit")
#: Suffix of a single-checkpoint measure's variable per data kind (``gini_weight``), after
#: the core variables ``per_weight`` / ``per_grad``.
DATA_SUFFIX: dict[str, str] = {"weights": "weight", "gradients": "grad",
                               "activations": "act", "ov_circuit": "ov"}
#: Reference steps of a comparative measure (config ``measures.<name>.reference``): the final
#: step (``<name>``, like ``cka``) and every step (``<name>_pairwise``, like ``cka_pairwise``).
REFERENCES: tuple[str, ...] = ("final", "pairwise")
#: What a measure's function takes: ``spectrum`` (singular values, descending, and a
#: :class:`SpectrumContext`), ``elements`` (a mapping of
#: :data:`lmdynamics.estimators.sparsity.ELEMENT_STATS`), ``activation_pair`` (an
#: :class:`lmdynamics.estimators.cca.ActivationPair` and the measure's parameters).
INPUTS: tuple[str, ...] = ("spectrum", "elements", "activation_pair")


@dataclass(frozen=True)
class SpectrumContext:
    """What a spectrum's measure may need besides the values: the PER divisor and truncation
    (``metrics.per_divisor``, ``metrics.per_truncate``; :func:`lmdynamics.estimators.rank.
    per_divisor`)."""

    divisor: int
    truncate: bool = True


@dataclass(frozen=True)
class Measure:
    """One measure (module docstring).

    ``name``: the config key and variable prefix; ``title``: for figures; ``input``: one of
    :data:`INPUTS`; ``data``: the data kinds it applies to (a subset of :data:`DATA_KINDS`);
    ``unit``: the axis label's unit; ``value_range``: (low, high) of its values (``inf`` when
    unbounded); ``log_scale``: drawn on a log colour scale; ``function``: the measure (see
    :data:`INPUTS` for its arguments), float64, NaN when undefined; ``source``: where its
    definition comes from; ``undefined``: when it is NaN, in words (the reduction's
    warnings); ``parameters``: its config keys besides ``data`` and ``reference``.
    """

    name: str
    title: str
    input: str
    data: tuple[str, ...]
    _: KW_ONLY
    unit: str
    value_range: tuple[float, float]
    log_scale: bool
    function: Callable[..., float]
    source: str
    undefined: str
    parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"measure {self.name}: input {self.input!r} is not one of {INPUTS}")
        if not set(self.data) <= set(DATA_KINDS):
            raise ValueError(f"measure {self.name}: data {self.data} not among {DATA_KINDS}")

    @property
    def comparative(self) -> bool:
        """Compares each step with a reference step (else: one checkpoint at a time)."""
        return self.input == "activation_pair"

    def variable(self, data: str, reference: str = "final") -> str:
        """The metrics variable of this measure on ``data``: ``<name>`` /
        ``<name>_pairwise`` for a comparative measure, else ``<name>_<suffix>``."""
        if data not in self.data:
            raise ValueError(f"measure {self.name} does not apply to {data!r}; it applies "
                             f"to {', '.join(self.data)}")
        if self.comparative:
            return self.name if reference == "final" else f"{self.name}_{reference}"
        return f"{self.name}_{DATA_SUFFIX[data]}"


def _per(s: np.ndarray, ctx: SpectrumContext) -> float:
    return proportional_effective_rank(s, ctx.divisor, truncate=ctx.truncate)


SPECTRAL = ("weights", "gradients", "activations", "ov_circuit")
ELEMENTS = ("weights", "gradients", "activations")

#: Why a measure is NaN, shared by measures of the same input.
_FLAT_SPECTRUM = "an all-zero or non-finite spectrum"
_BAD_ELEMENTS = ("all-zero or non-finite elements, or no gradient (gradient_protocol "
                 "paper_code)")
_BAD_ACTIVATIONS = "zero variance or non-finite activations"

#: Every measure, in the order figures and tables list them.
MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("pwcca", "PWCCA vs final step", "activation_pair", ("activations",),
            unit="similarity (0-1)", value_range=(0.0, 1.0), log_scale=False,
            function=lambda pair, params: cca.pwcca(pair),
            source="Morcos, Raghu & Bengio 2018 (weights from the step's side)",
            undefined=_BAD_ACTIVATIONS),
    Measure("svcca", "SVCCA vs final step", "activation_pair", ("activations",),
            unit="similarity (0-1)", value_range=(0.0, 1.0), log_scale=False,
            function=lambda pair, params: cca.svcca(pair, params["variance"]),
            source="Raghu et al. 2017 (top directions explaining `variance`)",
            undefined=_BAD_ACTIVATIONS, parameters=("variance",)),
    Measure("per", "proportional effective rank", "spectrum", ("activations", "ov_circuit"),
            unit="ER / divisor", value_range=(0.0, 1.0), log_scale=False, function=_per,
            source="Roy & Vetterli 2007; Martinez et al. 2024 (of weights and gradients: "
                   "the core per_weight, per_grad)", undefined=_FLAT_SPECTRUM),
    Measure("condition_number", "condition number", "spectrum", SPECTRAL,
            unit="sigma_max / sigma_min", value_range=(1.0, np.inf), log_scale=True,
            function=lambda s, ctx: spectral.condition_number(s),
            source="Golub & Van Loan 2013, 2.6.2 (NaN beyond 1e6: the spectrum's resolution)",
            undefined="a zero, non-finite or unresolvable smallest singular value "
                      "(condition number above 1e6)"),
    Measure("spectral_norm", "spectral norm", "spectrum", SPECTRAL, unit="sigma_max",
            value_range=(0.0, np.inf), log_scale=True,
            function=lambda s, ctx: spectral.spectral_norm(s),
            source="Golub & Van Loan 2013, 2.3", undefined=_FLAT_SPECTRUM),
    Measure("nuclear_norm", "nuclear norm", "spectrum", SPECTRAL, unit="sum of sigma",
            value_range=(0.0, np.inf), log_scale=True,
            function=lambda s, ctx: spectral.nuclear_norm(s),
            source="Golub & Van Loan 2013, 2.4 (pico-analyze norm, nuclear)",
            undefined=_FLAT_SPECTRUM),
    Measure("frobenius_norm", "Frobenius norm", "spectrum", SPECTRAL,
            unit="sqrt(sum of sigma^2)", value_range=(0.0, np.inf), log_scale=True,
            function=lambda s, ctx: spectral.frobenius_norm(s),
            source="Golub & Van Loan 2013, 2.3 (pico-analyze norm, frobenius)",
            undefined=_FLAT_SPECTRUM),
    Measure("max_norm", "max norm (largest |element|)", "elements", ELEMENTS,
            unit="max |x|", value_range=(0.0, np.inf), log_scale=True,
            function=sparsity.max_abs,
            source="pico-analyze norm, inf (of the flattened tensor)",
            undefined=_BAD_ELEMENTS),
    Measure("gini", "Gini index of |elements|", "elements", ELEMENTS, unit="Gini (0-1)",
            value_range=(0.0, 1.0), log_scale=False, function=sparsity.gini,
            source="Hurley & Rickard 2009", undefined=_BAD_ELEMENTS),
    Measure("hoyer", "Hoyer sparsity of elements", "elements", ELEMENTS, unit="Hoyer (0-1)",
            value_range=(0.0, 1.0), log_scale=False, function=sparsity.hoyer,
            source="Hoyer 2004; Hurley & Rickard 2009", undefined=_BAD_ELEMENTS),
)}


@dataclass(frozen=True)
class Choice:
    """One measure as a config chose it: the data kinds, the references (comparative
    measures) and its parameters."""

    measure: Measure
    data: tuple[str, ...]
    reference: tuple[str, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def parameters(self) -> dict[str, Any]:
        """The measure's parameters as a dict."""
        return dict(self.params)


def chosen(section: Mapping[str, Any]) -> list[Choice]:
    """The measures config section ``measures`` turns on (non-empty ``data``), in
    :data:`MEASURES` order. ``section``: as :func:`lmdynamics.options.resolve` returns it
    (every measure's entry present, defaults filled in). ValueError naming the key for a
    data kind or reference the measure does not declare."""
    out = []
    for name, measure in MEASURES.items():
        entry = section.get(name, {})
        data = tuple(entry.get("data", ()))
        bad = [d for d in data if d not in measure.data]
        if bad:
            raise ValueError(f"measures.{name}.data: {bad} not allowed; allowed: "
                             f"{', '.join(measure.data)}")
        reference = tuple(entry.get("reference", ())) if measure.comparative else ()
        bad = [r for r in reference if r not in REFERENCES]
        if bad:
            raise ValueError(f"measures.{name}.reference: {bad} not allowed; allowed: "
                             f"{', '.join(REFERENCES)}")
        if data and (reference or not measure.comparative):
            params = tuple((p, entry[p]) for p in measure.parameters)
            out.append(Choice(measure, data, reference, params))
    return out
