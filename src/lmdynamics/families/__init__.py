"""Model families: one small definition per architecture, found by module discovery.

A :class:`Family` names, for one architecture of transformers, everything the workflow
otherwise would hard-code: which model and config classes to build (by name, resolved
lazily from ``transformers``), which ``config.json`` values select it, where the blocks, the
attention and MLP write modules and the embeddings live, where the norms sit, the order of a
block's modules in the stores, whether the write weights are stored transposed (GPT-2's
``Conv1D``), how to read its config, count its parameters and build a tiny one, and how to
take each head's value and output weights for the OV circuits.

Built in: :mod:`~lmdynamics.families.gpt_neox` (Pythia, PolyPythias),
:mod:`~lmdynamics.families.llama` (``LlamaForCausalLM``, ``OlmoForCausalLM``,
``Olmo2ForCausalLM``) and :mod:`~lmdynamics.families.gpt2` (``GPT2LMHeadModel``).

Adding a family is one new module in this package that defines one module-level
:class:`Family` instance (any name), plus its test: :func:`registry` imports every module of
the package (``pkgutil``) and collects the instances. The config check asks the registry for
the config's ``family``, so the config schema needs no edit; a suite definition's ``family``
is an enum of ``lmdynamics/sources/suites/suite.schema.yaml``, which gains the name when a
suite uses the family.

This package imports neither torch nor transformers at import time (the reductions and the
report import the store names through :mod:`lmdynamics.extraction.names`); the functions that
need them import them when called.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The family of stores and configs that do not name one (everything before families existed).
DEFAULT = "gpt_neox"
#: Keys of :meth:`Family.dims` (transformers' common config attribute names).
DIMS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "vocab_size", "max_position_embeddings")


class UnknownFamilyError(ValueError):
    """A family name or a ``config.json`` that no registered family accepts."""


@dataclass(frozen=True)
class Family:
    """One architecture. Module paths are dotted attribute paths as in ``state_dict`` names.

    Attributes
    ----------
    name : str
        Registry key and the ``family`` config value / store attribute.
    model_class, config_class : str
        Names in ``transformers`` (e.g. ``GPTNeoXForCausalLM``), resolved when needed; the
        classes of the tiny suite's models.
    classes : mapping
        ``model_type -> (model class, config class)`` for model types built by other classes
        of the same layout (``olmo`` -> ``OlmoForCausalLM``, ``OlmoConfig``).
    model_types, architectures : tuple of str
        ``config.json`` values (``model_type``, ``architectures``) this family loads.
    base : str
        Attribute of the causal LM holding the trunk (``gpt_neox``, ``model``,
        ``transformer``): the prefix stripped from parameter names in the stores.
    layers : str
        Block container under ``base`` (``layers``, ``h``).
    attention_write, mlp_write : str
        Module, relative to a block, whose weight writes attention's / the MLP's output to
        the residual stream (``attention.dense``, ``self_attn.o_proj``, ``attn.c_proj``).
    input_embeddings : tuple of str
        Store names (under ``base``) of the input embeddings; the first is the token
        embedding whose row correlations the Conjecture statistics take.
    unembedding : str
        Store name of the output embedding (``lm_head`` in transformers 5).
    store_renames : mapping
        Non-block store names that differ from the model's (GPT-NeoX: ``lm_head`` ->
        ``embed_out``, the name its checkpoints and the stores have always used).
    norm_placement : str
        Where the norms sit, in words (documentation, and what a reader of the figures needs).
    module_order : tuple of str
        Order of a block's modules in the stores (its own forward order).
    block_matrices : tuple of (module, title)
        The block weight matrices the Conjecture figures show, titled by role.
    transposed_writes : bool
        The write modules store ``weight`` as (in, out) (``Conv1D``); :meth:`write_matrix`
        returns the (out, in) matrix either way.
    config_keys : mapping
        This family's ``config.json`` keys for transformers' common names of :data:`DIMS`
        where they differ (GPT-2: ``hidden_size`` -> ``n_embd``), for messages.
    activation_key, default_activation : str
        ``config.json`` key of the activation function and its default.
    dims : callable
        ``dims(config_dict) -> dict`` over :data:`DIMS` (``intermediate_size`` resolved).
    parameters : callable
        ``parameters(config_dict) -> int``: the parameter count a config implies.
    tiny_config : callable
        ``tiny_config(hidden_size, num_layers, num_heads, seq_len, vocab_size) -> dict``:
        keyword arguments of :attr:`config_class` for a tiny model of the tiny suite.
    shape_config : callable
        ``shape_config(shape) -> dict | None``: the ``config.json`` dict of a documented
        shape (a mapping with the keys of a suite definition's size: ``layers``, ``hidden``,
        ``heads``, ``vocab``, ``intermediate``, ``tied_embeddings``, ``model_type``,
        ``context``; ``None`` = not documented), enough for :attr:`parameters`; ``None``
        when a fact the count needs is not documented.
    ov_weights : callable
        ``ov_weights(weight, layer, n_heads) -> (w_out, w_values)``; ``weight(name)`` returns
        a tensor by its state-dict name; ``w_out`` is the attention write module's weight as
        stored (:meth:`write_matrix` makes it (d, n_heads * head_dim)) and ``w_values`` a
        list of per-head value matrices (head_dim, d).
    activation_sites : mapping
        ``model_type -> (attention module, MLP module)`` where what a block writes to the
        residual stream is the output of another module than the write matrix (OLMo 2
        normalises each sublayer's output before adding it).
    paper_code_attention : bool
        Whether ``extraction.attention_activation: paper_code`` (a slice of GPT-NeoX's fused
        QKV) exists for this family.
    legacy_buffers : tuple of str
        Regular expressions (searched in a checkpoint key) of the non-parameter buffers that
        checkpoints written by older transformers persist and today's model no longer has
        (GPT-2's ``attn.masked_bias``, kept by transformers < 4.30); the loader drops exactly
        these keys, by name, and logs them (:func:`lmdynamics.sources.checkpoints.load_model`),
        and the content audit leaves them out of the tensor digests. Any other unexpected
        key still fails the load.
    """

    name: str
    model_class: str
    config_class: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    base: str
    layers: str
    attention_write: str
    mlp_write: str
    input_embeddings: tuple[str, ...]
    unembedding: str
    norm_placement: str
    module_order: tuple[str, ...]
    block_matrices: tuple[tuple[str, str], ...]
    dims: Callable[[Mapping[str, Any]], dict[str, int]]
    parameters: Callable[[Mapping[str, Any]], int]
    tiny_config: Callable[..., dict[str, Any]]
    shape_config: Callable[[Mapping[str, Any]], dict[str, Any] | None]
    ov_weights: Callable[..., tuple[Any, list[Any]]]
    transposed_writes: bool = False
    activation_key: str = "hidden_act"
    default_activation: str = "gelu"
    store_renames: Mapping[str, str] = field(default_factory=dict)
    classes: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    config_keys: Mapping[str, str] = field(default_factory=dict)
    activation_sites: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    paper_code_attention: bool = False
    legacy_buffers: tuple[str, ...] = ()

    # --- transformers classes (imported when called) -----------------------------------
    def model_cls(self, model_type: str | None = None) -> type:
        """The ``transformers`` causal-LM class (of ``model_type``, default the family's)."""
        import transformers

        name = self.classes.get(model_type, (self.model_class, self.config_class))[0]
        return getattr(transformers, name)

    def config_cls(self, model_type: str | None = None) -> type:
        """The ``transformers`` config class (of ``model_type``, default the family's)."""
        import transformers

        name = self.classes.get(model_type, (self.model_class, self.config_class))[1]
        return getattr(transformers, name)

    # --- modules of a built model ---------------------------------------------------------
    def blocks(self, model: Any) -> list[Any]:
        """The model's blocks, in order."""
        return list(model.get_submodule(f"{self.base}.{self.layers}"))

    def write_modules(self, model: Any) -> dict[str, list[Any]]:
        """``{"attention": [...], "mlp": [...]}``: each block's write-matrix modules."""
        blocks = self.blocks(model)
        return {"attention": [b.get_submodule(self.attention_write) for b in blocks],
                "mlp": [b.get_submodule(self.mlp_write) for b in blocks]}

    def activation_modules(self, model: Any) -> dict[str, list[Any]]:
        """Per component, the modules whose outputs are what each block writes to the
        residual stream: :meth:`write_modules` unless :attr:`activation_sites` names others
        for the model's ``model_type``."""
        sites = self.activation_sites.get(getattr(model.config, "model_type", ""))
        if sites is None:
            return self.write_modules(model)
        blocks = self.blocks(model)
        return {c: [b.get_submodule(path) for b in blocks]
                for c, path in zip(("attention", "mlp"), sites, strict=True)}

    def token_embedding(self, model: Any) -> Any:
        """The input token embedding module."""
        return model.get_submodule(f"{self.base}.{self.input_embeddings[0]}")

    def write_matrix(self, weight: Any) -> Any:
        """A write module's weight (or its gradient) as the (out, in) matrix: transposed for
        :attr:`transposed_writes` families (``Conv1D`` stores (in, out)), else as is."""
        return weight.T if self.transposed_writes else weight

    def is_legacy_buffer(self, key: str) -> bool:
        """Whether checkpoint key ``key`` is one of :attr:`legacy_buffers`."""
        return any(re.search(p, key) for p in self.legacy_buffers)

    def param_name(self, layer: int, module: str, kind: str = "weight") -> str:
        """State-dict name of a block parameter: ``gpt_neox.layers.3.attention.dense.weight``."""
        return f"{self.base}.{self.layers}.{layer}.{module}.{kind}"

    # --- configs ---------------------------------------------------------------------------
    def accepts(self, config: Mapping[str, Any]) -> bool:
        """Whether ``config.json``'s ``model_type`` is one of this family's."""
        return config.get("model_type") in self.model_types

    def config_from_dict(self, config: Mapping[str, Any]) -> Any:
        """The ``transformers`` config object of a ``config.json`` dict."""
        return self.config_cls(config.get("model_type")).from_dict(dict(config))

    def build_tiny_config(self, spec: Mapping[str, int], *, seq_len: int,
                          vocab_size: int) -> Any:
        """The config object of a tiny model ``spec`` = {hidden_size, num_layers, num_heads}."""
        kwargs = self.tiny_config(hidden_size=spec["hidden_size"],
                                  num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                                  seq_len=seq_len, vocab_size=vocab_size)
        return self.config_cls()(**kwargs, attn_implementation="eager")


@functools.cache
def registry() -> dict[str, Family]:
    """Every :class:`Family` instance defined at module level in this package, by name."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Family):
                if value.name in found and found[value.name] is not value:
                    raise RuntimeError(f"family {value.name!r} is defined twice "
                                       f"(module {info.name})")
                found[value.name] = value
    return found


def names() -> tuple[str, ...]:
    """Registered family names, sorted."""
    return tuple(sorted(registry()))


def get(name: str | None) -> Family:
    """The family called ``name`` (None: :data:`DEFAULT`)."""
    name = DEFAULT if name is None else name
    try:
        return registry()[name]
    except (KeyError, TypeError):
        raise UnknownFamilyError(f"family={name!r}: unknown model family; known families: "
                                 f"{', '.join(names())}") from None


def for_config(config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family whose ``model_types`` hold ``config['model_type']`` and whose
    ``architectures`` hold every entry of ``config['architectures']``; one-line
    :class:`UnknownFamilyError` (naming ``where``, the value and the known families) else."""
    model_type = config.get("model_type")
    for family in registry().values():
        if family.accepts(config):
            archs = config.get("architectures")
            if not isinstance(archs, list) or not archs or any(
                    a not in family.architectures for a in archs):
                raise UnknownFamilyError(
                    f"{where}: key 'architectures' is {archs!r}; family {family.name} "
                    f"(model_type {model_type!r}) loads {', '.join(family.architectures)}")
            return family
    known = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in registry().values())
    raise UnknownFamilyError(f"{where}: key 'model_type' is {model_type!r}; known families "
                             f"(model types): {known}")


def for_model_type(model_type: str | None) -> Family:
    """The family whose ``model_types`` hold ``model_type`` (a built model's
    ``config.model_type``)."""
    for family in registry().values():
        if model_type in family.model_types:
            return family
    raise UnknownFamilyError(f"model_type {model_type!r}: no known family; known families: "
                             f"{', '.join(names())}")


def for_model(model: Any) -> Family:
    """The family of a built transformers model (by ``model.config.model_type``)."""
    return for_model_type(getattr(model.config, "model_type", None))


def check_attention_activation(family: Family, kind: str) -> None:
    """Refuse ``extraction.attention_activation: paper_code`` for a family without GPT-NeoX's
    fused QKV (one line naming the key and the family)."""
    if kind == "paper_code" and not family.paper_code_attention:
        raise ValueError(
            f"extraction.attention_activation='paper_code' slices GPT-NeoX's fused "
            f"query_key_value and exists only for gpt_neox; family {family.name!r} has no "
            "such module: use residual_write")


def family_of(attrs: Mapping[str, Any]) -> Family:
    """The family recorded in a store's attributes (``family``; stores written before
    families existed are GPT-NeoX's)."""
    return get(attrs.get("family", DEFAULT))


def default_dims(config: Mapping[str, Any], *, default_intermediate: int | None = None,
                 renames: Mapping[str, str] | None = None) -> dict[str, Any]:
    """:data:`DIMS` of a config dict whose keys are transformers' common names, or their
    ``renames`` (common -> this family's key); a missing ``intermediate_size`` becomes
    ``default_intermediate`` (None when that is None too)."""
    renames = renames or {}
    out = {key: config.get(renames.get(key, key)) for key in DIMS}
    if out["intermediate_size"] is None:
        out["intermediate_size"] = default_intermediate
    return out


def known(shape: Mapping[str, Any], *keys: str) -> bool:
    """Whether every fact ``keys`` of a documented ``shape`` (:attr:`Family.shape_config`) is
    given (not ``None``)."""
    return all(shape.get(key) is not None for key in keys)
