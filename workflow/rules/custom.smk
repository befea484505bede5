# The model files of a user's method (config `custom_methods`) that it says how to make: one job per
# (method, role[, sigma]) running its `train` command, with {output}, {sigma} and {python} (the
# interpreter running Snakemake) filled in. A file without a `train` command is expected to exist (or to
# be made by a built-in rule, such as the clean classifier). Each asks for the method's `train_gpus` GPUs
# (0 by default) with the `host` share per GPU, as a built-in stage's `gpus`; with 0 it sees no GPU.
# Certifying them: rules/certify.smk.


def _train_command(command: str):
    def render(wildcards, output):
        return command.format(sigma=wildcards.get("sigma", ""), output=output[0], python=PYTHON, results=R,
                              dataset=D)
    return render


for _name, _method in CUSTOM.items():
    for _role, _command in _method.train.items():
        _per_sigma = "{sigma}" in _method.templates[_role]
        rule:
            name:
                f"train_{_name}_{_role}"
            output:
                _method.templates[_role].format(sigma="{sigma}", results=R, dataset=D),
            params:
                command=_train_command(_command),
            log:
                log(f"train_{_name}", f"{_role}_sigma_{{sigma}}" if _per_sigma else _role),
            threads: 1
            resources:
                **job_resources(_method.train_gpus),
            shell:
                # no GPU it did not ask for (as a built-in stage with 0 GPUs and device auto)
                ("(export CUDA_VISIBLE_DEVICES=; " if _method.train_gpus == 0 else "(")
                + "{params.command}) > {log} 2>&1"
