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
            name=["convergence", "contrasts"],
            ext=["png", "pdf"],
        ),


rule intervention_run:
    input:
        iv_tokens,
    output:
        metrics=f"{IV_RESULTS}/runs/{{variant}}/{{arch}}/seed{{seed}}_metrics.csv",
        losses=f"{IV_RESULTS}/runs/{{variant}}/{{arch}}/seed{{seed}}_losses.csv",
        machine=f"{IV_RESULTS}/runs/{{variant}}/{{arch}}/seed{{seed}}_machine.json",
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
        variant=iv_variant_spec,
        arch=lambda wc: json.dumps(IV["sizes"][wc.arch], sort_keys=True),
        options=IV_RUN,
    shell:
        "lmdynamics intervention-run --variant {wildcards.variant:q}"
        " --variant-spec {params.variant:q} --size {wildcards.arch:q}"
        " --architecture {params.arch:q} --seed {wildcards.seed:q}"
        " --options {params.options:q} --out-metrics {output.metrics:q}"
        " --out-losses {output.losses:q} --out-machine {output.machine:q} > {log:q} 2>&1"


rule intervention_summarise:
    input:
        metrics=iv_runs("metrics"),
        losses=iv_runs("losses"),
        machines=iv_runs("machine", "json"),
        code=package_sources(
            "interventions.outcomes", "interventions.report", "estimators.paired"
        ),
    output:
        runs=f"{IV_OUT}/runs.csv",
        outcomes=f"{IV_OUT}/outcomes.csv",
        run_contrasts=f"{IV_OUT}/run_contrasts.csv",
        effects=f"{IV_OUT}/effects.csv",
        machines=f"{IV_OUT}/machines.csv",
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
        options=IV_OPTIONS,
        out_dir=lambda wc, output: os.path.dirname(output.outcomes),
    shell:
        "lmdynamics intervention-summarise --metrics {input.metrics:q}"
        " --losses {input.losses:q} --machines {input.machines:q}"
        " --options {params.options:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule intervention_figures:
    input:
        runs=f"{IV_OUT}/runs.csv",
        run_contrasts=f"{IV_OUT}/run_contrasts.csv",
        effects=f"{IV_OUT}/effects.csv",
        code=package_sources("interventions.report"),
    output:
        convergence=report(
            f"{IV_RESULTS}/figures/convergence.png",
            caption="../report/interventions_convergence.rst",
            category="Interventions",
            labels={"result": "convergence curves", "file": "figures/convergence.png"},
        ),
        contrasts=report(
            f"{IV_RESULTS}/figures/contrasts.png",
            caption="../report/interventions_contrasts.rst",
            category="Interventions",
            labels={"result": "per-seed contrasts", "file": "figures/contrasts.png"},
        ),
        pdfs=expand(
            f"{IV_RESULTS}/figures/{{name}}.pdf",
            name=["convergence", "contrasts"],
        ),
    log:
        f"{IV_RESULTS}/logs/intervention_figures.log",
    conda:
        ENV
    params:
        options=IV_OPTIONS,
        out_dir=lambda wc, output: os.path.dirname(output.convergence),
    shell:
        "lmdynamics intervention-figures --runs {input.runs:q}"
        " --run-contrasts {input.run_contrasts:q} --effects {input.effects:q}"
        " --options {params.options:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
