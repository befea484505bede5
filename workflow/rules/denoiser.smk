# Diffusion denoised smoothing (dds): the DDPM denoiser; mdds: its multi-scale fine-tuning, which
# needs the clean classifier (train_classifier at sigma 0.0).


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
    shell:
        "{RCM} --threads {threads} train-denoiser --dataset {params.dataset} --results {params.results}"
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
    shell:
        "{RCM} --threads {threads} finetune-denoiser --dataset {params.dataset} --results {params.results}"
        " {params.flags} > {log} 2>&1"
