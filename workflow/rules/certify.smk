# One job per certificate shard: (method, sigma, shard), (cascade, shard) per configured cascade, and
# (method, sigma, shard) and (cascade, shard) again for each of `sequential_methods` and its
# cascade, certified with early stopping.


rule certify:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=certify_models,
        code=CODE["certify"],
    output:
        str(paths.certificate(R, D, "{method}", "{sigma}", "{shard}", SHARDS)),
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
    log:
        log("certify", "{method}/sigma_{sigma}/shard_{shard}"),
    benchmark:
        bench("certify", "{method}.sigma_{sigma}.shard_{shard}")
    threads: 1
    resources:
        **gpu_resources("certify"),
    shell:
        "{LAUNCH[certify]} --threads {threads} certify --dataset {params.dataset} --results {params.results}"
        " --method {wildcards.method} --sigma {wildcards.sigma} --shard {wildcards.shard}"
        " {params.flags} > {log} 2>&1"


rule certify_cascade:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=cascade_models,
        code=CODE["certify_cascade"],
    output:
        str(paths.certificate(R, D, "{method}", paths.CASCADE, "{shard}", SHARDS)),
    wildcard_constraints:
        method="|".join(CASCADES) or "(?!)",  # only the configured cascades
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
        cascade=lambda wildcards: flags(CASCADES[wildcards.method]["flags"]),
    log:
        log("certify", "{method}/cascade/shard_{shard}"),
    benchmark:
        bench("certify", "{method}.cascade.shard_{shard}")
    threads: 1
    resources:
        **gpu_resources("certify"),
    shell:
        "{LAUNCH[certify]} --threads {threads} certify --dataset {params.dataset} --results {params.results}"
        " --method {wildcards.method} --sigma cascade --shard {wildcards.shard}"
        " {params.flags} {params.cascade} > {log} 2>&1"


rule certify_sequential:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=certify_models,
        code=CODE["certify"],
    output:
        str(paths.certificate(R, D, "{method}", "{sigma}", "{shard}", SHARDS, sequential=True)),
    wildcard_constraints:
        method="|".join(SEQUENTIAL_METHODS) or "(?!)",  # only the configured ones
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
        sequential=flags(config["sequential"]),
    log:
        log("certify", "{method}/sigma_{sigma}_sequential/shard_{shard}"),
    benchmark:
        bench("certify", "{method}.sigma_{sigma}_sequential.shard_{shard}")
    threads: 1
    resources:
        **gpu_resources("certify"),
    shell:
        "{LAUNCH[certify]} --threads {threads} certify --dataset {params.dataset} --results {params.results}"
        " --method {wildcards.method} --sigma {wildcards.sigma} --shard {wildcards.shard}"
        " {params.flags} --sequential {params.sequential} > {log} 2>&1"


rule certify_cascade_sequential:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=cascade_models,
        code=CODE["certify_cascade"],
    output:
        str(paths.certificate(R, D, "{method}", paths.CASCADE, "{shard}", SHARDS, sequential=True)),
    wildcard_constraints:
        method="|".join(SEQUENTIAL_CASCADES) or "(?!)",  # only the cascades of sequential_methods
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
        cascade=lambda wildcards: flags(CASCADES[wildcards.method]["flags"]),
        sequential=flags(config["sequential"]),
    log:
        log("certify", "{method}/cascade_sequential/shard_{shard}"),
    benchmark:
        bench("certify", "{method}.cascade_sequential.shard_{shard}")
    threads: 1
    resources:
        **gpu_resources("certify"),
    shell:
        "{LAUNCH[certify]} --threads {threads} certify --dataset {params.dataset} --results {params.results}"
        " --method {wildcards.method} --sigma cascade --shard {wildcards.shard}"
        " {params.flags} {params.cascade} --sequential {params.sequential} > {log} 2>&1"
