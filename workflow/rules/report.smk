# Every certificate shard of the configured grid (and the configured published baselines) -> tables,
# plot, DVC metrics and plots, cost. The outputs marked report() go into `snakemake --report`, each
# with the caption under workflow/report/.


rule report:
    input:
        certificates=certificates(),
        baselines=BASELINE_FILES,
        code=CODE["report"],
    output:
        csv=report(_report_file("certified_accuracy.csv"), caption="../report/certified_accuracy.rst",
                   category="Certified accuracy", labels={"what": "table (tidy)"}),
        md=_report_file("certified_accuracy.md"),
        paired=report(_report_file("paired_tests.csv"), caption="../report/paired_tests.rst",
                      category="Certified accuracy", labels={"what": "paired tests"}),
        tex=_report_file("certified_accuracy.tex"),
        png=report(_report_file("certified_accuracy.png"), caption="../report/certified_accuracy_plot.rst",
                   category="Certified accuracy", labels={"what": "plot"}),
        metrics=_report_file("metrics.json"),
        plot=_report_file("plot_certified_accuracy.csv"),
        cost=report(_report_file("cost.csv"), caption="../report/cost.rst", category="Cost",
                    labels={"what": "table"}),
        cost_md=_report_file("cost.md"),
        sources=report(_report_file("sources.txt"), caption="../report/sources.rst",
                       category="Provenance", labels={"what": "files read"}),
    params:
        flags=flags(config["report"]),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        log("report"),
    benchmark:
        bench("report")
    threads: 1
    shell:
        "{RCM} --threads {threads} report {input.certificates} {params.flags} --out {params.out}"
        " > {log} 2>&1"
