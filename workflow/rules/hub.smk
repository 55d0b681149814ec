# A suite's checkpoints from the Hugging Face hub (its definition, lmdynamics.sources.suites):
# one download job per (size, seed, step); the eval batch is Pythia's last training batch read by
# byte range from the preshuffled Pile (or a local copy of it), or a local file (eval_data).


# The pre-flight hub audit: the commit and each weight file's LFS sha256 and size of every
# planned revision and of each repo's main, from the hub's metadata (no weight bytes), before
# any download (lmdynamics.hub_audit). Stops the run on a revision without weights,
# and on any flagged revision with audit.defective: fail.
rule hub_audit:
    output:
        report(
            HUB_AUDIT,
            caption="../report/hub_audit.rst",
            category="Tables",
        ),
    log:
        f"{RESULTS}/logs/hub_audit.log",
    conda:
        ENV
    resources:
        network=1,
    params:
        # what the audit asks and how (the rest of the hub section changes nothing it
        # finds); a function, so that the '{size}' of hub.repo is not read as a wildcard
        options=lambda wc: job_options(config, *READS["hub-audit"]),
    shell:
        "lmdynamics hub-audit --options {params.options:q} --out {output:q} > {log:q} 2>&1"


# Weights are temporary: deleted once every job reading them has finished (the extraction of
# their (size, step), and for step 0 and the final step also the size's reference job),
# unless hub.keep_weights. The durable things are the per-pair stores and the per-size
# reference store, so adding a step later downloads and extracts that step only: Snakemake
# does not redo a job whose output exists because its temp() inputs are gone.
rule download:
    input:
        # the audit precedes every weight request; rewriting it later (a new step, a new
        # policy) re-downloads nothing
        audit=ancient(HUB_AUDIT),
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
    conda:
        ENV
    resources:
        network=1,
    params:
        repo=lambda wc: model_name(wc.size, wc.seed),
        revision=download_revision,
        options=job_options(config, *READS["download"]),
        out_dir=lambda wc, output: os.path.dirname(output.config),
    shell:
        "lmdynamics download --repo {params.repo:q} "
        + REVISION_FLAGS
        + " {params.revision:q}"
        " --out-dir {params.out_dir:q} --options {params.options:q}"
        " --hub-audit {input.audit:q}"
        " > {log:q} 2>&1"


if not EVAL_FROM_FILE:

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
            options=job_options(config, *READS["pile-batch"]),
            batch=FINAL_STEP - 1,
        shell:
            "lmdynamics pile-batch --options {params.options:q}"
            " --batch {params.batch:q} --out {output.npy:q}"
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
            options=job_options(config, *READS["hub-eval-batch"]),
        shell:
            "lmdynamics hub-eval-batch {input:q} --options {params.options:q}"
            " --out {output:q} > {log:q} 2>&1"


# Every other suite: hub.sequences sequences of eval_data.seq_len tokens from a local file
# (token ids, or text through the suite's tokenizer), the same for every step, size and seed.
if EVAL_FROM_FILE:

    rule suite_eval_batch:
        input:
            config["eval_data"]["path"],
        output:
            f"{RESULTS}/eval_batch.npy",
        log:
            f"{RESULTS}/logs/suite_eval_batch.log",
        conda:
            ENV
        resources:
            network=1 if config["eval_data"]["allow_download"] else 0,
        params:
            options=job_options(config, *READS["suite-eval-batch"]),
            vocab=suite_vocab(config, SUITE) or 0,
            tokenizer=(
                config["eval_data"]["tokenizer"]
                or SUITE.eval_data.get("tokenizer")
                or model_name(SIZES[0], SEEDS[0])
            ),
        shell:
            # '=' and '--': a path or tokenizer starting with '-' is still read as one
            "lmdynamics suite-eval-batch --options {params.options:q}"
            " --vocab {params.vocab:q} --tokenizer={params.tokenizer:q}"
            " --out {output:q} -- {input:q} > {log:q} 2>&1"
