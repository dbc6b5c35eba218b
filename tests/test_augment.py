import torch

from rlplastic.augment import drq_augment, drq_augment_runs, random_intensity, random_shift


def ramp_images(batch: int) -> torch.Tensor:
    # each pixel holds a unique value: row * 84 + col, in int64 to stay exact
    grid = torch.arange(84)[:, None] * 84 + torch.arange(84)[None, :]
    return grid.expand(batch, 4, 84, 84).clone()


def test_shift_keeps_shape_and_dtype():
    images = torch.randint(0, 255, (8, 4, 84, 84), dtype=torch.uint8)
    out = random_shift(images)
    assert out.shape == images.shape and out.dtype == torch.uint8


def test_shift_offsets_lie_in_the_reference_range_and_pad_by_edge_replication():
    generator = torch.Generator().manual_seed(0)
    out = random_shift(ramp_images(512), generator=generator)
    # with edge padding, the centre pixel still reveals the offset exactly
    centre = out[:, 0, 42, 42]
    dy, dx = centre // 84 - 42, centre % 84 - 42
    assert dy.min() == -4 and dy.max() == 3 and dx.min() == -4 and dx.max() == 3  # offsets 0..7 minus pad
    for i in range(16):
        rows = (torch.arange(84) + dy[i]).clamp(0, 83)
        cols = (torch.arange(84) + dx[i]).clamp(0, 83)
        expected = rows[:, None] * 84 + cols[None, :]
        assert torch.equal(out[i, 0], expected)
        assert torch.equal(out[i, 3], expected)  # one offset for all frames of a stack


def test_intensity_scales_each_image_by_a_factor_within_0_9_and_1_1():
    generator = torch.Generator().manual_seed(0)
    images = torch.full((4096, 4, 2, 2), 100.0)
    out = random_intensity(images, generator=generator)
    factors = out[:, 0, 0, 0] / 100.0
    assert factors.min() >= 0.9 - 1e-6 and factors.max() <= 1.1 + 1e-6
    assert (out == out[:, :1, :1, :1]).all()  # one factor per image
    assert (factors == 0.9).sum() > 0 and (factors == 1.1).sum() > 0  # clip at 2 sigma is hit
    assert abs(factors.mean().item() - 1.0) < 0.005


def test_drq_augment_returns_float_of_same_shape():
    states = torch.randint(0, 255, (32, 4, 84, 84), dtype=torch.uint8)
    out = drq_augment(states)
    assert out.dtype == torch.float32 and out.shape == states.shape
    assert out.max() <= 255 * 1.1 + 1e-3


def test_augmenting_the_batches_of_several_runs_at_once_is_each_run_alone():
    """drq_augment_runs (a batched update's augmentation) gives run i exactly what drq_augment gives
    with run i's generator, and leaves each generator where drq_augment leaves it."""
    states = torch.randint(0, 255, (3, 5, 4, 84, 84), dtype=torch.uint8)
    together = [torch.Generator().manual_seed(i) for i in range(3)]
    out = drq_augment_runs(states, together)
    assert out.shape == states.shape and out.dtype == torch.float32
    for i in range(3):
        alone = torch.Generator().manual_seed(i)
        assert torch.equal(out[i], drq_augment(states[i], alone))
        assert torch.equal(torch.rand(4, generator=together[i]), torch.rand(4, generator=alone))
    assert not torch.equal(out[0], out[1])
