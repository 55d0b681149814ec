"""Tests for lmdynamics.report.figures: every figure writes PNG and PDF, options are validated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from lmdynamics.report import figures

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SIZES_2 = {"70m": (6, 70_426_624), "160m": (12, 162_322_944)}
SIZES_3 = {"42k": (2, 42_000), "183k": (4, 183_000), "497k": (6, 497_000)}


def make_metrics_dataset(
    sizes: dict[str, tuple[int, int]], steps: list[int] = STEPS, seed: int = 0,
    flagged: bool = False,
) -> xr.Dataset:
    """Synthetic combined metrics dataset shaped like ``metrics.zarr``.

    ``sizes`` maps label -> (num_layers, n_params), ordered by parameter count. CKA rises to
    exactly 1 at the final step (later layers converge later); PER lies in (0, 1]. Layers a
    size lacks are NaN.
    """
    rng = np.random.default_rng(seed)
    n_layers = max(n for n, _ in sizes.values())
    step = np.asarray(steps)
    frac = step / step[-1]
    shape = (len(sizes), 2, n_layers, len(steps))
    cka = np.full(shape, np.nan)
    per_w = np.full(shape, np.nan)
    per_g = np.full(shape, np.nan)
    for s, (n, _) in enumerate(sizes.values()):
        for c in range(2):
            for layer in range(n):
                depth = (layer + 1) / n
                speed = 0.5 + 4.0 * (1 - depth) + s
                noise = rng.normal(0.0, 0.03, len(steps))
                curve = 1 - (1 - 0.2 * rng.random()) * (1 - frac) ** speed + noise
                curve[-1] = 1.0
                cka[s, c, layer] = np.clip(curve, 0.0, 1.0)
                per_w[s, c, layer] = np.clip(
                    0.99 - 0.1 * depth * frac + rng.normal(0, 0.005, len(steps)), 0.01, 1.0
                )
                per_g[s, c, layer] = np.clip(
                    0.6 - 0.2 * frac * depth + rng.normal(0, 0.02, len(steps)), 0.01, 1.0
                )
    dims = ("size", "component", "layer", "step")
    ds = xr.Dataset(
        {"cka": (dims, cka), "per_weight": (dims, per_w), "per_grad": (dims, per_g)},
        coords={
            "size": list(sizes),
            "component": ["attention", "mlp"],
            "layer": np.arange(n_layers),
            "step": step,
            "n_params": ("size", [p for _, p in sizes.values()]),
        },
        attrs={"final_step": int(step[-1]), "per_divisor": "H"},
    )
    if flagged:
        flags = np.zeros((len(sizes), len(steps)), dtype=bool)
        flags[0, 3] = True
        flags[-1, -3] = True
        ds["flagged"] = (("size", "step"), flags)
    return ds


def _assert_written(paths: list[Path], stem: Path) -> None:
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.with_suffix("") == stem for p in paths)
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000


@pytest.fixture(autouse=True)
def _fast_png(monkeypatch):
    """Lower the PNG resolution: the tests check files, not print quality."""
    monkeypatch.setattr(figures, "PNG_DPI", 100)


def holey_dataset() -> xr.Dataset:
    """Three sizes with NaN layers, an all-NaN step for one size, a NaN value, and flags."""
    ds = make_metrics_dataset(SIZES_3, flagged=True)
    ds["cka"].loc[{"size": "42k", "step": 4}] = np.nan
    ds["per_grad"].loc[{"size": "497k", "layer": 2, "step": 8}] = np.nan
    return ds


def replicated_dataset(seeds: tuple[int, ...] = (0, 1, 2)) -> xr.Dataset:
    """Seed replicates as ``combine_sizes`` stacks them: a ``seed`` dim after ``size``, each
    replicate its own synthetic run (different noise), flags (size, step) shared."""
    runs = [make_metrics_dataset(SIZES_2, seed=s).expand_dims(seed=[s], axis=1)
            for s in seeds]
    return xr.concat(runs, dim="seed").transpose("size", "seed", ...)


DATASETS = {"2sizes": lambda: make_metrics_dataset(SIZES_2), "3sizes-nan-flagged": holey_dataset,
            "2sizes-3seeds": replicated_dataset, "2sizes-1seed": lambda: replicated_dataset((0,))}


@pytest.mark.parametrize("data", sorted(DATASETS))
@pytest.mark.parametrize("x_axis", ["step", "fraction"])
@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_every_figure_writes_png_and_pdf(tmp_path, name, x_axis, data):
    import matplotlib.pyplot as plt

    open_before = len(plt.get_fignums())
    stem = tmp_path / "nested" / "dir" / name
    paths = figures.render(name, DATASETS[data](), stem, x_axis=x_axis)
    _assert_written(paths, stem)
    assert len(plt.get_fignums()) == open_before  # figure closed


def test_unknown_x_axis_names_value_and_allowed(tmp_path):
    ds = make_metrics_dataset(SIZES_2)
    with pytest.raises(ValueError, match=r"'layers'.*step, fraction"):
        figures.figure3(ds, tmp_path / "f3", x_axis="layers")
    with pytest.raises(ValueError, match="'epoch'"):
        figures.render("figure1", ds, tmp_path / "f1", x_axis="epoch")
    assert not (tmp_path / "f3.png").exists()


def test_unknown_figure_names_it_and_known_ones(tmp_path):
    ds = make_metrics_dataset(SIZES_2)
    with pytest.raises(ValueError, match=r"'figure9'.*figure1.*figure5"):
        figures.render("figure9", ds, tmp_path / "f9")


def test_helpers():
    ds = make_metrics_dataset(SIZES_3)
    assert list(figures.present_layers(ds, "42k")) == [0, 1]
    assert list(figures.present_layers(ds, "497k")) == [0, 1, 2, 3, 4, 5]
    assert figures.depth_fraction(5, 6) == pytest.approx(1.0)
    np.testing.assert_allclose(figures.x_values(ds, "fraction"), np.asarray(STEPS) / 512)
    pct = figures.layer_percentiles(ds["cka"].sel(size="42k", component="mlp"), [10, 50, 90])
    assert pct.shape == (3, len(STEPS))
    np.testing.assert_allclose(pct[:, -1], 1.0)  # all layers at the final step
    assert len(figures.size_colors(5)) == 5
    assert [figures.step_tick_label(v) for v in (0, 1, 100, 13000, 1e6)] == [
        "0", "1", "100", "13k", "1M",
    ]


def test_layer_statistics_ignore_nan():
    ds = holey_dataset()
    da = ds["cka"].sel(size="42k", component="attention")  # 2 of 6 layers, step 4 all NaN
    i = STEPS.index(4)
    pct = figures.layer_percentiles(da, [50])
    mean = figures.layer_mean(da)
    assert np.isnan(pct[0, i]) and np.isnan(mean[i])
    keep = np.arange(len(STEPS)) != i
    expected = da.sel(layer=[0, 1]).mean("layer").to_numpy()
    np.testing.assert_allclose(mean[keep], expected[keep])
    np.testing.assert_allclose(pct[0, keep], expected[keep])  # median of two = mean


def test_training_loss_figure(tmp_path):
    rows = []
    for size, scale in (("42k", 1.0), ("183k", 0.8)):
        for step in range(0, 300):
            rows.append({"size": size, "step": step, "loss": scale * (6 / np.sqrt(step + 1)) + 3})
    loss = pd.DataFrame(rows)
    stem = tmp_path / "training_loss"
    _assert_written(figures.training_loss_figure(loss, stem), stem)
    _assert_written(figures.training_loss_figure(loss, stem, smooth=None), stem)
    with pytest.raises(ValueError, match="loss"):
        figures.training_loss_figure(loss.drop(columns="loss"), stem)
    with pytest.raises(ValueError, match="smooth"):
        figures.training_loss_figure(loss, stem, smooth=2.0)


def test_over_seeds_mean_keeps_nan_and_one_seed_is_the_run_itself():
    ds = replicated_dataset()
    ds["cka"].loc[{"size": "70m", "seed": 1, "layer": 0, "step": 4}] = np.nan
    ds["cka_low"] = ds["cka"] - 0.1
    mean, per_seed = figures.over_seeds(ds)
    assert per_seed is ds and mean.attrs["n_seeds"] == 3 and "cka_low" not in mean
    expected = ds["cka"].to_numpy().mean(axis=1)  # numpy: NaN propagates
    np.testing.assert_array_equal(mean["cka"].transpose("size", ...).to_numpy(), expected)
    assert np.isnan(float(mean["cka"].sel(size="70m", layer=0, step=4, component="mlp")))
    one, none = figures.over_seeds(replicated_dataset((5,)))
    assert none is None and "seed" not in one.dims and "n_seeds" not in one.attrs
    xr.testing.assert_identical(one, make_metrics_dataset(SIZES_2, seed=5)
                                .assign_coords(seed=5).reset_coords("seed", drop=True))
    plain = make_metrics_dataset(SIZES_2)
    assert figures.over_seeds(plain)[0] is plain


def test_seed_sd_figure_says_one_seed_instead_of_a_line(tmp_path, monkeypatch):
    drawn = []
    real_save = figures.save_figure

    def keep(fig, stem):
        drawn.append(([t.get_text() for ax in fig.axes for t in ax.texts],
                      [line for ax in fig.axes for line in ax.get_lines()]))
        return real_save(fig, stem)

    monkeypatch.setattr(figures, "save_figure", keep)
    figures.cka_seed_sd(replicated_dataset((0,)), tmp_path / "one")
    texts, lines = drawn[-1]
    assert texts == ["one seed:\nno across-seed spread"] * 4 and lines == []
    ds = replicated_dataset((0, 1))
    figures.cka_seed_sd(ds, tmp_path / "two")
    texts, lines = drawn[-1]
    assert texts == [] and len(lines) == 2 * (6 + 12)  # a line per (component, layer)
    # each line is the sample sd over the two seeds: |a - b| / sqrt(2)
    cka = ds["cka"].sel(size="70m", component="attention", layer=0)
    np.testing.assert_allclose(lines[0].get_ydata(),
                               abs(cka.sel(seed=0) - cka.sel(seed=1)).to_numpy() / np.sqrt(2))


def test_training_loss_over_seeds(tmp_path):
    rows = [{"size": size, "seed": seed, "step": step, "loss": 3 + seed + 1 / (step + 1)}
            for size in ("42k", "183k") for seed in (0, 1) for step in range(50)]
    loss = pd.DataFrame(rows)
    stem = tmp_path / "training_loss"
    _assert_written(figures.training_loss_figure(loss, stem), stem)
    with pytest.raises(ValueError, match=r"42k: steps \[49\] are not logged by all 2 seeds"):
        figures.training_loss_figure(loss.drop(index=len(loss) // 2 - 1), stem)


def test_smooth_log_window():
    steps = np.array([0.0, 1, 2, 3, 100, 101, 102])
    values = np.array([9.0, 8, 7, np.nan, 4, 3, 2])
    out = figures.smooth_log_window(steps, values, 0.01)
    np.testing.assert_allclose(out[:3], [9, 8, 7])  # early steps are not averaged together
    assert np.isnan(out[3])
    np.testing.assert_allclose(out[4:], [3.5, 3, 2.5])
