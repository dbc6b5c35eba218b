"""DrQ / SPR / BBF image augmentation, batched on the device (Kostrikov et al. 2020; dopamine's atari_100k agent)."""

from __future__ import annotations

import torch

PAD = 4
INTENSITY_SCALE = 0.05


def random_shift(images: torch.Tensor, pad: int = PAD, generator: torch.Generator | None = None) -> torch.Tensor:
    """Edge-pad by `pad`, then crop each image back to its size at a random offset.

    One offset per image, shared by its stacked frames. Offsets are 0..2*pad-1: the reference's
    jax.random.randint(maxval=padded - size) excludes 2*pad, and we keep its convention.
    Edge padding is a clamp of the source index, so no padded copy is materialized.
    """
    b, c, h, w = images.shape
    offsets = torch.randint(0, 2 * pad, (b, 2), device=images.device, generator=generator) - pad
    rows = (offsets[:, :1] + torch.arange(h, device=images.device)).clamp_(0, h - 1)
    cols = (offsets[:, 1:] + torch.arange(w, device=images.device)).clamp_(0, w - 1)
    source = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, source).view(b, c, h, w)


def random_intensity(
    images: torch.Tensor, scale: float = INTENSITY_SCALE, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x * (1 + scale * clip(N(0, 1), -2, 2)), one factor per image."""
    noise = torch.randn((images.shape[0], 1, 1, 1), device=images.device, generator=generator)
    return images * (1.0 + scale * noise.clamp_(-2.0, 2.0))


def drq_augment(states: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> augmented float32 in [0, 255 * 1.1]."""
    return random_intensity(random_shift(states, generator=generator).float(), generator=generator)
