# Diffusion denoised smoothing (dds): the DDPM denoiser, trained or imported; mdds: its multi-scale
# fine-tuning (of the trained or the imported one), which needs the clean classifier (sigma 0.0).


if IMPORTED_DENOISER:
    # denoiser.pretrained names a model: `rcm train-denoiser` imports it (no training); the source is
    # the input, so replacing it reruns the import and what depends on it

    rule import_denoiser:
        input:
            source=IMPORTED_DENOISER,
            test=str(paths.prepared(R, D, "test")),
            code=CODE["import_denoiser"],
        output:
            str(paths.denoiser(R, D)),
        params:
            dataset=D,
            results=R,
            flags=import_flags("denoiser"),
        log:
            log("import_denoiser"),
        benchmark:
            bench("import_denoiser")
        threads: 1
        shell:
            "{RCM} --threads {threads} train-denoiser --dataset {params.dataset} --results {params.results}"
            " {params.flags} > {log} 2>&1"

else:

    rule train_denoiser:
        input:
            train=str(paths.prepared(R, D, "train")),
            val=str(paths.prepared(R, D, "val")),
            code=CODE["train_denoiser"],
        output:
            str(paths.denoiser(R, D)),
        params:
            dataset=D,
            results=R,
            flags=flags(config["denoiser"]),
        log:
            log("train_denoiser"),
        benchmark:
            bench("train_denoiser")
        threads: 1
        resources:
            **gpu_resources("denoiser"),
        shell:
            "{LAUNCH[denoiser]} --threads {threads} train-denoiser --dataset {params.dataset} --results {params.results}"
            " {params.flags} > {log} 2>&1"


rule finetune_denoiser:
    input:
        denoiser=str(paths.denoiser(R, D)),
        classifier=str(paths.classifier(R, D, 0.0)),
        train=str(paths.prepared(R, D, "train")),
        val=str(paths.prepared(R, D, "val")),
        code=CODE["finetune_denoiser"],
    output:
        str(paths.denoiser(R, D, finetuned=True)),
    params:
        dataset=D,
        results=R,
        flags=flags(config["finetune_denoiser"]),
    log:
        log("finetune_denoiser"),
    benchmark:
        bench("finetune_denoiser")
    threads: 1
    resources:
        **gpu_resources("finetune_denoiser"),
    shell:
        "{LAUNCH[finetune_denoiser]} --threads {threads} finetune-denoiser --dataset {params.dataset} --results {params.results}"
        " {params.flags} > {log} 2>&1"
