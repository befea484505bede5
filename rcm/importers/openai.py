"""``--format improved-diffusion`` and ``--format guided-diffusion``: OpenAI's diffusion state dicts.

The file holds only weights; the architecture and the noise schedule come from the flags the model
was trained with, passed as ``--flags "..."`` exactly as that code's README prints MODEL_FLAGS and
DIFFUSION_FLAGS (TRAIN_FLAGS and SAMPLE_FLAGS may be included; they do not change the network).
A flag that is not given takes that code's default (``model_and_diffusion_defaults`` of its
``script_util.py``), so the flags of a README line reproduce the network that line trained.

What is carried over exactly:
- the network (`rcm.models.openai_unet.OpenAIUNet`, the original parameter names);
- the schedule: ``linear`` is Ho et al.'s, stretched to T steps (betas 1e-4 and 0.02 times 1000/T),
  ``cosine`` is Nichol & Dhariwal's (rcm's ``squaredcos_cap_v2``);
- ``rescale_timesteps``: the network sees t * 1000 / T (improved-diffusion's default is True,
  guided-diffusion's False); ``eps`` still takes the integer t;
- ``learn_sigma``: 2C output channels, the first C the noise prediction; ``predict_xstart``: the
  network predicts x0 (rcm's ``prediction_type='sample'``);
- ``use_fp16``: the weights are read as float32 (mixed precision is rcm's choice at run time).
``timestep_respacing``, ``use_kl``, ``sigma_small`` and ``rescale_learned_sigmas`` only change
sampling or the training loss, not eps(x_t, t): they are accepted and recorded.
"""

from __future__ import annotations

import shlex

import torch

from rcm.errors import ConfigError

# model_and_diffusion_defaults() of each code base (script_util.py)
IMPROVED_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
    diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
    predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False,
    use_scale_shift_norm=True)
GUIDED_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False,
    use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
    use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000, noise_schedule="linear",
    timestep_respacing="", use_kl=False, predict_xstart=False, rescale_timesteps=False,
    rescale_learned_sigmas=False)
# flags of those codes' training and sampling scripts: accepted, no effect on the network
SCRIPT_FLAGS = {"data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size",
                "microbatch", "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "use_fp16",
                "fp16_scale_growth", "clip_denoised", "num_samples", "use_ddim", "model_path",
                "classifier_path", "classifier_scale"}
# channel_mult by image size when not given (create_model of each code base)
IMPROVED_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
GUIDED_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}



def _bool(text: str, key: str) -> bool:
    low = text.lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise ConfigError(f"--flags: --{key} takes a boolean, got '{text}'")


def parse_flags(text: str, defaults: dict, fmt: str) -> dict:
    """``"--image_size 32 --learn_sigma True ..."`` -> the full flag dict, defaults filled in."""
    try:
        tokens = shlex.split(text or "")
    except ValueError as exc:
        raise ConfigError(f"--flags: cannot split '{text}': {exc}") from exc
    values = dict(defaults)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"--flags: expected '--name value', got '{token}'")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ConfigError(f"--flags: --{key} has no value")
            value, i = tokens[i + 1], i + 1
        i += 1
        if key in SCRIPT_FLAGS and key not in defaults:
            continue
        if key not in defaults:
            raise ConfigError(f"--flags: --{key} is not a flag of {fmt} (its flags: {', '.join(sorted(defaults))})")
        default = defaults[key]
        try:
            values[key] = (_bool(value, key) if isinstance(default, bool) else
                           type(default)(value) if default is not None else value)
        except ValueError:
            raise ConfigError(f"--flags: --{key} takes a {type(default).__name__}, got '{value}'") from None
    return values


def denoiser_config(flags: dict, fmt: str) -> dict:
    """The flags as `Denoiser` arguments (network 'openai')."""
    size = flags["image_size"]
    if flags["class_cond"]:
        raise ConfigError(f"--flags: --class_cond True: a class-conditional {fmt} model needs a label at "
                          "every step; denoised smoothing uses the unconditional models")
    if fmt == "guided-diffusion" and flags["channel_mult"]:
        mult = tuple(int(m) for m in str(flags["channel_mult"]).split(","))
    else:
        table = IMPROVED_MULT if fmt == "improved-diffusion" else GUIDED_MULT
        if size not in table:
            raise ConfigError(f"--flags: {fmt} has no channel_mult for --image_size {size} "
                              f"(it knows {', '.join(map(str, table))})")
        mult = table[size]
    try:
        attention = [size // int(r) for r in str(flags["attention_resolutions"]).split(",")]
    except ValueError:
        raise ConfigError(f"--flags: --attention_resolutions '{flags['attention_resolutions']}' is not a "
                          "comma-separated list of resolutions") from None
    unet = dict(in_channels=3, model_channels=flags["num_channels"], out_channels=6 if flags["learn_sigma"] else 3,
                num_res_blocks=flags["num_res_blocks"], attention_resolutions=attention,
                dropout=flags["dropout"], channel_mult=list(mult), num_heads=flags["num_heads"],
                num_heads_upsample=flags["num_heads_upsample"],
                num_head_channels=flags.get("num_head_channels", -1),
                use_scale_shift_norm=flags["use_scale_shift_norm"],
                resblock_updown=flags.get("resblock_updown", False),
                use_new_attention_order=flags.get("use_new_attention_order", False))
    T = flags["diffusion_steps"]
    if flags["noise_schedule"] == "linear":
        schedule = dict(beta_schedule="linear", beta_start=1000 / T * 1e-4, beta_end=1000 / T * 0.02)
    elif flags["noise_schedule"] == "cosine":
        schedule = dict(beta_schedule="squaredcos_cap_v2")
    else:
        raise ConfigError(f"--flags: unknown --noise_schedule '{flags['noise_schedule']}' (linear, cosine)")
    return dict(image_size=size, network="openai", openai_unet=unet, num_train_timesteps=T, **schedule,
                prediction_type="sample" if flags["predict_xstart"] else "epsilon",
                timestep_scale=1000.0 / T if flags["rescale_timesteps"] else 1.0)


def _read(src, options: dict, fmt: str, defaults: dict):
    from rcm.importers import load_state_into, read_state
    from rcm.models.denoiser import Denoiser

    if not options.get("flags"):
        raise ConfigError(f"--format {fmt} needs --flags: the MODEL_FLAGS and DIFFUSION_FLAGS the model was "
                          "trained with, as the code's README prints them (the file holds only weights)")
    flags = parse_flags(options["flags"], defaults, fmt)
    state = read_state(src)
    model = Denoiser(**denoiser_config(flags, fmt))
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in state.items()}
    load_state_into(model.unet, state, src, hint="do --flags describe the network this file was trained as?")
    return model.eval(), {"flags": {k: v for k, v in flags.items() if v != defaults[k]}}


def read_improved(src, options: dict):
    return _read(src, options, "improved-diffusion", IMPROVED_DEFAULTS)


def read_guided(src, options: dict):
    return _read(src, options, "guided-diffusion", GUIDED_DEFAULTS)
