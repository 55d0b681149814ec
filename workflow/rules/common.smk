# Configuration checks and input functions shared by every rule file.
from types import SimpleNamespace

from snakemake.utils import validate

from lmdynamics.config import check_config, schedule_for

SCHEMA = workflow.source_path("../schemas/config.schema.yaml")

# Friendly messages first (key, bad value, what is allowed), then Snakemake's validate,
# which also fills in the schema's defaults.
check_config(config, SCHEMA)


validate(config, SCHEMA)


RESULTS = f"results/{config['suite']}"
SIZES = list(config["sizes"])
STEPS = sorted(config["steps"])
FINAL_STEP = config["final_step"]
SCHEDULE = schedule_for(config)
ENV = "../../envs/lmdynamics.yaml"
FIGURES = ["figure1", "figure2", "figure3", "figure4", "figure5"]


wildcard_constraints:
    size="|".join(map(re.escape, SIZES)),
    step=r"\d+",
    figure="|".join(FIGURES),


def checkpoint_files(wildcards):
    """The Hugging Face model directory of one (size, step), as its two files."""
    base = f"{RESULTS}/checkpoints/{wildcards.size}/step{wildcards.step}"
    return {"config": f"{base}/config.json", "weights": f"{base}/model.safetensors"}


def size_stores(wildcards):
    """Every analysed step's store of one size (the per-size reduction's inputs)."""
    return expand(f"{RESULTS}/extract/{wildcards.size}/step{{step}}.zarr", step=STEPS)


def model_name(size):
    if config["source"] == "tiny":
        return f"lmdynamics-tiny-{size}"
    return config["hub"]["repo"].format(size=size)


def revision(step):
    if config["source"] == "tiny":
        return f"step{step}"
    return config["hub"]["revision"].format(step=step)


# Conjecture statistics (workflow/rules/conjecture.smk). Each extraction job also reads the
# step-0 and final checkpoints of its size (distance from init, cosine and singular directions
# vs final); Snakemake keeps a temp() checkpoint until every job that reads it has finished.
CONJECTURE = config["conjecture"]
STATS_FIGURES = [
    "norms",
    "distance",
    "shape",
    "residual",
    "spectra",
    "embedding",
    "closeness",
]


def reference_checkpoints(wildcards):
    """Files of the step-0 and final checkpoints of a size (none when statistics are off)."""
    if not CONJECTURE["enabled"]:
        return {}
    files = {}
    for name, step in (("init", 0), ("final", FINAL_STEP)):
        ref = checkpoint_files(SimpleNamespace(size=wildcards.size, step=step))
        files.update({f"{name}_{key}": path for key, path in ref.items()})
    return files


def stats_args(wildcards):
    """The extract command's statistics flags (empty when statistics are off)."""
    if not CONJECTURE["enabled"]:
        return ""
    refs = reference_checkpoints(wildcards)
    lo, hi = CONJECTURE["spectrum_fit"]
    return (
        f"--init-checkpoint {os.path.dirname(refs['init_weights'])}"
        f" --final-checkpoint {os.path.dirname(refs['final_weights'])}"
        f" --stats-max-elements {CONJECTURE['max_elements']}"
        f" --stats-top-k {CONJECTURE['top_k']}"
        f" --stats-embedding-tokens {CONJECTURE['embedding_tokens']}"
        f" --stats-spectrum-fit {lo} {hi}"
    )


def all_outputs():
    outputs = [
        f"{RESULTS}/metrics.csv",
        f"{RESULTS}/tables/mcc.csv",
        f"{RESULTS}/tables/mcc.md",
    ]
    outputs += expand(
        f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"]
    )
    if CONJECTURE["enabled"]:
        outputs += expand(
            f"{RESULTS}/figures/conjecture_{{name}}.{{ext}}",
            name=STATS_FIGURES,
            ext=["png", "pdf"],
        )
    if config["source"] == "tiny":
        outputs += [
            f"{RESULTS}/training_loss.csv",
            f"{RESULTS}/figures/training_loss.png",
            f"{RESULTS}/figures/training_loss.pdf",
        ]
    return outputs
