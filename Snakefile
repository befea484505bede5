# rcm: randomized-smoothing certification of four methods side by side (docs/workflow.md).
#
#   snakemake --cores 2                                   # the embedded digits config
#   snakemake --cores 2 --configfile .test/config.yaml    # the tiny CI config
#   snakemake --profile profiles/slurm --configfile config/cifar10.yaml   # on a SLURM cluster
#
# Snakemake applies profiles/default (beside this file) by itself: shell commands printed, failed
# logs shown, independent jobs kept going. Every rule is a thin call of `rcm`, run as
# `<the interpreter running Snakemake> -m rcm`, so no `rcm` needs to be on PATH. Output paths come
# from rcm.paths, the same functions the command uses, and dvc.yaml declares the same stages for
# `dvc repro`. The config is validated against workflow/schemas/config.schema.yaml as
# rules/common.smk is included, before any job starts; `--config` values are read as the schema
# types them (Snakemake hands nested ones over as strings).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/denoiser.smk"
include: "workflow/rules/classifier.smk"
include: "workflow/rules/rrcm.smk"
include: "workflow/rules/custom.smk"
include: "workflow/rules/certify.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


# RCM_PLAN=DEVICE (e.g. a100-80gb): a real run (not -n) prints the plan of this config on that device in
# one line before any job (rcm plan; it imports torch and traces the networks, seconds to a minute).
# (An optional variable, read by rcm.plan.workflow_summary: `envvars:` would make it required.)
onstart:
    from rcm.plan import workflow_summary

    workflow_summary(config, [str(f) for f in workflow.configfiles])


rule all:
    input:
        report_files(),
    default_target: True
