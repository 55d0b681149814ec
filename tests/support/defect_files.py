"""Hub repos that serve what the suites' own trackers report, written from those reports.

Each builder publishes, on the loopback hub (tests/hub_server.py), revisions in the format of
the real repository (tests/pythia_files.py: transformers 4.x names, float16) whose *pattern
of content* is the one a public issue documents; the weights themselves are synthetic:

- :func:`add_pythia_205` (EleutherAI/pythia #205, pythia-2.8b): ``main`` and 76 step branches
  (step0, 1, 2, 4, ..., 512; every 1000 from 1000 through 53000; 55000, 60000, 65000, 70000,
  80000, 90000, 100000, 103000, 110000, 120000, 130000, 140000) serve one
  ``model.safetensors`` blob ("LFS sha256 of model.safetensors, via the HF API"); a second
  blob is served by the ten branches 54000, 56000-59000, 61000-64000 and step143000; every
  other branch has its own file. ``main`` and step143000 differ ("The two blobs differ
  somewhere outside the embedding ranges").
- :func:`add_pythia_206` (#206, pythia-12b): revisions sharded in three pickles
  ``pytorch_model-0000k-of-00003.bin`` with ``pytorch_model.bin.index.json`` (first shard:
  ``embed_in`` and the early layers; third: ``embed_out``); step50000 and step58000 serve the
  final checkpoint's first shard byte for byte, "shards 2-3 ... are unique per branch".
- :func:`add_missing_weights` (#202, PolyPythias): a step branch that exists but lists no
  weights ("pythia-410m-seed9@step40000 ... are missing weights on HF").

Genuine revisions follow a trajectory, so that CKA and the content audit's distance and cosine
statistics behave as in training: the weights of step ``s`` are
``(1 - t) W_init + t W_final + noise`` with ``t = (s / final) ** p`` and a small per-step noise
(every revision's bytes differ), all seeded; ``p`` grows with depth (0.15 for the first
block's tensors to 1.2 for the last, 0.5 outside the blocks), so that early layers converge
before late ones and Table 1 has something to measure. These are synthetic values, not a
claim about any real model.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors.torch
import torch

from support.pythia_files import legacy_state_dict, pythia_config, torch_bytes

#: #205's branches serving main's blob (the issue's list).
MAIN_BLOB_STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(1000, 54000, 1000),
                   55000, 60000, 65000, 70000, 80000, 90000, 100000, 103000, 110000, 120000,
                   130000, 140000)
#: #205's branches serving the second blob, with step143000.
SECOND_BLOB_STEPS = (54000, 56000, 57000, 58000, 59000, 61000, 62000, 63000, 64000, 143000)
#: #206's branches serving the final checkpoint's first shard.
SHARD_STEPS_206 = (50000, 58000)
FINAL = 143000
#: Test shapes (hidden, layers, heads): tiny, GPT-NeoX-shaped.
SHAPES = {"2.8b": (32, 6, 4), "12b": (24, 3, 2), "410m": (16, 2, 2), "70m": (16, 6, 2)}


def _speed(name: str, layers: int) -> float:
    """The exponent ``p`` of a tensor (module docstring)."""
    parts = name.split(".")
    if "layers" not in parts:
        return 0.5
    depth = (int(parts[parts.index("layers") + 1]) + 1) / layers
    return 0.15 + 1.05 * (depth - 1 / layers) / max(1 - 1 / layers, 1e-9)


def trajectory_state(size: str, step: int, vocab: int, *, final: int = FINAL,
                     noise: float = 0.002) -> dict[str, torch.Tensor]:
    """Legacy-named float16 tensors of ``size`` at ``step`` on a seeded trajectory from an
    initialisation to a final model (module docstring); the persisted buffers are those of
    ``legacy_state_dict``."""
    hidden, layers, heads = SHAPES[size]
    init = legacy_state_dict(hidden, layers, heads, vocab, seed=11)
    end = legacy_state_dict(hidden, layers, heads, vocab, seed=12)
    rng = np.random.default_rng(100_000 + step)
    out = {}
    for name, w0 in init.items():
        if not w0.is_floating_point() or name.endswith(("masked_bias", "inv_freq")):
            out[name] = w0
            continue
        t = float((step / final) ** _speed(name, layers))
        w = (1 - t) * w0.float() + t * end[name].float()
        w += torch.from_numpy(rng.normal(0.0, noise, tuple(w.shape)).astype(np.float32))
        out[name] = w.to(torch.float16)
    return out


def _config(size: str, vocab: int) -> bytes:
    hidden, layers, heads = SHAPES[size]
    return json.dumps(pythia_config(hidden, layers, heads, vocab), indent=2,
                      sort_keys=True).encode() + b"\n"


def add_pythia_205(hub, steps: list[int], *, vocab: int, size: str = "2.8b",
                   repo: str = "EleutherAI/pythia-2.8b") -> dict[str, list[int]]:
    """Publish ``repo`` with the branches ``steps`` and ``main`` in #205's pattern (module
    docstring). Returns the planned steps of each blob: ``{"main": [...], "second": [...]}``."""
    config = _config(size, vocab)

    def files(state):
        return {"config.json": config,
                "model.safetensors": safetensors.torch.save(state, metadata={"format": "pt"})}

    # final-era content, close to step143000's but not its bytes
    main = files(trajectory_state(size, FINAL, vocab, noise=0.004))
    second = files(trajectory_state(size, FINAL, vocab))
    for step in steps:
        if step in MAIN_BLOB_STEPS:
            hub.add_model(repo, f"step{step}", main)
        elif step in SECOND_BLOB_STEPS:
            hub.add_model(repo, f"step{step}", second)
        else:
            hub.add_model(repo, f"step{step}", files(trajectory_state(size, step, vocab)))
    hub.add_model(repo, "main", main)
    return {"main": [s for s in steps if s in MAIN_BLOB_STEPS],
            "second": [s for s in steps if s in SECOND_BLOB_STEPS]}


def first_shard(name: str) -> bool:
    """Whether tensor ``name`` is in #206's first shard: embed_in and the early layers (layer
    0 here)."""
    return name.startswith(("gpt_neox.embed_in.", "gpt_neox.layers.0."))


def sharded_files(size: str, state: dict[str, torch.Tensor], vocab: int,
                  first: bytes | None = None) -> dict[str, bytes]:
    """Three pickled shards and their index, ``embed_in`` and layer 0 in the first,
    ``embed_out`` in the third; ``first`` replaces the first shard's bytes."""
    last = SHAPES[size][1] - 1
    parts: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for name, tensor in state.items():
        k = 0 if first_shard(name) else (2 if name.startswith(
            ("embed_out.", "gpt_neox.final_layer_norm.", f"gpt_neox.layers.{last}.")) else 1)
        parts[k][name] = tensor
    names = [f"pytorch_model-{k:05d}-of-00003.bin" for k in (1, 2, 3)]
    files = {"config.json": _config(size, vocab)}
    for k, (name, part) in enumerate(zip(names, parts, strict=True)):
        files[name] = first if k == 0 and first is not None else torch_bytes(part)
    weight_map = {t: names[k] for k, part in enumerate(parts) for t in part}
    total = sum(t.numel() * t.element_size() for t in state.values())
    files["pytorch_model.bin.index.json"] = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    return files


def add_pythia_206(hub, steps: list[int], *, vocab: int, size: str = "12b",
                   repo: str = "EleutherAI/pythia-12b") -> None:
    """Publish ``repo`` with sharded branches ``steps`` and ``main`` (= step143000) in #206's
    pattern: :data:`SHARD_STEPS_206` serve the final checkpoint's first shard."""
    final = sharded_files(size, trajectory_state(size, FINAL, vocab), vocab)
    first = final["pytorch_model-00001-of-00003.bin"]
    for step in steps:
        if step == FINAL:
            hub.add_model(repo, f"step{step}", final)
            continue
        state = trajectory_state(size, step, vocab)
        hub.add_model(repo, f"step{step}", sharded_files(
            size, state, vocab, first=first if step in SHARD_STEPS_206 else None))
    hub.add_model(repo, "main", final)


def add_missing_weights(hub, repo: str, steps: list[int], missing: int, *, vocab: int,
                        size: str = "410m") -> None:
    """Publish ``repo`` (a PolyPythias seed repo) with branches ``steps``; the branch of
    ``missing`` holds ``config.json`` but no weights (#202); ``main`` holds only
    ``.gitattributes`` (shared/notes/reference-facts.md: "the main branch holds only
    .gitattributes")."""
    for step in steps:
        files = {"config.json": _config(size, vocab)}
        if step != missing:
            files["model.safetensors"] = safetensors.torch.save(
                trajectory_state(size, step, vocab), metadata={"format": "pt"})
        hub.add_model(repo, f"step{step}", files)
    hub.add_model(repo, "main", {".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs\n"})


def add_genuine(hub, steps: list[int], *, vocab: int, size: str = "70m",
                repo: str = "EleutherAI/pythia-70m") -> None:
    """Publish ``repo`` with the branches ``steps`` and ``main`` (= the final step), every
    revision its own point of the trajectory: a repo without defects beside the others."""
    config = _config(size, vocab)
    for step in [*steps, "main"]:
        state = trajectory_state(size, FINAL if step == "main" else step, vocab)
        hub.add_model(repo, "main" if step == "main" else f"step{step}",
                      {"config.json": config, "model.safetensors": safetensors.torch.save(
                          state, metadata={"format": "pt"})})
