"""Record the analysis while a model trains, so the run need not keep its checkpoints.

:class:`TrainerCallback` (transformers' ``Trainer``) and :func:`record_step` (a hand-written
loop) run the extraction pass (:func:`lmdynamics.extraction.extract.extract_model`: the
activations on the eval batch, the write matrices' weight and gradient spectra, the
Conjecture statistics) on a copy of the model and write the per-step store the workflow
would have extracted from that step's checkpoint, in the same format, at the path template
``local.recorded`` of the workflow config. The workflow (``source: local``) then reduces,
tabulates and draws them with the checkpoints that were kept (step 0 and the final one, at
``local.path``).

What a recorded store cannot hold: the statistics that compare a step with the final
checkpoint (``stat_param``'s cosine to the final step, ``stat_direction_closeness``) are NaN,
since the final checkpoint does not exist yet when the step is recorded; the distance to
step 0 is measured against the weights at the start of training. ``weights_sha256`` is the
sha256 of the parameters' bytes (:func:`parameters_sha256`), not of a file.

The run observed is left as it was: the pass runs on a deep copy (its own parameters,
gradients and ``requires_grad`` flags, in eval mode, so no dropout), and the random number
generators' states (Python, numpy, torch CPU and CUDA) are saved before and restored after
(:func:`preserved_rng`), so the weights of a run with and without the callback are
bit-identical (tests/test_record.py). The copy costs one more model in memory, on the
extraction device.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml

from lmdynamics import families, options
from lmdynamics.extraction.conjecture import StatsOptions
from lmdynamics.extraction.extract import DTYPES, extract_model, resolve_device
from lmdynamics.sources import local
from lmdynamics.sources.checkpoints import load_model, save_checkpoint
from lmdynamics.sources.eval_data import eval_batch

log = logging.getLogger(__name__)

#: Config sections a recording reads (those of an extraction job, and where the eval batch
#: and the stores are).
SECTIONS = ("tokens", "seed", "extraction", "sampling", "conjecture", "hub", "eval_data",
            "local")


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the Python, numpy, torch CPU and (when initialised) CUDA generators' states
    on exit, whatever the body drew from them."""
    states = (random.getstate(), np.random.get_state(),  # noqa: NPY002 (the global one)
              torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def parameters_sha256(model: torch.nn.Module) -> str:
    """sha256 of the model's state tensors (name, dtype, shape, bytes; in state order)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LiveReference:
    """What the Conjecture statistics read of the reference store, during training: step 0's
    parameters (``init``), and NaN for everything of the final checkpoint (``final``,
    ``directions``), which does not exist yet."""

    def __init__(self, init: Mapping[str, torch.Tensor], hidden: int, n_heads: int):
        self._init, self._hidden, self._heads = init, hidden, n_heads

    def check_model(self, model: torch.nn.Module) -> None:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        wrong = [n for n, s in shapes.items() if n not in self._init
                 or tuple(self._init[n].shape) != s]
        if wrong:
            raise ValueError(f"the step-0 weights do not fit the model (parameters "
                             f"{', '.join(wrong[:5])}); record step 0 of this run first")

    def init(self, name: str) -> torch.Tensor:
        return self._init[name]

    def final(self, name: str) -> torch.Tensor:
        return torch.full_like(self._init[name], float("nan"))

    def directions(self, layer: int) -> dict[str, list[torch.Tensor]]:
        nan = torch.full((self._hidden, 1), float("nan"), dtype=torch.float64)
        return {"mlp": [nan], "ov": [nan] * self._heads}


def read_config(config: Mapping[str, Any] | Path | str) -> dict[str, Any]:
    """The sections :data:`SECTIONS` of a workflow config (a file or a mapping), checked
    against the schema and completed with its defaults, and ``source``, ``sizes``,
    ``steps`` as given (a run that has not started has nothing on disk to check them
    against)."""
    if not isinstance(config, Mapping):
        path = Path(config)
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, Mapping):
            raise ValueError(f"{path}: not a YAML mapping of config keys")
    out = {s: options.resolve(s, config.get(s)) for s in SECTIONS}
    if config.get("source") != "local":
        raise ValueError(f"config key 'source': {config.get('source')!r}; recording writes "
                         "the stores of a 'local' run (docs/guide/own-runs.md)")
    if not out["local"].get("recorded"):
        raise ValueError("config key 'local.recorded': unset; allowed: the template the "
                         "stores are written to, e.g. 'runs/{size}/lmdynamics/step{step}.zarr'")
    if not out["eval_data"].get("path"):
        raise ValueError("config key 'eval_data.path': unset; allowed: the .npy / .bin / text "
                         "file of the eval batch")
    return {**out, "source": "local", "sizes": list(config.get("sizes") or []),
            "steps": config.get("steps")}


class Recorder:
    """Writes the per-step stores of one (size, seed) of a run described by a workflow
    config (:func:`read_config`); paths in it are taken relative to ``workdir`` (the folder
    the workflow runs in)."""

    def __init__(self, config: Mapping[str, Any] | Path | str, *, size: str, seed: int = 0,
                 workdir: Path | str = "."):
        self.config = read_config(config)
        self.size, self.seed, self.workdir = size, int(seed), Path(workdir)
        if self.config["sizes"] and size not in self.config["sizes"]:
            raise ValueError(f"size {size!r} is not among config key 'sizes' "
                             f"{self.config['sizes']}")
        data = self.config["eval_data"]
        if Path(data["path"]).suffix.lower() not in (".npy", ".bin") \
                and not data.get("tokenizer"):
            raise ValueError("config key 'eval_data.tokenizer': unset for a text eval file; "
                             "allowed: the run's tokenizer folder or hub id")
        self.batch = eval_batch(self._path(data["path"]),
                                sequences=self.config["hub"]["sequences"],
                                seq_len=data["seq_len"], dtype=data.get("dtype"),
                                tokenizer=data.get("tokenizer"),
                                allow_download=data["allow_download"])
        self.init: dict[str, torch.Tensor] | None = None

    def _path(self, path: str | Path) -> Path:
        return self.workdir / path

    def store(self, step: int) -> Path:
        """Where the store of ``step`` goes."""
        return self._path(local.recorded_store(self.config["local"]["recorded"], self.size,
                                               self.seed, step))

    def checkpoint(self, step: int) -> Path:
        """The checkpoint folder of ``step`` (``local.path``)."""
        return self._path(local.checkpoint_dir(self.config["local"]["path"], self.size,
                                               self.seed, step))

    def save_initial(self, model: torch.nn.Module) -> Path | None:
        """Write step 0's checkpoint (and a ``trainer_state.json`` naming step 0) at
        ``local.path`` unless it exists: the workflow reads it for the Conjecture reference."""
        folder = self.checkpoint(0)
        if folder.exists():
            return None
        with torch.no_grad():
            save_checkpoint(copy.deepcopy(model).to("cpu"), folder)
        (folder / local.TRAINER_STATE).write_text('{"global_step": 0}\n')
        return folder

    def _copy(self, model: torch.nn.Module) -> torch.nn.Module:
        ex = self.config["extraction"]
        twin = copy.deepcopy(model)
        twin.zero_grad(set_to_none=True)
        twin.to(device=resolve_device(ex["device"]), dtype=DTYPES[ex["dtype"]])
        twin.set_attn_implementation(ex["attention_implementation"])
        return twin.eval().requires_grad_(True)

    def _init_weights(self, model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
        if self.init is None:
            if step == 0:
                source = model
            else:  # the step-0 checkpoint the run kept
                source = load_model(self.checkpoint(0), family=families.for_model(model).name)
            self.init = {n: p.detach().to("cpu", torch.float32, copy=True)
                         for n, p in source.named_parameters()}
        return self.init

    def record(self, model: torch.nn.Module, step: int) -> Path:
        """Write the store of ``model`` at training step ``step``; returns its path."""
        cfg, ex = self.config, self.config["extraction"]
        if ex["gradient_protocol"] != "eval_batch":
            raise ValueError("config key 'extraction.gradient_protocol': recording takes the "
                             "gradient on the eval batch; allowed: eval_batch")
        with preserved_rng():
            twin = self._copy(model)
            fam = families.for_model(twin)
            conj = cfg["conjecture"]
            stats = refs = None
            if conj["enabled"]:
                stats = StatsOptions.from_config(self.store(step), conj, seed=cfg["seed"])
                refs = LiveReference(self._init_weights(model, step),
                                     twin.config.hidden_size, twin.config.num_attention_heads)
            out = extract_model(
                twin, fam, self.batch, self.store(step),
                eval_batch_source=cfg["eval_data"]["path"],
                tokens=cfg["tokens"], seed=cfg["seed"], size=self.size, step=int(step),
                model_name=f"local:{cfg['local']['path']}", revision=f"step{int(step)}",
                dtype=ex["dtype"], micro_batch=ex["micro_batch"] or None,
                sampling=cfg["sampling"]["protocol"],
                attention_activation=ex["attention_activation"],
                attention_implementation=ex["attention_implementation"],
                gradient_protocol="eval_batch", gradient_batches=None, stats=stats, refs=refs,
                replicate=self.seed, grad_sub_batches=ex["grad_sub_batches"],
                checkpoint_attrs={"weights_sha256": parameters_sha256(twin),
                                  "recorded": "during training (lmdynamics.record)"})
            del twin
        return out


def record_step(model: torch.nn.Module, step: int, *,
                config: Mapping[str, Any] | Path | str | None = None,
                size: str, seed: int = 0, workdir: Path | str = ".",
                recorder: Recorder | None = None) -> Path:
    """Write the store of ``model`` at step ``step`` (a hand-written training loop).

    Call it after the optimizer step that completes ``step`` updates (step 0: before the
    first). ``config``: the workflow config (``source: local``, ``local.recorded``,
    ``eval_data``); pass the same ``recorder`` (a :class:`Recorder`) on every call to read
    the eval batch and the step-0 weights once. Returns the store's path.
    """
    recorder = recorder or Recorder(config, size=size, seed=seed, workdir=workdir)
    return recorder.record(model, step)


class TrainerCallback(transformers.TrainerCallback):
    """Records steps of a transformers ``Trainer`` run (:class:`Recorder`).

    Records step 0 at the start of training (and saves its checkpoint at ``local.path``
    when ``save_initial``), then after each optimizer step whose number is in ``steps``
    (default: the config's ``steps`` when it lists them), a multiple of ``every``, or the
    last (``max_steps``). ``Trainer`` checkpoints (``save_steps``) are separate: keep only
    the final one (``save_steps`` = ``max_steps``) and the recorded stores stand in for the
    rest.
    """

    def __init__(self, config: Mapping[str, Any] | Path | str, *, size: str, seed: int = 0,
                 steps: Iterable[int] | None = None, every: int | None = None,
                 save_initial: bool = True, workdir: Path | str = "."):
        self.recorder = Recorder(config, size=size, seed=seed, workdir=workdir)
        listed = self.recorder.config["steps"]
        self.steps = set(steps if steps is not None else
                         listed if isinstance(listed, list) else ())
        if every is not None and every < 1:
            raise ValueError(f"every={every}: allowed a positive number of steps")
        self.every, self.save_initial = every, save_initial
        self.recorded: list[Path] = []

    def _wanted(self, step: int, last: int) -> bool:
        return (step in self.steps or step == last
                or (self.every is not None and step % self.every == 0))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            if self.save_initial:
                self.recorder.save_initial(model)
            self.recorded.append(self.recorder.record(model, 0))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._wanted(state.global_step, state.max_steps):
            self.recorded.append(self.recorder.record(model, state.global_step))
