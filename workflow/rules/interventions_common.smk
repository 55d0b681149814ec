# Configuration checks and input functions of the intervention study (interventions.smk).
import json

from lmdynamics.validation import ConfigError, schema_errors
from lmdynamics.interventions.study import TINY_TOKENS, run_section, section_errors
from lmdynamics.options import schema as package_schema
from lmdynamics.options import schema_path

# Package data of lmdynamics (lmdynamics/schemas/interventions.schema.yaml).
_ISCHEMA = str(schema_path("interventions"))
_ierrors = schema_errors(config, package_schema("interventions"))
if not _ierrors:
    validate(config, _ISCHEMA)  # fills in the defaults
    _ierrors = section_errors(config["interventions"])
if _ierrors:
    raise ConfigError("invalid configuration:\n  " + "\n  ".join(_ierrors))

IV = config["interventions"]
IV_RESULTS = f"results/interventions/{IV['name']}"
IV_VARIANTS = list(IV["variants"])
IV_SIZES = list(IV["sizes"])
IV_SEEDS = list(IV["seeds"])
IV_RUN = json.dumps(run_section(IV), sort_keys=True)
IV_OUT = f"{IV_RESULTS}/effects"


wildcard_constraints:
    variant="|".join(map(re.escape, IV_VARIANTS)),
    arch="|".join(map(re.escape, IV_SIZES)),
    seed=r"\d+",


def iv_runs(name):
    return expand(
        f"{IV_RESULTS}/runs/{{variant}}/{{arch}}/seed{{seed}}_{name}.csv",
        variant=IV_VARIANTS,
        arch=IV_SIZES,
        seed=IV_SEEDS,
    )


def iv_tokens(wildcards):
    """The user's token file, when one is configured (a changed file reruns the runs)."""
    return [] if IV["tokens"] == TINY_TOKENS else [IV["tokens"]]
