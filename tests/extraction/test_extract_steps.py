"""``lmdynamics extract`` over several checkpoints in one process (the tiny suite's one job per
(size, seed)): each store is the one a run of that checkpoint alone writes, file for file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmdynamics.cli import run
from support.faultlib import TOKENS, eval_batch, tiny_checkpoint

STEPS = (0, 4, 8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("checkpoints")
    return (eval_batch(root / "batch.npy"),
            [tiny_checkpoint(root / f"step{step}", step) for step in STEPS])


def extract_argv(batch: Path, checkpoints: list[Path], steps, outs: list[Path]) -> list[str]:
    return ["extract", "--checkpoint", *map(str, checkpoints), "--eval-batch", str(batch),
            "--options", json.dumps({"tokens": TOKENS}), "--size", "s",
            "--step", *map(str, steps), "--model", "tiny-s",
            "--revision", *(f"step{step}" for step in steps), "--out", *map(str, outs)]


def files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for p in sorted(store.rglob("*")) if p.is_file()}


def test_several_checkpoints_in_one_process_write_what_one_each_writes(checkpoints,
                                                                       tmp_path):
    batch, dirs = checkpoints
    together = [tmp_path / "together" / f"step{step}.zarr" for step in STEPS]
    run(extract_argv(batch, dirs, STEPS, together))
    for step, directory, store in zip(STEPS, dirs, together, strict=True):
        alone = tmp_path / "alone" / f"step{step}.zarr"
        run(extract_argv(batch, [directory], [step], [alone]))
        assert files(store) == files(alone), step


@pytest.mark.parametrize(("steps", "outs", "message"), [
    ((0, 4), 3, "--checkpoint gives 3 checkpoint(s) but --step 2; give one value of each"),
    (STEPS, 2, "--out 2"),
])
def test_one_value_per_checkpoint_is_required(checkpoints, tmp_path, steps, outs, message):
    batch, dirs = checkpoints
    argv = extract_argv(batch, dirs, steps, [tmp_path / f"{i}.zarr" for i in range(outs)])
    if len(steps) != len(dirs):  # --revision follows --step: drop one checkpoint's
        argv[argv.index("--revision") + 1:argv.index("--out")] = [f"step{s}" for s in STEPS]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(argv)
    assert not list(tmp_path.iterdir())


def test_two_checkpoints_may_not_share_a_store(checkpoints, tmp_path):
    batch, dirs = checkpoints
    out = tmp_path / "same.zarr"
    with pytest.raises(ValueError, match="same.zarr given for more than one checkpoint"):
        run(extract_argv(batch, dirs[:2], STEPS[:2], [out, out]))
    assert not out.exists()
