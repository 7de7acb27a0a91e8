"""The example trainer's model: :class:`TinyDenoiser`, a small conv net predicting the objective's
target from (x_t, t), or from (x_t, t, y) with a class label or a caption embedding ``y``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, num_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of 0-based timesteps, rescaled to a 1000-step range."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * (1000.0 / num_timesteps))[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Block(nn.Module):
    """conv 3x3 -> GroupNorm -> + timestep bias -> SiLU."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, cout), cout)
        self.emb = nn.Linear(emb, cout)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)) + self.emb(e)[:, :, None, None])


class TinyDenoiser(nn.Module):
    """A small two-level conv net predicting eps from (x_t, t), or from (x_t, t, y) with
    ``num_classes``: a class embedding of ``num_classes + 1`` rows (row ``num_classes`` is the null
    label) added to the timestep embedding.

    Images of 32 pixels or more are first folded into 2x2 patches (PixelUnshuffle), so the
    convolutions run at half resolution: 64x64x3 records train at a few steps per second on CPU.
    """

    def __init__(
        self,
        shape,
        num_timesteps: int,
        width: int = 32,
        emb: int = 64,
        num_classes: int = 0,
        text_dim: int = 0,
    ):
        super().__init__()
        channels, height, width_px = self.shape = tuple(int(v) for v in shape)
        self.patch = 2 if min(height, width_px) >= 32 and height % 2 == 0 == width_px % 2 else 1
        cin = channels * self.patch**2
        self.num_timesteps, self.emb_dim = num_timesteps, emb
        self.emb = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = Block(cin, width, emb)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = Block(2 * width, 2 * width, emb)
        self.lift = nn.Conv2d(2 * width, width, 1)
        self.up = Block(width, width, emb)
        self.out = nn.Conv2d(width, cin, 3, padding=1)
        # Made last, so the other layers start as the unconditional model's with the same seed.
        self.num_classes = int(num_classes)
        self.label = nn.Embedding(self.num_classes + 1, emb) if self.num_classes else None
        if self.label is not None:
            nn.init.zeros_(self.label.weight)  # starts as the unconditional model
        # Text (``text_dim``): a linear map of a caption's pooled embedding; the null condition
        # is the dataset's unconditional (empty prompt) embedding, a buffer set before training.
        self.text_dim = int(text_dim)
        self.text = nn.Linear(self.text_dim, emb) if self.text_dim else None
        if self.text is not None:
            nn.init.zeros_(self.text.weight)
            nn.init.zeros_(self.text.bias)
            self.register_buffer("null_text", torch.zeros(self.text_dim))

    @property
    def null_label(self) -> int:
        return self.num_classes

    def labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """Embedding rows of labels ``y`` [n]: a negative label (a null, read as -1) or no ``y``
        at all is the null label; ValueError for a label >= num_classes."""
        if y is None:
            return torch.full((n,), self.null_label, dtype=torch.int64)
        y = y.to(torch.int64)
        if (y >= self.num_classes).any():
            raise ValueError(
                f"class label {int(y.max())} >= num_classes = {self.num_classes} "
                "(--num-classes is too small for these records)"
            )
        return torch.where(y < 0, self.null_label, y)

    def drop(self, y: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """``y`` with the rows where ``dropped`` [B] is true replaced by the null condition."""
        if self.text is not None:
            return torch.where(dropped[:, None], self.null_text.to(y.dtype), y)
        return torch.where(dropped, -1, y)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        e = self.emb(timestep_embedding(t, self.emb_dim, self.num_timesteps))
        if self.label is not None:
            e = e + self.label(self.labels(y, len(x)))
        if self.text is not None:  # y [B, text_dim]: caption embeddings; None: the null one
            # centred on the null embedding: the null condition adds the bias alone
            y = torch.zeros_like(self.null_text) if y is None else y.float() - self.null_text
            e = e + self.text(y.expand(len(x), -1))
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)
        h1 = self.inp(x, e)
        h2 = self.mid(self.down(h1), e)
        h2 = F.interpolate(self.lift(h2), size=h1.shape[-2:], mode="nearest")
        y = self.out(self.up(h1 + h2, e))
        return F.pixel_shuffle(y, self.patch) if self.patch > 1 else y
