"""Checkpoints of your own training run, read in place from disk (config ``source: local``).

A checkpoint is a Hugging Face model folder (``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``, the files :func:`lmdynamics.sources.checkpoints.load_model` reads),
located by the path template ``local.path`` with ``{size}``, ``{seed}`` and ``{step}``
(e.g. ``runs/{size}/checkpoint-{step}``, as transformers' ``Trainer`` names them). Nothing
here copies, moves, writes or deletes a checkpoint.

A run may still be training: a folder is complete (:func:`completeness`) when its weights
file is whole (a safetensors header whose tensors end exactly at the end of the file; a
``.bin`` zip archive whose central directory reads) and either the Trainer's
``trainer_state.json`` (written after the weights) names the folder's step, or no file of it
has changed for ``local.settle_seconds``. An extraction job waits up to
``local.wait_seconds`` for that and otherwise fails in one line (:func:`wait_complete`);
discovery (:func:`discover_steps`) lists complete folders only.

The stores the recording callback wrote during training (:mod:`lmdynamics.record`, template
``local.recorded``) stand in for the steps whose checkpoints were not kept.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmdynamics.options import defaults

#: The Trainer's record of a checkpoint's step, written after its weights.
TRAINER_STATE = "trainer_state.json"
#: Weight files a local checkpoint may hold (those :func:`~lmdynamics.sources.checkpoints.
#: weights_path` reads), in the order it prefers them.
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
#: Fields a template may use.
FIELDS = ("size", "seed", "step")


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder is still being written (or was left half-written)."""


class LocalRunError(ValueError):
    """A ``source: local`` configuration does not match what is on disk."""


def template_fields(template: str, key: str = "local.path") -> list[str]:
    """The ``{field}`` names of a path template (config key ``key``), refusing any but
    :data:`FIELDS` and any other brace (``str.format`` would fail on a stray one, or read
    ``{{step}}`` as the text ``{step}``)."""
    names = re.findall(r"\{([^{}]*)\}", template)
    bad = [n for n in names if n not in FIELDS]
    if bad:
        raise LocalRunError(f"config key '{key}': {template!r} has {{{bad[0]}}}; allowed "
                            "fields: {size}, {seed}, {step}")
    if re.search(r"[{}]", re.sub(r"\{[^{}]*\}", "", template)):
        raise LocalRunError(f"config key '{key}': {template!r} has a stray brace; allowed: "
                            "braces only around the fields {size}, {seed}, {step}")
    return names


def checkpoint_dir(template: str, size: str, seed: int | str, step: int | str) -> Path:
    """The checkpoint folder of one (size, seed, step)."""
    return Path(template.format(size=size, seed=int(seed), step=int(step)))


def recorded_store(template: str, size: str, seed: int | str, step: int | str) -> Path:
    """The store the recording callback wrote for one (size, seed, step)."""
    return Path(template.format(size=size, seed=int(seed), step=int(step)))


def _glob(template: str, size: str, seed: int) -> dict[int, Path]:
    """Every existing path the template gives for (size, seed), by step."""
    fixed = template.replace("{size}", size).replace("{seed}", str(seed))
    head, sep, tail = fixed.partition("{step}")
    if not sep:
        raise LocalRunError(f"config key 'local.path': {template!r} has no {{step}}; allowed: "
                            "a template such as 'runs/{size}/checkpoint-{step}'")
    parent, slash, name_head = head.rpartition("/")
    base = Path(parent or "/") if slash else Path(".")
    # a later {step} in the template is the same number (a backreference)
    pattern = re.compile(re.escape(name_head) + r"(0|[1-9][0-9]{0,9})"
                         + r"\1".join(map(re.escape, tail.split("{step}"))) + r"\Z")
    found: dict[int, Path] = {}
    if not base.is_dir():
        return found
    for path in base.glob("/".join(["*"] * (1 + tail.count("/")))):
        m = pattern.match(path.relative_to(base).as_posix())
        if m:
            found[int(m.group(1))] = path
    return found


def discover_steps(template: str, size: str, seed: int, *,
                   settle_seconds: float | None = None,
                   now: float | None = None) -> list[int]:
    """Steps whose checkpoint folder exists and is complete (:func:`completeness`);
    ``settle_seconds`` None: config ``local.settle_seconds``'s default."""
    if settle_seconds is None:
        settle_seconds = defaults("local")["settle_seconds"]
    return sorted(step for step, path in _glob(template, size, seed).items()
                  if path.is_dir() and completeness(path, step, settle_seconds, now=now)[0])


def discover_recorded(template: str, size: str, seed: int) -> list[int]:
    """Steps whose recorded store exists (a finished store: :mod:`lmdynamics.store` writes
    them atomically, so an existing one is whole)."""
    return sorted(step for step, path in _glob(template, size, seed).items() if path.is_dir())


def weight_file(directory: Path | str) -> Path | None:
    """The checkpoint's weights file (:data:`WEIGHT_NAMES`), or None."""
    for name in WEIGHT_NAMES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def safetensors_whole(path: Path) -> str | None:
    """None when ``path``'s header parses and its last tensor ends at the end of the file;
    else why not (a safetensors file is an 8-byte little-endian header length, a JSON header
    of tensor byte ranges, then the data)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            return f"header length {n} exceeds the file's {size} bytes"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not complete JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    except (TypeError, ValueError, IndexError, KeyError):
        return "a tensor's data_offsets is not a [begin, end] pair of integers"
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"the header's tensors end at byte {expected}, the file has {size}"
    return None


def bin_whole(path: Path) -> str | None:
    """None when the ``.bin`` zip archive's central directory reads (written last)."""
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"not a whole zip archive ({exc})"
    return None


def _trainer_step(directory: Path) -> int | None:
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
        return int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def completeness(directory: Path | str, step: int, settle_seconds: float,
                 now: float | None = None) -> tuple[bool, str]:
    """Whether a checkpoint folder is complete, and if not why (one phrase).

    Complete: ``config.json`` and a whole weights file (:func:`safetensors_whole`,
    :func:`bin_whole`), and either ``trainer_state.json`` names ``step`` or no file in the
    folder was modified in the last ``settle_seconds``. A folder removed or rewritten while
    it is read (a Trainer's ``save_total_limit`` rotating checkpoints) is not complete.
    """
    try:
        return _completeness(Path(directory), step, settle_seconds, now)
    except FileNotFoundError as err:
        return False, f"a file went away while it was read ({err.filename})"


def _completeness(directory: Path, step: int, settle_seconds: float,
                  now: float | None) -> tuple[bool, str]:
    if not (directory / "config.json").is_file():
        return False, "no config.json yet"
    weights = weight_file(directory)
    if weights is None:
        return False, f"no weights file yet ({', '.join(WEIGHT_NAMES)})"
    broken = (safetensors_whole if weights.suffix == ".safetensors" else bin_whole)(weights)
    if broken:
        return False, f"{weights.name} is not whole: {broken}"
    if _trainer_step(directory) == int(step):
        return True, "trainer_state.json names the step"
    newest = max(p.stat().st_mtime for p in directory.iterdir() if p.is_file())
    age = (time.time() if now is None else now) - newest
    if age < settle_seconds:
        return False, (f"modified {age:.0f} s ago, less than local.settle_seconds "
                       f"{settle_seconds:g} (and no {TRAINER_STATE} naming step {step})")
    return True, f"unchanged for {age:.0f} s"


def wait_complete(directory: Path | str, step: int, *,
                  settle_seconds: float, wait_seconds: float, poll: float = 2.0) -> str:
    """Return once the folder is complete (why it is); after ``wait_seconds`` raise
    :class:`IncompleteCheckpointError` saying what is missing and what to do."""
    deadline = time.monotonic() + wait_seconds
    while True:
        ok, why = completeness(directory, step, settle_seconds)
        if ok:
            return why
        if time.monotonic() >= deadline:
            raise IncompleteCheckpointError(
                f"{directory}: checkpoint of step {step} is not complete ({why}); not read. "
                f"Rerun once it is written, or raise local.wait_seconds ({wait_seconds:g})")
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def fingerprint(directory: Path | str) -> dict[str, Any]:
    """Store attrs identifying a local checkpoint: ``checkpoint_path`` (absolute),
    ``checkpoint_sha256``, ``checkpoint_bytes`` and ``checkpoint_mtime`` (ISO 8601, UTC) of
    its weights file."""
    from datetime import UTC, datetime

    from lmdynamics.store import file_sha256

    weights = weight_file(directory)
    if weights is None:
        raise FileNotFoundError(f"{directory}: no weights file; expected one of "
                                f"{', '.join(WEIGHT_NAMES)}")
    st = weights.stat()
    return {"checkpoint_path": str(Path(directory).resolve()),
            "checkpoint_file": weights.name,
            "checkpoint_sha256": file_sha256(weights),
            "checkpoint_bytes": int(st.st_size),
            "checkpoint_mtime": datetime.fromtimestamp(st.st_mtime, UTC).isoformat()}


def section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``local`` section with the schema's defaults filled in."""
    return {**defaults("local"), **(config.get("local") or {})}


def seeds_of(config: Mapping[str, Any]) -> list[int]:
    return sorted(config.get("seeds") or [0])


def available_steps(config: Mapping[str, Any], size: str, seed: int) -> list[int]:
    """Steps of (size, seed) on disk: complete checkpoint folders and recorded stores."""
    local = section(config)
    steps = set(discover_steps(local["path"], size, seed,
                               settle_seconds=local["settle_seconds"]))
    if local.get("recorded"):
        steps |= set(discover_recorded(local["recorded"], size, seed))
    return sorted(steps)


def resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """``steps`` and ``final_step`` of a ``source: local`` config, read from disk where the
    config leaves them to it (``steps: discover``: the steps every (size, seed) has; an unset
    ``final_step``: the largest of them), and ``family`` from the checkpoints' ``config.json``
    when unset. Empty for other sources. Raises :class:`LocalRunError` in one line."""
    if config.get("source") != "local":
        return {}
    local = section(config)
    template_fields(local["path"])
    out: dict[str, Any] = {}
    steps = config["steps"]
    if steps == "discover":
        common: set[int] | None = None
        for size in config["sizes"]:
            for seed in seeds_of(config):
                found = set(available_steps(config, size, seed))
                common = found if common is None else common & found
        steps = sorted(common or ())
        if config.get("final_step") is not None:
            steps = [s for s in steps if s <= config["final_step"]]
        if len(steps) < 2:
            raise LocalRunError(
                f"config key 'steps': discover found {len(steps)} complete step(s) common to "
                f"every size and seed under {local['path']!r}"
                f"{' and ' + repr(local['recorded']) if local.get('recorded') else ''}; "
                "allowed: at least two (check local.path, or wait for the run)")
        out["steps"] = steps
    final = config.get("final_step")
    if final is None:
        out["final_step"] = max(steps)
    if config.get("family") is None:
        out["family"] = checkpoint_family(config, out.get("final_step", final))
    return out


def checkpoint_family(config: Mapping[str, Any], step: int) -> str:
    """The model family of the run's checkpoints (the first size and seed's checkpoint of
    ``step``, else any of its checkpoints), from its ``config.json``."""
    from lmdynamics.sources.checkpoints import config_family, read_model_config

    local = section(config)
    size, seed = config["sizes"][0], seeds_of(config)[0]
    candidates = [checkpoint_dir(local["path"], size, seed, step),
                  *_glob(local["path"], size, seed).values()]
    for folder in candidates:
        if (folder / "config.json").is_file():
            try:
                return config_family(read_model_config(folder)).name
            except Exception as exc:
                raise LocalRunError(f"{folder / 'config.json'}: {exc}; set config key "
                                    "'family' or train a family lmdynamics has an adapter "
                                    "for (src/lmdynamics/families/)") from exc
    raise LocalRunError(f"config key 'local.path': no checkpoint folder with a config.json "
                        f"for size {size!r} seed {seed} under {local['path']!r}; allowed: a "
                        "template naming your run's checkpoint folders")


def errors(config: Mapping[str, Any]) -> list[str]:
    """The checks :func:`lmdynamics.config.semantic_errors` makes of a ``source: local``
    config (steps resolved from disk where asked for)."""
    local = config.get("local") or {}
    if not local.get("path"):
        return ["config key 'local.path': missing; allowed: a checkpoint folder template "
                "with {step} (and {size}, {seed}), e.g. 'runs/{size}/checkpoint-{step}'"]
    if not (config.get("eval_data") or {}).get("path"):
        return ["config key 'eval_data.path': unset; allowed: a local .npy / .bin token file "
                "or a text file (source local has no public training batch)"]
    try:
        template_fields(local["path"])
        if local.get("recorded"):
            if "{step}" not in local["recorded"]:
                return [f"config key 'local.recorded': {local['recorded']!r} has no {{step}}; "
                        "allowed: a template such as 'runs/{size}/lmdynamics/step{step}.zarr'"]
            template_fields(local["recorded"], "local.recorded")
        if len(seeds_of(config)) > 1 and "{seed}" not in local["path"]:
            return [f"config key 'local.path': {local['path']!r} has no {{seed}} but seeds "
                    f"lists {len(seeds_of(config))} replicates; allowed: a template with "
                    "{seed}, or one seed"]
        if len(config["sizes"]) > 1 and "{size}" not in local["path"]:
            return [f"config key 'local.path': {local['path']!r} has no {{size}} but sizes "
                    f"lists {len(config['sizes'])}; allowed: a template with {{size}}"]
        resolved = {**config, **resolve(config)}
    except LocalRunError as exc:
        return [str(exc)]
    steps, final = resolved["steps"], resolved["final_step"]
    out = []
    if final not in steps:
        out.append(f"config key 'final_step': {final} is not among the steps "
                   f"{sorted(steps)[:30]}; allowed: one of them (the CKA reference)")
    return out


#: Store attrs a recorded store must share with the extraction options of the workflow:
#: (attr, how the options give it).
ADOPT_CHECKS = (
    ("token_seed", lambda o: o["seed"]),
    ("sampling_protocol", lambda o: o["sampling"]["protocol"]),
    ("dtype", lambda o: o["extraction"]["dtype"]),
    ("attention_activation", lambda o: o["extraction"]["attention_activation"]),
    ("attention_implementation", lambda o: o["extraction"]["attention_implementation"]),
    ("gradient_protocol", lambda o: o["extraction"]["gradient_protocol"]),
)


def adopt_recorded(store: Path | str, eval_batch: Path | str, out: Path | str, *, size: str,
                   step: int, replicate: int, opts: Mapping[str, Any],
                   statistics: bool) -> Path:
    """Copy a store the recording callback wrote (:mod:`lmdynamics.record`) to ``out``, the
    place of the store the workflow would have extracted, after checking that it is whole
    (:func:`lmdynamics.store.verify_store`), of this size, seed and step, of this eval batch
    (its sha256) and of these extraction options (``opts``: sections tokens, seed,
    extraction, sampling) and with the Conjecture statistics exactly when ``statistics``;
    otherwise one line says what differs. The recorded
    store is left in place."""
    import hashlib
    import shutil

    import numpy as np

    from lmdynamics.store import atomic_path, load_token_array, open_store, verify_store

    store = Path(store)
    verify_store(store)
    with open_store(store) as ds:
        attrs, n_tokens = dict(ds.attrs), ds.sizes.get("token")
        stats = any(str(v).startswith("stat_") for v in ds.data_vars)
    batch = load_token_array(eval_batch, ndim=2, what="eval batch (sequences, positions)")
    sha = hashlib.sha256(np.ascontiguousarray(batch, dtype=np.int64).tobytes()).hexdigest()
    want = {"size": size, "step": int(step), "seed": int(replicate), "eval_batch_sha256": sha,
            **{name: get(opts) for name, get in ADOPT_CHECKS}}
    wrong = [f"{k} {attrs.get(k)!r} (the workflow's: {v!r})" for k, v in want.items()
             if attrs.get(k) != v]
    if n_tokens != opts["tokens"]:
        wrong.append(f"{n_tokens} tokens (the workflow's: {opts['tokens']})")
    if stats != statistics:
        wrong.append(f"Conjecture statistics {'present' if stats else 'absent'} (the "
                     f"workflow's conjecture.enabled: {statistics})")
    sub = opts["extraction"]["grad_sub_batches"]
    if opts["extraction"]["gradient_protocol"] == "eval_batch" and \
            attrs.get("grad_sub_batches", 0) != (min(sub, batch.shape[0]) if sub > 1 else 0):
        wrong.append(f"grad_sub_batches {attrs.get('grad_sub_batches', 0)} (the workflow's: "
                     f"{sub})")
    if wrong:
        raise LocalRunError(f"{store}: recorded with other settings than this workflow's: "
                            f"{'; '.join(wrong)}; record again with this config, or remove "
                            "the step from steps")
    with atomic_path(out) as tmp:
        shutil.copytree(store, tmp)
    return Path(out)
