# Configuration checks and input functions of the intervention study (interventions.smk).
import json

from lmdynamics.validation import ConfigError
from lmdynamics.interventions.study import (
    TINY_TOKENS,
    resolve_section,
    run_section,
    variant_seeds,
)

IV = resolve_section(config)  # schema, defaults, and what the schema cannot say
IV_RESULTS = f"results/interventions/{IV['name']}"
IV_VARIANTS = list(IV["variants"])
IV_SIZES = list(IV["sizes"])
IV_RUN = json.dumps(run_section(IV), sort_keys=True)
IV_OPTIONS = json.dumps(IV, sort_keys=True)
IV_OUT = f"{IV_RESULTS}/effects"


wildcard_constraints:
    variant="|".join(map(re.escape, IV_VARIANTS)),
    arch="|".join(map(re.escape, IV_SIZES)),
    seed=r"\d+",


def iv_runs(name, ext="csv"):
    """One file per run: every variant x size x the variant's seeds."""
    return [
        f"{IV_RESULTS}/runs/{v}/{a}/seed{s}_{name}.{ext}"
        for v in IV_VARIANTS
        for a in IV_SIZES
        for s in variant_seeds(IV, v)
    ]


def iv_variant_spec(wildcards):
    """The variant's entry without its seeds (a changed seed list reruns no run)."""
    spec = {k: v for k, v in IV["variants"][wildcards.variant].items() if k != "seeds"}
    return json.dumps(spec, sort_keys=True)


def iv_tokens(wildcards):
    """The user's token file, when one is configured (a changed file reruns the runs)."""
    return [] if IV["tokens"] == TINY_TOKENS else [IV["tokens"]]
