# The content audit: byte-identical revisions (checkpoint_audit.csv), tensors equal to other
# steps' ones (tensor_audit.csv) and revisions off the run's trajectory, with the pre-flight
# hub audit's findings, in defective.csv (lmdynamics.reduction.audit, lmdynamics.defects).


rule checkpoint_audit:
    input:
        stores=all_stores(),
        hub=[HUB_AUDIT] if config["source"] == "hub" else [],
    output:
        audit=report(
            f"{RESULTS}/tables/checkpoint_audit.csv",
            caption="../report/checkpoint_audit.rst",
            category="Tables",
        ),
        tensors=f"{RESULTS}/tables/tensor_audit.csv",
        defects=report(
            DEFECTS,
            caption="../report/defective.rst",
            category="Tables",
        ),
    log:
        f"{RESULTS}/logs/checkpoint_audit.log",
    conda:
        ENV
    params:
        options=job_options(config, *READS["audit"]),
        hub=lambda wc, input: ["--hub-audit", input.hub[0]] if input.hub else [],
    shell:
        "lmdynamics audit {input.stores:q} --out {output.audit:q}"
        " --tensor-audit {output.tensors:q}"
        " --defects {output.defects:q} {params.hub:q} --options {params.options:q}"
        " > {log:q} 2>&1"
