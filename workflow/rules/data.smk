# Stage 1-2: the names, verified, and the lecture's train/dev/test splits.


rule download:
    output:
        "data/names.txt",
    params:
        url=config["names_url"],
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
