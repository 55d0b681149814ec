"""Tests of lmdynamics.sources.local (config ``source: local``): path templates, discovery of
the complete checkpoint folders of a run that may still be training, the whole-file checks of
its weights, waiting for a folder, the checkpoint fingerprint and the config checks.

Fast: folders of a few small files in ``tmp_path``, mtimes set with :func:`os.utime` instead
of waiting, and a fake clock for :func:`~lmdynamics.sources.local.wait_complete`'s loop. The
end-to-end runs of the source are in ``tests/workflow/test_local_workflow.py`` and
``tests/test_record.py`` (slow).

Files are built from their written-down formats:

- safetensors (https://github.com/huggingface/safetensors, README "Format"): 8 bytes, a
  little-endian unsigned 64-bit integer N, the size of the header; N bytes, a UTF-8 JSON
  object mapping each tensor name to its ``dtype``, ``shape`` and ``data_offsets``
  ``[begin, end]`` (relative to the start of the byte buffer), with an optional
  ``"__metadata__"`` map of strings; then the byte buffer, which the tensors index entirely.
  Also written with the ``safetensors`` library itself (``safetensors.torch.save_file``).
- ``pytorch_model.bin``: ``torch.save``'s zip archive (PyTorch's default serialization since
  1.6), whose central directory is written last.
- ``trainer_state.json``: transformers' ``Trainer`` saves its ``TrainerState``
  (``transformers.trainer_callback.TrainerState``) there with ``global_step``, the step of
  the checkpoint, into folders named ``checkpoint-<global_step>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import safetensors.numpy
import safetensors.torch
import torch

import lmdynamics.store  # noqa: F401  (imported here, not inside fingerprint's first test)
from lmdynamics.sources import local
from lmdynamics.validation import LOCAL_TEMPLATE_PATTERN

#: A fixed past instant for mtimes (2020-09-13T12:26:40Z).
T0 = 1_600_000_000


# --- builders -------------------------------------------------------------------------------


def st_bytes(tensors: dict[str, tuple[str, list[int], bytes]],
             metadata: dict[str, str] | None = None, *, order: list[str] | None = None) -> bytes:
    """A safetensors file by the format: tensors laid out in the buffer in dict order, listed
    in the header in ``order`` (default: the same), header padded with spaces to 8 bytes as
    the library does."""
    entries, buffer = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        entries[name] = {"dtype": dtype, "shape": shape,
                         "data_offsets": [len(buffer), len(buffer) + len(data)]}
        buffer += data
    header = {name: entries[name] for name in (order or list(entries))}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + buffer


#: Two F32 tensors and one I64, the last in the buffer listed first in the header.
TENSORS = {"embed.weight": ("F32", [2, 3], struct.pack("<6f", *range(6))),
           "norm.bias": ("F32", [3], struct.pack("<3f", 1.0, 2.0, 3.0)),
           "steps": ("I64", [1], struct.pack("<q", 7))}
SPEC_FILE = st_bytes(TENSORS, {"format": "pt"}, order=["steps", "embed.weight", "norm.bias"])


def header_size(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def library_file() -> bytes:
    """A safetensors file written by the safetensors library."""
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "b": torch.ones(4, dtype=torch.float16)}
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def bin_file(path: Path) -> bytes:
    torch.save({"w": torch.arange(10, dtype=torch.float32)}, path)
    return path.read_bytes()


def set_mtimes(folder: Path, when: float) -> None:
    for p in folder.iterdir():
        os.utime(p, (when, when))


def checkpoint(folder: Path, step: int | None = None, *, weights: bytes = SPEC_FILE,
               name: str = "model.safetensors", mtime: float | None = None) -> Path:
    """A checkpoint folder as the Trainer writes it: config.json, the weights and (``step``
    given) trainer_state.json naming ``step``; ``mtime``: every file's."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "gpt_neox"}')
    (folder / name).write_bytes(weights)
    if step is not None:
        (folder / local.TRAINER_STATE).write_text(json.dumps(
            {"global_step": step, "epoch": 0.5, "log_history": []}))
    if mtime is not None:
        set_mtimes(folder, mtime)
    return folder


def half_written(folder: Path, step: int | None = None) -> Path:
    """A folder whose weights the Trainer is still writing (the file cut in its data)."""
    return checkpoint(folder, step, weights=SPEC_FILE[:-5])


def config(tmp_path: Path, **changes) -> dict:
    """A ``source: local`` config over ``tmp_path/runs`` (family given: no config.json read)."""
    out = {"source": "local", "sizes": ["s"], "seeds": [0], "steps": "discover",
           "final_step": None, "family": "gpt_neox",
           "local": {"path": f"{tmp_path}/runs/{{size}}/checkpoint-{{step}}"},
           "eval_data": {"path": str(tmp_path / "eval.npy")}}
    return {**out, **changes}


# --- templates ------------------------------------------------------------------------------


def test_template_fields_names_the_fields_in_order():
    assert local.template_fields("runs/{size}/seed{seed}/checkpoint-{step}") == \
        ["size", "seed", "step"]
    assert local.template_fields("runs/{step}/step{step}") == ["step", "step"]
    assert local.template_fields("runs/plain") == []


@pytest.mark.parametrize("template, field", [
    ("runs/{bogus}/checkpoint-{step}", "bogus"),
    ("runs/{}/checkpoint-{step}", ""),
    ("runs/{0}/checkpoint-{step}", "0"),
    ("runs/checkpoint-{step:06d}", "step:06d"),
    ("runs/checkpoint-{step!r}", "step!r"),
    ("runs/checkpoint-{STEP}", "STEP"),
    ("runs/checkpoint-{ step }", " step "),
])
def test_template_fields_refuses_unknown_fields(template, field):
    with pytest.raises(local.LocalRunError) as exc:
        local.template_fields(template)
    assert str(exc.value) == (f"config key 'local.path': {template!r} has {{{field}}}; "
                              "allowed fields: {size}, {seed}, {step}")


@pytest.mark.parametrize("template", [
    "runs/{step", "runs/step}/x", "runs/{{step}}", "runs/{size/checkpoint-{step}",
    "runs/{step}}", "runs/{{size}/checkpoint-{step}",
])
def test_template_fields_refuses_stray_braces(template):
    with pytest.raises(local.LocalRunError) as exc:
        local.template_fields(template)
    assert str(exc.value) == (f"config key 'local.path': {template!r} has a stray brace; "
                              "allowed: braces only around the fields {size}, {seed}, {step}")


def test_template_fields_names_the_config_key():
    with pytest.raises(local.LocalRunError, match=r"\Aconfig key 'local\.recorded': "):
        local.template_fields("runs/{bogus}/step{step}.zarr", "local.recorded")


@pytest.mark.parametrize("template", [
    "runs/{size}/checkpoint-{step}", "{step}", "runs/{seed}{size}{step}", "a/{step}/b{step}",
    "runs/{bogus}/{step}", "runs/{step", "runs/{{step}}", "runs/{step}}", "runs/{}{step}",
    "runs/{step:06d}", "x}{step}", "{size/{step}",
])
def test_template_fields_agrees_with_the_schema(template):
    """The config schema's pattern for local.path and local.recorded and template_fields
    accept the same templates with {step}."""
    try:
        local.template_fields(template)
        accepted = True
    except local.LocalRunError:
        accepted = False
    assert accepted == bool(re.match(LOCAL_TEMPLATE_PATTERN, template))


def test_checkpoint_dir_and_recorded_store_fill_the_fields():
    # Snakemake wildcards are strings: the folder is the Trainer's, without leading zeros
    assert local.checkpoint_dir("runs/{size}/seed{seed}/checkpoint-{step}", "70m", "01",
                                "0100") == Path("runs/70m/seed1/checkpoint-100")
    assert local.checkpoint_dir("/r/{size}/checkpoint-{step}", "70m", 3, 0) == \
        Path("/r/70m/checkpoint-0")
    assert local.recorded_store("runs/{size}/lmdynamics/s{seed}/step{step}.zarr", "1b", 2,
                                64) == Path("runs/1b/lmdynamics/s2/step64.zarr")
    with pytest.raises(ValueError):
        local.checkpoint_dir("runs/{step}", "s", 0, "latest")


# --- discovery ------------------------------------------------------------------------------


def test_discover_steps_lists_complete_trainer_folders_only(tmp_path):
    runs = tmp_path / "runs" / "s"
    old = time.time() - 3600
    for step in (0, 500, 1000):
        checkpoint(runs / f"checkpoint-{step}", step)
    half_written(runs / "checkpoint-1500", 1500)           # weights cut short
    half_written(runs / "checkpoint-1600")                 # ... and settled: still not whole
    set_mtimes(runs / "checkpoint-1600", old)
    checkpoint(runs / "tmp-checkpoint-2000", 2000)          # some Trainers' name while saving
    checkpoint(runs / "checkpoint-02500", 2500)             # not a name format gives
    checkpoint(runs / "checkpoint-3000.old", 3000)
    (runs / "checkpoint-3500").write_text("a file")
    checkpoint(runs / "checkpoint-4000")                    # no trainer state, just written
    checkpoint(runs / "checkpoint-4500", mtime=old)         # no trainer state, settled
    (runs / "checkpoint-5000").mkdir()                      # created, nothing in it yet
    template = f"{tmp_path}/runs/{{size}}/checkpoint-{{step}}"
    assert local.discover_steps(template, "s", 0) == [0, 500, 1000, 4500]
    assert local.discover_steps(template, "s", 0, settle_seconds=0) == [0, 500, 1000, 4000,
                                                                        4500]
    assert local.discover_steps(template, "other", 0) == []  # no folder of that size


def test_discover_steps_with_seed_and_nested_folders(tmp_path):
    template = f"{tmp_path}/runs/{{size}}/seed{{seed}}/step{{step}}/hf"
    for seed, step in [(0, 8), (0, 64), (1, 8)]:
        checkpoint(local.checkpoint_dir(template, "s", seed, step), step)
    checkpoint(tmp_path / "runs/s/seed0/step16/other", 16)  # not the template's leaf
    assert local.discover_steps(template, "s", 0) == [8, 64]
    assert local.discover_steps(template, "s", 1) == [8]


def test_discover_steps_with_the_step_twice(tmp_path):
    """A template naming the step twice matches only folders where both are the same."""
    template = f"{tmp_path}/runs/{{size}}/step{{step}}/checkpoint-{{step}}"
    for step in (8, 64):
        checkpoint(local.checkpoint_dir(template, "s", 0, step), step)
    checkpoint(tmp_path / "runs/s/step8/checkpoint-64", 64)  # the two numbers differ
    assert local.discover_steps(template, "s", 0) == [8, 64]


def test_discover_steps_with_relative_templates(tmp_path, monkeypatch):
    checkpoint(tmp_path / "runs/s/checkpoint-10", 10)
    checkpoint(tmp_path / "runs/s/checkpoint-20", 20)
    monkeypatch.chdir(tmp_path)
    assert local.discover_steps("runs/{size}/checkpoint-{step}", "s", 0) == [10, 20]
    monkeypatch.chdir(tmp_path / "runs/s")
    assert local.discover_steps("checkpoint-{step}", "s", 0) == [10, 20]


def test_discover_steps_needs_step_in_the_template(tmp_path):
    with pytest.raises(local.LocalRunError) as exc:
        local.discover_steps(f"{tmp_path}/runs/{{size}}", "s", 0)
    assert str(exc.value) == (f"config key 'local.path': '{tmp_path}/runs/{{size}}' has no "
                              "{step}; allowed: a template such as "
                              "'runs/{size}/checkpoint-{step}'")


def test_discover_steps_now_decides_settling(tmp_path):
    checkpoint(tmp_path / "runs/s/checkpoint-7", mtime=T0)
    template = f"{tmp_path}/runs/{{size}}/checkpoint-{{step}}"
    assert local.discover_steps(template, "s", 0, settle_seconds=60, now=T0 + 59) == []
    assert local.discover_steps(template, "s", 0, settle_seconds=60, now=T0 + 60) == [7]


def test_discover_recorded_lists_existing_stores(tmp_path):
    template = f"{tmp_path}/runs/{{size}}/lmdynamics/step{{step}}.zarr"
    for step in (0, 32):
        local.recorded_store(template, "s", 0, step).mkdir(parents=True)
    (tmp_path / "runs/s/lmdynamics/step64.zarr").write_text("not a store folder")
    (tmp_path / "runs/s/lmdynamics/step128.zarr.tmp-1").mkdir()
    assert local.discover_recorded(template, "s", 0) == [0, 32]


def test_available_steps_joins_checkpoints_and_recorded_stores(tmp_path):
    cfg = config(tmp_path)
    runs = tmp_path / "runs/s"
    checkpoint(runs / "checkpoint-100", 100)
    checkpoint(runs / "checkpoint-300")  # just written, no trainer state
    assert local.available_steps(cfg, "s", 0) == [100]
    cfg["local"]["settle_seconds"] = 0
    assert local.available_steps(cfg, "s", 0) == [100, 300]
    cfg["local"]["recorded"] = f"{tmp_path}/runs/{{size}}/lmdynamics/step{{step}}.zarr"
    for step in (100, 200):
        (runs / f"lmdynamics/step{step}.zarr").mkdir(parents=True)
    assert local.available_steps(cfg, "s", 0) == [100, 200, 300]


def test_resolve_discovers_the_steps_every_size_and_seed_has(tmp_path):
    template = f"{tmp_path}/runs/{{size}}/seed{{seed}}/checkpoint-{{step}}"
    cfg = config(tmp_path, sizes=["70m", "160m"], seeds=[1, 0])
    cfg["local"]["path"] = template
    for size in ("70m", "160m"):
        for seed in (0, 1):
            for step in (0, 100, 200):
                checkpoint(local.checkpoint_dir(template, size, seed, step), step)
    checkpoint(local.checkpoint_dir(template, "70m", 0, 300), 300)
    checkpoint(local.checkpoint_dir(template, "70m", 1, 300), 300)
    checkpoint(local.checkpoint_dir(template, "160m", 0, 300), 300)
    half_written(local.checkpoint_dir(template, "160m", 1, 300), 300)
    assert local.resolve(cfg) == {"steps": [0, 100, 200], "final_step": 200}
    # the last folder written: step 300 is then every size's and seed's
    checkpoint(local.checkpoint_dir(template, "160m", 1, 300), 300)
    assert local.resolve(cfg) == {"steps": [0, 100, 200, 300], "final_step": 300}


def test_resolve_keeps_a_given_final_step(tmp_path):
    for step in (0, 100, 200, 300):
        checkpoint(tmp_path / f"runs/s/checkpoint-{step}", step)
    assert local.resolve(config(tmp_path, final_step=200)) == {"steps": [0, 100, 200]}
    assert local.resolve(config(tmp_path, final_step=250)) == {"steps": [0, 100, 200]}
    assert local.resolve(config(tmp_path, steps=[0, 100, 300])) == {"final_step": 300}
    assert local.resolve(config(tmp_path, steps=[0, 100], final_step=100)) == {}


def test_resolve_needs_two_steps(tmp_path):
    checkpoint(tmp_path / "runs/s/checkpoint-100", 100)
    half_written(tmp_path / "runs/s/checkpoint-200", 200)
    cfg = config(tmp_path)
    with pytest.raises(local.LocalRunError) as exc:
        local.resolve(cfg)
    assert str(exc.value) == (
        "config key 'steps': discover found 1 complete step(s) common to every size and seed "
        f"under {cfg['local']['path']!r}; allowed: at least two (check local.path, or wait "
        "for the run)")


def test_resolve_other_sources_and_bad_templates(tmp_path):
    assert local.resolve({"source": "hub", "steps": "discover"}) == {}
    assert local.resolve({"source": "tiny"}) == {}
    with pytest.raises(local.LocalRunError, match=re.escape("has {bogus};")):
        local.resolve(config(tmp_path, local={"path": f"{tmp_path}/{{bogus}}/{{step}}"}))


# --- whole weight files ---------------------------------------------------------------------


def test_spec_builder_is_read_by_the_safetensors_library():
    """The hand-built file is a safetensors file (the library reads the tensors back)."""
    loaded = safetensors.numpy.load(SPEC_FILE)
    assert loaded["embed.weight"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert loaded["norm.bias"].tolist() == [1, 2, 3]
    assert loaded["steps"].tolist() == [7]
    assert header_size(SPEC_FILE) % 8 == 0


@pytest.mark.parametrize("maker", [lambda: SPEC_FILE, library_file], ids=["spec", "library"])
def test_safetensors_whole_file(tmp_path, maker):
    path = tmp_path / "model.safetensors"
    path.write_bytes(maker())
    assert local.safetensors_whole(path) is None


CUTS = {  # where a file is cut: (header size n, whole size) -> length kept
    "empty": lambda n, size: 0,
    "inside the length prefix": lambda n, size: 5,
    "length prefix only": lambda n, size: 8,
    "inside the header": lambda n, size: 8 + n // 2,
    "last header byte missing": lambda n, size: 8 + n - 1,
    "header, no data": lambda n, size: 8 + n,
    "inside the data": lambda n, size: 8 + n + (size - 8 - n) // 2,
    "last byte missing": lambda n, size: size - 1,
}


@pytest.mark.parametrize("maker", [lambda: SPEC_FILE, library_file], ids=["spec", "library"])
@pytest.mark.parametrize("cut", list(CUTS))
def test_safetensors_truncated_is_not_whole(tmp_path, maker, cut):
    data = maker()
    n, size = header_size(data), len(data)
    kept = CUTS[cut](n, size)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[:kept])
    if kept < 8:
        want = f"{kept} bytes, shorter than a safetensors header"
    elif kept < 8 + n:
        want = f"header length {n} exceeds the file's {kept} bytes"
    else:
        want = f"the header's tensors end at byte {size}, the file has {kept}"
    assert local.safetensors_whole(path) == want


def test_safetensors_with_trailing_bytes_is_not_whole(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(SPEC_FILE + b"\0")
    assert local.safetensors_whole(path) == \
        f"the header's tensors end at byte {len(SPEC_FILE)}, the file has {len(SPEC_FILE) + 1}"


@pytest.mark.parametrize("header, why", [
    (b"{not json", "header is not complete JSON"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', "header is not complete "
     "JSON"),
    (b'{"\xff": {}}', "header is not complete JSON"),  # not UTF-8
    (b"", "header is not complete JSON"),
    (b"[1, 2]", "header is not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": 4}}',
     "a tensor's data_offsets is not a [begin, end] pair of integers"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}',
     "a tensor's data_offsets is not a [begin, end] pair of integers"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "x"]}}',
     "a tensor's data_offsets is not a [begin, end] pair of integers"),
])
def test_safetensors_bad_header(tmp_path, header, why):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert local.safetensors_whole(path) == why


def test_safetensors_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    assert local.safetensors_whole(path) == f"header length {2**64 - 1} exceeds the file's 10 bytes"


def test_safetensors_metadata_only_file_is_whole(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(st_bytes({}, {"format": "pt"}))
    assert local.safetensors_whole(path) is None


def test_bin_whole(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    data = bin_file(path)
    assert zipfile.is_zipfile(path)  # torch.save's zip serialization
    assert local.bin_whole(path) is None
    for kept in (0, 10, len(data) // 2, len(data) - 22, len(data) - 1):
        path.write_bytes(data[:kept])
        why = local.bin_whole(path)
        assert why is not None and why.startswith("not a whole zip archive ("), (kept, why)
        assert "\n" not in why


# --- completeness ---------------------------------------------------------------------------


def test_completeness_needs_config_and_whole_weights(tmp_path):
    folder = tmp_path / "checkpoint-100"
    folder.mkdir()
    assert local.completeness(folder, 100, 0) == (False, "no config.json yet")
    (folder / "config.json").write_text("{}")
    assert local.completeness(folder, 100, 0) == \
        (False, "no weights file yet (model.safetensors, pytorch_model.bin)")
    half_written(folder, 100)  # the trainer state does not make cut weights whole
    ok, why = local.completeness(folder, 100, 0)
    assert not ok and why.startswith("model.safetensors is not whole: the header's tensors end")
    checkpoint(folder, 100)
    assert local.completeness(str(folder), 100, 3600) == \
        (True, "trainer_state.json names the step")


def test_completeness_of_a_bin_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint-5"
    data = bin_file(tmp_path / "w.bin")
    checkpoint(folder, 5, weights=data, name="pytorch_model.bin")
    assert local.completeness(folder, 5, 60) == (True, "trainer_state.json names the step")
    (folder / "pytorch_model.bin").write_bytes(data[:-1])
    ok, why = local.completeness(folder, 5, 60)
    assert not ok and why.startswith("pytorch_model.bin is not whole: not a whole zip archive")


def test_completeness_prefers_safetensors(tmp_path):
    folder = checkpoint(tmp_path / "checkpoint-5", 5)
    (folder / "pytorch_model.bin").write_bytes(b"half a zip")
    assert local.weight_file(folder) == folder / "model.safetensors"
    assert local.completeness(folder, 5, 60)[0]
    (folder / "model.safetensors").unlink()
    assert local.weight_file(folder) == folder / "pytorch_model.bin"
    assert not local.completeness(folder, 5, 60)[0]
    (folder / "pytorch_model.bin").unlink()
    assert local.weight_file(folder) is None


@pytest.mark.parametrize("state", [None, '{"global_step": 99}', '{"epoch": 1}', "[100]",
                                   '{"global_step": 10', '{"global_step": null}'])
def test_completeness_without_the_step_in_trainer_state_waits_to_settle(tmp_path, state):
    folder = checkpoint(tmp_path / "checkpoint-100")
    if state is not None:
        (folder / local.TRAINER_STATE).write_text(state)
    set_mtimes(folder, T0)
    assert local.completeness(folder, 100, 60, now=T0 + 30) == (
        False, "modified 30 s ago, less than local.settle_seconds 60 (and no "
               "trainer_state.json naming step 100)")
    assert local.completeness(folder, 100, 60, now=T0 + 60) == (True, "unchanged for 60 s")
    assert local.completeness(folder, 100, 0.5, now=T0 + 1) == (True, "unchanged for 1 s")


def test_completeness_settles_on_the_newest_file(tmp_path):
    folder = checkpoint(tmp_path / "checkpoint-100", mtime=T0 - 1000)
    os.utime(folder / "model.safetensors", (T0, T0))
    (folder / "sub").mkdir()  # folders do not count, only files
    os.utime(folder / "sub", (T0 + 500, T0 + 500))
    assert not local.completeness(folder, 100, 60, now=T0 + 59)[0]
    assert local.completeness(folder, 100, 60, now=T0 + 61) == (True, "unchanged for 61 s")


def test_completeness_of_a_folder_removed_while_read(tmp_path, monkeypatch):
    """A Trainer with ``save_total_limit`` deletes old checkpoint folders while discovery
    reads them: such a folder is not complete, and nothing raises."""
    folder = checkpoint(tmp_path / "checkpoint-100")
    whole = local.safetensors_whole

    def rotated(path):
        why = whole(path)
        shutil.rmtree(folder)
        return why

    monkeypatch.setattr(local, "safetensors_whole", rotated)
    ok, why = local.completeness(folder, 99, 60)
    assert not ok and why.startswith("a file went away while it was read ("), why


def test_completeness_uses_the_clock(tmp_path):
    folder = checkpoint(tmp_path / "checkpoint-100")
    assert not local.completeness(folder, 100, 60)[0]
    set_mtimes(folder, time.time() - 3600)
    ok, why = local.completeness(folder, 100, 60)
    assert ok and re.fullmatch(r"unchanged for 360[01] s", why)


# --- waiting --------------------------------------------------------------------------------


class FakeClock:
    """``local.time`` stand-in: a monotonic clock moved by sleeps and by ``drift`` per read."""

    def __init__(self, drift: float = 0.0):
        self.now, self.drift, self.sleeps = 0.0, drift, []
        self.time = time.time  # completeness's wall clock stays the real one

    def monotonic(self) -> float:
        self.now += self.drift
        return self.now - self.drift

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_complete_returns_at_once_when_complete(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path / "checkpoint-100", 100)
    clock = FakeClock()
    monkeypatch.setattr(local, "time", clock)
    assert local.wait_complete(folder, 100, settle_seconds=60, wait_seconds=600) == \
        "trainer_state.json names the step"
    assert clock.sleeps == []


def test_wait_complete_fails_in_one_line(tmp_path):
    folder = half_written(tmp_path / "checkpoint-100", 100)
    start = time.monotonic()
    with pytest.raises(local.IncompleteCheckpointError) as exc:
        local.wait_complete(folder, 100, settle_seconds=60, wait_seconds=0.05, poll=0.01)
    assert 0.05 <= time.monotonic() - start < 0.5
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{folder}: checkpoint of step 100 is not complete "
                              "(model.safetensors is not whole: the header's tensors end at ")
    assert message.endswith("); not read. Rerun once it is written, or raise "
                            "local.wait_seconds (0.05)")


def test_wait_complete_without_waiting(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path / "checkpoint-100")  # just written, no trainer state
    clock = FakeClock()
    monkeypatch.setattr(local, "time", clock)
    with pytest.raises(local.IncompleteCheckpointError,
                       match=r"less than local\.settle_seconds 60 .*local\.wait_seconds \(0\)"):
        local.wait_complete(folder, 100, settle_seconds=60, wait_seconds=0)
    assert clock.sleeps == []


def test_wait_complete_polls_until_complete(monkeypatch):
    answers = iter([(False, "a"), (False, "b"), (True, "done")])
    calls = []
    monkeypatch.setattr(local, "completeness",
                        lambda d, s, settle: calls.append((d, s, settle)) or next(answers))
    clock = FakeClock()
    monkeypatch.setattr(local, "time", clock)
    assert local.wait_complete("f", 7, settle_seconds=5, wait_seconds=60, poll=2) == "done"
    assert clock.sleeps == [2, 2]
    assert calls == [("f", 7, 5)] * 3


def test_wait_complete_polls_until_the_deadline(monkeypatch):
    monkeypatch.setattr(local, "completeness", lambda d, s, settle: (False, "still writing"))
    clock = FakeClock()
    monkeypatch.setattr(local, "time", clock)
    with pytest.raises(local.IncompleteCheckpointError, match=r"\(still writing\)"):
        local.wait_complete("f", 7, settle_seconds=5, wait_seconds=5, poll=2)
    assert clock.sleeps == [2, 2, 1]


def test_wait_complete_does_not_sleep_past_the_deadline(monkeypatch):
    """The clock passes the deadline between the check and the sleep: no extra poll."""
    monkeypatch.setattr(local, "completeness", lambda d, s, settle: (False, "still writing"))
    clock = FakeClock(drift=0.5)
    monkeypatch.setattr(local, "time", clock)
    with pytest.raises(local.IncompleteCheckpointError):
        local.wait_complete("f", 7, settle_seconds=5, wait_seconds=1, poll=2)
    assert clock.sleeps == [0.0]
    assert clock.now <= 2.0


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_identifies_the_weights(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path / "runs/checkpoint-100", 100)
    os.utime(folder / "model.safetensors", (T0, T0))
    monkeypatch.chdir(tmp_path)
    first = local.fingerprint("runs/checkpoint-100")
    assert first == {"checkpoint_path": str(folder.resolve()),
                     "checkpoint_file": "model.safetensors",
                     "checkpoint_sha256": hashlib.sha256(SPEC_FILE).hexdigest(),
                     "checkpoint_bytes": len(SPEC_FILE),
                     "checkpoint_mtime": "2020-09-13T12:26:40+00:00"}
    assert datetime.fromisoformat(first["checkpoint_mtime"]).timestamp() == T0
    assert datetime.fromisoformat(first["checkpoint_mtime"]).tzinfo == UTC
    # other weights of the same size, same mtime: only the hash tells
    other = st_bytes({**TENSORS, "norm.bias": ("F32", [3], struct.pack("<3f", 1.0, 2.0, 4.0))},
                     {"format": "pt"}, order=["steps", "embed.weight", "norm.bias"])
    assert len(other) == len(SPEC_FILE)
    (folder / "model.safetensors").write_bytes(other)
    os.utime(folder / "model.safetensors", (T0, T0))
    second = local.fingerprint(folder)
    assert {k for k in first if first[k] != second[k]} == {"checkpoint_sha256"}
    # touched: the mtime tells
    os.utime(folder / "model.safetensors", (T0 + 1, T0 + 1))
    assert local.fingerprint(folder)["checkpoint_mtime"] == "2020-09-13T12:26:41+00:00"
    # config.json and trainer state are not the weights
    (folder / "config.json").write_text('{"model_type": "llama"}')
    assert local.fingerprint(folder)["checkpoint_sha256"] == second["checkpoint_sha256"]


def test_fingerprint_of_a_bin_checkpoint_and_of_none(tmp_path):
    data = bin_file(tmp_path / "w.bin")
    folder = checkpoint(tmp_path / "checkpoint-1", 1, weights=data, name="pytorch_model.bin")
    fp = local.fingerprint(folder)
    assert (fp["checkpoint_file"], fp["checkpoint_bytes"], fp["checkpoint_sha256"]) == \
        ("pytorch_model.bin", len(data), hashlib.sha256(data).hexdigest())
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        local.fingerprint(folder)
    assert str(exc.value) == (f"{folder}: no weights file; expected one of model.safetensors, "
                              "pytorch_model.bin")


# --- config checks --------------------------------------------------------------------------


def given(tmp_path: Path, **changes) -> dict:
    """A valid config with its steps given (nothing read from disk)."""
    return config(tmp_path, **{"steps": [0, 100, 200], "final_step": 200, **changes})


def test_errors_of_a_valid_config(tmp_path):
    assert local.errors(given(tmp_path)) == []
    assert local.errors(given(tmp_path, final_step=None)) == []  # the largest step


@pytest.mark.parametrize("section", [None, {}, {"path": ""}, {"path": None}])
def test_errors_missing_path(tmp_path, section):
    assert local.errors(given(tmp_path, local=section)) == [
        "config key 'local.path': missing; allowed: a checkpoint folder template with {step} "
        "(and {size}, {seed}), e.g. 'runs/{size}/checkpoint-{step}'"]


@pytest.mark.parametrize("eval_data", [None, {}, {"path": ""}])
def test_errors_missing_eval_data(tmp_path, eval_data):
    assert local.errors(given(tmp_path, eval_data=eval_data)) == [
        "config key 'eval_data.path': unset; allowed: a local .npy / .bin token file or a text "
        "file (source local has no public training batch)"]


def test_errors_of_templates(tmp_path):
    path = f"{tmp_path}/runs/{{size}}/checkpoint-{{step}}"

    def errs(**section):
        return local.errors(given(tmp_path, local={"path": path, **section}))

    assert errs(path="runs/{model}/checkpoint-{step}") == [
        "config key 'local.path': 'runs/{model}/checkpoint-{step}' has {model}; allowed "
        "fields: {size}, {seed}, {step}"]
    assert errs(path="runs/{size}/checkpoint-{step}}") == [
        "config key 'local.path': 'runs/{size}/checkpoint-{step}}' has a stray brace; "
        "allowed: braces only around the fields {size}, {seed}, {step}"]
    assert errs(recorded="runs/{size}/rec.zarr") == [
        "config key 'local.recorded': 'runs/{size}/rec.zarr' has no {step}; allowed: a "
        "template such as 'runs/{size}/lmdynamics/step{step}.zarr'"]
    assert errs(recorded="runs/{run}/step{step}.zarr") == [
        "config key 'local.recorded': 'runs/{run}/step{step}.zarr' has {run}; allowed "
        "fields: {size}, {seed}, {step}"]
    assert errs(recorded="runs/{size}/step{step}.zarr") == []


def test_errors_of_sizes_and_seeds_the_template_cannot_tell_apart(tmp_path):
    path = f"{tmp_path}/runs/{{size}}/checkpoint-{{step}}"
    assert local.errors(given(tmp_path, seeds=[0, 1])) == [
        f"config key 'local.path': {path!r} has no {{seed}} but seeds lists 2 replicates; "
        "allowed: a template with {seed}, or one seed"]
    assert local.errors(given(tmp_path, seeds=[3])) == []
    flat = f"{tmp_path}/runs/checkpoint-{{step}}"
    assert local.errors(given(tmp_path, sizes=["a", "b", "c"], local={"path": flat})) == [
        f"config key 'local.path': {flat!r} has no {{size}} but sizes lists 3; allowed: a "
        "template with {size}"]
    assert local.errors(given(tmp_path, sizes=["a"], local={"path": flat})) == []


def test_errors_of_the_final_step(tmp_path):
    assert local.errors(given(tmp_path, final_step=150)) == [
        "config key 'final_step': 150 is not among the steps [0, 100, 200]; allowed: one of "
        "them (the CKA reference)"]


def test_errors_of_discovered_steps(tmp_path):
    cfg = config(tmp_path)
    assert local.errors(cfg) == [
        "config key 'steps': discover found 0 complete step(s) common to every size and seed "
        f"under {cfg['local']['path']!r}; allowed: at least two (check local.path, or wait "
        "for the run)"]
    for step in (0, 50, 100):
        checkpoint(tmp_path / f"runs/s/checkpoint-{step}", step)
    assert local.errors(cfg) == []
    assert local.errors(config(tmp_path, final_step=100)) == []
    errs = local.errors(config(tmp_path, final_step=75))  # steps up to 75: 0, 50
    assert errs == ["config key 'final_step': 75 is not among the steps [0, 50]; allowed: one "
                    "of them (the CKA reference)"]


def test_errors_are_one_line_each(tmp_path):
    bad = [given(tmp_path, local=None), given(tmp_path, eval_data=None),
           given(tmp_path, local={"path": "{x}{step}"}), given(tmp_path, final_step=1),
           config(tmp_path), given(tmp_path, seeds=[0, 1])]
    for cfg in bad:
        (message,) = local.errors(cfg)
        assert "\n" not in message and message.startswith("config key '")
