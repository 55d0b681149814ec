# The Conjecture post's statistics: computed in each extraction job (stat_* variables of the
# per-pair stores) against the size's reference store, stacked per size, combined across
# sizes, and drawn.


# What the statistics need of the INIT_STEP (step 0, else the earliest analysed step) and final
# checkpoints, once per (size, seed): both
# checkpoints' weights and the final top-k singular directions (lmdynamics.extraction.reference).
# What it reads of the config: READS["reference"] (lmdynamics.commands).
rule reference:
    input:
        unpack(reference_checkpoints),
    output:
        directory(f"{RESULTS}/reference/{{size}}/seed{{seed}}.zarr"),
    log:
        f"{RESULTS}/logs/reference/{{size}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/reference/{{size}}/seed{{seed}}.tsv"
    conda:
        ENV
    threads: 1
    params:
        options=job_options(config, *READS["reference"]),
        model=lambda wc: model_name(wc.size, wc.seed),
        init=lambda wc, input: os.path.dirname(input.init_weights),
        final=lambda wc, input: os.path.dirname(input.final_weights),
    shell:
        "lmdynamics reference --init-checkpoint {params.init:q}"
        " --final-checkpoint {params.final:q} --size {wildcards.size:q}"
        " --model {params.model:q}"
        " --options {params.options:q} --threads {threads:q}"
        " --out {output:q} > {log:q} 2>&1"


rule reduce_stats:
    input:
        size_stores,
    output:
        directory(f"{RESULTS}/stats/{{size}}/seed{{seed}}.zarr"),
    log:
        f"{RESULTS}/logs/reduce_stats/{{size}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/reduce_stats/{{size}}/seed{{seed}}.tsv"
    conda:
        ENV
    params:
        options=job_options(config, *READS["reduce-stats"]),
    shell:
        "lmdynamics reduce-stats {input:q} --options {params.options:q}"
        " --out {output:q} > {log:q} 2>&1"


rule combine_stats:
    input:
        per_seed_outputs("stats"),
    output:
        directory(f"{RESULTS}/stats.zarr"),
    log:
        f"{RESULTS}/logs/combine_stats.log",
    benchmark:
        f"{RESULTS}/benchmarks/combine_stats.tsv"
    conda:
        ENV
    shell:
        "lmdynamics combine-stats {input:q} --out {output:q} > {log:q} 2>&1"


rule stats_figure:
    input:
        stats=f"{RESULTS}/stats.zarr",
        defects=DEFECTS,
        code=package_sources("report.figures", "report.conjecture", "report.exclusion"),
    output:
        png=report(
            f"{RESULTS}/figures/conjecture_{{stat_figure}}.png",
            caption="../report/conjecture.rst",
            category="Conjecture analyses",
        ),
        pdf=f"{RESULTS}/figures/conjecture_{{stat_figure}}.pdf",
    log:
        f"{RESULTS}/logs/stats_figure/{{stat_figure}}.log",
    wildcard_constraints:
        stat_figure="|".join(STATS_FIGURES),
    conda:
        ENV
    params:
        options=job_options(config, *READS["stats-figure"]),
        stem=lambda wc, output: os.path.splitext(output.png)[0],
        init_step=INIT_STEP,
    shell:
        "lmdynamics stats-figure {wildcards.stat_figure:q} --stats {input.stats:q}"
        " --defects {input.defects:q} --init-step {params.init_step:q}"
        " --options {params.options:q} --out-stem {params.stem:q} > {log:q} 2>&1"
