# sigma = 0.0: the clean classifier behind dds/mdds; sigma > 0: Cohen et al.'s Gaussian baseline.


rule train_classifier:
    input:
        train=str(paths.prepared(R, D, "train")),
        val=str(paths.prepared(R, D, "val")),
        code=CODE["train_classifier"],
    output:
        str(paths.classifier(R, D, "{sigma}")),
    params:
        dataset=D,
        results=R,
        flags=flags(config["classifier"]),
    log:
        log("train_classifier", "sigma_{sigma}"),
    benchmark:
        bench("train_classifier", "sigma_{sigma}")
    threads: 1
    shell:
        "{RCM} --threads {threads} train-classifier --dataset {params.dataset} --results {params.results}"
        " --sigma {wildcards.sigma} {params.flags} > {log} 2>&1"
