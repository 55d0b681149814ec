# Per (size, seed): CKA and PER over (component, layer, step). Across sizes and seeds: one
# dataset and a CSV.


rule reduce_size:
    input:
        size_stores,
    output:
        directory(f"{RESULTS}/metrics/{{size}}/seed{{seed}}.zarr"),
    log:
        f"{RESULTS}/logs/reduce_size/{{size}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/reduce_size/{{size}}/seed{{seed}}.tsv"
    conda:
        ENV
    params:
        options=job_options(config, *READS["reduce"]),
    shell:
        "lmdynamics reduce {input:q} --options {params.options:q}"
        " --out {output:q} > {log:q} 2>&1"


rule combine:
    input:
        per_seed_outputs("metrics"),
    output:
        zarr=directory(f"{RESULTS}/metrics.zarr"),
        csv=report(
            f"{RESULTS}/metrics.csv",
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"result": "all metrics", "file": "metrics.csv"},
        ),
    log:
        f"{RESULTS}/logs/combine.log",
    benchmark:
        f"{RESULTS}/benchmarks/combine.tsv"
    conda:
        ENV
    shell:
        "lmdynamics combine {input:q} --out-zarr {output.zarr:q}"
        " --out-csv {output.csv:q} > {log:q} 2>&1"
