"""The per-size reference store of the Conjecture statistics: what every extraction of a size
needs from its step-0 and final checkpoints, computed once.

The statistics compare each checkpoint with two others of the same size
(:mod:`lmdynamics.extraction.conjecture`): distance, relative distance and cosine of every
parameter to its step-0 value, cosine to its final value, and the closeness of the top-k
singular directions of each MLP-out and per-head OV matrix to the final checkpoint's. Reading
both reference checkpoints in every extraction cost two extra checkpoints of reading per job
(about 11 GB per Pythia-2.8b extraction) and the final checkpoint's singular vectors were
recomputed every time. :func:`build_reference` writes, once per size, a store holding

- ``init.<name>`` and ``final.<name>`` for every model parameter ``<name>`` (today's
  state-dict names, e.g. ``gpt_neox.layers.0.attention.dense.weight``): the tensor exactly
  as the statistics use it, the checkpoint's value widened to float32
  (:class:`lmdynamics.extraction.conjecture.ReferenceWeights`). A float16 file (every Pythia
  revision) is stored in float16, which widens to the same float32 values at half the bytes;
  any other dtype is stored as its float32 value. Dims ``d<axis>_<length>``.
- ``direction_mlp`` (layer, dim, mlp_k) and ``direction_ov`` (layer, head, dim, ov_k),
  float64: the final checkpoint's top-k left singular vectors of each layer's MLP-out matrix
  and of each head's OV circuit (:func:`lmdynamics.extraction.conjecture.circuit_directions`),
  with k = ``conjecture.top_k`` clipped to the matrix's rank bound.

and the provenance in its attrs: size, model, the steps and weights-file sha256 of both source
checkpoints, ``top_k`` (the one option that shapes the store), the architecture, the parameter
names in model order. The full final tensors stay in the store because the ``cos_final``
statistic is the cosine of every parameter with its final value, which needs all of them.

Reading (:class:`ReferenceStore`) goes through :func:`lmdynamics.store.open_store`: the
store's structure, attrs digest and the direction arrays are verified when it is opened, and
each weight array's sha256 is checked as that array is read (:class:`lmdynamics.store.
DigestedReader`), so every byte is read once and nothing unverified is used. A store of
another size, of another ``top_k``, of another architecture or parameter set, or with a damaged
chunk raises :class:`ReferenceMismatchError` or :class:`lmdynamics.store.IncompleteStoreError`,
one line naming the store and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr

from lmdynamics.extraction.stats import circuit_directions
from lmdynamics.sources.checkpoints import (
    CheckpointMismatchError,
    ReferenceWeights,
    config_family,
    read_model_config,
    weights_sha256,
)
from lmdynamics.store import DigestedReader, open_store, redo_hint, write_store

#: Version of this store's layout (attr ``reference_format``).
REFERENCE_FORMAT = 1
#: Prefixes of the weight arrays: step-0 and final values of each parameter.
INIT_PREFIX, FINAL_PREFIX = "init.", "final."
DIRECTION_VARIABLES = ("direction_mlp", "direction_ov")
REQUIRED_ATTRS = ("reference_format", "size", "top_k", "params", "num_layers",
                  "num_attention_heads", "init_weights_sha256", "final_weights_sha256")


class ReferenceMismatchError(ValueError):
    """A reference store does not belong to this extraction (size, options, architecture);
    the message (one line) names the store, what differs and how to rebuild it."""


def stored_array(tensor: torch.Tensor) -> np.ndarray:
    """A reference tensor as the store keeps it: float16 as is, anything else as its float32
    value (both widen to exactly the float32 tensor :class:`ReferenceWeights` returns)."""
    t = tensor.detach().to("cpu")
    return (t if t.dtype == torch.float16 else t.float()).contiguous().numpy()


def _memory_order(vectors: list[torch.Tensor]) -> str:
    """``"F"`` when the (dim, k) matrices are column-major (as LAPACK returns singular
    vectors), else ``"C"``. Recorded so that a reader hands :func:`direction_closeness` the
    same memory layout: its matrix product sums in another order for another layout, which
    changes the last bit of the closeness (2e-16 on the tiny suite)."""
    orders = {"F" if u.shape[0] > 1 and u.stride(0) == 1 and u.shape[1] > 1 else "C"
              for u in vectors}
    return "F" if orders == {"F"} else "C"


def _dims(shape: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(f"d{axis}_{length}" for axis, length in enumerate(shape))


def parameter_shapes(directory: Path | str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters of the model ``directory``'s config describes, in
    model order (built on the meta device: nothing is allocated)."""
    config = read_model_config(directory)
    with torch.device("meta"):
        model = config_family(config).model_cls(config.model_type)(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def build_reference(init_checkpoint: Path | str, final_checkpoint: Path | str,
                    out: Path | str, *, size: str, top_k: int, model_name: str = "",
                    init_step: int = 0, final_step: int | None = None) -> Path:
    """Write the reference store of one size (module docstring) to ``out``; return ``out``.

    ``init_checkpoint`` / ``final_checkpoint``: Hugging Face model directories of step 0 and
    of the final step. ``top_k``: singular directions kept per matrix (``conjecture.top_k``).
    Both checkpoints must describe the model of the final one's ``config.json`` (same
    parameter names and shapes, same number of heads), else :class:`CheckpointMismatchError`.
    Holds both checkpoints' tensors in memory while writing (float16 for Pythia: 11 GB for
    2.8b).
    """
    from lmdynamics import __version__

    if top_k < 1:
        raise ValueError(f"conjecture.top_k={top_k!r}: allowed >= 1")
    shapes = parameter_shapes(final_checkpoint)
    config = read_model_config(final_checkpoint)
    init_config = read_model_config(init_checkpoint)
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if getattr(init_config, key) != getattr(config, key):
            raise CheckpointMismatchError(
                f"{init_checkpoint}: {key}={getattr(init_config, key)} but the final "
                f"checkpoint {final_checkpoint} has {getattr(config, key)}; the two reference "
                "checkpoints must be of the same size")
    data: dict[str, tuple] = {}
    for prefix, directory in ((INIT_PREFIX, init_checkpoint), (FINAL_PREFIX, final_checkpoint)):
        weights = ReferenceWeights(directory)
        for name, shape in shapes.items():
            tensor = weights.raw(name)
            if tuple(tensor.shape) != shape:
                raise CheckpointMismatchError(
                    f"{weights.path}: {name} has shape {tuple(tensor.shape)}, the model of "
                    f"{final_checkpoint}/config.json has {shape}")
            data[prefix + name] = (_dims(shape), stored_array(tensor))
        del weights

    def final(name: str) -> torch.Tensor:  # what ReferenceWeights(final)[name] returns
        return torch.from_numpy(data[FINAL_PREFIX + name][1]).float()

    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    family = config_family(config)
    layers = [circuit_directions(final, layer, n_heads, top_k, family)
              for layer in range(n_layers)]
    mlp = [d["mlp"][0] for d in layers]
    ov = [u for d in layers for u in d["ov"]]
    data["direction_mlp"] = (("layer", "dim", "mlp_k"), np.stack([u.numpy() for u in mlp]), {
        "long_name": "final checkpoint's top-k left singular vectors of the MLP write "
                     f"({family.mlp_write})",
        "memory_order": _memory_order(mlp)})
    data["direction_ov"] = (("layer", "head", "dim", "ov_k"), np.stack(
        [u.numpy() for u in ov]).reshape(n_layers, n_heads, *ov[0].shape), {
        "long_name": "final checkpoint's top-k left singular vectors of each head's OV",
        "memory_order": _memory_order(ov)})
    attrs = {
        "reference_format": REFERENCE_FORMAT, "size": size, "model": model_name,
        "top_k": int(top_k), "params": list(shapes), "num_layers": n_layers,
        "num_attention_heads": n_heads, "hidden_size": config.hidden_size,
        "init_step": int(init_step), "final_step": final_step,
        "init_checkpoint": str(init_checkpoint), "final_checkpoint": str(final_checkpoint),
        "init_weights_sha256": weights_sha256(init_checkpoint),
        "final_weights_sha256": weights_sha256(final_checkpoint),
        "lmdynamics_version": __version__,
    }
    return write_store(xr.Dataset(data, attrs=attrs), out)


class ReferenceStore:
    """A verified reference store (module docstring), opened for one extraction.

    ``size`` and ``top_k``: what the extraction expects (its ``--size`` and
    ``conjecture.top_k``); a store built for other values raises
    :class:`ReferenceMismatchError`. Opening verifies the store's structure and attrs and reads
    the directions (sha256 checked); the weight arrays are verified by :meth:`init` /
    :meth:`final` as they read them, so each array is read once.
    """

    def __init__(self, path: Path | str, *, size: str | None, top_k: int):
        self.path = Path(path)
        ds = open_store(self.path, required=DIRECTION_VARIABLES, required_attrs=REQUIRED_ATTRS,
                        defer=(*self._weight_names(path), *DIRECTION_VARIABLES))
        # opened once: its zarr.json (attrs, digests) is not read again for every array
        self._group = zarr.open_group(self.path, mode="r", use_consolidated=False)
        self.attrs = dict(ds.attrs)
        fmt = self.attrs["reference_format"]
        if fmt != REFERENCE_FORMAT:
            self._mismatch(f"has reference_format {fmt!r}, this version reads "
                           f"{REFERENCE_FORMAT}")
        if size is not None and self.attrs["size"] != size:
            self._mismatch(f"is the reference of size {self.attrs['size']!r}, not {size!r}")
        if self.attrs["top_k"] != top_k:
            self._mismatch(f"was built with conjecture.top_k={self.attrs['top_k']}, this "
                           f"extraction uses top_k={top_k}")
        self.params: list[str] = list(self.attrs["params"])
        missing = [p for prefix in (INIT_PREFIX, FINAL_PREFIX) for p in self.params
                   if prefix + p not in ds.variables]
        if missing:
            self._mismatch(f"lacks {', '.join(missing[:4])}")
        self.shapes = {p: tuple(ds[INIT_PREFIX + p].shape) for p in self.params}
        self._directions = {v: self._read_verified(v) for v in DIRECTION_VARIABLES}
        self._orders = {v: ds[v].attrs.get("memory_order", "C") for v in DIRECTION_VARIABLES}

    @staticmethod
    def _weight_names(path: Path | str) -> tuple[str, ...]:
        """Names of the weight arrays (their content is verified as it is read)."""
        try:
            group = zarr.open_group(Path(path), mode="r", use_consolidated=False)
            names = [n for n, _ in group.arrays()]
        except Exception:  # open_store names what is wrong
            return ()
        return tuple(n for n in names if n.startswith((INIT_PREFIX, FINAL_PREFIX)))

    def _mismatch(self, what: str) -> None:
        raise ReferenceMismatchError(
            f"{self.path} {what}; rebuild it (`lmdynamics reference`, or "
            f"{redo_hint(self.path)})")

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`ReferenceMismatchError` unless ``model`` has exactly the store's
        parameters (names and shapes) and number of heads."""
        have = {name: tuple(p.shape) for name, p in model.named_parameters()}
        if have != self.shapes:
            other = sorted(set(have) ^ set(self.shapes)) or sorted(
                n for n in have if have[n] != self.shapes[n])
            self._mismatch(f"holds another model's parameters than this checkpoint's "
                           f"({', '.join(other[:4])} differ)")
        heads = model.config.num_attention_heads
        if self.attrs["num_attention_heads"] != heads:
            self._mismatch(f"has {self.attrs['num_attention_heads']} attention heads, this "
                           f"checkpoint {heads}")

    def _read_verified(self, variable: str) -> np.ndarray:
        """One array, read once, its sha256 checked against the recorded one."""
        reader = DigestedReader(self.path, variable, self._group)
        array = reader.read(())
        reader.finish()
        return array

    def _read(self, variable: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._read_verified(variable))).float()

    def init(self, name: str) -> torch.Tensor:
        """The step-0 value of parameter ``name`` as float32 on CPU (verified as read)."""
        return self._read(INIT_PREFIX + name)

    def final(self, name: str) -> torch.Tensor:
        """The final value of parameter ``name`` as float32 on CPU (verified as read)."""
        return self._read(FINAL_PREFIX + name)

    def directions(self, layer: int) -> Mapping[str, list[torch.Tensor]]:
        """The final checkpoint's top-k directions of one layer: ``{"mlp": [(D, k)], "ov":
        [(D, k) per head]}``, float64, as :func:`circuit_directions` computed them."""
        def tensor(variable: str, index: tuple[int, ...]) -> torch.Tensor:
            u = self._directions[variable][index]
            order = self._orders[variable]
            return torch.from_numpy(np.asfortranarray(u) if order == "F" else
                                    np.ascontiguousarray(u))

        n_heads = self._directions["direction_ov"].shape[1]
        return {"mlp": [tensor("direction_mlp", (layer,))],
                "ov": [tensor("direction_ov", (layer, h)) for h in range(n_heads)]}
