# Raw data set -> prepared splits and their manifests (rcm.data), in two jobs: the certification
# split (test) and the training splits (train, and val held out of train for every training-time
# evaluation). Only certification and the imports' checks read test; only training reads train and
# val, so when every model is imported `prepare_train` never runs (ImageNet's train/ is never read).
# Both get every `data` flag (as DVC renders ${data}; a part ignores the keys it does not read), but
# only the keys a part reads are its params: a change to `skip` reprepares test, not training.


rule prepare:
    input:
        code=CODE["prepare"],
    output:
        test=str(paths.prepared(R, D, "test")),
        manifest=str(paths.manifest(R, D)),
    params:
        dataset=D,
        results=R,
        data={k: v for k, v in config["data"].items() if k not in ("val_fraction", "val_seed")},
    log:
        log("prepare"),
    benchmark:
        bench("prepare")
    threads: 1
    shell:
        "{RCM} --threads {threads} prepare --part test --dataset {params.dataset} --results {params.results}"
        " {DATA_FLAGS} > {log} 2>&1"


rule prepare_train:
    input:
        code=CODE["prepare"],
    output:
        train=str(paths.prepared(R, D, "train")),
        val=str(paths.prepared(R, D, "val")),
        manifest=str(paths.train_manifest(R, D)),
    params:
        dataset=D,
        results=R,
        data={k: v for k, v in config["data"].items() if k not in ("skip", "max_images")},
    log:
        log("prepare_train"),
    benchmark:
        bench("prepare_train")
    threads: 1
    shell:
        "{RCM} --threads {threads} prepare --part train --dataset {params.dataset} --results {params.results}"
        " {DATA_FLAGS} > {log} 2>&1"
