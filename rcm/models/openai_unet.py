"""The UNet of OpenAI's improved-diffusion (Nichol & Dhariwal 2021) and guided-diffusion (Dhariwal &
Nichol 2021) code, rebuilt with the original parameter names so their released state dicts load unchanged.

Carlini et al. (2023) denoise CIFAR-10 with improved-diffusion's ``cifar10_uncond_50M_500K.pt`` and
ImageNet with guided-diffusion's ``256x256_diffusion_uncond.pt``; Jeong & Shin (2023) fine-tune the latter.
improved-diffusion's network is guided-diffusion's with ``num_head_channels=-1``,
``resblock_updown=False`` and the legacy head split, so one module serves both.

Structure (what the parameter names encode):
- ``time_embed``: Linear(C, 4C), SiLU, Linear(4C, 4C) on the sinusoidal embedding of the timestep;
- ``input_blocks[0]``: a 3x3 conv; then per level ``num_res_blocks`` x (ResBlock [+ AttentionBlock])
  and, except at the last level, a down-sampling block (strided conv, or a ResBlock with ``down``);
- ``middle_block``: ResBlock, AttentionBlock, ResBlock;
- ``output_blocks``: per level in reverse ``num_res_blocks + 1`` x (ResBlock on the concatenated skip
  [+ AttentionBlock] [+ up-sampling at the level's last block]);
- ``out``: GroupNorm, SiLU, 3x3 conv.
GroupNorms (32 groups) compute in float32 whatever the input dtype, as the original does.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from rcm.models.vit import timestep_embedding  # the same sinusoidal embedding (cosines, then sines)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) evaluated in float32, cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (optionally) a 3x3 conv named ``conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """A stride-2 3x3 conv, or 2x2 average pooling; named ``op`` either way."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep conditioning (scale-shift after the second norm, or an added bias),
    SiLU-dropout-conv, plus a skip (identity, or 1x1 conv when the width changes). ``up``/``down``
    resample both paths between the first norm-SiLU and the first conv."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]       # (B, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions: GroupNorm, a 1x1 ``qkv`` projection, heads, ``proj_out``,
    residual. ``legacy`` splits the channels into heads before q/k/v (improved-diffusion, and
    guided-diffusion unless ``use_new_attention_order``); otherwise q/k/v first, then heads."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy: bool = True):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} attention channels are not divisible by "
                                 f"num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"{channels} attention channels are not divisible by num_heads={num_heads}")
        self.num_heads, self.legacy = num_heads, legacy
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))                                   # (B, 3C, T)
        n, length, ch = self.num_heads, qkv.shape[-1], c // self.num_heads
        if self.legacy:
            q, k, v = qkv.reshape(b * n, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (z.reshape(b * n, ch, length) for z in qkv.chunk(3, dim=1))
        scale = 1.0 / math.sqrt(math.sqrt(ch))                         # on q and k each, as the original
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class TimestepSequential(nn.Sequential):
    """A sequence whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class OpenAIUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (unconditional, 2-D). Arguments as in that code, except
    ``attention_resolutions``, which is the tuple of *downsampling factors* (image_size // resolution)
    that the original's ``create_model`` passes. ``forward(x, t)`` returns the raw network output
    (noise prediction, and the variance interpolation when ``out_channels`` is twice the input's)."""

    def __init__(self, *, in_channels: int = 3, model_channels: int = 128, out_channels: int = 3,
                 num_res_blocks: int = 2, attention_resolutions: list[int] = (2, 4), dropout: float = 0.0,
                 channel_mult: list[float] = (1, 2, 4, 8), conv_resample: bool = True, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attn = set(int(a) for a in attention_resolutions)
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))

        def res(c_in: int, c_out: int, **kw) -> ResBlock:
            return ResBlock(c_in, emb, dropout, c_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attention(c: int, heads: int) -> AttentionBlock:
            return AttentionBlock(c, heads, num_head_channels, legacy=not use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepSequential(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), attention(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attn:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); timesteps: (B,) or scalar, as the network was trained to see them."""
        t = torch.as_tensor(timesteps, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
