"""Intervention study (lmdynamics.interventions): variants, outcome rules, effects, workflow.

The effective-rank checks measure rank with the project's float64 estimator
(:func:`lmdynamics.estimators.rank.effective_rank` of LAPACK singular values, Roy & Vetterli 2007),
independent of the torch code under test.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lmdynamics.estimators.rank import effective_rank
from lmdynamics.interventions.outcomes import (
    MEASURES,
    area_above,
    convergence_step,
    effects,
    summary_effects,
)
from lmdynamics.interventions.run import RunSettings
from lmdynamics.interventions.study import run_one, section_errors, settings_from
from lmdynamics.interventions.variants import (
    build_variant,
    entropy_penalty,
    normalised_entropy,
    orthogonal_write_init,
)
from lmdynamics.sources.tiny import model_config
from support.workflow import REPO, copy_workflow, snakemake

TINY_ARCH = {"hidden_size": 8, "num_layers": 2, "num_heads": 2}


def _erank(w: torch.Tensor) -> float:
    return effective_rank(np.linalg.svd(w.detach().double().numpy(), compute_uv=False))


def _decaying_matrix(seed: int = 0) -> torch.Tensor:
    """16 x 32 matrix with singular values 1, 1/2, ..., 1/16 (effective rank ~6.5 of 16)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 16, generator=g, dtype=torch.float64))
    s = 1.0 / torch.arange(1, 17, dtype=torch.float64)
    return (u * s) @ v.T


@pytest.mark.parametrize("strength", [1.0, -1.0])
def test_regulariser_moves_effective_rank_in_its_sign(strength):
    w = _decaying_matrix().requires_grad_(True)
    before = _erank(w)
    opt = torch.optim.SGD([w], lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        entropy_penalty([w], strength).backward()
        opt.step()
    after = _erank(w)
    if strength > 0:
        assert after > before + 0.5, (before, after)
    else:
        assert after < before - 0.5, (before, after)


def test_entropy_is_log_of_the_projects_effective_rank():
    w = _decaying_matrix(1)
    stack = torch.stack([w, 2 * _decaying_matrix(2)])
    got = normalised_entropy(stack)
    assert got.shape == (2,)
    assert math.exp(float(got[0])) == pytest.approx(_erank(w), rel=1e-10)
    assert math.exp(float(got[1])) == pytest.approx(_erank(stack[1]), rel=1e-10)


def test_penalty_is_the_mean_over_matrices_and_has_no_nan_gradient_for_rank_deficiency():
    a = torch.zeros(4, 6, dtype=torch.float64)
    a[0, 0] = 1.0  # rank 1: zero singular values must not give NaN gradients
    b = _decaying_matrix()
    a.requires_grad_(True)
    pen = entropy_penalty([a, b], 0.5)
    expected = -0.5 * (0.0 + float(normalised_entropy(b))) / 2
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-12)
    pen.backward()
    assert torch.isfinite(a.grad).all()


def test_orthogonal_init_gives_per_one_at_the_default_scale():
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(model_config({"hidden_size": 16, "num_layers": 2,
                                             "num_heads": 2}, seq_len=8))
    orthogonal_write_init(model, "mlp", 0.02)
    for layer in model.gpt_neox.layers:
        w = layer.mlp.dense_4h_to_h.weight  # 16 x 64
        assert _erank(w) / 16 == pytest.approx(1.0, abs=1e-6)
        # Frobenius norm of N(0, 0.02^2) entries: 0.02 sqrt(16 * 64)
        assert float(w.detach().norm()) == pytest.approx(0.02 * math.sqrt(16 * 64), rel=1e-5)
        assert _erank(layer.attention.dense.weight) / 16 < 0.95  # untouched: random


@pytest.mark.parametrize("spec, message", [
    ({"kind": "nope"}, r"variants\.v\.kind: unknown kind 'nope'"),
    ({"kind": "rank_regulariser", "strength": 0.1}, r"variants\.v: .*needs targets"),
    ({"kind": "rank_regulariser", "strength": 0, "targets": "both"}, r"strength: 0\.0"),
    ({"kind": "baseline", "strength": 1.0}, r"variants\.v\.strength: not a parameter"),
    ({"kind": "orthogonal_init", "targets": "all"}, r"targets: 'all'"),
    ({"kind": "rank_regulariser", "strength": "big", "targets": "both"}, r"wrong type"),
])
def test_bad_variant_entries_are_one_line_naming_the_key(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        build_variant("v", spec)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ convergence-step rule

STEPS = [0, 8, 16, 32, 64]


@pytest.mark.parametrize("cka, expected", [
    ([0.95, 0.96, 0.97, 0.99, 1.0], 0.0),          # converged from the first analysed step
    ([0.1, 0.2, 0.3, 0.4, 1.0], 64.0),             # only the final step
    ([0.1, 0.9, 0.95, 0.97, 1.0], 8.0),            # exactly at the threshold counts
    ([0.1, 0.95, 0.89999, 0.95, 1.0], 32.0),       # a dip below resets: must *stay* above
    ([0.95, 0.95, np.nan, 0.95, 1.0], 32.0),       # NaN is never taken for converged
    ([0.95, 0.95, 0.95, 0.95, np.nan], math.nan),  # undefined final CKA: no convergence
    ([0.95, 0.95, 0.95, 0.95, 0.8], math.nan),     # below at the last step: never converged
])
def test_convergence_step_rule(cka, expected):
    got = convergence_step(STEPS, cka, 0.9)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_convergence_step_threshold_above_one_never_converges_and_bad_steps_raise():
    assert math.isnan(convergence_step(STEPS, [1.0] * 5, 1.0 + 1e-12))
    assert convergence_step(STEPS, [1.0] * 5, 1.0) == 0.0
    with pytest.raises(ValueError, match="strictly increasing"):
        convergence_step([0, 8, 8], [1, 1, 1], 0.5)
    with pytest.raises(ValueError, match="equal length"):
        convergence_step([0, 8], [1.0], 0.5)


def test_area_above_is_the_mean_distance_over_the_fraction_of_training():
    assert area_above([0, 32, 64], [1, 1, 1], 64) == 0.0
    assert area_above([0, 32, 64], [0, 0, 0], 64) == pytest.approx(1.0)
    # 1 - CKA falls linearly from 1 to 0: area 1/2, whatever the analysed steps
    assert area_above([0, 16, 64], [0, 0.25, 1.0], 64) == pytest.approx(0.5)
    assert math.isnan(area_above([0, 32, 64], [0, np.nan, 1], 64))


# ------------------------------------------------------------------ effects

def _outcomes(shift: dict[int, float]) -> pd.DataFrame:
    rows = []
    for seed in (0, 1, 2):
        for variant in ("baseline", "up"):
            for layer in (0, 1):
                base = 100.0 + 10 * seed + layer
                value = base + (shift[seed] if variant == "up" else 0.0)
                rows.append({"variant": variant, "size": "s", "seed": seed,
                             "component": "mlp", "layer": layer,
                             **{m: value for m in MEASURES}})
    return pd.DataFrame(rows)


def test_effects_are_seed_paired_differences_with_bootstrap_intervals():
    # seeds differ by 10 between each other, the variant by -8 +- 1 within a seed: paired
    # differences are -9, -8, -7, their mean -8 and every resampled mean lies in [-9, -7]
    eff = effects(_outcomes({0: -9.0, 1: -8.0, 2: -7.0}), samples=500, level=0.9)
    row = eff[(eff["measure"] == "convergence_step") & (eff["layer"] == 0)].iloc[0]
    assert row["effect"] == pytest.approx(-8.0)
    assert -9.0 <= row["low"] < -8.0 < row["high"] <= -7.0
    assert row["baseline"] == pytest.approx(110.0) and row["value"] == pytest.approx(102.0)
    assert row["n_seeds"] == 3
    summary = summary_effects(_outcomes({0: -9.0, 1: -8.0, 2: -7.0}), samples=500)
    assert summary.set_index("measure").loc["auc", "effect"] == pytest.approx(-8.0)


def test_effects_need_the_baseline():
    with pytest.raises(ValueError, match="no runs of the baseline variant 'base'"):
        effects(_outcomes({0: 0, 1: 0, 2: 0}), baseline="base")


# ------------------------------------------------------------------ runs

def _settings(**kw) -> RunSettings:
    return RunSettings(**{"final_step": 6, "steps": (0, 2, 4, 6), "batch_size": 4,
                          "seq_len": 16, "warmup": 2, "eval_tokens": 32, "threads": 1,
                          **kw})


def test_variants_with_identical_settings_give_identical_metrics():
    tokens = np.random.default_rng(0).integers(0, 256, 5000)
    spec = {"kind": "rank_regulariser", "strength": 0.3, "targets": "attention"}
    a_m, a_l = run_one("a", spec, "s", TINY_ARCH, 1, _settings(), tokens)
    b_m, b_l = run_one("b", dict(spec), "s", TINY_ARCH, 1, _settings(), tokens)
    cols = ["cka", "cka_debiased", "per_weight", "per_grad", "loss"]
    assert np.array_equal(a_m[cols].to_numpy(), b_m[cols].to_numpy())
    assert np.array_equal(a_l["train_loss"], b_l["train_loss"])
    assert np.isfinite(a_m[cols].to_numpy()).all()
    # CKA of the final step to itself is 1; the regulariser is active and recorded
    final = a_m[a_m["step"] == 6]
    np.testing.assert_allclose(final["cka"], 1.0, rtol=1e-12)
    assert (a_l["penalty"] < 0).all()
    # the same seed gives baseline the same data and initialisation: step 0 agrees with the
    # regularised run (the regulariser only acts from the first update on)
    base_m, _ = run_one("base", {"kind": "baseline"}, "s", TINY_ARCH, 1, _settings(), tokens)
    step0 = ["per_weight", "per_grad", "loss"]
    np.testing.assert_array_equal(base_m[base_m.step == 0][step0].to_numpy(),
                                  a_m[a_m.step == 0][step0].to_numpy())
    assert not np.array_equal(base_m[base_m.step == 6][step0].to_numpy(),
                              a_m[a_m.step == 6][step0].to_numpy())


def test_settings_refuse_steps_without_the_final_one():
    with pytest.raises(ValueError, match="must include final_step=6"):
        _settings(steps=(0, 2))
    with pytest.raises(ValueError, match="eval_tokens=100"):
        _settings(eval_tokens=100)


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_shipped_configs_pass_the_semantic_checks():
    for name in ("interventions.yaml", "interventions_gpu.yaml"):
        section = _config(REPO / "config" / name)["interventions"]
        assert section_errors(section) == []
        settings_from(section)


def test_section_errors_name_the_key():
    section = _config(REPO / "config" / "interventions.yaml")["interventions"]
    section = {**section, "baseline": "control", "vocab_size": 300,
               "sizes": {"x": {"hidden_size": 10, "num_layers": 1, "num_heads": 3}}}
    errors = "\n".join(section_errors(section))
    assert "interventions.baseline: 'control'" in errors
    assert "interventions.sizes.x: hidden_size 10" in errors
    assert "interventions.vocab_size: 300" in errors


# ------------------------------------------------------------------ workflow

QUICK = {
    "name": "quick",
    "tokens": "tiny",
    "vocab_size": 256,
    "variants": {"baseline": {"kind": "baseline"}},
    "sizes": {"s8": TINY_ARCH},
    "seeds": [0],
    "training": {"final_step": 4, "batch_size": 4, "seq_len": 16, "lr": 0.003, "warmup": 1},
    "steps": [0, 2, 4],
    "eval_tokens": 32,
    "outcomes": {"threshold": 0.9, "cka_estimator": "debiased",
                 "bootstrap": {"samples": 100, "level": 0.9}},
}


def _write(workdir: Path, section: dict) -> str:
    (workdir / "config" / "quick.yaml").write_text(yaml.safe_dump({"interventions": section}))
    return "config/quick.yaml"


def _planned_runs(proc: subprocess.CompletedProcess) -> list[str]:
    """variant/size/seedN of every intervention_run job a dry run plans (not the inputs that
    the summarising job lists)."""
    blocks = proc.stdout.split("rule ")
    return [m[1] for b in blocks if b.startswith("intervention_run:")
            for m in [re.search(r"output: \S*/runs/(\S+?)_metrics\.csv", b)] if m]


def test_adding_a_variant_or_changing_outcomes_reruns_no_run(tmp_path):
    workdir = copy_workflow(tmp_path)
    cfg = _write(workdir, QUICK)
    target = "results/interventions/quick/runs/baseline/s8/seed0_metrics.csv"
    snakemake(workdir, target, "--configfile", cfg)
    grown = {**QUICK, "variants": {**QUICK["variants"], "rank_up": {
        "kind": "rank_regulariser", "strength": 0.1, "targets": "both"}},
        "outcomes": {**QUICK["outcomes"], "threshold": 0.8}}
    _write(workdir, grown)
    proc = snakemake(workdir, "interventions", "-n", "--configfile", cfg)
    assert sorted(set(_planned_runs(proc))) == ["rank_up/s8/seed0"], proc.stdout[-3000:]
    # a changed training setting reruns it (the check above can fail)
    _write(workdir, {**grown, "training": {**QUICK["training"], "lr": 0.002}})
    proc = snakemake(workdir, "interventions", "-n", "--configfile", cfg)
    assert sorted(set(_planned_runs(proc))) == ["baseline/s8/seed0", "rank_up/s8/seed0"]


def test_default_tiny_run_has_no_intervention_rules(tmp_path):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, "-n", "--configfile", "config/tiny.yaml")
    assert "intervention" not in proc.stdout


def test_gpu_config_dry_runs_on_a_token_file(tmp_path):
    workdir = copy_workflow(tmp_path)
    tokens = workdir / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 50304, 100_000).astype(np.uint16))
    (workdir / "config" / "tokens.yaml").write_text(
        yaml.safe_dump({"interventions": {"tokens": str(tokens)}}))
    proc = snakemake(workdir, "interventions", "-n", "--configfile",
                     "config/interventions_gpu.yaml", "config/tokens.yaml")
    section = _config(REPO / "config" / "interventions_gpu.yaml")["interventions"]
    runs = set(_planned_runs(proc))
    assert len(runs) == len(section["variants"]) * len(section["sizes"]) * len(
        section["seeds"])
    assert all("/14m/" in r for r in runs)


def test_bad_intervention_config_is_one_line_naming_the_key(tmp_path):
    workdir = copy_workflow(tmp_path)
    cfg = _write(workdir, {**QUICK, "variants": {"baseline": {"kind": "baseline"},
                                                 "x": {"kind": "warp"}}})
    proc = snakemake(workdir, "interventions", "-n", "--configfile", cfg, check=False)
    assert proc.returncode != 0
    assert "interventions.variants.x.kind: unknown kind 'warp'" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    workdir = copy_workflow(tmp_path)
    section = {**QUICK, "variants": {"baseline": {"kind": "baseline"}, "orth": {
        "kind": "orthogonal_init", "targets": "both"}}, "seeds": [0, 1]}
    cfg = _write(workdir, section)
    snakemake(workdir, "interventions", "--configfile", cfg)
    out = workdir / "results/interventions/quick"
    eff = pd.read_csv(out / "effects/effects.csv")
    assert set(eff["variant"]) == {"orth"} and set(eff["measure"]) == set(MEASURES)
    per = eff[(eff["measure"] == "per_weight")]
    assert (per["effect"] > 0).all()  # orthogonal init raises PER of the write matrices
    for name in ("convergence", "effect_scatter"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/interventions_gpu.py"), "--out", str(tmp_path),
         "--device", "cpu", "--vocab-size", "256", "--hidden-size", "8", "--num-layers", "2",
         "--num-heads", "2", "--final-step", "4", "--n-tokens", "5000", "--eval-tokens", "32",
         "--batch-size", "4", "--seq-len", "16", "--threads", "1",
         "--variants", "baseline", "rank_up"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank_up" in (tmp_path / "effects.md").read_text()


def test_training_batch_keeps_token_ids_beyond_bytes():
    from lmdynamics.sources.tiny import training_batch

    tokens = np.arange(1000, 1400, dtype=np.int64)  # 100 sequences of 4 tokens
    batch = training_batch(tokens, 0, batch_size=5, seq_len=4, seed=0)
    assert batch.min() >= 1000 and (np.diff(batch, axis=1) == 1).all()


def test_study_code_imports_without_zarr_or_snakemake():
    """The GPU script's machine has neither (benchmarks/interventions_gpu.sh)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('zarr', 'snakemake'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import lmdynamics.interventions.study, lmdynamics.interventions.report\n"
        "from lmdynamics.interventions.report import effects_markdown\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")},
                          timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
