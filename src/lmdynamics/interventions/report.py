"""Tables and figures of an intervention study.

- :func:`effects_markdown`: the study's answer: the primary outcome declared in the config
  with its exact sign-flip p-value and the smallest effect the design could detect, the
  positive control(s), the dose-response (:func:`dose_response`), every contrast and
  measure, and the machines the runs used;
- :func:`convergence_figure`: CKA to the reference step over training for the targeted
  component's layers, one colour per variant (mean over seeds, band: lowest to highest seed);
- :func:`contrast_figure`: the per-seed differences of every contrast on the within-run
  measures, with their mean, interval and the smallest detectable effect;
- :func:`write_summary`: the summarising job (tables in, every table and effects.md out).

The captions (:data:`CAPTIONS`) say what counts as evidence for or against the hypothesis.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .outcomes import CKA_COLUMNS, RUN_MEASURES  # noqa: E402

__all__ = ["CAPTIONS", "contrast_figure", "convergence_figure", "dose_response",
           "effects_markdown", "machines_summary", "write_summary"]

CAPTIONS = {
    "convergence": (
        "CKA of each layer's output to its own output at the reference step (the last step "
        "before any learning-rate decay), per variant (line: mean over seeds; band: lowest "
        "to highest seed; dashed: the convergence threshold), for the targeted component's "
        "layers; the targeted layer's panel is marked. Evidence *for* the hypothesis (higher "
        "effective rank -> sooner convergence): the rank-raising variant's curve crosses the "
        "threshold for good earlier than the rank-lowering one's in the targeted layer and "
        "not in the others."),
    "contrasts": (
        "Per-seed differences (treatment - control run of the same seed) of the within-run "
        "contrast (targeted layer - mean of the other layers of its component), one row per "
        "contrast; bar: mean and bootstrap interval over seeds; grey band: the smallest effect "
        "the design could detect (paired t-test, power and level of the config). The "
        "hypothesis predicts negative crossing-step and area differences for a contrast of "
        "higher vs lower rank. The positive control must lie clearly outside the band."),
}

#: Decimal places per measure family in the tables.
DIGITS = {"crossing_step": 1, "crossing_loss": 4, "area": 4, "per_weight": 3, "per_grad": 3,
          "train_loss": 4, "eval_loss": 4}
#: Units per measure family.
UNITS = {"crossing_step": "steps", "crossing_loss": "nats", "area": "", "per_weight": "",
         "per_grad": "", "train_loss": "nats", "eval_loss": "nats"}


def _family(measure: str) -> str:
    for prefix in ("did_", "target_", "control_"):
        if measure.startswith(prefix):
            return measure[len(prefix):]
    return measure


def _num(x: float, digits: int, sign: bool = True) -> str:
    if not np.isfinite(x):
        return "NaN"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(p: float) -> str:
    if not np.isfinite(p):
        return "NaN"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _row(effects: pd.DataFrame, contrast: str, measure: str, size: str) -> pd.Series:
    sel = effects[(effects["contrast"] == contrast) & (effects["measure"] == measure)
                  & (effects["size"].astype(str) == str(size))]
    return sel.iloc[0]


def _verdict(r: pd.Series, alpha: float, power: float, unit: str, digits: int) -> str:
    mde = _num(r["mde"], digits, sign=False)
    if r["n_seeds"] < 2:
        return "**cannot be tested**: fewer than 2 seeds with both runs."
    if r["min_p"] >= alpha:
        return (f"**cannot be decided**: with {r['n_seeds']} seeds the exact test cannot go "
                f"below p = {_p(r['min_p'])} >= alpha = {alpha:g}; add seeds.")
    if r["p_value"] < alpha:
        return (f"**detected** at alpha = {alpha:g}: the treatment moves the outcome by "
                f"{_num(r['effect'], digits)} {unit} against control (p = {_p(r['p_value'])}).")
    return (f"**not detected** at alpha = {alpha:g} (p = {_p(r['p_value'])}). A true effect of "
            f"{mde} {unit} or more in either direction would have been detected with "
            f"probability {power:g}; a smaller one cannot be told from chance by this run.")


def machines_summary(machines: pd.DataFrame) -> list[str]:
    """Markdown lines on the machines the runs used (rows of
    :func:`lmdynamics.interventions.machine.machine_facts`, one per run)."""
    if machines.empty:
        return ["No machine facts were recorded."]
    cols = [c for c in ("cpu", "torch_cpu_capability", "mkl_cbwr", "openblas_coretype",
                        "torch_threads", "torch", "numpy", "transformers", "gpu")
            if c in machines]
    facts = machines[cols].fillna("-").astype(str)  # a fact not recorded: "-"
    distinct = facts.drop_duplicates()
    pinned = machines["kernels_pinned"].astype(bool) if "kernels_pinned" in machines else None
    lines = [f"{len(machines)} runs on {len(distinct)} distinct configuration(s) of machine "
             "and libraries:", "", "| " + " | ".join(cols) + " | runs |",
             "|" + "---|" * (len(cols) + 1)]
    for _, d in distinct.iterrows():
        n = int((facts == d).all(axis=1).sum())
        lines.append("| " + " | ".join(d[c] for c in cols) + f" | {n} |")
    lines.append("")
    if pinned is not None and pinned.all():
        lines.append("Every run computed with the pinned kernels (one thread; ATen AVX2, MKL "
                     "COMPATIBLE, OpenBLAS Haswell): the same numbers on any x86-64 CPU with "
                     "AVX2 and the same library versions.")
    else:
        n_free = len(machines) if pinned is None else int((~pinned).sum())
        lines.append(f"{n_free} run(s) computed with the machine's own kernels: their numbers "
                     "are bit-identical only on a machine with the same facts; on another CPU "
                     "expect per-run differences of the order given in docs/guide/"
                     "interventions.md (\"Determinism\").")
    return lines


def _strength(spec: Mapping[str, Any]) -> tuple[str, float] | None:
    """``(kind, value)`` of a variant entry whose kind has exactly one numeric parameter."""
    from .variants import STUDY_KEYS

    params = {k: v for k, v in spec.items() if k not in STUDY_KEYS}
    if len(params) != 1:
        return None
    (value,) = params.values()
    return (spec["kind"], float(value)) if isinstance(value, int | float) else None


def dose_response(effects: pd.DataFrame, section: Mapping[str, Any], size: str) -> list[str]:
    """Markdown lines: every contrast between two variants of the same one-parameter kind
    (e.g. ``rank_regulariser`` +0.3 against -0.3, and +1 against -1), by kind and by the
    distance between the two parameter values, with its effect, p and MDE on the primary
    measure. A causal effect grows with the distance; empty when no kind has such a
    contrast."""
    measure = section["primary"]["measure"]
    fam = _family(measure)
    d, u = DIGITS[fam], UNITS[fam]
    rows = []
    for name, c in section["contrasts"].items():
        t, k = (_strength(section["variants"][c[role]]) for role in ("treatment", "control"))
        if t is not None and k is not None and t[0] == k[0]:
            rows.append((t[0], abs(t[1] - k[1]), name, t[1], k[1]))
    if not rows:
        return []
    lines = [f"Contrasts between two strengths of one kind, on `{measure}`: a causal effect "
             "grows with the distance between the strengths (one row per kind and distance "
             "is a dose-response of one point; add arms in the config for more).", "",
             "| kind | contrast | treatment | control | effect | p | MDE |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for kind, _, name, tv, kv in sorted(rows):
        r = _row(effects, name, measure, size)
        lines.append(f"| {kind} | {name} | {tv:g} | {kv:g} | {_num(r['effect'], d)} {u} | "
                     f"{_p(r['p_value'])} | {_num(r['mde'], d, sign=False)} |")
    return [*lines, ""]


def effects_markdown(effects: pd.DataFrame, section: Mapping[str, Any],
                     machines: pd.DataFrame | None = None) -> str:
    """The study's answer as Markdown (see the module docstring)."""
    o, t, tr = section["outcomes"], section["target"], section["training"]
    alpha, power = o["alpha"], o["power"]
    primary = section["primary"]
    contrasts = section["contrasts"]
    sizes = [str(s) for s in section["sizes"]]
    lines = [
        f"# Intervention study `{section['name']}`", "",
        "**Question.** Does raising the effective rank of one layer make that layer converge "
        "sooner?", "",
        f"**Design.** Target: the {t['component']} write matrix of layer {t['layer']}; control: "
        f"the other {t['component']} layers of the same run. Schedule {tr['schedule']}, lr "
        f"{tr['lr']:g}, {tr['final_step']} updates of {tr['batch_size']} x {tr['seq_len']} "
        "tokens; CKA is measured against the reference step (the last before any "
        f"learning-rate decay), on checkpoints every {section['checkpoint_every']} steps; the "
        f"crossing of {o['cka_estimator']} CKA >= {o['threshold']:g} is interpolated between "
        "them. A run's within-run contrast is the targeted layer's measure minus the mean of "
        "the control layers'; a contrast's effect is, per seed, treatment run minus control "
        "run (same initialisation and data order) of that contrast, i.e. a "
        "difference-in-differences, averaged over seeds "
        f"[{o['bootstrap']['level']:.0%} percentile bootstrap interval over seeds]. "
        "p: exact two-sided sign-flip test over seeds (every one of the 2^n sign patterns). "
        f"MDE: the smallest true effect a two-sided paired t-test at alpha = {alpha:g} detects "
        f"with power {power:g}, at the observed standard deviation of the per-seed "
        "differences (non-central t; the sign-flip test's power is about the same).", ""]
    for size in sizes:
        head = "" if len(sizes) == 1 else f" (size {size})"
        c = contrasts[primary["contrast"]]
        r = _row(effects, primary["contrast"], primary["measure"], size)
        fam = _family(primary["measure"])
        d, u = DIGITS[fam], UNITS[fam]
        lines += [f"## Primary outcome{head}", "",
                  f"Declared in the config before the run: contrast `{primary['contrast']}` "
                  f"({c['treatment']} - {c['control']}), measure `{primary['measure']}`.", "",
                  f"Effect {_num(r['effect'], d)} {u} [{_num(r['low'], d)}, "
                  f"{_num(r['high'], d)}] over {r['n_seeds']} seeds; p = {_p(r['p_value'])} "
                  f"(smallest possible with {r['n_seeds']} seeds: {_p(r['min_p'])}); smallest "
                  f"detectable effect (alpha {alpha:g}, power {power:g}): "
                  f"{_num(r['mde'], d, sign=False)} {u}.", "",
                  "Verdict: " + _verdict(r, alpha, power, u, d), ""]
        controls = [n for n, k in contrasts.items() if k["positive_control"]]
        if controls:
            lines += [f"## Positive control{head}", ""]
            for name in controls:
                r = _row(effects, name, primary["measure"], size)
                k = contrasts[name]
                lines.append(f"- `{name}` ({k['treatment']} - {k['control']}) on "
                             f"`{primary['measure']}`: effect {_num(r['effect'], d)} {u}, "
                             f"n = {r['n_seeds']}, " + _verdict(r, alpha, power, u, d))
            if any(_row(effects, n, primary["measure"], size)["p_value"] >= alpha
                   for n in controls):
                lines += ["", "A positive control was **not** detected: this run could not "
                          "detect a change known to alter convergence, so its primary result "
                          "does not answer the question."]
            lines.append("")
        dose = dose_response(effects, section, size)
        if dose:
            lines += [f"## Dose-response{head}", "", *dose]
    lines += ["## Every contrast and measure", "",
              "Secondary: no correction for multiple comparisons; read them as description.",
              "", "| contrast | size | measure | n | treatment | control | effect [interval] "
              "| p | min p | MDE |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in contrasts:
        for size in sizes:
            for measure in RUN_MEASURES:
                r = _row(effects, name, measure, size)
                d = DIGITS[_family(measure)]
                undefined = f" ({r['n_undefined']} undefined)" if r["n_undefined"] else ""
                lines.append(
                    f"| {name} | {size} | {measure} | {r['n_seeds']}{undefined} | "
                    f"{_num(r['treatment_mean'], d, sign=False)} | "
                    f"{_num(r['control_mean'], d, sign=False)} | {_num(r['effect'], d)} "
                    f"[{_num(r['low'], d)}, {_num(r['high'], d)}] | {_p(r['p_value'])} | "
                    f"{_p(r['min_p'])} | {_num(r['mde'], d, sign=False)} |")
    lines += ["", "## Machines", ""]
    lines += machines_summary(machines if machines is not None else pd.DataFrame())
    return "\n".join(lines) + "\n"


def _save(fig, out_stem: Path) -> list[Path]:
    """The project's :func:`lmdynamics.report.figures.save_figure` (png + pdf, atomic), imported
    here so that the tables of this module import without zarr."""
    from lmdynamics.report.figures import save_figure

    return save_figure(fig, Path(out_stem))


def _variant_colors(variants: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def convergence_figure(metrics: pd.DataFrame, out_stem: Path,
                       section: Mapping[str, Any]) -> list[Path]:
    """Draw the convergence curves (see :data:`CAPTIONS`) from the stacked per-step tables
    (rows variant, size, seed, component, layer, step with the CKA columns)."""
    o, t = section["outcomes"], section["target"]
    column = CKA_COLUMNS[o["cka_estimator"]]
    sizes = [s for s in section["sizes"] if s in set(metrics["size"].astype(str))]
    variants = list(section["variants"])
    colors = _variant_colors(variants)
    sub_all = metrics[metrics["component"] == t["component"]]
    n_cols = int(sub_all["layer"].max()) + 1
    fig, axes = plt.subplots(len(sizes), n_cols, figsize=(2.6 * n_cols + 1.0,
                                                          2.0 * len(sizes) + 0.6),
                             squeeze=False, sharey=True, layout="constrained")
    for r, size in enumerate(sizes):
        sub = sub_all[sub_all["size"].astype(str) == size]
        for col in range(n_cols):
            ax = axes[r, col]
            g_layer = sub[sub["layer"] == col]
            if g_layer.empty:
                ax.set_axis_off()
                continue
            for v in variants:
                g = g_layer[g_layer["variant"] == v]
                if g.empty:
                    continue
                stat = g.groupby("step")[column].agg(["mean", "min", "max"])
                x = stat.index.to_numpy(dtype=float)
                ax.plot(x, stat["mean"], color=colors[v], lw=1.1, label=v)
                ax.fill_between(x, stat["min"], stat["max"], color=colors[v], alpha=0.15, lw=0)
            ax.axhline(o["threshold"], color="0.4", ls="--", lw=0.8)
            ax.set_ylim(max(-0.05, float(np.nanmin(g_layer[column])) - 0.05), 1.02)
            role = "target" if col == t["layer"] else "control"
            ax.set_title(f"{size} {t['component']} L{col} ({role})", fontsize=8,
                         fontweight="bold" if role == "target" else "normal")
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("CKA to reference", fontsize=8)
            if r == len(sizes) - 1:
                ax.set_xlabel("training step", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(variants), fontsize=8)
    return _save(fig, out_stem)


#: The within-run measures the contrast figure shows, one panel each.
FIGURE_MEASURES = ("did_crossing_step", "did_crossing_loss", "did_area")


def contrast_figure(run_contrasts: pd.DataFrame, effects: pd.DataFrame, out_stem: Path,
                    section: Mapping[str, Any]) -> list[Path]:
    """Draw the per-seed contrast differences (see :data:`CAPTIONS`).

    ``run_contrasts``: one row per run (variant, size, seed, the measures of
    :func:`lmdynamics.interventions.outcomes.run_contrasts`); ``effects``: the long table of
    :func:`lmdynamics.interventions.outcomes.contrast_effects`.
    """
    names = list(section["contrasts"])
    sizes = [str(s) for s in section["sizes"]]
    rows = [(n, s) for n in names for s in sizes]
    fig, axes = plt.subplots(1, len(FIGURE_MEASURES),
                             figsize=(3.2 * len(FIGURE_MEASURES), 0.55 * len(rows) + 1.4),
                             squeeze=False, layout="constrained")
    runs = run_contrasts.assign(size=run_contrasts["size"].astype(str))
    for ax, measure in zip(axes[0], FIGURE_MEASURES, strict=True):
        for y, (name, size) in enumerate(rows):
            c = section["contrasts"][name]
            sel = runs[runs["size"] == size]
            t = sel[sel["variant"] == c["treatment"]].set_index("seed")[measure]
            k = sel[sel["variant"] == c["control"]].set_index("seed")[measure]
            d = (t - k).dropna()
            r = _row(effects, name, measure, size)
            if np.isfinite(r["mde"]):
                ax.fill_betweenx([y - 0.4, y + 0.4], -r["mde"], r["mde"], color="0.88", lw=0)
            ax.scatter(d.to_numpy(), np.full(len(d), y) + np.linspace(-0.15, 0.15, len(d)),
                       s=9, color="tab:blue" if not c["positive_control"] else "tab:orange",
                       alpha=0.7, lw=0)
            if np.isfinite(r["effect"]):
                ax.errorbar(r["effect"], y, xerr=[[r["effect"] - r["low"]],
                                                  [r["high"] - r["effect"]]],
                            fmt="D", color="k", ms=4, lw=1.0, capsize=2)
        ax.axvline(0, color="0.4", lw=0.7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([n if len(sizes) == 1 else f"{n} ({s})" for n, s in rows]
                           if ax is axes[0, 0] else [], fontsize=7)
        unit = UNITS[_family(measure)]
        ax.set_xlabel(f"{measure}{f' ({unit})' if unit else ''}: treatment - control",
                      fontsize=8)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    return _save(fig, out_stem)


def write_summary(metrics_paths: Sequence[Path], losses_paths: Sequence[Path],
                  machine_paths: Sequence[Path], section: Mapping[str, Any],
                  out_dir: Path) -> None:
    """Read the runs' tables, summarise them (:func:`lmdynamics.interventions.study.summarise`)
    and write runs.csv, outcomes.csv, run_contrasts.csv, effects.csv, machines.csv and
    effects.md to ``out_dir``."""
    from lmdynamics.store import write_text_atomic

    from .study import summarise

    metrics = pd.concat([pd.read_csv(p) for p in metrics_paths], ignore_index=True)
    losses = pd.concat([pd.read_csv(p) for p in losses_paths], ignore_index=True)
    machines = pd.DataFrame([json.loads(Path(p).read_text()) for p in machine_paths])
    outcomes, run_table, effects = summarise(metrics, losses, section)
    out = Path(out_dir)
    write_text_atomic(metrics.to_csv(index=False), out / "runs.csv")
    write_text_atomic(outcomes.to_csv(index=False), out / "outcomes.csv")
    write_text_atomic(run_table.to_csv(index=False), out / "run_contrasts.csv")
    write_text_atomic(effects.to_csv(index=False), out / "effects.csv")
    write_text_atomic(machines.to_csv(index=False), out / "machines.csv")
    write_text_atomic(effects_markdown(effects, section, machines), out / "effects.md")
