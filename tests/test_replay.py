import numpy as np
import pytest
import torch

from rlplastic.replay import FrameReplay, StackedFrameReplays


def frame(value: int) -> np.ndarray:
    return np.full((84, 84), value, dtype=np.uint8)


def fill(replay, rewards, terminals, truncations=None):
    truncations = truncations or [False] * len(rewards)
    for t, (r, d, tr) in enumerate(zip(rewards, terminals, truncations, strict=True)):
        replay.add(frame(t + 1), action=t % 3, reward=r, terminal=d, truncated=tr)


def test_n_step_return_without_terminal():
    replay = FrameReplay(capacity=50, n_step=3, gamma=0.5)
    fill(replay, [1.0, 2.0, 4.0, 8.0, 16.0], [False] * 5)
    batch = replay.transitions(torch.tensor([0, 1]))
    # 1 + 0.5*2 + 0.25*4 = 3 ; 2 + 0.5*4 + 0.25*8 = 6 ; bootstrap gamma^3 from slots 3 and 4
    assert batch.returns.tolist() == [3.0, 6.0]
    assert batch.discounts.tolist() == [0.125, 0.125]
    assert batch.next_states[:, -1, 0, 0].tolist() == [4, 5]
    assert batch.actions.tolist() == [0, 1]


def test_n_step_return_stops_at_a_terminal_inside_the_window():
    replay = FrameReplay(capacity=50, n_step=3, gamma=0.5)
    # terminal after step 1: rewards of steps 2.. belong to the next segment
    fill(replay, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0], [False, True, False, False, False, False])
    batch = replay.transitions(torch.tensor([0, 1, 2]))
    assert batch.returns.tolist() == [1.0 + 0.5 * 2.0, 2.0, 4.0 + 0.5 * 8.0 + 0.25 * 16.0]
    assert batch.discounts.tolist() == [0.0, 0.0, 0.125]


def test_terminal_at_last_step_of_window_gives_no_bootstrap():
    replay = FrameReplay(capacity=50, n_step=3, gamma=0.5)
    fill(replay, [1.0, 1.0, 1.0, 1.0, 1.0], [False, False, True, False, False])
    batch = replay.transitions(torch.tensor([0]))
    assert batch.returns.item() == 1.75 and batch.discounts.item() == 0.0


def test_stack_reads_zeros_before_a_segment_start():
    replay = FrameReplay(capacity=50, n_step=1, gamma=0.9)
    # frames 1..6; life loss (terminal) after slot 2, so slot 3 starts a new segment
    fill(replay, [0.0] * 6, [False, False, True, False, False, False])
    states = replay.states_at(torch.tensor([0, 1, 2, 3, 4, 5]))[:, :, 0, 0].tolist()
    assert states == [[0, 0, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 4], [0, 0, 4, 5], [0, 4, 5, 6]]


def test_windows_reaching_a_truncation_are_never_sampled():
    replay = FrameReplay(capacity=50, n_step=3, gamma=0.9)
    trunc = [False] * 10
    trunc[4] = True  # step cap hit at slot 4, no terminal: slots 2, 3, 4 cannot bootstrap
    fill(replay, [0.0] * 10, [False] * 10, trunc)
    sampleable = set(torch.nonzero(replay.sampleable).flatten().tolist())
    assert sampleable == {0, 1, 5, 6}
    assert replay.num_sampleable == 4


def test_sampling_never_crosses_the_write_head():
    capacity, n_step, stack = 40, 5, 4
    generator = torch.Generator().manual_seed(0)
    replay = FrameReplay(capacity, n_step, 0.99, stack=stack, generator=generator)
    rng = np.random.default_rng(0)
    for step in range(3 * capacity + 7):  # wrap around the buffer several times
        replay.add(frame(step % 250), 0, 0.0, bool(rng.random() < 0.05), False)
        if step < n_step + 1:
            continue
        slots = replay.sample(256).indices
        head = replay.head
        ahead = (head - slots) % capacity  # how far the write head is past the slot
        # the slot's n rewards and its bootstrap frame (slot + n) are all written ...
        assert (ahead > n_step).all()
        # ... and, once full, the stack's oldest frame (slot - 3) was not overwritten yet
        if len(replay) == capacity:
            assert ((slots - head) % capacity >= stack - 1).all()


@pytest.mark.slow
def test_sampling_is_uniform_over_sampleable_slots():
    generator = torch.Generator().manual_seed(0)
    replay = FrameReplay(capacity=100, n_step=2, gamma=0.9, generator=generator)
    fill(replay, [0.0] * 12, [False] * 12)
    counts = torch.bincount(replay.sample(20_000).indices, minlength=100)
    assert set(torch.nonzero(counts).flatten().tolist()) == set(range(10))
    assert counts[:10].min() > 1700 and counts[:10].max() < 2300  # 2000 expected each


def test_capacity_must_exceed_window():
    with pytest.raises(ValueError, match="capacity 5"):
        FrameReplay(capacity=5, n_step=3, gamma=0.9)


def test_sampling_is_uniform_over_sampleable_slots_only():
    generator = torch.Generator().manual_seed(0)
    replay = FrameReplay(100, 3, 0.99, generator=generator)
    for i in range(60):  # a truncation at step 29 makes the slots whose window reaches it unsampleable
        replay.add(np.zeros((84, 84), np.uint8), 0, 0.0, False, i == 29)
    allowed = torch.as_tensor(replay._sampleable_host)
    assert 0 < int(allowed.sum()) < 60
    counts = torch.bincount(replay.sample_slots(200_000), minlength=100)
    assert counts[~allowed].sum() == 0
    expected = 200_000 / int(allowed.sum())
    assert ((counts[allowed] - expected).abs() < 0.1 * expected).all()


def test_stacked_replays_sample_each_run_exactly_as_its_replay_alone():
    """A batch's replays (rlplastic.replay.StackedFrameReplays): run i's replay adds into its slice
    of the stacked tensors, and one sample() of all runs gives at [i] exactly what a replay with
    run i's contents and generator samples alone: the same slots, states, returns and next states,
    whatever each run's fill level (the last one has wrapped around)."""
    stacked = StackedFrameReplays(3, 200, 5, 0.9, generators=[torch.Generator().manual_seed(i) for i in range(3)])
    alone = [FrameReplay(200, 5, 0.9, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rng = np.random.default_rng(0)
    for i in range(3):
        for _ in range(150 + 40 * i):
            step = (rng.integers(0, 255, (84, 84), dtype=np.uint8), int(rng.integers(4)), float(rng.random() < 0.3),
                    bool(rng.random() < 0.05), bool(rng.random() < 0.02))  # fmt: skip
            stacked[i].add(*step)
            alone[i].add(*step)
    assert stacked[1].frames.data_ptr() == stacked.storage["frames"][1].data_ptr()  # a view, no copy
    for _ in range(3):
        batch = stacked.sample(16)
        for i, replay in enumerate(alone):
            own = replay.sample(16)
            for field in ("indices", "states", "actions", "returns", "discounts", "next_states"):
                assert torch.equal(getattr(batch, field)[i], getattr(own, field)), (i, field)
    with pytest.raises(ValueError, match="2 generators for 3 runs"):
        StackedFrameReplays(3, 200, 5, 0.9, generators=[None, None])
    with pytest.raises(RuntimeError, match="no complete n-step transition"):
        StackedFrameReplays(2, 200, 5, 0.9).sample(4)
