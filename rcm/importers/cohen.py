"""``--format cohen``: the ``checkpoint.pth.tar`` files of Cohen et al. (2019)'s code and models.

The file is ``{'epoch', 'arch', 'state_dict', 'optimizer'}``; ``state_dict`` is that of
``Sequential(NormalizeLayer, net)``, so every key starts with ``1.`` (the normalisation layer keeps its
mean and std as plain attributes, not in the state dict), and ResNet-50's ``net`` was wrapped in
``DataParallel`` (``1.module.``). Both prefixes are removed. The normalisation is not in the file: it is
their dataset's (``--dataset cifar10`` or ``imagenet``, by default the one the architecture was
trained on), or ``--mean``/``--std``.
"""

from __future__ import annotations

from rcm.errors import CheckpointError, ConfigError



def strip_prefixes(state: dict) -> dict:
    """Remove ``1.`` (the Sequential index) and then ``module.`` (DataParallel) where every key has it."""
    for prefix in ("1.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read(src, options: dict):
    from rcm.importers import load_state_into, read_file
    from rcm.models.cohen import ARCHS, DEFAULT_DATASET, NORMALIZATION, CohenClassifier

    payload = read_file(src)
    if isinstance(payload, dict) and "state_dict" in payload:
        state, arch = payload["state_dict"], options.get("arch") or payload.get("arch")
    else:
        raise CheckpointError(f"{src} is not a Cohen et al. checkpoint: it has no 'state_dict' entry "
                              f"(keys: {', '.join(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__})")
    if arch is None:
        raise CheckpointError(f"{src} records no 'arch'; pass --arch ({', '.join(ARCHS)})")
    if arch not in ARCHS:
        raise CheckpointError(f"{src}: unknown architecture '{arch}' (Cohen et al.'s are {', '.join(ARCHS)})")
    if options.get("arch") and payload.get("arch") not in (None, options["arch"]):
        raise ConfigError(f"--arch {options['arch']} contradicts {src}, which records arch '{payload['arch']}'")
    dataset = options.get("dataset") or DEFAULT_DATASET[arch]
    if dataset not in NORMALIZATION:
        raise ConfigError(f"--dataset {dataset}: Cohen et al.'s normalisations are {', '.join(NORMALIZATION)}")
    mean, std = NORMALIZATION[dataset]
    state = strip_prefixes(dict(state))
    head = state.get("fc.weight")
    if head is None or getattr(head, "dim", lambda: 0)() != 2:
        raise CheckpointError(f"{src}: the state dict has no 'fc.weight' matrix, so it is not a '{arch}' network")
    model = CohenClassifier(arch=arch, num_classes=int(head.shape[0]), mean=options.get("mean") or mean,
                            std=options.get("std") or std)
    load_state_into(model.net, state, src, hint=f"is it really a '{arch}' checkpoint?")
    return model.eval(), {"arch": arch, "dataset": dataset, "epoch": payload.get("epoch")}
