# One job per (size, step): a forward and backward pass on the eval batch, into a zarr store.


rule extract:
    input:
        unpack(checkpoint_files),
        unpack(reference_checkpoints),
        batch=f"{RESULTS}/eval_batch.npy",
    output:
        directory(f"{RESULTS}/extract/{{size}}/step{{step}}.zarr"),
    log:
        f"{RESULTS}/logs/extract/{{size}}/step{{step}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/extract/{{size}}/step{{step}}.tsv"
    conda:
        ENV
    threads: 1
    params:
        tokens=config["tokens"],
        seed=config["seed"],
        device=config["extraction"]["device"],
        dtype=config["extraction"]["dtype"],
        model=lambda wc: model_name(wc.size),
        revision=lambda wc: revision(wc.step),
        stats=stats_args,
    shell:
        "lmdynamics extract --checkpoint $(dirname {input.weights})"
        " --eval-batch {input.batch} --tokens {params.tokens} --seed {params.seed}"
        " --size {wildcards.size} --step {wildcards.step} --model {params.model}"
        " --revision {params.revision} --device {params.device} --dtype {params.dtype}"
        " --threads {threads} {params.stats} --out {output} > {log} 2>&1"
