"""Configuration of the metrics and paper-code options, and the DAG they select."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import xarray as xr
import yaml

from lmdynamics.config import ConfigError, check_config, load_config
from lmdynamics.options import schema_path
from support.workflow import REPO, snakemake

SCHEMA = schema_path()
TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
PAPER_OPTIONS = {
    "metrics": {"per_divisor": "head_dim", "per_truncate": True, "cka_estimator": "biased",
                "standardize": True, "bootstrap": {"samples": 50, "level": 0.9}},
    "extraction": {"device": "cpu", "dtype": "float32", "attention_activation": "paper_code",
                   "gradient_protocol": "paper_code"},
}


def test_paper_code_config_is_the_paper_grid_with_every_paper_option():
    pythia = load_config(REPO / "config/config.yaml", SCHEMA)
    paper = load_config(REPO / "config/paper_code.yaml", SCHEMA)
    for key in ("source", "sizes", "steps", "final_step"):
        assert paper[key] == pythia[key], key
    for key in ("cka_threshold", "early_fraction", "per_weight_threshold", "per_grad_fraction"):
        assert paper["mcc"][key] == pythia["mcc"][key], key  # the paper's numbers
    # Table 1 as the paper's code defined it: CKA > 0.45 at the step nearest 10 %, head_dim
    # PER > 0.95 (a fixed value)
    assert paper["mcc"]["comparison"] == "greater" and paper["mcc"]["early_step"] == "nearest"
    assert paper["mcc"]["per_quantity"] == "per_head_dim"
    assert paper["mcc"]["weight_threshold"] == "absolute"
    assert paper["extraction"]["attention_activation"] == "paper_code"
    assert paper["extraction"]["gradient_protocol"] == "paper_code"
    assert paper["metrics"]["per_divisor"] == "head_dim" and paper["metrics"]["per_truncate"]
    assert paper["metrics"]["cka_estimator"] == "biased"
    assert paper["tokens"] == 128 and paper["hub"]["sequences"] == 128
    assert paper["suite"] != pythia["suite"]  # its own results folder
    assert paper["sampling"]["protocol"] == "paper_code"


def _set(config, dotted, value):
    *parents, last = dotted.split(".")
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


BAD = [
    ("metrics.cka_estimator", "unbiased", ["metrics.cka_estimator", "'unbiased'",
                                           "biased, debiased"]),
    ("metrics.bootstrap.level", 1.0, ["metrics.bootstrap.level", "1.0", "< 1"]),
    ("metrics.bootstrap.samples", -1, ["metrics.bootstrap.samples", "-1", ">= 0"]),
    ("metrics.standardize", "yes", ["metrics.standardize", "'yes'", "boolean"]),
    ("metrics.per_truncate", 1, ["metrics.per_truncate", "1", "boolean"]),
    ("extraction.attention_activation", "values",
     ["extraction.attention_activation", "'values'", "residual_write, paper_code"]),
    ("extraction.gradient_protocol", "train",
     ["extraction.gradient_protocol", "'train'", "eval_batch, paper_code"]),
    ("mcc.per_quantity", "rank", ["mcc.per_quantity", "'rank'", "per_normalized"]),
    ("mcc.early_step", "first", ["mcc.early_step", "'first'", "at_or_before, nearest"]),
]


@pytest.mark.parametrize(("key", "value", "fragments"), BAD, ids=[b[0] for b in BAD])
def test_bad_metrics_option_is_named(key, value, fragments):
    config = copy.deepcopy(TINY)
    _set(config, key, value)
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def _write_config(workdir, **updates) -> str:
    config = copy.deepcopy(TINY)
    for key, value in updates.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    (workdir / "config/run.yaml").write_text(yaml.safe_dump(config))
    return "config/run.yaml"


def test_dry_run_with_paper_options_lists_gradient_batches_and_new_figures(workflow_copy):
    workdir = workflow_copy
    cfg = _write_config(workdir, **copy.deepcopy(PAPER_OPTIONS))
    out = snakemake(workdir, "--configfile", cfg, "-n", "--quiet", "rules").stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.MULTILINE))
    assert counts["gradient_batches"] == str(len(TINY["steps"]))
    assert counts["figure"] == "8"  # figures 1-6, figure2_standardized and cka_seed_sd
    default = snakemake(workdir, "--configfile", "config/tiny.yaml", "-n", "--quiet",
                        "rules").stdout
    assert "gradient_batches" not in default
    assert dict(re.findall(r"^(\w+)\s+(\d+)$", default, re.MULTILINE))["figure"] == "7"


@pytest.mark.slow
def test_paper_code_options_end_to_end_on_a_reduced_tiny_suite(workflow_copy):
    workdir = workflow_copy
    cfg = _write_config(workdir, sizes=["42k"], steps=[0, 8, 64], final_step=64, tokens=128,
                        **copy.deepcopy(PAPER_OPTIONS))
    snakemake(workdir, "--configfile", cfg)
    results = workdir / "results/tiny"
    batches = np.load(results / "gradient_batches/seed0/step8.npy")
    assert batches.shape == (2, 16, 128)
    store = xr.open_zarr(results / "extract/42k/seed0/step8.zarr", consolidated=False)
    assert store.attrs["attention_activation"] == "paper_code"
    assert store.attrs["gradient_steps"] == [3, 4]
    metrics = xr.open_zarr(results / "metrics.zarr", consolidated=False)
    assert metrics.attrs["per_divisor"] == "head_dim" and metrics.attrs["standardize"]
    for name in ("cka", "cka_debiased", "cka_standardized", "cka_debiased_standardized_low",
                 "cka_pairwise", "cka_layer_mean_high"):
        assert name in metrics, name
    for name in ("figure2_standardized", "figure6"):
        assert (results / f"figures/{name}.png").stat().st_size > 5000
    assert "biased CKA ≥ 0.45" in (results / "tables/mcc.md").read_text()
