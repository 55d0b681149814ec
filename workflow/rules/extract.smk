# One job per (size, seed, step): a forward and backward pass on the eval batch, into a zarr store.


rule extract:
    input:
        unpack(checkpoint_files),
        unpack(gradient_batches_input),
        unpack(reference_store),
        batch=f"{RESULTS}/eval_batch.npy",
    output:
        directory(f"{RESULTS}/extract/{{size}}/seed{{seed}}/step{{step}}.zarr"),
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
        # what the job reads of the config; figure_steps only chooses what figures show
        options=job_options(
            config,
            "tokens",
            "seed",
            "extraction",
            "sampling",
            "conjecture",
            "family",
            omit=["conjecture.figure_steps"],
        ),
        model=lambda wc: model_name(wc.size, wc.seed),
        revision=lambda wc: revision(wc.step),
        grad_batches=lambda wc, input: (
            ["--gradient-batches", input.grad_batches]
            if "grad_batches" in input.keys()
            else []
        ),
        stats=stats_args,
        checkpoint=lambda wc, input: os.path.dirname(input.weights),
    shell:
        "lmdynamics extract --checkpoint {params.checkpoint:q}"
        " --eval-batch {input.batch:q} --size {wildcards.size:q} --step {wildcards.step:q}"
        " --replicate {wildcards.seed:q}"
        " --model {params.model:q} --revision {params.revision:q}"
        " --options {params.options:q} {params.grad_batches:q} --threads {threads:q}"
        " {params.stats:q}"
        " --out {output:q} > {log:q} 2>&1"


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
        source=config["source"],
        batch_size=config.get("tiny", {}).get("batch_size", 16),
        seq_len=config.get("tiny", {}).get("seq_len", 128),
        seed=lambda wc: (
            training_seed(wc.seed) if "seed" in wc.keys() else config["seed"]
        ),
        dataset=config["hub"]["dataset"],
        dataset_revision=config["hub"]["dataset_revision"],
        local=(
            [f"--tokens-path={config['hub']['tokens_path']}"]
            if config["hub"]["tokens_path"]
            else []
        ),
        retries=config["hub"]["retries"],
        backoff=config["hub"]["backoff"],
    shell:
        "lmdynamics gradient-batches --source {params.source:q} --step {wildcards.step:q}"
        " --batch-size {params.batch_size:q} --seq-len {params.seq_len:q}"
        " --seed {params.seed:q}"
        " --dataset {params.dataset:q} --dataset-revision {params.dataset_revision:q}"
        " {params.local:q} --retries {params.retries:q}"
        " --backoff {params.backoff:q} --out {output.npy:q} --record {output.record:q}"
        " > {log:q} 2>&1"
