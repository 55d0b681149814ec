# Configuration checks and input functions shared by every rule file.
import importlib.util
import os
from types import SimpleNamespace

from snakemake.utils import validate

from lmdynamics.config import (
    canonical,
    check_config,
    command_line_integers,
    eval_from_file,
    hub_repo,
    hub_revision,
    hub_section,
    resolved_family,
    resolved_seeds,
    schedule_for,
    suite_for,
    suite_vocab,
)
from lmdynamics.commands import READS
from lmdynamics.options import job_options, schema_path
from lmdynamics.plan import parameters
from lmdynamics.sources import local
from lmdynamics.sources.suites import DISCOVERED_PREFIX
from lmdynamics.report.registry import (
    REPORT_CATEGORIES,
    STATS_FIGURES,
    measure_category,
    measure_figures,
    paper_figures,
)

# The config schema is package data of lmdynamics (lmdynamics/schemas/config.schema.yaml).
SCHEMA = str(schema_path("config"))

# Friendly messages first (key, bad value, what is allowed), then Snakemake's validate,
# which also fills in the schema's defaults. The config files are read again strictly
# (repeated keys, YAML 1.1 octals), since Snakemake has already loaded them its own way.
# `--config 'seeds=[0,1]'` reaches us as strings: digits given there are integers.
config.update(command_line_integers(config, workflow.config_settings.config))
check_config(config, SCHEMA, files=workflow.configfiles)


validate(config, SCHEMA)
# Source local: steps "discover", an unset final_step and family, read from disk.
config.update(local.resolve(config))
# The suite definition (source hub; lmdynamics.sources.suites): hub.repo, hub.revision and
# hub.dataset the config leaves unset come from it.
SUITE = suite_for(config)
config["hub"] = hub_section(config, SUITE)
# An unset family: the suite definition's (hub), GPT-NeoX (tiny).
config["family"] = resolved_family(config)
# Unset seeds: [0], or every replicate of a hub suite that has them (docs/guide/seeds.md).
config["seeds"] = resolved_seeds(config)
# Sorted keys: parameters built from config sections do not change when a file is reordered.
config.update(canonical(dict(config)))


RESULTS = f"results/{config['suite']}"
SIZES = list(config["sizes"])
# Replicate ids (docs/guide/seeds.md): every per-checkpoint path has a seed<k> level.
SEEDS = sorted(config["seeds"])
STEPS = sorted(config["steps"])
FINAL_STEP = config["final_step"]
# The Conjecture statistics' initialisation: step 0, or the earliest analysed step of a suite
# that has no step 0 (OLMo-1B-hf's first revision is step 1000).
INIT_STEP = STEPS[0]
# Checkpoints you can trust (docs/guide/checkpoint-trust.md): what the pre-flight hub audit
# and the content audit flag, and what the run does with it (audit.defective).
HUB_AUDIT = f"{RESULTS}/tables/hub_audit.csv"
DEFECTS = f"{RESULTS}/tables/defective.csv"
SCHEDULE = schedule_for(config)
ENV = "../../envs/lmdynamics.yaml"
FIGURES = paper_figures(config["metrics"]["standardize"])
# One figure per measure turned on (config section measures; workflow/rules/measures.smk).
MEASURE_FIGURES = measure_figures(config["measures"])
# train_tiny's priority: 1 for the smallest size ... len(SIZES) for the largest (by parameters).
TRAINING_PRIORITY = (
    {
        size: rank
        for rank, size in enumerate(
            sorted(SIZES, key=lambda size: parameters(config, size)), start=1
        )
    }
    if config["source"] == "tiny"
    else {}
)
# GPUs one extraction job asks for: `--resources gpu=N` locally, `--gpus=1` on SLURM.
EXTRACTION_GPUS = 0 if config["extraction"]["device"] == "cpu" else 1


wildcard_constraints:
    size="|".join(map(re.escape, SIZES)),
    step=r"\d+",
    seed=r"\d+",
    figure="|".join(FIGURES),


def checkpoint_files(wildcards):
    """The Hugging Face model directory of one (size, seed, step), as its two files."""
    base = checkpoint_dir(wildcards.size, wildcards.seed, wildcards.step)
    if config["source"] == "local":  # the weights file the folder holds
        weights = local.weight_file(base) or f"{base}/{local.WEIGHT_NAMES[0]}"
        return {"config": f"{base}/config.json", "weights": str(weights)}
    return {"config": f"{base}/config.json", "weights": f"{base}/model.safetensors"}


# The paper code's gradient batches follow the data order: per replicate for the tiny suite
# (replicate k trains with seed + k); one file for the hub (the config check refuses hub
# replicates with that protocol: their data order is not the Pile's preshuffled one).
GRADIENT_BATCHES = f"{RESULTS}/gradient_batches/" + (
    "seed{seed}/step{step}" if config["source"] == "tiny" else "step{step}"
)


def gradient_batches_input(wildcards):
    """The paper code's gradient batches of one step, when that protocol is configured."""
    if config["extraction"]["gradient_protocol"] != "paper_code":
        return {}
    path = GRADIENT_BATCHES.format(
        size=wildcards.size, seed=wildcards.seed, step=wildcards.step
    )
    return {"grad_batches": f"{path}.npy"}


def gradient_batches_args(wildcards, input):
    """``--gradient-batches`` and an extraction job's gradient batch files, if it has any."""
    if "grad_batches" not in input.keys():
        return []
    files = input.grad_batches
    return ["--gradient-batches", *([files] if isinstance(files, str) else files)]


def size_extraction_inputs(wildcards):
    """The inputs of the tiny suite's one extraction job per (size, seed): every analysed
    step's checkpoint files (and gradient batches), and the reference store."""
    inputs = {"checkpoints": [], "grad_batches": []}
    for step in STEPS:
        each = SimpleNamespace(size=wildcards.size, seed=wildcards.seed, step=step)
        inputs["checkpoints"] += checkpoint_files(each).values()
        inputs["grad_batches"] += gradient_batches_input(each).values()
    if not inputs["grad_batches"]:
        del inputs["grad_batches"]
    return {**inputs, **reference_store(wildcards)}


def checkpoint_dir(size, seed, step):
    """The one place a checkpoint directory's path is formed."""
    if config["source"] == "local":
        return str(local.checkpoint_dir(config["local"]["path"], size, seed, step))
    return f"{RESULTS}/checkpoints/{size}/seed{seed}/step{step}"


def extract_store(size, seed, step):
    """The one place a per-checkpoint store's path is formed."""
    return f"{RESULTS}/extract/{size}/seed{seed}/step{step}.zarr"


def size_stores(wildcards):
    """Every analysed step's store of one (size, seed): the per-size reduction's inputs."""
    return [extract_store(wildcards.size, wildcards.seed, step) for step in STEPS]


def all_stores():
    """Every store of the configuration: sizes x seeds x steps."""
    return [
        extract_store(size, seed, step)
        for size in SIZES
        for seed in SEEDS
        for step in STEPS
    ]


def per_seed_outputs(kind):
    """``<RESULTS>/<kind>/<size>/seed<k>.zarr`` of every size and seed (the inputs of the
    combining rules; ``kind``: metrics or stats)."""
    return [
        f"{RESULTS}/{kind}/{size}/seed{seed}.zarr" for size in SIZES for seed in SEEDS
    ]


def package_sources(*modules):
    """Source files of ``lmdynamics.<module>``, used as inputs of the cheap rules (figures,
    tables) so that editing a plotting module redraws the figures (mtime trigger). Costly
    rules (training, downloads, extraction, reductions) do not depend on their code: rerun
    them by hand after a change that alters results (``--forcerun extract``)."""
    return [importlib.util.find_spec(f"lmdynamics.{m}").origin for m in modules]


def report_category(wildcards):
    """The report category of one paper figure."""
    return REPORT_CATEGORIES[wildcards.figure]


def model_name(size, seed):
    """The model a (size, seed) names: the one place the hub repo id is formed. Tiny:
    ``lmdynamics-tiny-<size>`` for seed 0 (as before seeds), ``...-seed<k>`` otherwise.
    """
    seed = int(seed)
    if config["source"] == "tiny":
        return f"lmdynamics-tiny-{size}" + (f"-seed{seed}" if seed else "")
    if config["source"] == "local":
        return f"local:{config['local']['path']}"
    return hub_repo(config, SUITE, size, seed)


def revision(step):
    """The revision name of a step; for a discover suite, a label until the download job
    has read the branch from the hub (its revision.json, which the store records)."""
    if config["source"] != "hub":
        return f"step{step}"
    return hub_revision(config, SUITE, step) or f"{DISCOVERED_PREFIX}step{step}"


# A discover suite's download job reads the branch of its step from the hub's branch list
# (--step N --revision-pattern REGEX); other suites name the revision (--revision NAME).
DISCOVER = config["source"] == "hub" and hub_revision(config, SUITE, 0) is None
REVISION_FLAGS = (
    "--step {wildcards.step:q} --revision-pattern" if DISCOVER else "--revision"
)


def download_revision(wildcards):
    """The value of REVISION_FLAGS: the revision name, or the suite's branch pattern."""
    return SUITE.revisions["pattern"] if DISCOVER else revision(wildcards.step)


# Where the eval batch comes from: the last training batch of the preshuffled Pile (Pythia),
# or a local file named by eval_data (every other suite; docs/guide/suites.md).
EVAL_FROM_FILE = eval_from_file(config, SUITE)


# Conjecture statistics (workflow/rules/conjecture.smk). What they need of the INIT_STEP and
# final checkpoints of a size (init weights, final weights, the final top-k singular
# directions) is computed once per (size, seed) into reference/<size>/seed<k>.zarr (rule reference); each
# extraction job reads that store and its own checkpoint. The two checkpoints are inputs of the
# reference job only, so on the hub they are temp() like every other revision's weights.
CONJECTURE = config["conjecture"]


def reference_checkpoints(wildcards):
    """Files of the INIT_STEP and final checkpoints of a size (the reference job's inputs)."""
    files = {}
    for name, step in (("init", INIT_STEP), ("final", FINAL_STEP)):
        ref = checkpoint_files(
            SimpleNamespace(size=wildcards.size, seed=wildcards.seed, step=step)
        )
        files.update({f"{name}_{key}": path for key, path in ref.items()})
    return files


def reference_store(wildcards):
    """The size's reference store, read by its extractions (none when statistics are off)."""
    if not CONJECTURE["enabled"]:
        return {}
    return {
        "reference": f"{RESULTS}/reference/{wildcards.size}/seed{wildcards.seed}.zarr"
    }


def stats_args(wildcards):
    """The extract command's reference store, one list item per argument (the rule quotes
    each one); empty when statistics are off."""
    refs = reference_store(wildcards)
    return ["--reference", refs["reference"]] if refs else []


def recorded_store(template, size, seed, step):
    """The store lmdynamics.record wrote for one (size, seed, step) (source local)."""
    return str(local.recorded_store(template, size, seed, step))


def all_outputs():
    outputs = [
        f"{RESULTS}/metrics.csv",
        f"{RESULTS}/tables/mcc.csv",
        f"{RESULTS}/tables/mcc.md",
        f"{RESULTS}/tables/mcc_seeds.csv",
        f"{RESULTS}/tables/checkpoint_audit.csv",
        f"{RESULTS}/tables/tensor_audit.csv",
        DEFECTS,
        f"{RESULTS}/figures/mcc_sensitivity.png",
        f"{RESULTS}/figures/mcc_sensitivity.pdf",
    ]
    outputs += expand(
        f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"]
    )
    outputs += expand(
        f"{RESULTS}/figures/measure_{{measure}}.{{ext}}",
        measure=MEASURE_FIGURES,
        ext=["png", "pdf"],
    )
    if CONJECTURE["enabled"]:
        outputs += expand(
            f"{RESULTS}/figures/conjecture_{{name}}.{{ext}}",
            name=STATS_FIGURES,
            ext=["png", "pdf"],
        )
    if config["source"] == "hub":
        outputs.append(HUB_AUDIT)
    if config["source"] == "tiny":
        outputs += [
            f"{RESULTS}/training_loss.csv",
            f"{RESULTS}/figures/training_loss.png",
            f"{RESULTS}/figures/training_loss.pdf",
        ]
    return outputs
