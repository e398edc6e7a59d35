"""Prompt-free segmentation of the learned labels: a small head on the frozen foundation embeddings.

The image embedding (what the foundation model knows about the slice) plus the decoder's positional
encoding (where each cell is, so left is told from right) go through a few convolutions at the 64x64 grid,
are upsampled 4x, and meet a skip from the slice's own pixels, which carries the boundary detail a
64x64 grid cannot. One pass segments every label; it is a few times cheaper than one mask-decoder call, so
a round trains on a CPU in minutes, and it never changes the prompted model's answers.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
        nn.GroupNorm(8, out_channels),
        nn.GELU(),
    )


class AutoHead(nn.Module):
    """Per-label logits for a batch of slices.

    Args:
        names: label names, in output order (channel i + 1 of the softmax is names[i]; 0 is background).
        embed_dim: channels of the image embedding and positional encoding (256 for SAM-family models).
        width: channels of the head at the embedding grid.
    """

    def __init__(self, names: list[str], embed_dim: int = 256, width: int = 64) -> None:
        super().__init__()
        if not names:
            raise ValueError("AutoHead needs at least one label")
        self.names = list(names)
        self.embed = nn.Conv2d(embed_dim, width, 1)
        self.position = nn.Conv2d(embed_dim, width, 1)
        self.context = nn.Sequential(nn.GroupNorm(8, width), nn.GELU(), _block(width, width), _block(width, width))
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(width, width // 2, 2, stride=2),
            nn.GroupNorm(8, width // 2),
            nn.GELU(),
            nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2),
            nn.GELU(),
        )
        self.pixels = _block(1, width // 4)
        self.fuse = _block(width // 2, width // 4, kernel=1)  # 1x1 at full resolution: 9x cheaper than 3x3
        self.classify = nn.Conv2d(width // 4, len(names) + 1, 1)
        # channels-last: oneDNN's convolutions then skip their layout reorders, which cost more than the arithmetic
        # of the thin full-resolution layers (see the commit that added it). Loaded weights keep this layout.
        self.to(memory_format=torch.channels_last)

    def forward(self, embeddings: torch.Tensor, position: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Segment every label.

        Args:
            embeddings: (B, 256, 64, 64) image embeddings.
            position: (1, 256, 64, 64) the decoder's dense positional encoding.
            pixels: (B, 1, 256, 256) the slice as the encoder saw it, scaled to [0, 1], on the low-res grid.
        Returns:
            (B, L + 1, 256, 256) logits, channels-last in memory; channel 0 is background.
        """
        embeddings, position, pixels = (
            t.contiguous(memory_format=torch.channels_last) for t in (embeddings, position, pixels)
        )
        features = self.context(self.embed(embeddings) + self.position(position))
        upsampled = self.upsample(features)
        return self.classify(self.fuse(torch.cat([upsampled, self.pixels(pixels)], dim=1)))
