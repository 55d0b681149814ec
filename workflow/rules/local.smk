# Your own run (source local; docs/guide/own-runs.md): checkpoint folders read in place from
# local.path (never copied, moved or deleted; the extract rule waits for a complete folder
# and records its path, sha256, size and mtime), and the stores lmdynamics.record wrote
# during training (local.recorded) for the steps whose checkpoints were not kept.


rule local_eval_batch:
    input:
        config["eval_data"]["path"],
    output:
        f"{RESULTS}/eval_batch.npy",
    log:
        f"{RESULTS}/logs/local_eval_batch.log",
    conda:
        ENV
    resources:
        network=1 if config["eval_data"]["allow_download"] else 0,
    params:
        options=job_options(config, *READS["suite-eval-batch"]),
        tokenizer=(
            [f"--tokenizer={config['eval_data']['tokenizer']}"]
            if config["eval_data"]["tokenizer"]
            else []
        ),
    shell:
        "lmdynamics suite-eval-batch --options {params.options:q} {params.tokenizer:q}"
        " --out {output:q} -- {input:q} > {log:q} 2>&1"


# A step with a checkpoint folder is extracted from it (rule extract); a step without one
# takes its recorded store, checked against this workflow's eval batch and options.
if config["local"]["recorded"]:

    ruleorder: extract > adopt_recorded

    rule adopt_recorded:
        input:
            store=lambda wc: recorded_store(
                config["local"]["recorded"] or "", wc.size, wc.seed, wc.step
            ),
            batch=f"{RESULTS}/eval_batch.npy",
        output:
            directory(extract_store("{size}", "{seed}", "{step}")),
        log:
            f"{RESULTS}/logs/adopt_recorded/{{size}}/seed{{seed}}/step{{step}}.log",
        conda:
            ENV
        params:
            options=EXTRACTION_OPTIONS,
            stats=["--statistics"] if CONJECTURE["enabled"] else [],
        shell:
            "lmdynamics adopt-store {input.store:q} --eval-batch {input.batch:q}"
            " --size {wildcards.size:q} --step {wildcards.step:q}"
            " --replicate {wildcards.seed:q} --options {params.options:q} {params.stats:q}"
            " --out {output:q} > {log:q} 2>&1"
