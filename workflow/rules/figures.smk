# Figures 1-5 and Table 1 of the paper, from the combined metrics.


rule figure:
    input:
        metrics=f"{RESULTS}/metrics.zarr",
        defects=DEFECTS,
        code=package_sources("report.figures", "report.cka", "report.exclusion"),
    output:
        png=report(
            f"{RESULTS}/figures/{{figure}}.png",
            caption="../report/figure.rst",
            category=report_category,
            labels={"result": "{figure}", "file": "figures/{figure}.png (also .pdf)"},
        ),
        pdf=f"{RESULTS}/figures/{{figure}}.pdf",
    log:
        f"{RESULTS}/logs/figure/{{figure}}.log",
    conda:
        ENV
    params:
        options=job_options(config, *READS["figure"]),
        stem=lambda wc, output: os.path.splitext(output.png)[0],
    shell:
        "lmdynamics figure {wildcards.figure:q} --metrics {input.metrics:q}"
        " --defects {input.defects:q} --options {params.options:q}"
        " --out-stem {params.stem:q} > {log:q} 2>&1"


rule mcc_table:
    input:
        metrics=f"{RESULTS}/metrics.zarr",
        defects=DEFECTS,
        code=package_sources("report.tables", "report.exclusion"),
    output:
        csv=report(
            f"{RESULTS}/tables/mcc.csv",
            caption="../report/mcc.rst",
            category="Table 1: Matthews correlation, early convergence vs large PER",
            labels={"result": "Table 1", "file": "tables/mcc.csv (also .md)"},
        ),
        md=f"{RESULTS}/tables/mcc.md",
        seeds=report(
            f"{RESULTS}/tables/mcc_seeds.csv",
            caption="../report/mcc.rst",
            category="Table 1: Matthews correlation, early convergence vs large PER",
            labels={"result": "Table 1 across seeds", "file": "tables/mcc_seeds.csv"},
        ),
    log:
        f"{RESULTS}/logs/mcc_table.log",
    conda:
        ENV
    params:
        options=job_options(config, *READS["mcc"]),
    shell:
        "lmdynamics mcc --metrics {input.metrics:q} --defects {input.defects:q}"
        " --options {params.options:q}"
        " --csv {output.csv:q} --md {output.md:q} --seeds-csv {output.seeds:q}"
        " > {log:q} 2>&1"


rule mcc_sensitivity:
    input:
        metrics=f"{RESULTS}/metrics.zarr",
        defects=DEFECTS,
        code=package_sources(
            "report.tables",
            "report.mcc",
            "report.figures",
            "report.cka",
            "report.exclusion",
        ),
    output:
        png=report(
            f"{RESULTS}/figures/mcc_sensitivity.png",
            caption="../report/mcc_sensitivity.rst",
            category="Table 1: Matthews correlation, early convergence vs large PER",
            labels={
                "result": "Table 1 threshold sensitivity",
                "file": "figures/mcc_sensitivity.png (also .pdf)",
            },
        ),
        pdf=f"{RESULTS}/figures/mcc_sensitivity.pdf",
    log:
        f"{RESULTS}/logs/mcc_sensitivity.log",
    conda:
        ENV
    params:
        options=job_options(config, *READS["mcc"]),
        stem=lambda wc, output: os.path.splitext(output.png)[0],
    shell:
        "lmdynamics mcc --metrics {input.metrics:q} --defects {input.defects:q}"
        " --options {params.options:q} --sensitivity-stem {params.stem:q} > {log:q} 2>&1"
