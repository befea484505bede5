# sigma = 0.0: the clean classifier behind dds/mdds; sigma > 0: Cohen et al.'s Gaussian baseline.
# A classifier named in classifier.pretrained (sigma 0.0) or classifier.pretrained_noisy is imported
# by the same `rcm train-classifier` command (it imports instead of training): its source file is
# the job's input, so replacing the file reruns that import and what depends on it, nothing else.


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
    resources:
        **gpu_resources("classifier"),
    shell:
        "{LAUNCH[classifier]} --threads {threads} train-classifier --dataset {params.dataset} --results {params.results}"
        " --sigma {wildcards.sigma} {params.flags} > {log} 2>&1"


if IMPORTED_CLASSIFIERS:

    ruleorder: import_classifier > train_classifier

    rule import_classifier:
        input:
            source=lambda wildcards: IMPORTED_CLASSIFIERS[wildcards.sigma],
            test=str(paths.prepared(R, D, "test")),
            code=CODE["import_classifier"],
        output:
            str(paths.classifier(R, D, "{sigma}")),
        wildcard_constraints:
            sigma="|".join(re.escape(s) for s in IMPORTED_CLASSIFIERS),
        params:
            dataset=D,
            results=R,
            flags=import_flags("classifier"),
        log:
            log("import_classifier", "sigma_{sigma}"),
        benchmark:
            bench("import_classifier", "sigma_{sigma}")
        threads: 1
        shell:
            "{RCM} --threads {threads} train-classifier --dataset {params.dataset} --results {params.results}"
            " --sigma {wildcards.sigma} {params.flags} > {log} 2>&1"
