"""The noise-prediction network eps_theta(x_t, t): a small U-Net (Ronneberger et al. 2015)
with residual blocks, GroupNorm and time injection, as in Ho et al. 2020 (Appendix B).

Resolution levels for 28x28 with ``channel_mults=(1, 2, 2)``: 28 -> 14 -> 7.
Where the decoder's skip features come from is the subject of chapter 07:

- ``skip="pre"``: the encoder's features at level i are saved *before* downsampling
  (full resolution r_i). The decoder concatenates them after upsampling back to r_i:
  the standard U-Net, which carries fine detail past the bottleneck.
- ``skip="post"``: saved *after* downsampling (resolution r_i / 2), as the original
  tutorial did. To keep the parameter count identical, they are brought back to
  r_i by nearest-neighbour repetition before concatenation, so every 2x2 block of
  the skip is constant: half the resolution's detail never reaches the decoder.
- ``skip="none"``: no skips at all (fewer parameters in the decoder's first blocks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_timesteps
from .config import ModelConfig
from .embeddings import TimeEmbedding


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the projected time embedding, GroupNorm -> SiLU ->
    dropout -> conv, plus a residual path (1x1 conv when the width changes).
    (B, c_in, H, W), (B, temb_dim) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        if c_in % groups:
            raise ValueError(f"ResBlock input width {c_in} is not divisible by groups={groups}")
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.residual = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]  # (B, c_out, 1, 1): same shift at every pixel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.residual(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual path."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]         # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """3x3 conv with stride 2: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to ``size`` then a 3x3 conv: (B, C, h, w) -> (B, C, *size)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W), (B,) -> (B, C, H, W). Built from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig | None = None, T: int = 1000, **overrides):
        super().__init__()
        if config is None:
            config = ModelConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a ModelConfig or keyword overrides, not both")
        self.config = cfg = config
        self.T = T                    # timesteps it is trained for: t must lie in [0, T)
        widths, g, temb = cfg.widths, cfg.groups, cfg.temb_dim
        L = len(widths)

        self.time_embed = TimeEmbedding(cfg.sinusoid_dim, temb)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)

        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        ch = widths[0]
        for i, w in enumerate(widths):
            self.down_blocks.append(nn.ModuleList(
                ResBlock(ch if j == 0 else w, w, temb, g, cfg.dropout) for j in range(cfg.num_res_blocks)))
            ch = w
            if i < L - 1:
                self.downsamples.append(Downsample(w))

        self.mid1 = ResBlock(ch, ch, temb, g, cfg.dropout)
        self.mid_attn = SelfAttention(ch, g) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, temb, g, cfg.dropout)

        self.upsamples, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(L - 1)):       # decoder levels L-2 .. 0
            w = widths[i]
            skip_ch = w if cfg.skip != "none" else 0
            self.upsamples.append(Upsample(ch))
            self.up_blocks.append(nn.ModuleList(
                ResBlock(ch + skip_ch if j == 0 else w, w, temb, g, cfg.dropout)
                for j in range(cfg.num_res_blocks)))
            ch = w

        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        # Created last, so an unconditional network's initialisation is unchanged by the option.
        # Index num_classes is the "null" class: eps_theta(x_t, null) is the unconditional model.
        self.class_embed = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes else None

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}), got {shape}")
        if tuple(x.shape[2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"this model was built for {cfg.image_size}x{cfg.image_size} images, "
                             f"got {tuple(x.shape[2:])}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        check_timesteps(t, self.T, batch=x.shape[0])

    def _class_labels(self, y: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        K = self.config.num_classes
        if not K:
            raise ValueError("this model has no class embedding (ModelConfig.num_classes = 0): "
                             "sample it without a class, or train a conditional model (train --conditional)")
        if y is None:
            return torch.full((batch,), K, dtype=torch.long, device=device)
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != batch or y.is_floating_point():
            raise ValueError(f"y must be an integer tensor of shape ({batch},), got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > K):
            raise ValueError(f"class labels must lie in [0, {K}] ({K} = the null class), "
                             f"got min {int(y.min())}, max {int(y.max())}")
        return y.long()

    def encode(self, x: torch.Tensor, temb: torch.Tensor):
        """Encoder. Returns (h at the lowest resolution, skips, sizes).

        skips[i] is what decoder level i will concatenate (``None`` when skip="none");
        sizes[i] is the spatial size of level i, where the decoder upsamples to.
        """
        h = self.conv_in(x)
        skips, sizes = [], []
        for i, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, temb)
            if i == len(self.downsamples):          # lowest level: nothing to downsample
                break
            sizes.append(tuple(h.shape[2:]))
            saved_before = h                          # (B, w_i, r_i, r_i)
            h = self.downsamples[i](h)                # (B, w_i, r_i/2, r_i/2)
            skips.append({"pre": saved_before, "post": h, "none": None}[self.config.skip])
        return h, skips, sizes

    def decode(self, h: torch.Tensor, skips, sizes, temb: torch.Tensor) -> torch.Tensor:
        for upsample, blocks, skip, size in zip(self.upsamples, self.up_blocks,
                                                reversed(skips), reversed(sizes)):
            h = upsample(h, size)                                     # (B, ch, r_i, r_i)
            if skip is not None:
                if tuple(skip.shape[2:]) != size:                     # "post": repeat pixels, adds no detail
                    skip = F.interpolate(skip, size=size, mode="nearest")
                h = torch.cat([h, skip], dim=1)                       # (B, ch + w_i, r_i, r_i)
            for block in blocks:
                h = block(h, temb)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t[, y]): x (B, C, H, W), t (B,) in [0, T), y (B,) class indices in
        [0, num_classes] (num_classes = null) or None (the null class) -> (B, C, H, W)."""
        self._check_inputs(x, t)
        temb = self.time_embed(t)                     # (B, temb_dim)
        if y is not None or self.class_embed is not None:
            temb = temb + self.class_embed(self._class_labels(y, x.shape[0], x.device))
        h, skips, sizes = self.encode(x, temb)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        h = self.decode(h, skips, sizes, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _forward_with_hooks(model: UNet, x: torch.Tensor, t: torch.Tensor, hooks: list) -> None:
    """One no-grad forward pass with the given hook handles attached, removed afterwards."""
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for h in hooks:
            h.remove()


def layer_table(model: UNet, x: torch.Tensor, t: torch.Tensor) -> list:
    """Run one forward pass and list (module name, output shape, parameters) in execution order,
    for the blocks a reader follows: stem, residual blocks, down/upsampling, middle, head."""
    kinds = (ResBlock, Downsample, Upsample, SelfAttention, TimeEmbedding, nn.Conv2d, nn.GroupNorm)
    rows, hooks = [], []
    for name, module in model.named_modules():
        top_level_leaf = name.count(".") == 0 and name
        if isinstance(module, kinds[:5]) or (top_level_leaf and isinstance(module, kinds)):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: rows.append((name, tuple(out.shape), count_parameters(m)))))
    _forward_with_hooks(model, x, t, hooks)
    return rows


def decoder_inputs(model: UNet, x: torch.Tensor, t: torch.Tensor) -> dict:
    """What each decoder level really receives: the input of its first ResBlock (upsampled
    features and, concatenated after them, the skip), keyed by decoder index k
    (k = 0 is the lowest resolution). {k: (B, ch + w_i, r_i, r_i)}."""
    captured = {}
    hooks = [blocks[0].register_forward_pre_hook(
        lambda m, args, k=k: captured.__setitem__(k, args[0].detach().clone()))
        for k, blocks in enumerate(model.up_blocks)]
    _forward_with_hooks(model, x, t, hooks)
    return captured
