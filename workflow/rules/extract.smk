# A forward and backward pass on the eval batch per checkpoint, each into its own zarr store.
# Hub suites: one job per (size, seed, step), so adding a step downloads and extracts that step
# only. The tiny suite: one job per (size, seed) extracting every step in one process (a
# checkpoint takes about a second, the process's start several), so adding a step there
# extracts that (size, seed) again; its stores are the same as one job per step writes.
# What the job reads of the config: READS["extract"] (lmdynamics.commands).
EXTRACTION_OPTIONS = job_options(config, *READS["extract"])
# Source local: the job waits for a complete checkpoint folder and records its fingerprint.
LOCAL_ARGS = (
    [
        f"--local-settle={float(config['local']['settle_seconds'])}",
        f"--local-wait={float(config['local']['wait_seconds'])}",
    ]
    if config["source"] == "local"
    else []
)
EXTRACT_COMMAND = (
    "lmdynamics extract --checkpoint {params.checkpoints:q}"
    " --eval-batch {input.batch:q} --size {wildcards.size:q} --step {params.steps:q}"
    " --replicate {wildcards.seed:q}"
    " --model {params.model:q} --revision {params.revisions:q}"
    " --options {params.options:q} {params.grad_batches:q} --threads {threads:q}"
    " {params.stats:q} {params.local:q}"
    " --out {output:q} > {log:q} 2>&1"
)


if config["source"] == "tiny":

    rule extract:
        input:
            unpack(size_extraction_inputs),
            batch=f"{RESULTS}/eval_batch.npy",
        output:
            [directory(extract_store("{size}", "{seed}", step)) for step in STEPS],
        log:
            f"{RESULTS}/logs/extract/{{size}}/seed{{seed}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/extract/{{size}}/seed{{seed}}.tsv"
        conda:
            ENV
        threads: 1
        resources:
            gpu=EXTRACTION_GPUS,
        params:
            options=EXTRACTION_OPTIONS,
            model=lambda wc: model_name(wc.size, wc.seed),
            steps=STEPS,
            revisions=[revision(step) for step in STEPS],
            checkpoints=lambda wc: [
                checkpoint_dir(wc.size, wc.seed, step) for step in STEPS
            ],
            grad_batches=gradient_batches_args,
            stats=stats_args,
            local=LOCAL_ARGS,
        shell:
            EXTRACT_COMMAND


if config["source"] != "tiny":

    rule extract:
        input:
            unpack(checkpoint_files),
            unpack(gradient_batches_input),
            unpack(reference_store),
            batch=f"{RESULTS}/eval_batch.npy",
        output:
            directory(extract_store("{size}", "{seed}", "{step}")),
        log:
            f"{RESULTS}/logs/extract/{{size}}/seed{{seed}}/step{{step}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/extract/{{size}}/seed{{seed}}/step{{step}}.tsv"
        conda:
            ENV
        threads: 1
        resources:
            gpu=EXTRACTION_GPUS,
        params:
            options=EXTRACTION_OPTIONS,
            model=lambda wc: model_name(wc.size, wc.seed),
            steps=lambda wc: [wc.step],
            revisions=lambda wc: [revision(wc.step)],
            checkpoints=lambda wc, input: [os.path.dirname(input.weights)],
            grad_batches=gradient_batches_args,
            stats=stats_args,
            local=LOCAL_ARGS,
        shell:
            EXTRACT_COMMAND


# The paper code's gradient protocol: training batches of steps c-5 and c-4 for checkpoint c
# (0 and 1 below step 5). Tiny suite: rebuilt from the corpus; hub: the first 128 sequences of
# each read by byte range from the preshuffled Pile (a network job), or from hub.tokens_path.
rule gradient_batches:
    input:
        (
            [config["hub"]["tokens_path"]]
            if config["source"] == "hub" and config["hub"]["tokens_path"]
            else []
        ),
    output:
        npy=f"{GRADIENT_BATCHES}.npy",
        record=f"{GRADIENT_BATCHES}.json",
    log:
        GRADIENT_BATCHES.replace(f"{RESULTS}/", f"{RESULTS}/logs/") + ".log",
    conda:
        ENV
    resources:
        network=(
            1 if config["source"] == "hub" and not config["hub"]["tokens_path"] else 0
        ),
    params:
        replicate=lambda wc: wc.seed if "seed" in wc.keys() else 0,
        options=job_options(config, *READS["gradient-batches"]),
    shell:
        "lmdynamics gradient-batches --step {wildcards.step:q}"
        " --replicate {params.replicate:q} --options {params.options:q}"
        " --out {output.npy:q} --record {output.record:q}"
        " > {log:q} 2>&1"
