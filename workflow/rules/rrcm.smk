# rRCM: one contrastive consistency pretraining (or the authors' pretrained network, imported), then
# one fine-tuned model per sigma.


if IMPORTED_RRCM:
    # rrcm_pretrain.pretrained names the authors' pretrained network: `rcm pretrain-rrcm` imports it

    rule import_rrcm:
        input:
            source=IMPORTED_RRCM,
            test=str(paths.prepared(R, D, "test")),
            code=CODE["import_rrcm"],
        output:
            str(paths.rrcm_pretrained(R, D)),
        params:
            dataset=D,
            results=R,
            flags=import_flags("rrcm_pretrain"),
        log:
            log("import_rrcm"),
        benchmark:
            bench("import_rrcm")
        threads: 1
        shell:
            "{RCM} --threads {threads} pretrain-rrcm --dataset {params.dataset} --results {params.results}"
            " {params.flags} > {log} 2>&1"

else:

    rule pretrain_rrcm:
        input:
            train=str(paths.prepared(R, D, "train")),
            val=str(paths.prepared(R, D, "val")),
            code=CODE["pretrain_rrcm"],
        output:
            str(paths.rrcm_pretrained(R, D)),
        params:
            dataset=D,
            results=R,
            flags=flags(config["rrcm_pretrain"]),
        log:
            log("pretrain_rrcm"),
        benchmark:
            bench("pretrain_rrcm")
        threads: 1
        resources:
            **gpu_resources("rrcm_pretrain"),
        shell:
            "{LAUNCH[rrcm_pretrain]} --threads {threads} pretrain-rrcm --dataset {params.dataset} --results {params.results}"
            " {params.flags} > {log} 2>&1"


rule finetune_rrcm:
    input:
        pretrained=str(paths.rrcm_pretrained(R, D)),
        train=str(paths.prepared(R, D, "train")),
        val=str(paths.prepared(R, D, "val")),
        code=CODE["finetune_rrcm"],
    output:
        str(paths.rrcm_finetuned(R, D, "{sigma}")),
    params:
        dataset=D,
        results=R,
        flags=flags(config["rrcm_finetune"]),
    log:
        log("finetune_rrcm", "sigma_{sigma}"),
    benchmark:
        bench("finetune_rrcm", "sigma_{sigma}")
    threads: 1
    resources:
        **gpu_resources("rrcm_finetune"),
    shell:
        "{LAUNCH[rrcm_finetune]} --threads {threads} finetune-rrcm --dataset {params.dataset} --results {params.results}"
        " --sigma {wildcards.sigma} {params.flags} > {log} 2>&1"


if IMPORTED_RRCM_CLASSIFIERS:
    # rrcm_finetune.pretrained_noisy names the authors' fine-tuned classifiers: `rcm finetune-rrcm`
    # imports them (no pretraining is needed for those sigmas)

    ruleorder: import_rrcm_classifier > finetune_rrcm

    rule import_rrcm_classifier:
        input:
            source=lambda wildcards: IMPORTED_RRCM_CLASSIFIERS[wildcards.sigma],
            test=str(paths.prepared(R, D, "test")),
            code=CODE["import_rrcm"],
        output:
            str(paths.rrcm_finetuned(R, D, "{sigma}")),
        wildcard_constraints:
            sigma="|".join(re.escape(s) for s in IMPORTED_RRCM_CLASSIFIERS),
        params:
            dataset=D,
            results=R,
            flags=import_flags("rrcm_finetune"),
        log:
            log("import_rrcm_classifier", "sigma_{sigma}"),
        benchmark:
            bench("import_rrcm_classifier", "sigma_{sigma}")
        threads: 1
        shell:
            "{RCM} --threads {threads} finetune-rrcm --dataset {params.dataset} --results {params.results}"
            " --sigma {wildcards.sigma} {params.flags} > {log} 2>&1"
