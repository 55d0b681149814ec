# One job per (size, step): a forward and backward pass on the eval batch, into a zarr store.


rule extract:
    input:
        unpack(checkpoint_files),
        unpack(gradient_batches_input),
        unpack(reference_checkpoints),
        batch=f"{RESULTS}/eval_batch.npy",
    output:
        directory(f"{RESULTS}/extract/{{size}}/step{{step}}.zarr"),
    log:
        f"{RESULTS}/logs/extract/{{size}}/step{{step}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/extract/{{size}}/step{{step}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        gpu=EXTRACTION_GPUS,
    params:
        tokens=config["tokens"],
        seed=config["seed"],
        device=config["extraction"]["device"],
        dtype=config["extraction"]["dtype"],
        micro_batch=config["extraction"]["micro_batch"],
        sampling=config["sampling"]["protocol"],
        model=lambda wc: model_name(wc.size),
        revision=lambda wc: revision(wc.step),
        attention=config["extraction"]["attention_activation"],
        attention_implementation=config["extraction"]["attention_implementation"],
        gradients=config["extraction"]["gradient_protocol"],
        grad_batches=lambda wc, input: (
            ["--gradient-batches", input.grad_batches]
            if "grad_batches" in input.keys()
            else []
        ),
        stats=stats_args,
        checkpoint=lambda wc, input: os.path.dirname(input.weights),
    shell:
        "lmdynamics extract --checkpoint {params.checkpoint:q}"
        " --eval-batch {input.batch:q} --tokens {params.tokens:q} --seed {params.seed:q}"
        " --size {wildcards.size:q} --step {wildcards.step:q} --model {params.model:q}"
        " --revision {params.revision:q} --device {params.device:q} --dtype {params.dtype:q}"
        " --micro-batch {params.micro_batch:q} --sampling {params.sampling:q}"
        " --attention-activation {params.attention:q}"
        " --gradient-protocol {params.gradients:q}"
        " --attention-implementation {params.attention_implementation:q}"
        " {params.grad_batches:q} --threads {threads:q} {params.stats:q}"
        " --out {output:q} > {log:q} 2>&1"


# The paper code's gradient protocol: training batches of steps c-5 and c-4 for checkpoint c.
rule gradient_batches:
    output:
        f"{RESULTS}/gradient_batches/step{{step}}.npy",
    log:
        f"{RESULTS}/logs/gradient_batches/step{{step}}.log",
    conda:
        ENV
    params:
        source=config["source"],
        batch_size=config.get("tiny", {}).get("batch_size", 16),
        seq_len=config.get("tiny", {}).get("seq_len", 128),
        seed=config["seed"],
    shell:
        "lmdynamics gradient-batches --source {params.source:q} --step {wildcards.step:q}"
        " --batch-size {params.batch_size:q} --seq-len {params.seq_len:q}"
        " --seed {params.seed:q} --out {output:q} > {log:q} 2>&1"
