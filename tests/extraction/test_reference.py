"""The per-size reference store of the Conjecture statistics: written once from the step-0 and
final checkpoints, read by every extraction of the size; the statistics it gives equal those
computed directly from the two checkpoints (the way every extraction computed them before the
store existed), and a damaged or mismatched store is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import zarr

from lmdynamics import cli
from lmdynamics.extraction.conjecture import (
    CIRCUITS,
    PARAM_STATS,
    StatsOptions,
)
from lmdynamics.extraction.extract import extract_checkpoint
from lmdynamics.extraction.names import param_key
from lmdynamics.extraction.reference import (
    ReferenceMismatchError,
    ReferenceStore,
    build_reference,
)
from lmdynamics.extraction.stats import (
    circuit_directions,
    compare_to_reference,
    direction_closeness,
)
from lmdynamics.families import get as get_family
from lmdynamics.sources import tiny
from lmdynamics.sources.checkpoints import ReferenceWeights, load_model, weights_sha256
from lmdynamics.store import IncompleteStoreError, open_store, write_array_atomic

GPT_NEOX = get_family("gpt_neox")

SPEC = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
FINAL, MID, TOP_K = 8, 4, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny size trained for 8 updates, its eval batch and its reference store."""
    root = tmp_path_factory.mktemp("reference")
    corpus = tiny.load_corpus()
    write_array_atomic(tiny.eval_batch(corpus, final_step=FINAL, batch_size=4, seq_len=32,
                                       seed=0), root / "eval_batch.npy")
    tiny.train_tiny_model(SPEC, size="a", out_dir=root / "ck", loss_csv=root / "loss.csv",
                          final_step=FINAL, log_until=MID, interval=MID, batch_size=4,
                          seq_len=32, lr=1e-2, warmup=1, seed=0, threads=1, corpus=corpus)
    cli.run(["reference", "--init-checkpoint", str(root / "ck/step0"), "--final-checkpoint",
             str(root / f"ck/step{FINAL}"), "--size", "a",
             "--options", json.dumps({"conjecture": {"top_k": TOP_K}, "final_step": FINAL}),
             "--out", str(root / "ref.zarr")])
    return root


def _extract(root: Path, step: int, reference: Path, out: Path, *, size: str = "a",
             top_k: int = TOP_K) -> Path:
    return extract_checkpoint(root / f"ck/step{step}", root / "eval_batch.npy", out, tokens=32,
                              seed=0, size=size, step=step, model_name="tiny-a",
                              revision=f"step{step}",
                              stats=StatsOptions(reference, top_k=top_k))


def test_store_records_its_sources_and_options(trained):
    ds = open_store(trained / "ref.zarr")
    assert ds.attrs["size"] == "a" and ds.attrs["top_k"] == TOP_K
    assert ds.attrs["final_step"] == FINAL and ds.attrs["init_step"] == 0
    assert ds.attrs["init_weights_sha256"] == weights_sha256(trained / "ck/step0")
    assert ds.attrs["final_weights_sha256"] == weights_sha256(trained / f"ck/step{FINAL}")
    names = [n for n, _ in load_model(trained / "ck/step0").named_parameters()]
    assert ds.attrs["params"] == names
    init = ReferenceWeights(trained / "ck/step0")
    for name in names:  # exactly the float32 tensors the checkpoints hold
        np.testing.assert_array_equal(ds[f"init.{name}"].values, init[name].numpy())
    heads, hidden = SPEC["num_heads"], SPEC["hidden_size"]
    assert ds.direction_mlp.shape == (SPEC["num_layers"], hidden, TOP_K)
    assert ds.direction_ov.shape == (SPEC["num_layers"], heads, hidden,
                                     min(TOP_K, hidden // heads))


@pytest.mark.parametrize("step", [0, MID, FINAL])
def test_statistics_equal_a_direct_computation_from_the_two_checkpoints(trained, tmp_path,
                                                                        step):
    """The reference the store replaced: every extraction read both checkpoints tensor by
    tensor and recomputed the final checkpoint's singular directions. Same numbers, bit for
    bit (same float32 tensors, same float64 arithmetic, same LAPACK calls)."""
    ds = open_store(_extract(trained, step, trained / "ref.zarr", tmp_path / "s.zarr"))
    model = load_model(trained / f"ck/step{step}")
    init, final = ReferenceWeights(trained / "ck/step0"), ReferenceWeights(
        trained / f"ck/step{FINAL}")
    for name, p in model.named_parameters():
        w = p.detach()
        to_init = compare_to_reference(w, init[name].to(w.dtype))
        to_final = compare_to_reference(w, final[name].to(w.dtype))
        row = ds.stat_param.sel(param=param_key(name)).to_series()
        for stat, value in (("dist_init", to_init["dist"]), ("rel_dist_init", to_init["rel_dist"]),
                            ("cos_init", to_init["cos"]), ("cos_final", to_final["cos"])):
            assert stat in PARAM_STATS
            np.testing.assert_array_equal(row[stat], value, err_msg=f"{name} {stat}")
    params = dict(model.named_parameters())
    for layer in range(SPEC["num_layers"]):
        now = circuit_directions(lambda n: params[n].detach(), layer, SPEC["num_heads"], TOP_K,
                                 GPT_NEOX)
        ref = circuit_directions(final.__getitem__, layer, SPEC["num_heads"], TOP_K, GPT_NEOX)
        for c, circuit in enumerate(CIRCUITS):
            direct = np.mean([direction_closeness(u, r)
                              for u, r in zip(now[circuit], ref[circuit], strict=True)])
            assert float(ds.stat_direction_closeness.values[c, layer]) == direct


def test_an_extraction_reads_each_reference_array_once(trained, tmp_path, monkeypatch):
    """Every array of the store, once, through the reader that checks its sha256."""
    from lmdynamics.extraction import reference

    reads: list[str] = []
    original = reference.DigestedReader.read

    def counting(self, index):
        reads.append(self.name)
        return original(self, index)

    monkeypatch.setattr(reference.DigestedReader, "read", counting)
    _extract(trained, MID, trained / "ref.zarr", tmp_path / "s.zarr")
    names = open_store(trained / "ref.zarr").attrs["params"]
    assert sorted(reads) == sorted([f"init.{n}" for n in names] + [f"final.{n}" for n in names]
                                   + ["direction_mlp", "direction_ov"])


def _damage(store: Path, array: str) -> None:
    chunk = next(p for p in (store / array / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def test_a_damaged_store_is_one_line_error(trained, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(trained / "ref.zarr", broken)
    _damage(broken, "final.gpt_neox.layers.1.mlp.dense_4h_to_h.weight")
    with pytest.raises(IncompleteStoreError, match=r"dense_4h_to_h\.weight' has a damaged chunk"):
        _extract(trained, MID, broken, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    # through the command line: one line naming the store, then the traceback
    argv = ["extract", "--checkpoint", str(trained / f"ck/step{MID}"), "--eval-batch",
            str(trained / "eval_batch.npy"), "--size", "a", "--step", str(MID), "--model", "m",
            "--revision", "r", "--options", json.dumps({"tokens": 32, "conjecture": {
                "top_k": TOP_K}}), "--reference", str(broken), "--out", str(tmp_path / "c.zarr")]
    assert cli.main(argv) == 1
    first = capsys.readouterr().err.splitlines()
    line = next(x for x in first if x.startswith("lmdynamics extract: error:"))
    assert str(broken) in line and "damaged chunk" in line and "--forcerun" in line
    # the directions are verified when the store is opened, before the model is loaded
    shutil.rmtree(broken)
    shutil.copytree(trained / "ref.zarr", broken)
    _damage(broken, "direction_ov")
    with pytest.raises(IncompleteStoreError, match="direction_ov"):
        ReferenceStore(broken, size="a", top_k=TOP_K)


def test_a_store_of_other_options_size_or_model_is_refused(trained, tmp_path):
    ref = trained / "ref.zarr"
    with pytest.raises(ReferenceMismatchError, match=r"top_k=3, this extraction uses top_k=5"):
        _extract(trained, MID, ref, tmp_path / "s.zarr", top_k=5)
    with pytest.raises(ReferenceMismatchError, match=r"size 'a', not 'b'"):
        _extract(trained, MID, ref, tmp_path / "s.zarr", size="b")
    # a store built from another architecture (hidden 24) for the same label
    other = tmp_path / "other"
    corpus = tiny.load_corpus()
    tiny.train_tiny_model({"hidden_size": 24, "num_layers": 2, "num_heads": 2}, size="a",
                          out_dir=other, loss_csv=tmp_path / "l.csv", final_step=1, log_until=1,
                          interval=1, batch_size=2, seq_len=16, lr=1e-2, warmup=1, seed=0,
                          threads=1,
                          corpus=corpus)
    build_reference(other / "step0", other / "step1", tmp_path / "other.zarr", size="a",
                    top_k=TOP_K)
    with pytest.raises(ReferenceMismatchError, match="another model's parameters"):
        _extract(trained, MID, tmp_path / "other.zarr", tmp_path / "s.zarr")
    # two reference checkpoints of different sizes
    with pytest.raises(ValueError, match="must be of the same size"):
        build_reference(other / "step0", trained / f"ck/step{FINAL}", tmp_path / "x.zarr",
                        size="a", top_k=TOP_K)
    # an edited attribute (here the recorded top_k) fails the store's attrs digest
    edited = tmp_path / "edited.zarr"
    import shutil

    shutil.copytree(ref, edited)
    group = zarr.open_group(edited, mode="r+", use_consolidated=False)
    group.attrs["top_k"] = 5
    with pytest.raises(IncompleteStoreError, match="attributes"):
        ReferenceStore(edited, size="a", top_k=5)


def test_pythia_files_are_stored_in_float16_and_read_as_their_float32_values(tmp_path):
    """Pythia's revisions hold float16 tensors under transformers 4.x names with legacy
    buffers, as ``pytorch_model.bin`` or ``model.safetensors`` (shared/notes/reference-facts.md;
    tests/pythia_files.py): the store keeps float16 (half the bytes of float32) and gives back
    exactly the float32 tensors ReferenceWeights reads from the files."""
    from support.pythia_files import legacy_state_dict, pythia_config, torch_bytes

    shape = (16, 2, 2, 64)
    for step, seed in ((0, 1), (1, 2)):
        d = tmp_path / f"step{step}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(pythia_config(*shape)))
        state = legacy_state_dict(*shape, seed=seed)
        if step == 0:
            (d / "pytorch_model.bin").write_bytes(torch_bytes(state))
        else:
            safetensors.torch.save_file({k: v for k, v in state.items() if v.ndim and
                                         v.is_floating_point()}, d / "model.safetensors")
    out = build_reference(tmp_path / "step0", tmp_path / "step1", tmp_path / "ref.zarr",
                          size="t", top_k=2)
    ds = open_store(out)
    assert ds["init.lm_head.weight"].dtype == np.float16
    assert "init.gpt_neox.layers.0.attention.bias" not in ds  # a buffer, not a parameter
    refs = ReferenceStore(out, size="t", top_k=2)
    for prefix, step in (("init", 0), ("final", 1)):
        direct = ReferenceWeights(tmp_path / f"step{step}")
        for name in refs.params:
            assert torch.equal(getattr(refs, prefix)(name), direct[name]), (prefix, name)
