# Raw data set -> prepared train/val/test tensors and a manifest (rcm.data): val is held out of
# train for every training-time evaluation; only certification reads test.


rule prepare:
    input:
        code=CODE["prepare"],
    output:
        train=str(paths.prepared(R, D, "train")),
        val=str(paths.prepared(R, D, "val")),
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
