# lmdynamics: how the layers of language models converge during pretraining.
# Default: the embedded tiny suite (offline). The paper's Pythia grid: --configfile config/config.yaml
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/tiny.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


if config["source"] == "tiny":

    include: "workflow/rules/tiny.smk"


if config["source"] == "hub":

    include: "workflow/rules/hub.smk"


include: "workflow/rules/extract.smk"


# after extract.smk: its adopt_recorded rule shares the extraction options
if config["source"] == "local":

    include: "workflow/rules/local.smk"


include: "workflow/rules/reduce.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/measures.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/conjecture.smk"


if "interventions" in config:

    include: "workflow/rules/interventions.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
