"""The whole DAG on tiny Llama-style and GPT-2 models (config key ``family``), end to end
through the real Snakemake command line, and the one-line refusal of an option that exists
for GPT-NeoX only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from lmdynamics import families
from support.workflow import mini_config, snakemake


def _configure(workdir, family: str, **overlay):
    """config/family.yaml in ``workdir`` (a copy of the workflow): the mini suite on ``family``."""
    config = {**mini_config(), "family": family, **overlay}
    (workdir / "config/family.yaml").write_text(yaml.safe_dump(config))
    return workdir, config


@pytest.mark.slow  # about 3 minutes each on 2 cores (measured: llama 168 s, gpt2 239 s)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_dag_runs_end_to_end_on_another_family(workflow_copy, name):
    workdir, config = _configure(workflow_copy, name)
    snakemake(workdir, "--configfile", "config/family.yaml")
    results = workdir / "results" / config["suite"]
    family = families.get(name)
    store = xr.open_zarr(results / f"extract/{config['sizes'][0]}/seed0/step0.zarr",
                         consolidated=False)
    assert store.attrs["family"] == name
    params = [str(p) for p in store.param.values]
    assert f"layer0.{family.attention_write}.weight" in params
    assert f"layer0.{family.mlp_write}.weight" in params
    assert not any("gpt_neox" in p or "dense_4h_to_h" in p for p in params)
    stats = xr.open_zarr(results / "stats.zarr", consolidated=False)
    assert stats.attrs["family"] == name
    table = pd.read_csv(results / "metrics.csv")
    assert len(table) > 0
    for column in ("cka", "per_weight", "per_grad"):
        assert np.isfinite(table[column]).all(), column
    final = table[table.step == config["final_step"]]
    np.testing.assert_allclose(final.cka, 1.0, atol=1e-9)
    for name_ in ("figure1", "conjecture_norms", "conjecture_closeness"):
        assert (results / f"figures/{name_}.png").stat().st_size > 5000, name_
    assert (results / "tables/mcc.md").stat().st_size > 0


def test_paper_code_attention_with_another_family_is_refused_in_one_line(workflow_copy):
    workdir, _ = _configure(workflow_copy, "gpt2", extraction={
        **mini_config()["extraction"], "attention_activation": "paper_code"})
    proc = snakemake(workdir, "--configfile", "config/family.yaml", "-n", check=False)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "extraction.attention_activation" in line]
    assert lines and "'gpt2'" in lines[0] and "residual_write" in lines[0]


def test_an_unknown_family_is_refused_naming_the_known_ones(workflow_copy):
    workdir, _ = _configure(workflow_copy, "mamba")
    proc = snakemake(workdir, "--configfile", "config/family.yaml", "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "family" in out and "mamba" in out and "gpt_neox" in out and "llama" in out
