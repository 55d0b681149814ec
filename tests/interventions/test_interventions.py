"""Intervention study (lmdynamics.interventions): variants, outcome rules, contrasts, runs,
the study's configs, the pipeline on a tiny study, and the workflow.

The effective-rank checks measure rank with the project's float64 estimator
(:func:`lmdynamics.estimators.rank.effective_rank` of LAPACK singular values, Roy & Vetterli 2007),
independent of the torch code under test; the learning-rate control is checked against
torch's own AdamW with a parameter group at the scaled rate.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lmdynamics.estimators.paired import minimum_detectable_effect, sign_flip_test
from lmdynamics.estimators.rank import effective_rank
from lmdynamics.extraction.passes import COMPONENTS
from lmdynamics.interventions.outcomes import (
    LAYER_MEASURES,
    RUN_MEASURES,
    area_above,
    contrast_effects,
    crossing_step,
    run_contrasts,
)
from lmdynamics.interventions.report import (
    contrast_figure,
    convergence_figure,
    dose_response,
    effects_markdown,
)
from lmdynamics.interventions.run import SCHEDULES, RunSettings
from lmdynamics.interventions.study import (
    resolve_section,
    run_one,
    section_errors,
    settings_from,
    summarise,
    target_from,
    variant_seeds,
)
from lmdynamics.interventions.variants import (
    Target,
    build_variant,
    entropy_penalty,
    normalised_entropy,
    spectrum_update,
    target_block,
    target_matrix,
)
from lmdynamics.options import schema
from lmdynamics.sources.tiny import learning_rate, model_config, train_updates
from support.workflow import REPO, snakemake

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


def _model(spec=None, seed: int = 0):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(model_config(spec or {"hidden_size": 16, "num_layers": 3,
                                                    "num_heads": 2}, seq_len=8))


# ------------------------------------------------------------------ variants

@pytest.mark.parametrize("strength", [1.0, -1.0])
def test_regulariser_moves_effective_rank_in_its_sign(strength):
    w = _decaying_matrix().float().requires_grad_(True)
    before = _erank(w)
    opt = torch.optim.SGD([w], lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        entropy_penalty([w], strength).backward()
        opt.step()
    after = _erank(w)
    assert w.dtype == torch.float32 and w.grad.dtype == torch.float32
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


def test_penalty_is_computed_in_float64_and_has_no_nan_gradient_for_rank_deficiency():
    a = torch.zeros(4, 6)
    a[0, 0] = 1.0  # rank 1: zero singular values must not give NaN gradients
    b = _decaying_matrix().float()
    a.requires_grad_(True)
    pen = entropy_penalty([a, b], 0.5)
    assert pen.dtype == torch.float64
    expected = -0.5 * (0.0 + float(normalised_entropy(b.double()))) / 2
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-12)
    pen.backward()
    assert torch.isfinite(a.grad).all()


def test_variants_act_on_the_target_only():
    model = _model()
    target = Target("mlp", 1)
    w = target_matrix(model, target)
    assert w is model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight
    assert target_block(model, target) is model.gpt_neox.layers[1].mlp
    assert target_block(model, Target("attention", 2)) is model.gpt_neox.layers[2].attention
    others = {i: _erank(model.gpt_neox.layers[i].mlp.dense_4h_to_h.weight) for i in (0, 2)}
    build_variant("o", {"kind": "orthogonal_init"}, target).init(model)
    assert _erank(w) / 16 == pytest.approx(1.0, abs=1e-6)
    # Frobenius norm of N(0, 0.02^2) entries: 0.02 sqrt(16 * 64)
    assert float(w.detach().norm()) == pytest.approx(0.02 * math.sqrt(16 * 64), rel=1e-5)
    for i, e in others.items():
        assert _erank(model.gpt_neox.layers[i].mlp.dense_4h_to_h.weight) == e
    with pytest.raises(ValueError, match="target.layer: 3; the model has 3 layers"):
        target_matrix(model, Target("mlp", 3))


def test_spectrum_update_reshapes_singular_values_at_equal_step_length():
    prev = torch.randn(16, 32, dtype=torch.float64)
    delta = _decaying_matrix(3)
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    for p in (0.0, 0.5, 2.0):
        got = spectrum_update(prev, prev + delta, p) - prev
        sv = np.linalg.svd(got.numpy(), compute_uv=False)
        expected = s ** p * np.linalg.norm(s) / np.linalg.norm(s ** p)
        np.testing.assert_allclose(sv, expected, rtol=1e-10)
        # the same singular vectors: the reshaped update projects onto the original's
        u, _, vh = np.linalg.svd(delta.numpy(), full_matrices=False)
        np.testing.assert_allclose(np.abs(np.diag(u.T @ got.numpy() @ vh.T)), expected,
                                   rtol=1e-9)
    assert _erank(spectrum_update(prev, prev + delta, 0.0) - prev) == pytest.approx(16)
    assert _erank(spectrum_update(prev, prev + delta, 2.0) - prev) < _erank(delta) - 1
    torch.testing.assert_close(spectrum_update(prev, prev + delta, 1.0), prev + delta)
    assert torch.equal(spectrum_update(prev, prev.clone(), 0.0), prev)
    # rank 2 update, p = 0: the null directions stay null (no 0^0 = 1 step)
    low = (torch.outer(torch.ones(16), torch.ones(32))
           + torch.outer(torch.arange(16.0), torch.arange(32.0) % 3)).double()
    sv = np.linalg.svd((spectrum_update(prev, prev + low, 0.0) - prev).numpy(),
                       compute_uv=False)
    assert (sv[2:] < 1e-9 * sv[0]).all() and sv[0] == pytest.approx(sv[1])


def test_lr_scale_is_adamw_at_the_scaled_rate():
    """The update rule against torch's AdamW with the block in its own parameter group."""
    tokens = np.random.default_rng(0).integers(0, 256, 4000)
    target, factor = Target("mlp", 1), 0.3
    variant = build_variant("low", {"kind": "lr_scale", "factor": factor}, target)
    model = _model()
    reference = copy.deepcopy(model)
    params = variant.update.parameters(model)
    previous = [p.detach().clone() for p in params]

    @torch.no_grad()
    def rewrite(step, _loss):
        for p, prev in zip(params, previous, strict=True):
            p.copy_(variant.update.apply(prev, p))
            prev.copy_(p)

    kw = {"final_step": 4, "batch_size": 2, "seq_len": 8, "lr": 3e-3, "warmup": 1, "seed": 0}
    train_updates(model, tokens, after_update=rewrite, **kw)
    block = {id(p) for p in target_block(reference, target).parameters()}
    groups = [{"params": [p for p in reference.parameters() if id(p) not in block],
               "scale": 1.0},
              {"params": [p for p in reference.parameters() if id(p) in block],
               "scale": factor}]
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    from lmdynamics.sources.tiny import training_batch

    for u in range(4):
        for g in opt.param_groups:
            g["lr"] = learning_rate(u, lr=3e-3, warmup=1, final_step=4) * g["scale"]
        batch = torch.from_numpy(training_batch(tokens, u, batch_size=2, seq_len=8, seed=0))
        loss = reference(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
    # equal up to rounding, which Adam's first steps (m / sqrt(v) with v tiny) magnify: a
    # factor of 1 + 1e-7 alone gives ~1e-4 of a parameter's move; a wrong rule gives O(1)
    init = _model()
    for (name, a), b, c in zip(model.named_parameters(), reference.parameters(),
                               init.parameters(), strict=True):
        moved = float((b - c).detach().abs().max())
        assert moved > 0 and float((a - b).detach().abs().max()) < 1e-3 * moved, name


@pytest.mark.parametrize("spec, message", [
    ({"kind": "nope"}, r"variants\.v\.kind: unknown kind 'nope'"),
    ({"kind": "rank_regulariser"}, r"variants\.v: .*needs strength"),
    ({"kind": "rank_regulariser", "strength": 0}, r"strength: 0\.0; must be non-zero"),
    ({"kind": "baseline", "strength": 1.0}, r"variants\.v\.strength: not a parameter"),
    ({"kind": "update_spectrum", "exponent": 1}, r"exponent: 1\.0; must be >= 0 and not 1"),
    ({"kind": "lr_scale", "factor": 0.0}, r"factor: 0\.0; must be > 0 and not 1"),
    ({"kind": "lr_scale", "factor": float("nan")}, r"factor: nan; must be finite"),
    ({"kind": "rank_regulariser", "strength": "big"}, r"wrong type"),
])
def test_bad_variant_entries_are_one_line_naming_the_key(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        build_variant("v", spec, Target("mlp", 0))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ outcome rules

STEPS = [0, 8, 16, 24, 32]


@pytest.mark.parametrize("cka, expected", [
    ([0.95, 0.96, 0.97, 0.99, 1.0], 0.0),           # above from the first analysed step
    ([0.1, 0.2, 0.3, 0.5, 1.0], 24 + 8 * 0.4 / 0.5),  # 0.5 -> 1.0 crosses 0.9 at 4/5 of 8
    ([0.1, 0.8, 0.95, 0.97, 1.0], 8 + 8 * 0.1 / 0.15),  # between 8 (0.8) and 16 (0.95)
    ([0.1, 0.9, 0.95, 0.97, 1.0], 8.0),             # exactly at the threshold counts
    ([0.1, 0.95, 0.85, 0.95, 1.0], 16 + 8 * 0.05 / 0.1),  # a dip below: must *stay* above
    ([0.95, 0.95, np.nan, 0.95, 1.0], 24.0),        # NaN is below, no interpolation from it
    ([0.95, 0.95, 0.95, 0.95, np.nan], math.nan),   # undefined last CKA: no convergence
    ([0.95, 0.95, 0.95, 0.95, 0.8], math.nan),      # below at the last step: never converged
])
def test_crossing_step_is_the_last_upward_crossing_interpolated(cka, expected):
    got = crossing_step(STEPS, cka, 0.9)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_crossing_step_is_continuous_and_bad_steps_raise():
    # moving one CKA value a little moves the crossing a little (no jump to a checkpoint)
    a = crossing_step(STEPS, [0.1, 0.2, 0.3, 0.899, 1.0], 0.9)
    b = crossing_step(STEPS, [0.1, 0.2, 0.3, 0.901, 1.0], 0.9)
    assert a == pytest.approx(24 + 8 * 0.001 / 0.101) and b == pytest.approx(16 + 8 * 0.6 / 0.601)
    assert abs(a - b) < 0.1  # an analysed-step rule would jump by the spacing, 8
    with pytest.raises(ValueError, match="strictly increasing"):
        crossing_step([0, 8, 8], [1, 1, 1], 0.5)
    with pytest.raises(ValueError, match="equal length"):
        crossing_step([0, 8], [1.0], 0.5)


def test_area_above_is_the_mean_distance_over_the_fraction_of_training():
    assert area_above([0, 32, 64], [1, 1, 1], 64) == 0.0
    assert area_above([0, 32, 64], [0, 0, 0], 64) == pytest.approx(1.0)
    assert area_above([0, 16, 64], [0, 0.25, 1.0], 64) == pytest.approx(0.5)
    assert math.isnan(area_above([0, 32, 64], [0, np.nan, 1], 64))


def _layer_outcomes(values: dict[int, float], run_wide: float = 2.0) -> pd.DataFrame:
    rows = []
    for comp in COMPONENTS:
        for layer, v in values.items():
            rows.append({"component": comp, "layer": layer,
                         **{m: v + (100 if comp == "attention" else 0)
                            for m in LAYER_MEASURES},
                         "train_loss": run_wide, "eval_loss": run_wide + 1})
    return pd.DataFrame(rows)


def test_run_contrast_is_target_minus_mean_of_the_same_components_other_layers():
    got = run_contrasts(_layer_outcomes({0: 10.0, 1: 30.0, 2: 20.0}), component="mlp", layer=1)
    assert list(got) == list(RUN_MEASURES)
    assert got["target_crossing_step"] == 30.0 and got["control_crossing_step"] == 15.0
    assert got["did_crossing_step"] == 15.0 and got["did_area"] == 15.0
    assert got["train_loss"] == 2.0 and got["eval_loss"] == 3.0
    with pytest.raises(ValueError, match="at least one other mlp layer"):
        run_contrasts(_layer_outcomes({0: 1.0}), component="mlp", layer=0)


def _runs(shifts: dict[int, float]) -> pd.DataFrame:
    """Seeds differ a lot between each other (common to both arms), the treatment's DiD by
    ``shifts[seed]`` within a seed."""
    rows = []
    for seed, shift in shifts.items():
        for variant in ("up", "down"):
            base = 50.0 * seed
            value = base + (shift if variant == "up" else 0.0)
            rows.append({"variant": variant, "size": "s", "seed": seed,
                         **dict.fromkeys(RUN_MEASURES, value)})
    return pd.DataFrame(rows)


def test_contrast_effects_are_seed_paired_with_the_exact_test_and_the_mde():
    shifts = {0: -9.0, 1: -8.0, 2: -7.0, 3: -10.0, 4: 1.0, 5: -6.0}
    eff = contrast_effects(_runs(shifts), {"rank": {"treatment": "up", "control": "down"}},
                           alpha=0.05, power=0.8, samples=500, level=0.9)
    row = eff[eff["measure"] == "did_crossing_step"].iloc[0]
    d = np.array(list(shifts.values()))
    assert row["effect"] == pytest.approx(d.mean()) and row["n_seeds"] == 6
    # hand: sum -39; flipping a subset F changes it to -39 - 2 sum(F), so |sum| >= 39 for F
    # with sum(F) >= 0 or <= -39: {}, {1}, the five negatives, the five negatives and 1
    flips = [f for r in range(7) for f in itertools.combinations(d, r)
             if sum(f) >= 0 or sum(f) <= -39]
    assert len(flips) == 4
    assert row["p_value"] == 4 / 64 and row["min_p"] == 2 / 64
    assert row["sd"] == pytest.approx(np.std(d, ddof=1))
    assert row["mde"] == minimum_detectable_effect(np.std(d, ddof=1), 6, alpha=0.05,
                                                   power=0.8)
    assert row["low"] < row["effect"] < row["high"]
    assert row["treatment_mean"] - row["control_mean"] == pytest.approx(d.mean())
    # a NaN difference is counted and left out, never silently a number
    runs = _runs(shifts)
    runs.loc[(runs["seed"] == 4) & (runs["variant"] == "up"), "did_area"] = np.nan
    eff = contrast_effects(runs, {"rank": {"treatment": "up", "control": "down"}},
                           alpha=0.05, power=0.8, samples=500, level=0.9)
    area = eff[eff["measure"] == "did_area"].iloc[0]
    assert area["n_seeds"] == 5 and area["n_undefined"] == 1
    assert area["p_value"] == sign_flip_test(np.delete(d, 4)).p_value


def test_dose_response_lists_same_kind_contrasts_by_distance():
    """Two ± pairs of the regulariser (0.3 and 1.0) and a positive control of another kind:
    the dose-response lists the two same-kind contrasts, the smaller distance first, with
    their effect and p on the primary measure; without such a contrast it is empty."""
    runs = pd.concat([_runs({s: -2.0 - s for s in range(6)}),
                      _runs({s: -9.0 - s for s in range(6)}).replace(
                          {"variant": {"up": "up1", "down": "down1"}})])
    contrasts = {"strong": {"treatment": "up1", "control": "down1"},
                 "weak": {"treatment": "up", "control": "down"}}
    section = {"primary": {"contrast": "weak", "measure": "did_area"}, "contrasts": contrasts,
               "variants": {"up": {"kind": "rank_regulariser", "strength": 0.3},
                            "down": {"kind": "rank_regulariser", "strength": -0.3},
                            "up1": {"kind": "rank_regulariser", "strength": 1.0},
                            "down1": {"kind": "rank_regulariser", "strength": -1.0},
                            "lr": {"kind": "lr_scale", "factor": 3.0, "seeds": [0, 1]}}}
    eff = contrast_effects(runs, contrasts, alpha=0.05, power=0.8, samples=200, level=0.9)
    rows = [line for line in dose_response(eff, section, "s")
            if line.startswith("| rank_regulariser")]
    assert [r.split("|")[2].strip() for r in rows] == ["weak", "strong"]
    assert "| 0.3 | -0.3 | -4.5000 " in rows[0] and "| 1 | -1 | -11.5000 " in rows[1]
    assert f"| {2 / 64:.3f} |" in rows[0]  # every seed negative: the exact floor
    other_kinds = {**section, "contrasts": {"pc": {"treatment": "lr", "control": "down"}}}
    assert dose_response(eff, other_kinds, "s") == []


# ------------------------------------------------------------------ runs and settings

def _settings(**kw) -> RunSettings:
    return RunSettings(**{"final_step": 6, "batch_size": 4, "seq_len": 16, "lr": 3e-3,
                          "warmup": 2, "schedule": "constant", "decay_fraction": 0.5,
                          "checkpoint_every": 2, "gradient_every": 4, "eval_tokens": 32,
                          "vocab_size": 256, "device": "cpu", "reproducible_kernels": True,
                          **kw})


def test_schedules_and_the_reference_step():
    s = _settings(final_step=100, warmup=10, checkpoint_every=8, gradient_every=16)
    assert [s.learning_rate(u) for u in (0, 9, 10, 99)] == pytest.approx(
        [3e-4, 3e-3, 3e-3, 3e-3])
    assert s.reference_step == 100 and s.steps[-2:] == (96, 100) and s.steps[:3] == (0, 8, 16)
    assert s.gradient_steps == (0, 16, 32, 48, 64, 80, 96, 100)
    w = _settings(final_step=100, warmup=10, schedule="wsd", decay_fraction=0.2,
                  checkpoint_every=8, gradient_every=16)
    assert w.reference_step == 80 and w.steps[-1] == 80
    assert w.learning_rate(79) == pytest.approx(3e-3)  # stable up to the reference step
    assert w.learning_rate(99) == pytest.approx(3e-4)  # then linear to 10%
    assert w.learning_rate(89) == pytest.approx(3e-3 * (1 - 0.9 * 10 / 20))
    c = _settings(final_step=100, warmup=10, schedule="cosine")
    assert [c.learning_rate(u) for u in range(100)] == [
        learning_rate(u, lr=3e-3, warmup=10, final_step=100) for u in range(100)]
    assert set(SCHEDULES) == {"constant", "wsd", "cosine"}
    with pytest.raises(ValueError, match="gradient_every=3: must be a positive multiple"):
        _settings(gradient_every=3)
    with pytest.raises(ValueError, match="eval_tokens=100"):
        _settings(eval_tokens=100)
    with pytest.raises(ValueError, match="reference step 3"):
        _settings(schedule="wsd", warmup=4)


def test_variants_with_identical_settings_give_identical_metrics():
    tokens = np.random.default_rng(0).integers(0, 256, 5000)
    spec = {"kind": "rank_regulariser", "strength": 0.3}
    target = Target("mlp", 0)
    a_m, a_l = run_one("a", spec, "s", TINY_ARCH, 1, _settings(), tokens, target)
    b_m, b_l = run_one("b", dict(spec), "s", TINY_ARCH, 1, _settings(), tokens, target)
    cols = ["cka", "cka_debiased", "per_weight", "per_grad", "loss"]
    assert np.array_equal(a_m[cols].to_numpy(), b_m[cols].to_numpy(), equal_nan=True)
    assert np.array_equal(a_l["train_loss"], b_l["train_loss"])
    assert sorted(set(a_m["step"])) == [0, 2, 4, 6]
    # gradients at multiples of gradient_every and the reference step only
    assert set(a_m.dropna(subset=["per_grad"])["step"]) == {0, 4, 6}
    final = a_m[a_m["step"] == 6]
    np.testing.assert_allclose(final["cka"], 1.0, rtol=1e-12)
    assert (a_l["penalty"] < 0).all() and (a_l["lr"] > 0).all()
    base_m, _ = run_one("base", {"kind": "baseline"}, "s", TINY_ARCH, 1, _settings(), tokens,
                        target)
    step0 = ["per_weight", "per_grad", "loss"]
    np.testing.assert_array_equal(base_m[base_m.step == 0][step0].to_numpy(),
                                  a_m[a_m.step == 0][step0].to_numpy())
    assert not np.array_equal(base_m[base_m.step == 6][step0].to_numpy(),
                              a_m[a_m.step == 6][step0].to_numpy())


def test_an_update_rule_acts_on_the_target_in_a_run():
    tokens = np.random.default_rng(0).integers(0, 256, 5000)
    target = Target("mlp", 0)
    runs = {name: run_one(name, spec, "s", TINY_ARCH, 3, _settings(), tokens, target)[0]
            for name, spec in (("base", {"kind": "baseline"}),
                               ("frozen", {"kind": "lr_scale", "factor": 1e-9}))}

    def per(name, comp, layer, step):
        m = runs[name]
        return float(m[(m.component == comp) & (m.layer == layer) & (m.step == step)]
                     ["per_weight"].iloc[0])

    # at a billionth of the rate the targeted matrix keeps its initial spectrum
    assert per("frozen", "mlp", 0, 6) == pytest.approx(per("frozen", "mlp", 0, 0), abs=1e-6)
    assert abs(per("base", "mlp", 0, 6) - per("base", "mlp", 0, 0)) > 1e-4
    assert abs(per("frozen", "mlp", 1, 6) - per("frozen", "mlp", 1, 0)) > 1e-4


# ------------------------------------------------------------------ the study's configs

def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_shipped_configs_resolve_and_carry_the_decisive_design():
    for name, size in (("interventions.yaml", "183k"), ("interventions_gpu.yaml", "14m")):
        section = resolve_section(_config(REPO / "config" / name))
        settings_from(section)
        assert list(section["sizes"]) == [size]
        assert section["training"]["schedule"] == "constant"
        primary = section["contrasts"][section["primary"]["contrast"]]
        n = len(set(variant_seeds(section, primary["treatment"]))
                & set(variant_seeds(section, primary["control"])))
        assert n >= 16
        assert section["primary"]["measure"] == "did_area"
        for c in section["contrasts"].values():
            if c["positive_control"]:
                n = len(set(variant_seeds(section, c["treatment"]))
                        & set(variant_seeds(section, c["control"])))
                assert 2 / 2 ** n < 0.01  # the exact test can reach p < 0.01
    local = resolve_section(_config(REPO / "config" / "interventions.yaml"))
    gpu = resolve_section(_config(REPO / "config" / "interventions_gpu.yaml"))
    same = ("variants", "contrasts", "primary", "seeds", "outcomes", "checkpoint_every",
            "gradient_every", "reproducible_kernels")
    assert {k: local[k] for k in same} == {k: gpu[k] for k in same}


def _section(**changes) -> dict:
    section = resolve_section(_config(REPO / "config" / "interventions.yaml"))
    return {**section, **changes}


def test_section_errors_name_the_key():
    s = _section(contrasts={"x": {"treatment": "rank_up", "control": "nope",
                                  "positive_control": False},
                            "y": {"treatment": "lr_low", "control": "rank_up",
                                  "positive_control": False}},
                 primary={"contrast": "z", "measure": "did_area"},
                 target={"component": "mlp", "layer": 3}, vocab_size=300)
    errors = "\n".join(section_errors(s))
    assert "interventions.contrasts.x.control: 'nope' is not among" in errors
    assert "interventions.primary.contrast: 'z' is not among" in errors
    assert "interventions.target.layer: 3; size 183k has layers 0..2" in errors
    assert "interventions.vocab_size: 300" in errors
    lone = _section(variants={**_section()["variants"], "lr_high": {
        "kind": "lr_scale", "factor": 3.0, "seeds": [99]}})
    assert any("share 0 seed(s)" in e for e in section_errors(lone))


def test_schema_enums_are_the_codes_choices():
    node = schema("interventions")["properties"]["interventions"]["properties"]
    assert tuple(node["target"]["properties"]["component"]["enum"]) == COMPONENTS
    assert set(node["training"]["properties"]["schedule"]["enum"]) == set(SCHEDULES)
    assert tuple(node["primary"]["properties"]["measure"]["enum"]) == RUN_MEASURES


# ------------------------------------------------------------------ the pipeline, tiny

TINY_STUDY = {
    "name": "tiny_study",
    "tokens": "tiny",
    "vocab_size": 256,
    "target": {"component": "mlp", "layer": 0},
    "variants": {
        "rank_up": {"kind": "rank_regulariser", "strength": 0.3},
        "rank_down": {"kind": "rank_regulariser", "strength": -0.3},
        "baseline": {"kind": "baseline", "seeds": [0, 1, 2, 3, 4, 5]},
        "lr_low": {"kind": "lr_scale", "factor": 0.3, "seeds": [0, 1, 2, 3, 4, 5]},
    },
    "seeds": [0, 1, 2, 3, 4, 5],
    "contrasts": {"weight_rank": {"treatment": "rank_up", "control": "rank_down"},
                  "positive_control": {"treatment": "lr_low", "control": "baseline",
                                       "positive_control": True}},
    "primary": {"contrast": "weight_rank", "measure": "did_crossing_step"},
    "sizes": {"s8": TINY_ARCH},
    "training": {"final_step": 8, "batch_size": 4, "seq_len": 16, "lr": 0.003,
                 "warmup": 1},
    "checkpoint_every": 2,
    "gradient_every": 4,
    "eval_tokens": 32,
    "outcomes": {"threshold": 0.5, "bootstrap": {"samples": 200}},
}


def test_tiny_study_end_to_end_in_process(tmp_path):
    """The whole pipeline on a study of seconds: every run, outcomes, contrasts, effects,
    effects.md and both figures; the numbers in effects.md are those of the tables."""
    section = resolve_section({"interventions": TINY_STUDY})
    assert section["outcomes"]["alpha"] == 0.05 and section["training"]["schedule"] == \
        "constant"
    settings, target = settings_from(section), target_from(section)
    from lmdynamics.sources.tiny import load_corpus

    tokens = load_corpus()
    metrics, losses = [], []
    for variant, entry in section["variants"].items():
        spec = {k: v for k, v in entry.items() if k != "seeds"}
        for seed in variant_seeds(section, variant):
            m, lo = run_one(variant, spec, "s8", TINY_ARCH, seed, settings, tokens, target)
            metrics.append(m)
            losses.append(lo)
    outcomes, runs, effects = summarise(pd.concat(metrics), pd.concat(losses), section)
    assert len(runs) == 24 and set(runs.columns) >= set(RUN_MEASURES)
    assert np.isfinite(outcomes["crossing_step"]).all()
    # the table's primary effect and p are the sign-flip test of the per-seed DiD differences
    up = runs[runs.variant == "rank_up"].set_index("seed")["did_crossing_step"]
    down = runs[runs.variant == "rank_down"].set_index("seed")["did_crossing_step"]
    test = sign_flip_test((up - down).to_numpy())
    row = effects[(effects.contrast == "weight_rank")
                  & (effects.measure == "did_crossing_step")].iloc[0]
    assert row["p_value"] == test.p_value and row["effect"] == pytest.approx(test.mean)
    from lmdynamics.interventions.machine import machine_facts

    machines = pd.DataFrame([machine_facts("cpu")])
    text = effects_markdown(effects, section, machines)
    assert "## Primary outcome" in text and "## Positive control" in text
    assert f"p = {test.p_value:.3f}" in text or f"p = {test.p_value:.2g}" in text
    assert "smallest detectable effect" in text and "| weight_rank | s8 | did_area |" in text
    assert "Verdict: **" in text and "## Machines" in text
    all_metrics = pd.concat(metrics)
    for path in (*convergence_figure(all_metrics, tmp_path / "conv", section),
                 *contrast_figure(runs, effects, tmp_path / "contrasts", section)):
        assert path.stat().st_size > 1000


# ------------------------------------------------------------------ determinism

def _cli_run(tmp_path: Path, name: str, options: dict, env: dict) -> bytes:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "lmdynamics", "intervention-run", "--variant", "down",
           "--variant-spec", json.dumps({"kind": "rank_regulariser", "strength": -0.3}),
           "--size", "s", "--architecture",
           json.dumps({"hidden_size": 32, "num_layers": 2, "num_heads": 2}), "--seed", "0",
           "--options", json.dumps(options), "--out-metrics", f"{out}_m.csv",
           "--out-losses", f"{out}_l.csv", "--out-machine", f"{out}.json"]
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OPENBLAS_CORETYPE")}
    proc = subprocess.run(cmd, env={**clean, "PYTHONPATH": str(REPO / "src"), **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(f"{out}_m.csv").read_bytes() + Path(f"{out}_l.csv").read_bytes()


def test_pinned_runs_do_not_depend_on_threads_or_the_kernels_the_machine_would_pick(tmp_path):
    """Two processes that would otherwise compute with different kernels (AVX-512 vs AVX2
    ATen kernels, MKL's own dispatch vs a fixed branch, numpy's SkylakeX vs Haswell
    kernels, 2 threads vs 1) give byte-identical tables with reproducible_kernels, and
    different ones without (so the check can fail)."""
    options = {"tokens": "tiny", "vocab_size": 256, "device": "cpu",
               "reproducible_kernels": True, "target": {"component": "mlp", "layer": 0},
               "training": {"final_step": 24, "batch_size": 4, "seq_len": 32, "lr": 0.003,
                            "warmup": 2, "schedule": "constant", "decay_fraction": 0.2},
               "checkpoint_every": 8, "gradient_every": 8, "eval_tokens": 64}
    machine_a = {"OMP_NUM_THREADS": "1"}
    machine_b = {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                 "OPENBLAS_CORETYPE": "Sandybridge"}
    pinned = [_cli_run(tmp_path, f"p{i}", options, env)
              for i, env in enumerate((machine_a, machine_b))]
    assert pinned[0] == pinned[1]
    facts = json.loads((tmp_path / "p1.json").read_text())
    assert facts["kernels_pinned"] and facts["torch_threads"] == 1
    free = {**options, "reproducible_kernels": False}
    unpinned = [_cli_run(tmp_path, f"u{i}", free, env)
                for i, env in enumerate((machine_a, machine_b))]
    assert unpinned[0] != unpinned[1]


# ------------------------------------------------------------------ workflow

QUICK = {**TINY_STUDY, "name": "quick",
         "variants": {"up": {"kind": "rank_regulariser", "strength": 0.3},
                      "down": {"kind": "rank_regulariser", "strength": -0.3}},
         "seeds": [0, 1],
         "contrasts": {"rank": {"treatment": "up", "control": "down"}},
         "primary": {"contrast": "rank", "measure": "did_crossing_step"},
         "training": {"final_step": 4, "batch_size": 4, "seq_len": 16, "lr": 0.003,
                      "warmup": 1}}


def _write(workdir: Path, section: dict) -> str:
    (workdir / "config" / "quick.yaml").write_text(yaml.safe_dump({"interventions": section}))
    return "config/quick.yaml"


def _planned_runs(proc: subprocess.CompletedProcess) -> list[str]:
    """variant/size/seedN of every intervention_run job a dry run plans (not the inputs that
    the summarising job lists)."""
    blocks = proc.stdout.split("rule ")
    return [m[1] for b in blocks if b.startswith("intervention_run:")
            for m in [re.search(r"output: \S*/runs/(\S+?)_metrics\.csv", b)] if m]


def test_adding_a_variant_seed_or_contrast_reruns_no_run(workflow_copy):
    workdir = workflow_copy
    cfg = _write(workdir, QUICK)
    target = "results/interventions/quick/runs/up/s8/seed0_metrics.csv"
    snakemake(workdir, target, "--configfile", cfg)
    grown = {**QUICK, "variants": {**QUICK["variants"], "base": {"kind": "baseline"}},
             "contrasts": {**QUICK["contrasts"], "b": {"treatment": "up", "control": "base"}},
             "outcomes": {**QUICK["outcomes"], "threshold": 0.8}}
    _write(workdir, grown)
    proc = snakemake(workdir, "interventions", "-n", "--configfile", cfg)
    planned = sorted(set(_planned_runs(proc)))
    assert "up/s8/seed0" not in planned and "base/s8/seed0" in planned, proc.stdout[-3000:]
    # a changed training setting or target reruns it (the check above can fail)
    _write(workdir, {**grown, "target": {"component": "attention", "layer": 0}})
    proc = snakemake(workdir, "interventions", "-n", "--configfile", cfg)
    assert "up/s8/seed0" in set(_planned_runs(proc))


def test_default_tiny_run_has_no_intervention_rules(workflow_copy):
    workdir = workflow_copy
    proc = snakemake(workdir, "-n", "--configfile", "config/tiny.yaml")
    # rule names only: paths in the output may contain the word (a checkout named so)
    assert "rule intervention" not in proc.stdout and "intervention_" not in proc.stdout


def test_decisive_and_gpu_configs_plan_every_run(workflow_copy):
    workdir = workflow_copy
    tokens = workdir / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 50304, 100_000).astype(np.uint16))
    (workdir / "config" / "tokens.yaml").write_text(
        yaml.safe_dump({"interventions": {"tokens": str(tokens)}}))
    for files, size in ((["config/interventions.yaml"], "183k"),
                        (["config/interventions_gpu.yaml", "config/tokens.yaml"], "14m")):
        proc = snakemake(workdir, "interventions", "-n", "--configfile", *files)
        section = resolve_section(_config(REPO / files[0]))
        runs = set(_planned_runs(proc))
        expected = {f"{v}/{size}/seed{s}" for v in section["variants"]
                    for s in variant_seeds(section, v)}
        assert runs == expected


def test_bad_intervention_config_is_one_line_naming_the_key(workflow_copy):
    workdir = workflow_copy
    cfg = _write(workdir, {**QUICK, "variants": {**QUICK["variants"], "x": {"kind": "warp"}}})
    proc = snakemake(workdir, "interventions", "-n", "--configfile", cfg, check=False)
    assert proc.returncode != 0
    assert "interventions.variants.x.kind: unknown kind 'warp'" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_quick_study_through_the_workflow(workflow_copy):
    workdir = workflow_copy
    cfg = _write(workdir, {**TINY_STUDY, "name": "quick"})
    snakemake(workdir, "interventions", "--configfile", cfg)
    out = workdir / "results/interventions/quick"
    eff = pd.read_csv(out / "effects/effects.csv")
    assert set(eff["contrast"]) == {"weight_rank", "positive_control"}
    assert set(eff["measure"]) == set(RUN_MEASURES)
    assert "## Primary outcome" in (out / "effects/effects.md").read_text()
    machines = pd.read_csv(out / "effects/machines.csv")
    assert len(machines) == 24 and machines["kernels_pinned"].all()
    for name in ("convergence", "contrasts"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path):
    override = {"device": "cpu", "vocab_size": 256,
                "sizes": {"14m": TINY_ARCH}, "target": {"component": "mlp", "layer": 0},
                "seeds": [0, 1], "variants": QUICK["variants"],
                "contrasts": QUICK["contrasts"], "primary": QUICK["primary"],
                "training": QUICK["training"], "checkpoint_every": 2, "gradient_every": 2,
                "eval_tokens": 32}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/interventions_gpu.py"), "--out", str(tmp_path),
         "--generated", "5000", "--override", json.dumps(override)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Primary outcome" in (tmp_path / "effects.md").read_text()


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
        "import lmdynamics.interventions.machine\n"
        "from lmdynamics.interventions.study import resolve_section\n"
        "import yaml\n"
        "resolve_section(yaml.safe_load(open(sys.argv[1])))\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code,
                           str(REPO / "config" / "interventions_gpu.yaml")],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
