"""An intervention study in one process, for a GPU machine without zarr or snakemake.

Reads a study config (default: config/interventions_gpu.yaml, the decisive design at
Pythia-14m shape), trains every run it names (each variant x size x the variant's seeds) one
after the other, analyses each run's checkpoints in memory
(:mod:`lmdynamics.interventions.run`) and writes to ``--out``: runs.csv (per-step CKA / PER /
loss), losses.csv, outcomes.csv, run_contrasts.csv, effects.csv, machines.csv, effects.md
(the study's answer: primary outcome, p-value, smallest detectable effect, positive control)
and timing.json; effects.md is printed. Finished runs are kept in ``--out/runs`` and not
trained again, so an interrupted study resumes.

Tokens: the config's ``tokens`` file, or ``--tokens FILE.npy``, or ``--generated N``: a
first-order Markov chain over the vocabulary, each token followed by one of 4 fixed successors
with probabilities 0.6/0.25/0.1/0.05 (90%) or by a Zipf(1.1)-distributed token (10%), seeded:
learnable structure on a realistic vocabulary, no data to download; an instrument check, not
natural text.

    python benchmarks/interventions_gpu.py --out "$OUT" --generated 4000000
    python benchmarks/interventions_gpu.py --out o --override '{"device": "cpu", ...}'

``--override`` is a JSON object merged into the config's ``interventions`` section (nested
objects key by key) before it is checked, e.g. a smaller shape for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def markov_tokens(n: int, vocab: int, seed: int = 0):
    """``n`` tokens of the seeded Markov chain described in the module docstring."""
    import numpy as np

    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, size=(vocab, 4))
    choice = rng.choice(4, size=n, p=[0.6, 0.25, 0.1, 0.05])
    jump = rng.random(n) < 0.1
    zipf = np.minimum(rng.zipf(1.1, size=n) - 1, vocab - 1)
    out = np.empty(n, dtype=np.int64)
    prev = int(rng.integers(vocab))
    for i in range(n):
        prev = int(zipf[i]) if jump[i] else int(succ[prev, choice[i]])
        out[i] = prev
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=REPO / "config" / "interventions_gpu.yaml")
    p.add_argument("--override", default="{}", help="JSON merged into the section")
    p.add_argument("--tokens", default=None, help=".npy token file (replaces the config's)")
    p.add_argument("--generated", type=int, default=0,
                   help="train on this many generated Markov-chain tokens (the config's "
                        "tokens file is then not read)")
    a = p.parse_args(argv)
    config = yaml.safe_load(a.config.read_text())
    config["interventions"] = merge(config["interventions"], json.loads(a.override))
    if a.tokens:
        config["interventions"]["tokens"] = a.tokens
    section = config["interventions"]
    if section.get("device", "cpu") == "cpu" and section.get("reproducible_kernels", True):
        from lmdynamics.interventions.machine import pin_kernels

        pin_kernels()  # before numpy and torch load
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

    import pandas as pd
    import torch

    from lmdynamics.interventions.machine import machine_facts
    from lmdynamics.interventions.report import effects_markdown
    from lmdynamics.interventions.study import (
        load_tokens,
        resolve_section,
        run_one,
        settings_from,
        summarise,
        target_from,
        variant_seeds,
    )

    section = resolve_section({"interventions": section})
    settings = settings_from(section)
    out, runs_dir = a.out, a.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokens = (markov_tokens(a.generated, section["vocab_size"]) if a.generated
              else load_tokens(section["tokens"]))
    timing = {"tokens_s": time.perf_counter() - t0, "runs": {}}
    print(f"tokens ready ({len(tokens)}) in {timing['tokens_s']:.1f} s", flush=True)
    target = target_from(section)
    metrics, losses, machines = [], [], []
    for size, arch in section["sizes"].items():
        for variant, entry in section["variants"].items():
            spec = {k: v for k, v in entry.items() if k != "seeds"}
            for seed in variant_seeds(section, variant):
                stem = runs_dir / f"{variant}_{size}_seed{seed}"
                if not Path(f"{stem}_metrics.csv").exists():
                    t = time.perf_counter()
                    m, lo = run_one(variant, spec, size, arch, seed, settings, tokens, target)
                    timing["runs"][stem.name] = time.perf_counter() - t
                    Path(f"{stem}_machine.json").write_text(
                        json.dumps(machine_facts(settings.device), sort_keys=True))
                    lo.to_csv(f"{stem}_losses.csv", index=False)
                    m.to_csv(f"{stem}_metrics.csv", index=False)  # last: the run's marker
                    print(f"{stem.name}: {timing['runs'][stem.name]:.1f} s, loss "
                          f"{lo['train_loss'].iloc[-1]:.3f}", flush=True)
                metrics.append(pd.read_csv(f"{stem}_metrics.csv"))
                losses.append(pd.read_csv(f"{stem}_losses.csv"))
                machines.append(json.loads(Path(f"{stem}_machine.json").read_text()))
    runs, loss_table = pd.concat(metrics), pd.concat(losses)
    machine_table = pd.DataFrame(machines)
    outcomes, run_table, effects = summarise(runs, loss_table, section)
    for name, frame in (("runs", runs), ("losses", loss_table), ("outcomes", outcomes),
                        ("run_contrasts", run_table), ("effects", effects),
                        ("machines", machine_table)):
        frame.to_csv(out / f"{name}.csv", index=False)
    table = effects_markdown(effects, section, machine_table)
    (out / "effects.md").write_text(table)
    timing["total_s"] = time.perf_counter() - t0
    timing["device"] = (torch.cuda.get_device_name() if settings.device == "cuda" else "cpu")
    timing["section"] = section
    (out / "timing.json").write_text(json.dumps(timing, indent=1, default=str))
    print(table)
    print(f"total {timing['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
