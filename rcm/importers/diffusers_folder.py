"""``--format diffusers``: a local diffusers directory (a ``UNet2DModel.save_pretrained`` folder, or
a pipeline folder with ``unet/`` and ``scheduler/``); see `rcm.models.denoiser.load_pretrained`."""

from __future__ import annotations


def read(src, options: dict):
    from rcm.models.denoiser import load_pretrained

    model = load_pretrained(src, schedule=options.get("schedule"))
    return model, {"schedule": {k: model.config[k] for k in ("num_train_timesteps", "beta_schedule",
                                                             "beta_start", "beta_end", "prediction_type")}}
