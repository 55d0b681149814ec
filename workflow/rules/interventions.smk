# Intervention study (lmdynamics.interventions): one job per (variant, size, seed) run that
# trains and analyses all its checkpoints; then outcomes, effects, table and figures.
# Target: `snakemake interventions --cores 2 --configfile config/interventions.yaml` (the
# target first: --configfile takes every name after it).


include: "interventions_common.smk"


rule interventions:
    input:
        f"{IV_OUT}/effects.md",
        expand(
            f"{IV_RESULTS}/figures/{{name}}.{{ext}}",
            name=["convergence", "effect_scatter"],
            ext=["png", "pdf"],
        ),


rule intervention_run:
    input:
        iv_tokens,
    output:
        metrics=f"{IV_RESULTS}/runs/{{variant}}/{{arch}}/seed{{seed}}_metrics.csv",
        losses=f"{IV_RESULTS}/runs/{{variant}}/{{arch}}/seed{{seed}}_losses.csv",
    log:
        f"{IV_RESULTS}/logs/intervention_run/{{variant}}/{{arch}}/seed{{seed}}.log",
    benchmark:
        f"{IV_RESULTS}/benchmarks/intervention_run/{{variant}}/{{arch}}/seed{{seed}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        gpu=1 if IV["device"] == "cuda" else 0,
    params:
        variant=lambda wc: json.dumps(IV["variants"][wc.variant], sort_keys=True),
        arch=lambda wc: json.dumps(IV["sizes"][wc.arch], sort_keys=True),
        section=IV_RUN,
    shell:
        "lmdynamics intervention-run --variant {wildcards.variant:q}"
        " --variant-spec {params.variant:q} --size {wildcards.arch:q}"
        " --architecture {params.arch:q} --seed {wildcards.seed:q}"
        " --section {params.section:q} --threads {threads:q}"
        " --out-metrics {output.metrics:q} --out-losses {output.losses:q} > {log:q} 2>&1"


rule intervention_summarise:
    input:
        metrics=iv_runs("metrics"),
        losses=iv_runs("losses"),
        code=package_sources("interventions.outcomes", "interventions.report"),
    output:
        runs=f"{IV_OUT}/runs.csv",
        outcomes=f"{IV_OUT}/outcomes.csv",
        effects=f"{IV_OUT}/effects.csv",
        summary=f"{IV_OUT}/effects_summary.csv",
        table=report(
            f"{IV_OUT}/effects.md",
            caption="../report/interventions_table.rst",
            category="Interventions",
            labels={"result": "effects table", "file": "effects/effects.md"},
        ),
    log:
        f"{IV_RESULTS}/logs/intervention_summarise.log",
    conda:
        ENV
    params:
        baseline=IV["baseline"],
        threshold=IV["outcomes"]["threshold"],
        estimator=IV["outcomes"]["cka_estimator"],
        samples=IV["outcomes"]["bootstrap"]["samples"],
        level=IV["outcomes"]["bootstrap"]["level"],
        out_dir=lambda wc, output: os.path.dirname(output.outcomes),
    shell:
        "lmdynamics intervention-summarise --metrics {input.metrics:q}"
        " --losses {input.losses:q} --baseline {params.baseline:q}"
        " --threshold {params.threshold:q} --cka-estimator {params.estimator:q}"
        " --bootstrap-samples {params.samples:q} --bootstrap-level {params.level:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule intervention_figures:
    input:
        runs=f"{IV_OUT}/runs.csv",
        effects=f"{IV_OUT}/effects.csv",
        code=package_sources("interventions.report"),
    output:
        convergence=report(
            f"{IV_RESULTS}/figures/convergence.png",
            caption="../report/interventions_convergence.rst",
            category="Interventions",
            labels={"result": "convergence curves", "file": "figures/convergence.png"},
        ),
        scatter=report(
            f"{IV_RESULTS}/figures/effect_scatter.png",
            caption="../report/interventions_scatter.rst",
            category="Interventions",
            labels={"result": "effect scatter", "file": "figures/effect_scatter.png"},
        ),
        pdfs=expand(
            f"{IV_RESULTS}/figures/{{name}}.pdf",
            name=["convergence", "effect_scatter"],
        ),
    log:
        f"{IV_RESULTS}/logs/intervention_figures.log",
    conda:
        ENV
    params:
        threshold=IV["outcomes"]["threshold"],
        estimator=IV["outcomes"]["cka_estimator"],
        out_dir=lambda wc, output: os.path.dirname(output.convergence),
    shell:
        "lmdynamics intervention-figures --runs {input.runs:q} --effects {input.effects:q}"
        " --threshold {params.threshold:q} --cka-estimator {params.estimator:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
