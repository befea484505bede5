"""`Denoiser`: an epsilon-prediction DDPM (diffusers' `UNet2DModel` + its noise schedule), the one-shot
denoising of Carlini et al. 2023 ("(Certified!!) Adversarial Robustness for Free!"), and
`DenoisedClassifier`, the base classifier of `dds` and `mdds`.

Conventions: the DDPM works on data in [-1, 1]; everything that enters or leaves this module from the
rest of rcm is an image in [0, 1] with pixel-space sigma (a model in [-1, 1] sees noise 2 sigma).
Forward process (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, abar_t = prod_s<=t (1 - beta_s).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from rcm.errors import CheckpointError, ConfigError

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
NETWORKS = ("diffusers", "openai")
DDPM_NOISE = 2  # the stream of the DDPM loss's per-row noise (rcm.distributed.local_normal)
# Config keys of Denoiser that are UNet2DModel arguments under another name or the same name.
_UNET_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
              "up_block_types", "mid_block_type", "norm_num_groups", "add_attention")
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                  "prediction_type")


def make_betas(num_train_timesteps: int, beta_schedule: str = "linear", beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas: list[float] | None = None) -> torch.Tensor:
    """(T,) float64 betas, the same formulas as diffusers' DDPMScheduler but in double precision.

    'linear': Ho et al. (guided-diffusion's ImageNet 256 model: 1e-4..0.02, T = 1000);
    'scaled_linear': linear in sqrt(beta) (latent diffusion);
    'squaredcos_cap_v2': improved-diffusion's cosine schedule (Nichol & Dhariwal 2021, eq. 17),
    abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, betas capped at 0.999.

    On the CPU always, also while a network is built on another default device (``rcm plan`` builds on
    the meta device and reads t* from this schedule).
    """
    T = num_train_timesteps
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float64, device="cpu")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64, device="cpu")
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64, device="cpu") ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(T)], dtype=torch.float64,
                            device="cpu")
    raise ConfigError(f"unknown beta_schedule '{beta_schedule}' (known: {', '.join(SCHEDULES)})")


class Denoiser(nn.Module):
    """DDPM noise predictor on [-1, 1] data with its schedule; ``self.config`` rebuilds it.

    ``unet_extra`` holds any further `UNet2DModel` arguments (an imported model's attention heads,
    time embedding, ...), so every diffusers UNet round-trips through an rcm checkpoint.
    If the UNet outputs 2C channels (a learned-variance model, improved/guided-diffusion style),
    the first C are the noise prediction.

    ``network="openai"`` replaces the diffusers UNet by OpenAI's improved/guided-diffusion UNet
    (`rcm.models.openai_unet.OpenAIUNet`, built from ``openai_unet``; the diffusers arguments are then
    unused and not recorded). ``timestep_scale`` multiplies the integer timestep before the network
    sees it (1000 / T for improved-diffusion's ``rescale_timesteps``); ``eps`` always takes the
    integer t of the schedule.
    """

    def __init__(self, *, image_size: int = 8, in_channels: int = 1, out_channels: int | None = None,
                 block_out_channels: list[int] = (16, 32), layers_per_block: int = 1,
                 down_block_types: list[str] = ("DownBlock2D", "DownBlock2D"),
                 up_block_types: list[str] = ("UpBlock2D", "UpBlock2D"),
                 mid_block_type: str | None = "UNetMidBlock2D", norm_num_groups: int = 8,
                 add_attention: bool = False, unet_extra: dict | None = None,
                 num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", network: str = "diffusers",
                 openai_unet: dict | None = None, timestep_scale: float = 1.0):
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"unknown denoiser network '{network}' (known: {', '.join(NETWORKS)})")
        if network == "openai":
            if not openai_unet:
                raise ValueError("network='openai' needs the openai_unet arguments")
            in_channels = int(openai_unet.get("in_channels", 3))
            out_channels = int(openai_unet.get("out_channels", in_channels))
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"out_channels must be {in_channels} (epsilon) or {2 * in_channels} "
                             f"(epsilon and learned variance), got {out_channels}")
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type '{prediction_type}' (known: {', '.join(PREDICTIONS)})")
        self.config = dict(
            image_size=int(image_size), in_channels=in_channels, out_channels=out_channels,
            block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=list(down_block_types), up_block_types=list(up_block_types),
            mid_block_type=mid_block_type, norm_num_groups=norm_num_groups, add_attention=add_attention,
            unet_extra=dict(unet_extra or {}), num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule, beta_start=float(beta_start), beta_end=float(beta_end),
            trained_betas=None if trained_betas is None else [float(b) for b in trained_betas],
            prediction_type=prediction_type, network=network, timestep_scale=float(timestep_scale))
        if network == "openai":
            from rcm.models.openai_unet import OpenAIUNet

            for key in (*_UNET_KEYS, "unet_extra"):
                if key not in ("in_channels", "out_channels"):
                    del self.config[key]
            self.config["openai_unet"] = {**openai_unet, "in_channels": in_channels, "out_channels": out_channels}
            self.unet = OpenAIUNet(**self.config["openai_unet"])
        else:
            from diffusers import UNet2DModel  # deferred: importing diffusers takes seconds

            self.unet = UNet2DModel(sample_size=int(image_size),
                                    **{k: self.config[k] for k in _UNET_KEYS}, **self.config["unet_extra"])
        betas = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas)
        if len(betas) != num_train_timesteps:
            raise ValueError(f"{len(betas)} trained_betas for num_train_timesteps={num_train_timesteps}")
        abar = torch.cumprod(1.0 - betas, dim=0)                     # (T,) float64
        # sqrt((1 - abar_t) / abar_t): the std of the noise on x_0 after rescaling x_t by 1/sqrt(abar_t)
        self._noise_ratio = ((1.0 - abar) / abar).sqrt()             # kept in float64 for t*
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    @property
    def downsampling(self) -> int:
        """The UNet's total downsampling factor: an input side must be a multiple of it."""
        levels = (len(self.config["openai_unet"]["channel_mult"]) if self.config["network"] == "openai"
                  else len(self.config["block_out_channels"]))
        return 2 ** (levels - 1)

    def check_size(self, size: int) -> None:
        """Whether the UNet can denoise ``size`` px images. Both UNets are convolutional, with attention
        placed by downsampling rate, so a model trained at one resolution runs at another whose side is
        a multiple of ``downsampling`` (Carlini et al. run the 256 px guided-diffusion model on ImageNet's
        224 px centre crops); ConfigError otherwise."""
        if size % self.downsampling:
            raise ConfigError(f"the denoiser ({self.config['image_size']} px, {self.downsampling}x downsampling) "
                              f"cannot run on {size} px images: the side must be a multiple of {self.downsampling}")

    def _abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast to ``like``'s shape: t is an int or (B,)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        a = self.alphas_cumprod[t].to(like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0 in [-1, 1], (B, C, H, W)."""
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """eps_theta(x_t, t): (B, C, H, W) noise prediction (the first C channels of a 2C output)."""
        t_in = t if isinstance(t, torch.Tensor) else torch.tensor(t, device=x_t.device)
        if self.config["timestep_scale"] != 1.0:
            t_in = t_in.float() * self.config["timestep_scale"]
        if self.config["network"] == "openai":
            out = self.unet(x_t, t_in)
        else:
            out = self.unet(x_t, t_in).sample
        out = out[:, : x_t.shape[1]]
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return out
        a = self._abar(t, x_t)
        if kind == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0  =>  eps = sqrt(a) v + sqrt(1-a) x_t
            return a.sqrt() * out + (1.0 - a).sqrt() * x_t
        return (x_t - a.sqrt() * out) / (1.0 - a).sqrt()          # 'sample': out is x0

    def loss(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The DDPM "simple" loss E ||eps - eps_theta(x_t, t)||^2, t ~ U{0..T-1}; x0 in [-1, 1].

        ``x0`` holds this pass's rows of a global batch (rcm.distributed): the timesteps are drawn
        from ``generator`` for the whole global batch and this pass's part kept; the noise is drawn
        per row on x0's device (``local_normal``), so it does not depend on how the batch is split.
        """
        from rcm.distributed import local, local_normal, parts

        t = local(torch.randint(0, self.num_timesteps, (len(x0) * parts(),), generator=generator)).to(x0.device)
        noise = local_normal(generator, len(x0), tuple(x0.shape[1:]), DDPM_NOISE, x0.device)
        return F.mse_loss(self.eps(self.q_sample(x0, t, noise), t), noise)

    def t_star(self, sigma: float) -> int:
        """The first t with sqrt((1 - abar_t)/abar_t) >= 2 sigma (DESIGN section 5).

        "first >=" (not "closest") reproduces the published values: cosine T = 4000 -> 1158/1984/2809 and
        linear T = 1000 -> 145/259/396 for sigma = 0.25/0.5/1.0.

        Computed once per sigma and kept (``denoise_one_shot`` asks on every forward pass): the search is
        a data-dependent ``nonzero`` and a host read, which would break a compiled graph and cost a
        synchronisation per batch on a GPU. The schedule never changes after construction.
        """
        cache = getattr(self, "_t_star_cache", None)
        if cache is None:
            cache = self._t_star_cache = {}
        if sigma not in cache:
            if sigma < 0:
                raise ConfigError(f"sigma must be >= 0, got {sigma}")
            hits = torch.nonzero(self._noise_ratio >= 2.0 * sigma)
            if len(hits) == 0:
                raise ConfigError(f"sigma={sigma} is beyond this denoiser's schedule (largest noise 2 sigma = "
                                  f"{self._noise_ratio[-1].item():.4g} at t={self.num_timesteps - 1})")
            cache[sigma] = int(hits[0])
        return cache[sigma]

    def denoise_one_shot(self, x_noisy: torch.Tensor, sigma: float) -> torch.Tensor:
        """One-shot denoising of x + N(0, sigma^2 I) (pixel space): (B, C, H, W) in -> [0, 1] out.

        y = 2x - 1 has noise 2 sigma; x_t* = sqrt(abar) y is distributed like the forward process at t*;
        x0_hat = (x_t* - sqrt(1 - abar) eps_theta(x_t*, t*)) / sqrt(abar), clipped to [-1, 1].
        """
        t = self.t_star(sigma)
        a = self.alphas_cumprod[t].to(x_noisy.dtype)
        x_t = a.sqrt() * (2.0 * x_noisy - 1.0)
        x0 = (x_t - (1.0 - a).sqrt() * self.eps(x_t, t)) / a.sqrt()
        return (x0.clamp(-1.0, 1.0) + 1.0) / 2.0


class DenoisedClassifier(nn.Module):
    """Noisy [0, 1] images (B, C, H, W) -> logits (B, K): one-shot denoise at ``sigma``, resize to the
    classifier's resolution if it differs, classify. This is the base classifier that `dds`/`mdds` smooth."""

    def __init__(self, denoiser: Denoiser, classifier: nn.Module, sigma: float,
                 classifier_size: int | None = None):
        super().__init__()
        self.denoiser, self.classifier, self.sigma = denoiser, classifier, float(sigma)
        if classifier_size is None:
            classifier_size = getattr(classifier, "config", {}).get("image_size")
        self.classifier_size = classifier_size
        denoiser.t_star(self.sigma)  # fail now, not inside certification, if sigma is out of range

    def describe(self, size: int) -> str:
        """What happens to a ``size`` px noisy image, resolution by resolution (the certify log records it);
        ConfigError if the denoiser cannot run at that size."""
        self.denoiser.check_size(size)
        native = self.denoiser.config["image_size"]
        steps = [f"denoise at t* = {self.denoiser.t_star(self.sigma)} at {size} px"
                 + ("" if size == native else f" (a {native} px model, run at the input's size)")]
        target = self.classifier_size
        if target is not None and target != size:
            steps.append(f"resize {size} -> {target} px, bicubic with antialiasing")
        steps.append(f"classify at {target or size} px")
        return "; ".join(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.denoiser.denoise_one_shot(x, self.sigma)            # (B, C, H, W) in [0, 1]
        size = self.classifier_size
        if size is not None and tuple(x0.shape[-2:]) != (size, size):
            # bicubic with antialiasing, as Carlini et al. (2023) resize denoised images for their
            # classifiers (32 -> 224 on CIFAR-10, 256 -> 512 on ImageNet); not clipped afterwards
            x0 = F.interpolate(x0, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return self.classifier(x0)


# ----------------------------------------------------------------------------- importing diffusers models

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON config ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(unet folder, scheduler config or None) for a UNet folder or a pipeline folder."""
    if not path.exists():
        raise CheckpointError(f"pretrained denoiser not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"pretrained denoiser {path} must be a diffusers directory (a UNet2DModel "
                              "save_pretrained folder, or a pipeline folder with unet/ and scheduler/)")
    if (path / "unet" / "config.json").is_file():                     # pipeline layout
        sched = path / "scheduler" / "scheduler_config.json"
        return path / "unet", sched if sched.is_file() else None
    if (path / "config.json").is_file():                              # bare UNet folder
        sched = path / "scheduler_config.json"
        return path, sched if sched.is_file() else None
    raise CheckpointError(f"{path} holds neither config.json (a UNet2DModel folder) nor unet/config.json "
                          "(a diffusers pipeline folder)")


def load_pretrained(path: str | Path, schedule: dict | None = None) -> Denoiser:
    """A `Denoiser` from a local diffusers directory (never the network).

    Accepted layouts: a `UNet2DModel.save_pretrained` folder (config.json + weights), optionally with a
    `scheduler_config.json` beside them; or a pipeline folder with unet/ and scheduler/ (e.g. the
    layout of google/ddpm-cifar10-32). Without a scheduler config, ``schedule`` (keys of
    Denoiser's schedule arguments) or diffusers' DDPM defaults are used.
    """
    from diffusers import UNet2DModel

    path = Path(path)
    unet_dir, sched_file = _locate(path)
    cfg = _read_json(unet_dir / "config.json")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{unet_dir / 'config.json'} describes a {cfg['_class_name']}, "
                              "not a UNet2DModel (only unconditional pixel-space DDPMs are supported)")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError variously
        cause = exc
        while cause is not None and not isinstance(cause, pickle.UnpicklingError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # diffusers reads a .bin with torch.load(weights_only=True)
            raise CheckpointError(f"{unet_dir} holds weights with Python objects besides tensors: refused before "
                                  "any of it ran (diffusers loads .bin files with weights_only=True)") from None
        raise CheckpointError(f"cannot load the UNet2DModel in {unet_dir}: {type(exc).__name__}: {exc}") from exc
    ucfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items()
            if not k.startswith("_")}
    size = ucfg.pop("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"{unet_dir}: non-square sample_size {size} is not supported")
        size = size[0]
    if size is None:
        raise CheckpointError(f"{unet_dir / 'config.json'} has no sample_size")
    sched = dict(schedule or {})
    if sched_file is not None:
        scfg = _read_json(sched_file)
        sched.update({k: scfg[k] for k in _SCHEDULE_KEYS if k in scfg})
    sched = {k: v for k, v in sched.items() if k in _SCHEDULE_KEYS}
    if sched.get("beta_schedule", "linear") not in SCHEDULES and sched.get("trained_betas") is None:
        raise CheckpointError(f"{sched_file}: beta_schedule '{sched['beta_schedule']}' is not supported "
                              f"(known: {', '.join(SCHEDULES)})")
    top = {k: ucfg.pop(k) for k in _UNET_KEYS if k in ucfg}
    model = Denoiser(image_size=size, **top, unet_extra=ucfg, **sched)
    model.unet.load_state_dict(unet.state_dict(), strict=True)
    return model.eval()
