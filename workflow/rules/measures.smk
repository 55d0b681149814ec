# One layer x step figure per measure the config turns on (config section measures;
# lmdynamics.estimators.measures), from the combined metrics.


rule measure_figure:
    input:
        metrics=f"{RESULTS}/metrics.zarr",
        code=package_sources("report.measures", "report.figures"),
    output:
        png=report(
            f"{RESULTS}/figures/measure_{{measure}}.png",
            caption="../report/measure.rst",
            category=lambda wildcards: measure_category(wildcards.measure),
            labels={
                "result": "{measure}",
                "file": "figures/measure_{measure}.png (also .pdf)",
            },
        ),
        pdf=f"{RESULTS}/figures/measure_{{measure}}.pdf",
    log:
        f"{RESULTS}/logs/measure_figure/{{measure}}.log",
    wildcard_constraints:
        measure="|".join(MEASURE_FIGURES) or "no_measure",
    conda:
        ENV
    params:
        options=job_options(config, "figures"),
        stem=lambda wc, output: os.path.splitext(output.png)[0],
    shell:
        "lmdynamics measure-figure {wildcards.measure:q} --metrics {input.metrics:q}"
        " --options {params.options:q} --out-stem {params.stem:q} > {log:q} 2>&1"
