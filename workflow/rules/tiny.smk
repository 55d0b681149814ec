# The embedded tiny suite: trained locally, one job per (size, seed) (replicate k trains with
# config seed + k: lmdynamics train-tiny --replicate k), checkpoints on a Pythia-like schedule; the eval batch is
# the last training batch of replicate 0 (config seed), one file for every replicate.


rule train_tiny:
    output:
        expand(
            f"{RESULTS}/checkpoints/{{size}}/seed{{seed}}/step{{step}}/{{file}}",
            step=SCHEDULE,
            file=["config.json", "model.safetensors"],
            allow_missing=True,
        ),
        loss=f"{RESULTS}/training/{{size}}/seed{{seed}}/loss.csv",
    log:
        f"{RESULTS}/logs/train_tiny/{{size}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_tiny/{{size}}/seed{{seed}}.tsv"
    # Largest size first: it trains longest, so the other sizes' training and extractions fill
    # the other cores while it runs (longest job first shortens the DAG).
    priority: lambda wc: TRAINING_PRIORITY[wc.size]
    conda:
        ENV
    threads: 1
    params:
        spec=lambda wc: config["tiny"]["models"][wc.size],
        out_dir=lambda wc: f"{RESULTS}/checkpoints/{wc.size}/seed{wc.seed}",
        options=job_options(config, *READS["train-tiny"]),
    shell:
        "lmdynamics train-tiny --size {wildcards.size:q} --replicate {wildcards.seed:q}"
        " --options {params.options:q}"
        " --hidden-size {params.spec[hidden_size]:q}"
        " --num-layers {params.spec[num_layers]:q}"
        " --num-heads {params.spec[num_heads]:q}"
        " --threads {threads:q} --out-dir {params.out_dir:q} --loss-csv {output.loss:q}"
        " > {log:q} 2>&1"


rule tiny_eval_batch:
    output:
        f"{RESULTS}/eval_batch.npy",
    log:
        f"{RESULTS}/logs/tiny_eval_batch.log",
    conda:
        ENV
    params:
        options=job_options(config, *READS["tiny-eval-batch"]),
    shell:
        "lmdynamics tiny-eval-batch --options {params.options:q}"
        " --out {output:q} > {log:q} 2>&1"


rule training_loss:
    input:
        csvs=[
            f"{RESULTS}/training/{size}/seed{seed}/loss.csv"
            for size in SIZES
            for seed in SEEDS
        ],
        code=package_sources("report.figures"),
    output:
        csv=report(
            f"{RESULTS}/training_loss.csv",
            caption="../report/training_loss.rst",
            category="Training loss",
            labels={"result": "training loss (table)", "file": "training_loss.csv"},
        ),
        png=report(
            f"{RESULTS}/figures/training_loss.png",
            caption="../report/training_loss.rst",
            category="Training loss",
            labels={
                "result": "training loss (figure)",
                "file": "figures/training_loss.png (also .pdf)",
            },
        ),
        pdf=f"{RESULTS}/figures/training_loss.pdf",
    log:
        f"{RESULTS}/logs/training_loss.log",
    conda:
        ENV
    params:
        stem=lambda wc, output: os.path.splitext(output.png)[0],
        seeds=[seed for size in SIZES for seed in SEEDS],
    shell:
        "lmdynamics training-loss {input.csvs:q} --seeds {params.seeds:q}"
        " --out-csv {output.csv:q}"
        " --out-stem {params.stem:q} > {log:q} 2>&1"
