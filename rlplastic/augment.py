"""DrQ / SPR / BBF image augmentation, batched on the device (Kostrikov et al. 2020; dopamine's atari_100k agent)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD = 4
INTENSITY_SCALE = 0.05


def shift_offsets(b: int, device: torch.device, pad: int = PAD, generator: torch.Generator | None = None):
    """(b, 2) random (row, column) offsets in -pad..pad-1. The reference's
    jax.random.randint(maxval=padded - size) excludes 2*pad, and we keep its convention."""
    return torch.randint(0, 2 * pad, (b, 2), device=device, generator=generator) - pad


def shift(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each image (B, C, H, W) edge-padded, then cropped back to its size at its (row, column)
    offset: one offset per image, shared by its stacked frames. Edge padding is a clamp of the
    source index, so no padded copy is materialized."""
    b, c, h, w = images.shape
    rows = (offsets[:, :1] + torch.arange(h, device=images.device)).clamp_(0, h - 1)
    cols = (offsets[:, 1:] + torch.arange(w, device=images.device)).clamp_(0, w - 1)
    source = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, source).view(b, c, h, w)


def random_shift(images: torch.Tensor, pad: int = PAD, generator: torch.Generator | None = None) -> torch.Tensor:
    """Edge-pad by `pad`, then crop each image back to its size at a random offset (shift)."""
    return shift(images, shift_offsets(images.shape[0], images.device, pad, generator))


def scale_intensity(images: torch.Tensor, noise: torch.Tensor, scale: float = INTENSITY_SCALE) -> torch.Tensor:
    """x * (1 + scale * clip(noise, -2, 2)), noise (B, 1, 1, 1) standard normal: one factor per image."""
    return images * (1.0 + scale * noise.clamp_(-2.0, 2.0))


def random_intensity(
    images: torch.Tensor, scale: float = INTENSITY_SCALE, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x * (1 + scale * clip(N(0, 1), -2, 2)), one factor per image."""
    noise = torch.randn((images.shape[0], 1, 1, 1), device=images.device, generator=generator)
    return scale_intensity(images, noise, scale)


def drq_augment(states: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> augmented float32 in [0, 255 * 1.1]."""
    return random_intensity(random_shift(states, generator=generator).float(), generator=generator)


def drq_augment_runs(states: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """uint8 (N, B, C, H, W), the batches of N runs -> run i's batch augmented as drq_augment
    augments it with generators[i] (the same draws, in the same order), all runs in one call."""
    n, b = states.shape[:2]
    offsets = torch.stack([torch.randint(0, 2 * PAD, (b, 2), device=states.device, generator=g) for g in generators])
    noise = torch.stack([torch.randn((b, 1, 1, 1), device=states.device, generator=g) for g in generators])
    shifted = shift(states.flatten(0, 1), offsets.flatten(0, 1) - PAD).float()  # as shift_offsets
    return scale_intensity(shifted, noise.flatten(0, 1)).view(states.shape)
