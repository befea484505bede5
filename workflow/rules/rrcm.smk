# rRCM: one contrastive consistency pretraining (or the authors' pretrained network, imported), then
# one fine-tuned model per sigma.


if IMPORTED_RRCM:
    # rrcm_pretrain.pretrained names the authors' pretrained network: `rcm pretrain-rrcm` imports it

    rule import_rrcm:
        input:
            source=IMPORTED_RRCM,
            val=str(paths.prepared(R, D, "val")),
            code=CODE["import_rrcm"],
        output:
            str(paths.rrcm_pretrained(R, D)),
        params:
            dataset=D,
            results=R,
            flags=flags(config["rrcm_pretrain"]),
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
        shell:
            "{RCM} --threads {threads} pretrain-rrcm --dataset {params.dataset} --results {params.results}"
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
    shell:
        "{RCM} --threads {threads} finetune-rrcm --dataset {params.dataset} --results {params.results}"
        " --sigma {wildcards.sigma} {params.flags} > {log} 2>&1"
