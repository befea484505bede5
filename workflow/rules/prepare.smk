# Raw data set -> prepared train/test tensors and a manifest (rcm.data).


rule prepare:
    input:
        code=CODE["prepare"],
    output:
        train=str(paths.prepared(R, D, "train")),
        test=str(paths.prepared(R, D, "test")),
        manifest=str(paths.manifest(R, D)),
    params:
        dataset=D,
        results=R,
        flags=flags(config["data"]),
    log:
        log("prepare"),
    benchmark:
        bench("prepare")
    threads: 1
    shell:
        "{RCM} --threads {threads} prepare --dataset {params.dataset} --results {params.results}"
        " {params.flags} > {log} 2>&1"
