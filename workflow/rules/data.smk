# Stage 1-2: the names, verified, and the lecture's train/dev/test splits.


rule download:
    output:
        "data/names.txt",
    params:
        # The data are known by their checksum, not by where they come from: a function is evaluated only when
        # the job runs, so Snakemake does not record the URL among the params whose change reruns the step
        # (switching to a local copy of the same bytes reruns nothing); a new sha256 does rerun it.
        url=lambda wildcards, output: config["names_url"],
        sha256=config["names_sha256"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    log:
        "logs/download.log",
    script:
        "../scripts/download.py"


rule splits:
    input:
        "data/names.txt",
    output:
        tensors="data/splits.pt",
        summary="data/splits.json",
    params:
        block_size=config["block_size"],
        seed=config["split_seed"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/splits.log",
    script:
        "../scripts/splits.py"
