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
    wildcard_constraints:
        method="|".join(paths.METHODS),  # the built-ins; a user's method: certify_custom
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
        method="|".join(c for c in CASCADES if c not in CUSTOM) or "(?!)",  # the configured cascades
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
        method="|".join(m for m in SEQUENTIAL_METHODS if m not in CUSTOM) or "(?!)",  # the configured ones
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
        method="|".join(m for m in SEQUENTIAL_CASCADES if m not in CUSTOM) or "(?!)",  # the built-ins' sequential cascades
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


# A user's method (config `custom_methods`): the same four kinds of job, its --custom_* flags added and
# its builder's source file as code.


rule certify_custom:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=certify_models,
        code=lambda wildcards: CODE["certify"] + custom_code(wildcards.method),
    output:
        str(paths.certificate(R, D, "{method}", "{sigma}", "{shard}", SHARDS)),
    wildcard_constraints:
        method="|".join(CUSTOM) or "(?!)",
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
        custom=lambda wildcards: custom_flags(wildcards.method),
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
        " {params.flags} {params.custom} > {log} 2>&1"


rule certify_custom_cascade:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=cascade_models,
        code=lambda wildcards: CODE["certify_cascade"] + custom_code(wildcards.method),
    output:
        str(paths.certificate(R, D, "{method}", paths.CASCADE, "{shard}", SHARDS)),
    wildcard_constraints:
        method="|".join(c for c in CASCADES if c in CUSTOM) or "(?!)",
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
        cascade=lambda wildcards: flags(CASCADES[wildcards.method]["flags"]),
        custom=lambda wildcards: custom_flags(wildcards.method),
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
        " {params.flags} {params.cascade} {params.custom} > {log} 2>&1"


rule certify_custom_sequential:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=certify_models,
        code=lambda wildcards: CODE["certify"] + custom_code(wildcards.method),
    output:
        str(paths.certificate(R, D, "{method}", "{sigma}", "{shard}", SHARDS, sequential=True)),
    wildcard_constraints:
        method="|".join(m for m in SEQUENTIAL_METHODS if m in CUSTOM) or "(?!)",
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
        sequential=flags(config["sequential"]),
        custom=lambda wildcards: custom_flags(wildcards.method),
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
        " {params.flags} --sequential {params.sequential} {params.custom} > {log} 2>&1"


rule certify_custom_cascade_sequential:
    input:
        test=str(paths.prepared(R, D, "test")),
        models=cascade_models,
        code=lambda wildcards: CODE["certify_cascade"] + custom_code(wildcards.method),
    output:
        str(paths.certificate(R, D, "{method}", paths.CASCADE, "{shard}", SHARDS, sequential=True)),
    wildcard_constraints:
        method="|".join(m for m in SEQUENTIAL_CASCADES if m in CUSTOM) or "(?!)",
    params:
        dataset=D,
        results=R,
        flags=flags(config["certify"]),
        cascade=lambda wildcards: flags(CASCADES[wildcards.method]["flags"]),
        sequential=flags(config["sequential"]),
        custom=lambda wildcards: custom_flags(wildcards.method),
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
        " {params.flags} {params.cascade} --sequential {params.sequential} {params.custom} > {log} 2>&1"
