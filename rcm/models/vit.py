"""rRCM's network (Lei et al. 2025): a noise-conditioned ViT, its EDM noise grid, and the base classifier.

Conventions of this module (DESIGN section 7): the network works on data in [-1, 1], so a pixel-space
noise level sigma is 2*sigma here. ``s`` always names a noise level in that [-1, 1] space, normally a
point of the EDM grid. ``SigmaConditioned`` is the bridge to the rest of the project: it takes noisy
images in [0, 1] pixel space, as the smoothing core produces them, and returns logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rcm.errors import ConfigError

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
SIGMA_DATA = 0.5             # std of data in [-1, 1] assumed by c_in (EDM's sigma_data)
TIME_SCALE = 250.0           # the time token embeds 250 * ln(s)
CERTIFY_GRID_POINTS = 81     # N used by fine-tuning and certification
START_POINTS, END_POINTS = 20, 80   # the growing schedule 21 -> 41 -> 81


def edm_grid(num_points: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
             rho: float = RHO) -> torch.Tensor:
    """Karras et al.'s grid s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    Returns (N,) float64, index 0 the noisiest (s_max) and index N-1 the cleanest (s_min).
    """
    if num_points < 2:
        raise ConfigError(f"an EDM grid needs at least 2 points, got {num_points}")
    i = torch.arange(num_points, dtype=torch.float64, device="cpu") / (num_points - 1)   # on the CPU always (as a schedule)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    grid = (a + i * (b - a)) ** rho
    grid[0], grid[-1] = sigma_max, sigma_min  # exact endpoints, not pow round-off
    return grid


def num_grid_points(step: int, total_steps: int) -> int:
    """Grid size N(k) = min(20 * 2^ceil(k/K'), 80) + 1 with K' = ceil(K / log2(5)).

    Written as in DESIGN section 7 (the consistency-training curriculum with a ceiling): N = 21 at
    k = 0 only, 41 for 1 <= k <= K', and 81 from k = K' + 1 on.
    """
    k_prime = math.ceil(total_steps / math.log2(END_POINTS // START_POINTS + 1))
    return min(START_POINTS * 2 ** math.ceil(step / max(1, k_prime)), END_POINTS) + 1


def nearest_grid_index(s: float, num_points: int = CERTIFY_GRID_POINTS) -> int:
    """Index of the grid point nearest to the noise level ``s`` ([-1, 1] space)."""
    return int((edm_grid(num_points) - s).abs().argmin())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalars t (B,) -> (B, dim): cosines then sines of geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]                     # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))                    # odd dim: one zero column


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); x (B, T, D).

    On a CPU, attention is written out (softmax(q k^T / sqrt(d)) v): with ~20 tokens that trains about
    30% faster than the fused kernels (nn.TransformerEncoderLayer's) and is as fast at inference. On an
    accelerator, with paper-size token counts, the fused scaled_dot_product_attention is used.
    """

    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu":
            attn = (q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1)   # (B, heads, T, T)
            out = attn @ v
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, t, d))                   # (B, T, D)
        return x + self.mlp(self.norm2(x))


def _projector(dim: int, hidden: int, out: int, bias: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU twice, then Linear to ``out`` (the contrastive head z)."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=bias))


class RRCMNet(nn.Module):
    """ViT over tokens [CLS, TIME, patches] whose CLS output is the representation h.

    Input: x_s = x + s*eps in [-1, 1] space, (B, C, H, W), and the grid level s ((B,) or a scalar).
    The network sees c_in(s) * x_s with c_in = 1/sqrt(s^2 + 0.25); s enters as the TIME token, an MLP
    of the sinusoidal embedding of 250 ln s. ``proj_dim = 0`` means no projector (a fine-tuned
    classifier), ``num_classes = 0`` no linear head (a pretrained encoder).

    The options that differ in the rRCM authors' reference network (so their weights load unchanged,
    `rcm import-model --format rrcm`): ``qkv_bias=False``; ``time_mlp=0`` (the time token is the
    sinusoidal embedding itself, no MLP; ``time_mlp=r`` is an MLP of hidden width r*dim);
    ``proj_bias=False``; and for their CIFAR-10 fine-tuning ``head_norm=False`` (the head reads the
    CLS output without the final LayerNorm; the projector always reads it normalised).
    """

    def __init__(self, *, image_size: int = 8, in_channels: int = 1, patch_size: int = 2, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, proj_dim: int = 256,
                 proj_hidden: int = 256, num_classes: int = 0, qkv_bias: bool = True, time_mlp: float = 1.0,
                 proj_bias: bool = True, head_norm: bool = True):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if dim % heads:
            raise ConfigError(f"dim {dim} is not a multiple of heads {heads}")
        self.config = dict(image_size=image_size, in_channels=in_channels, patch_size=patch_size, dim=dim,
                           depth=depth, heads=heads, mlp_ratio=mlp_ratio, proj_dim=proj_dim,
                           proj_hidden=proj_hidden, num_classes=num_classes, qkv_bias=bool(qkv_bias),
                           time_mlp=float(time_mlp), proj_bias=bool(proj_bias), head_norm=bool(head_norm))
        num_patches = (image_size // patch_size) ** 2
        self.dim = dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + num_patches, dim))
        t_hidden = round(time_mlp * dim)
        self.time_embed = (nn.Sequential(nn.Linear(dim, t_hidden), nn.SiLU(), nn.Linear(t_hidden, dim))
                           if time_mlp else nn.Identity())
        self.blocks = nn.ModuleList(Block(dim, heads, round(mlp_ratio * dim), qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.projector = _projector(dim, proj_hidden, proj_dim, proj_bias) if proj_dim else None
        self.head = nn.Linear(dim, num_classes) if num_classes else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def representation(self, x: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """h = LayerNorm(CLS output) for x_s (B, C, H, W) at levels s; returns (B, dim)."""
        return self.norm(self.cls_output(x, s))

    def cls_output(self, x: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """The last block's CLS token for x_s at levels s, before the final LayerNorm; (B, dim)."""
        b = x.shape[0]
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1).expand(b)   # (B,)
        c_in = torch.rsqrt(s * s + SIGMA_DATA ** 2)
        patches = self.patch_embed(c_in[:, None, None, None] * x).flatten(2).transpose(1, 2)  # (B, P, D)
        time = self.time_embed(timestep_embedding(TIME_SCALE * torch.log(s), self.dim)).to(x.dtype)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), time[:, None], patches], 1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)                                # (B, 2 + P, D)
        return tokens[:, 0]

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """z = projector(h), (B, proj_dim); only a pretraining network has a projector."""
        if self.projector is None:
            raise ConfigError("this RRCMNet has no projector (proj_dim = 0)")
        return self.projector(h)

    def forward(self, x: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """Logits (B, num_classes) for x_s at levels s; needs a head (num_classes > 0)."""
        if self.head is None:
            raise ConfigError("this RRCMNet has no classification head (num_classes = 0)")
        h = self.representation(x, s) if self.config["head_norm"] else self.cls_output(x, s)
        return self.head(h)

    def encoder_state(self) -> dict:
        """State of everything but the projector and head (what fine-tuning starts from)."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("projector.", "head."))}


def classifier_from_encoder(encoder: RRCMNet, num_classes: int) -> RRCMNet:
    """A new RRCMNet with ``encoder``'s weights, no projector and a fresh linear head."""
    net = RRCMNet(**{**encoder.config, "proj_dim": 0, "num_classes": num_classes})
    missing, unexpected = net.load_state_dict(encoder.encoder_state(), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return net


class SigmaConditioned(nn.Module):
    """The base classifier the smoothing core smooths: noisy [0, 1] images (B, C, H, W) -> logits (B, K).

    The core has already added N(0, sigma^2) noise in pixel space. In [-1, 1] space, y = 2x - 1 has
    noise 2*sigma, so the network is conditioned on the grid level nearest to 2*sigma (N = 81 grid);
    sigma = 0 (clean inputs) picks s_min. One forward pass per noise draw.
    """

    def __init__(self, net: RRCMNet, sigma: float, num_points: int = CERTIFY_GRID_POINTS):
        super().__init__()
        self.net = net
        self.sigma = float(sigma)
        self.grid_index = nearest_grid_index(2 * self.sigma, num_points)
        self.grid_sigma = float(edm_grid(num_points)[self.grid_index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(2 * x - 1, self.grid_sigma)
