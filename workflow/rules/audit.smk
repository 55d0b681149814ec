# Revisions whose weights are byte-identical to another revision of the same size.


rule checkpoint_audit:
    input:
        all_stores(),
    output:
        report(
            f"{RESULTS}/tables/checkpoint_audit.csv",
            caption="../report/checkpoint_audit.rst",
            category="Tables",
        ),
    log:
        f"{RESULTS}/logs/checkpoint_audit.log",
    conda:
        ENV
    shell:
        "lmdynamics audit {input:q} --out {output:q} > {log:q} 2>&1"
