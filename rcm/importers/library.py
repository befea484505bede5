"""``--format timm`` and ``--format hf``: classifiers of the two model libraries of the field.

timm: ``SRC`` is a local weights file (``.safetensors``, or a ``.pth``/``.bin``/``.pt`` state dict,
possibly inside ``{'state_dict' | 'model': ...}``) and ``--model`` the timm architecture name it
belongs to (e.g. ``beit_large_patch16_512.in22k_ft_in22k_in1k``, ``vit_base_patch16_224``). Input
size, interpolation, mean and std come from that name's pretrained config in timm, each overridable.
A file in the layout of the model's original release is converted by the model module's own
``checkpoint_filter_fn``, as timm does when it loads pretrained weights.

hf: ``SRC`` is a local transformers image-classification folder (``config.json``, the weights, and
``preprocessor_config.json``), e.g. a ViT-B/16 fine-tuned on CIFAR-10. The size, mean and std come
from its image processor; resizing is bicubic with antialiasing (how Carlini et al. bring 32 x 32
CIFAR-10 images to a 224 ViT), overridable with ``--interpolation``.

Both are loaded without running code from the files: safetensors, or ``torch.load(weights_only=True)``
(timm by rcm itself, transformers by its own loader, which refuses pickled objects the same way).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

from rcm.errors import CheckpointError, ConfigError

# PIL resampling codes of a transformers image processor
_PIL = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _timm_state(src: Path) -> dict:
    from rcm.importers import read_file

    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(src))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{src} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    state = read_file(src)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{src} is not a state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def timm_classifier(options: dict):
    """The TimmClassifier that ``--model`` and the other import options describe, with random weights,
    and timm's pretrained config for it (its input size, interpolation, mean, std)."""
    import timm

    from rcm.models.library import TimmClassifier

    name = options.get("model")
    if not name:
        raise ConfigError("--format timm needs --model: the timm architecture name the weights belong to")
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"--model {name}: timm has no such architecture (see timm.list_models())")
    try:
        cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
    except Exception:  # an unknown pretrained tag
        cfg = None
    cfg = cfg.to_dict() if cfg is not None else {}
    head = options.get("num_classes") or cfg.get("num_classes") or 1000
    size = int(options.get("image_size") or cfg.get("input_size", (3, 224, 224))[-1])
    kwargs = {}
    if options.get("image_size") and cfg.get("fixed_input_size"):
        kwargs["img_size"] = size          # ViT/BEiT: position embeddings for this size
    try:
        model = TimmClassifier(model_name=name, image_size=size, mean=options.get("mean") or cfg.get("mean", (0.485, 0.456, 0.406)),
                               std=options.get("std") or cfg.get("std", (0.229, 0.224, 0.225)),
                               interpolation=options.get("interpolation") or cfg.get("interpolation", "bicubic"),
                               num_classes=int(head), create_kwargs=kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"timm cannot build '{name}' with {kwargs or 'its defaults'}: {exc}") from exc
    return model, cfg


def read_timm(src, options: dict):
    from rcm.importers import load_state_into

    model, cfg = timm_classifier(options)
    name = options["model"]
    state = _timm_state(Path(src))
    if set(state) != set(model.net.state_dict()):
        module = importlib.import_module(type(model.net).__module__)
        convert = getattr(module, "checkpoint_filter_fn", None)
        if convert is not None:
            try:
                state = convert(state, model.net)
            except Exception as exc:  # the converter assumes its own layout
                raise CheckpointError(f"{src} does not fit '{name}', and timm's converter for it failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
    load_state_into(model.net, state, src, hint=f"are these the weights of '{name}'?")
    return model.eval(), {"pretrained_cfg": {k: cfg.get(k) for k in ("input_size", "interpolation", "mean", "std",
                                                                     "crop_pct", "num_classes") if k in cfg}}


def hf_settings(config: dict) -> dict:
    """A transformers config dict without its bookkeeping keys: what rebuilds the network."""
    return {k: v for k, v in config.items()
            if k not in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype")}


def read_hf(src, options: dict):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from rcm.models.library import HFClassifier

    src = Path(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not a transformers model folder (no config.json)")
    try:
        original = AutoModelForImageClassification.from_pretrained(src, local_files_only=True, use_safetensors=None)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{src} holds weights with Python objects besides tensors: refused before any of it "
                              "ran (transformers loads .bin files with weights_only=True)") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"transformers cannot load an image classifier from {src}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    config = original.config
    try:
        processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{src} has no readable image processor (preprocessor_config.json): {exc}") from exc
    size = getattr(processor, "size", None) or {}
    side = options.get("image_size") or size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", None)
    if not side:
        raise ConfigError(f"{src}: the image processor gives no input size; pass --image_size")
    model = HFClassifier(hf_config=hf_settings(config.to_dict()), image_size=int(side),
                         mean=options.get("mean") or processor.image_mean, std=options.get("std") or processor.image_std,
                         interpolation=options.get("interpolation") or "bicubic")
    from rcm.importers import load_state_into

    load_state_into(model.net, original.state_dict(), src)
    resample = _PIL.get(int(getattr(processor, "resample", -1)), "unknown")
    return model.eval(), {"model_type": config.model_type, "processor_size": dict(size),
                          "processor_resample": resample}
