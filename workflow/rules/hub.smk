# Pythia from the Hugging Face hub: one download job per (size, seed, step), and the last training
# batch read by byte range from the preshuffled Pile (or a local copy of it).
REFERENCE_STEPS = "|".join(str(s) for s in sorted({0, FINAL_STEP}))


# Every extraction of a size reads that size's step-0 and final checkpoints (Conjecture
# statistics), so those two are kept: were they temporary, adding a step later would download
# them again and, their files being new, redo every extraction of the size. Other revisions'
# weights are deleted once their store exists, unless hub.keep_weights.
rule download:
    output:
        config=f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/config.json",
        weights=(
            f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/model.safetensors"
            if config["hub"]["keep_weights"]
            else temp(
                f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/model.safetensors"
            )
        ),
        record=f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/revision.json",
    log:
        f"{RESULTS}/logs/download/{{size}}/seed{{seed}}/step{{step}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/download/{{size}}/seed{{seed}}/step{{step}}.tsv"
    wildcard_constraints:
        step=rf"(?!(?:{REFERENCE_STEPS})/)\d+",
    conda:
        ENV
    resources:
        network=1,
    params:
        repo=lambda wc: model_name(wc.size, wc.seed),
        revision=lambda wc: revision(wc.step),
        hub=config["hub"],
        out_dir=lambda wc, output: os.path.dirname(output.config),
    shell:
        "lmdynamics download --repo {params.repo:q} --revision {params.revision:q}"
        " --out-dir {params.out_dir:q} --min-free-gb {params.hub[min_free_gb]:q}"
        " --retries {params.hub[retries]:q} --backoff {params.hub[backoff]:q}"
        " > {log:q} 2>&1"


use rule download as download_reference with:
    output:
        config=f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/config.json",
        weights=f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/model.safetensors",
        record=f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/revision.json",
    wildcard_constraints:
        step=REFERENCE_STEPS,


rule pile_batch:
    input:
        [config["hub"]["tokens_path"]] if config["hub"]["tokens_path"] else [],
    output:
        npy=f"{RESULTS}/data/batch{FINAL_STEP - 1}.npy",
        record=f"{RESULTS}/data/batch{FINAL_STEP - 1}.json",
    log:
        f"{RESULTS}/logs/pile_batch.log",
    conda:
        ENV
    resources:
        network=0 if config["hub"]["tokens_path"] else 1,
    params:
        hub=config["hub"],
        # one argument, so that a path starting with '-' is still read as the path
        local=(
            [f"--tokens-path={config['hub']['tokens_path']}"]
            if config["hub"]["tokens_path"]
            else []
        ),
        batch=FINAL_STEP - 1,
    shell:
        "lmdynamics pile-batch --dataset {params.hub[dataset]:q}"
        " --dataset-revision {params.hub[dataset_revision]:q} {params.local:q}"
        " --batch {params.batch:q} --retries {params.hub[retries]:q}"
        " --backoff {params.hub[backoff]:q} --out {output.npy:q}"
        " --record {output.record:q} > {log:q} 2>&1"


rule hub_eval_batch:
    input:
        f"{RESULTS}/data/batch{FINAL_STEP - 1}.npy",
    output:
        f"{RESULTS}/eval_batch.npy",
    log:
        f"{RESULTS}/logs/hub_eval_batch.log",
    conda:
        ENV
    params:
        sequences=config["hub"]["sequences"],
    shell:
        "lmdynamics hub-eval-batch {input:q} --sequences {params.sequences:q}"
        " --out {output:q} > {log:q} 2>&1"
