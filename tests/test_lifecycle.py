"""Lifecycle layers: Algorithm 1 replayed by hand on a 4-neuron layer, and the layer's contracts."""

import copy

import pytest
import torch
from torch import nn

from rlplastic.interventions import LifecycleConv2d, LifecycleLinear, swap_in_lifecycle

T, F = True, False


def planted_layer(warmup=2, revival="memory"):
    """4 neurons with lifespans [1, 2, 3, 5] and recovery times [2, 1, 1, 1]."""
    torch.manual_seed(0)
    layer = LifecycleLinear(3, 4, lifespan=(1, 5), recovery=(1, 2), warmup=warmup, revival=revival)
    with torch.no_grad():
        layer.lifespan.copy_(torch.tensor([1, 2, 3, 5]))
        layer.life.copy_(layer.lifespan)
        layer.recovery_time.copy_(torch.tensor([2, 1, 1, 1]))
        layer.weight.copy_(torch.arange(12.0).view(4, 3) + 1)
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        layer.memory_weight.zero_(), layer.memory_bias.zero_()
    return layer


def state(layer):
    return (layer.active.tolist(), layer.life.tolist(), layer.recovery.tolist(), layer.scaler.tolist())


def test_algorithm_1_step_by_step():
    layer = planted_layer()
    x = torch.ones(1, 3)
    original = layer.weight.detach().clone()

    layer(x)  # step 1: unit 0 reaches life 0 and is lysed
    assert state(layer) == ([F, T, T, T], [0, 1, 2, 4], [2, 0, 0, 0], [1, 1, 1, 1])
    assert torch.equal(layer.memory_weight[0], original[0]) and layer.memory_bias[0].item() == pytest.approx(0.1)
    assert not layer.memory_weight[1:].any()  # only the lysed unit is saved
    with torch.no_grad():
        layer.weight[0] += 100.0  # what an optimizer's leftover momentum could do to a dead unit

    layer(x)  # step 2: unit 1 lysed; unit 0 recovering
    assert state(layer) == ([F, F, T, T], [0, 0, 1, 3], [1, 1, 0, 0], [1, 1, 1, 1])
    assert torch.equal(layer.memory_weight[1], original[1])

    layer(x)  # step 3: unit 2 lysed; units 0 and 1 revived from memory with scaler 1/k
    assert state(layer) == ([T, T, F, T], [1, 2, 0, 2], [0, 0, 1, 0], [0.5, 0.5, 1, 1])
    assert torch.equal(layer.weight[:2], original[:2])  # restored FROM MEMORY, drift undone
    assert layer.bias[0].item() == pytest.approx(0.1)

    out = layer(x)  # step 4: warm-up reaches 1; unit 0 dies again; unit 2 revived
    assert state(layer) == ([F, T, T, T], [0, 1, 3, 1], [2, 0, 0, 0], [1, 1, 0.5, 1])
    expected = (original @ x.T).squeeze(1) + torch.tensor([0.1, 0.2, 0.3, 0.4])
    gate = torch.tensor([0.0, 1.0, 0.5, 1.0])
    assert torch.allclose(out[0], expected * gate)  # (W * d) x + b * d


def test_eval_and_no_grad_forwards_apply_the_mask_without_stepping():
    layer = planted_layer()
    x = torch.ones(2, 3)
    layer(x), layer(x)
    before = state(layer)
    with torch.no_grad():  # an acting or target forward in training mode
        layer(x)
    assert state(layer) == before
    layer.eval()
    out = layer(x)
    assert state(layer) == before
    assert not out[:, :2].any() and out[:, 2:].all()


def test_dead_units_get_no_gradient():
    layer = planted_layer()
    layer(torch.ones(1, 3))
    layer(torch.ones(1, 3)).sum().backward()  # units 0 and 1 are dead during this forward
    assert not layer.weight.grad[:2].any() and not layer.bias.grad[:2].any()
    assert layer.weight.grad[2:].all()


@pytest.mark.parametrize("revival", ["he", "xavier"])
def test_revival_by_fresh_init_ablation(revival):
    layer = planted_layer(revival=revival)
    original = layer.weight.detach().clone()
    for _ in range(3):
        layer(torch.ones(1, 3))
    assert layer.active[0] and not torch.equal(layer.weight[0], original[0])
    assert layer.bias[0] == 0
    assert layer.weight[0].abs().max() < 2.0  # a fresh draw on 3 inputs, not the planted 1..12


def test_no_warmup_ablation_revives_at_full_scale():
    layer = planted_layer(warmup=0)
    for _ in range(3):
        layer(torch.ones(1, 3))
    assert layer.scaler.tolist() == [1, 1, 1, 1] and layer.active.tolist() == [T, T, F, T]


def test_revival_zeroes_bound_optimizer_moments():
    layer = planted_layer()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer.bind_optimizer(optimizer)  # the clock ticks after each optimizer.step()
    for _ in range(4):
        optimizer.zero_grad()
        layer(torch.ones(1, 3)).sum().backward()
        optimizer.step()
    moments = optimizer.state[layer.weight]["exp_avg"]
    # Unit 1: alive in updates 1-2 (grad 1: exp_avg 0.1, 0.19), dead in update 3 (0.171), revived by
    # the tick after it, and trained at scaler 1/2 in update 4. Zeroed at revival, its moment is
    # just (1 - beta1) * 0.5 = 0.05; without the reset it would be 0.9 * 0.171 + 0.05 = 0.2039.
    assert torch.allclose(moments[:2], torch.full((2, 3), 0.05))
    assert torch.allclose(moments[3], torch.full((3,), 0.1 * (1 + 0.9 + 0.81 + 0.729)))


def test_a_bound_layer_ages_once_per_optimizer_step_whatever_the_forwards():
    """Algorithm 1 ticks once per training iteration: an agent's extra forwards (double-DQN next
    states, acting with autograd on, as CleanRL's DQN does) must not age the units."""
    layer = planted_layer()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    layer.bind_optimizer(optimizer)
    x = torch.ones(1, 3)
    layer(x), layer(x), layer(x)  # three training forwards with autograd on, no step: no tick
    assert layer.life.tolist() == [1, 2, 3, 5]
    optimizer.zero_grad()
    layer(x).sum().backward()
    optimizer.step()  # one step: one tick
    assert state(layer) == ([F, T, T, T], [0, 1, 2, 4], [2, 0, 0, 0], [1, 1, 1, 1])
    layer.eval()
    optimizer.step()  # evaluation mode: the clock stands still
    assert layer.life.tolist() == [0, 1, 2, 4]


def test_swap_in_lifecycle_with_the_optimizer_needs_no_further_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    (layer,) = swap_in_lifecycle(model, optimizer=optimizer, lifespan=(2, 2), recovery=(1, 1), warmup=0)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(layer.weight) in held and id(layer.bias) in held and len(held) == 4
    before = layer.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(16, 3)).pow(2).mean().backward()
        optimizer.step()
    assert not torch.equal(layer.weight, before)  # the optimizer trains the new layer
    assert not layer.active.any() and layer.recovery.tolist() == [1] * 8  # two steps: every unit died
    target = copy.deepcopy(model)  # a copy (a target network) is not on the clock
    optimizer.step()
    assert target[0].life.tolist() == [0] * 8 and layer.active.all()


def test_a_lifecycle_layer_trains():
    torch.manual_seed(0)
    model = nn.Sequential(
        LifecycleLinear(2, 32, lifespan=(20, 40), recovery=(5, 10), warmup=5), nn.ReLU(), nn.Linear(32, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, 2)
    y = (x[:, :1] * x[:, 1:]).sin()
    losses = []
    for _ in range(300):
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    assert not model[0].active.all() or (model[0].scaler < 1).any() or model[0].life.min() < 40
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_conv_lifecycle_masks_whole_channels():
    torch.manual_seed(0)
    conv = LifecycleConv2d(1, 3, 3, padding=1, lifespan=(1, 1), recovery=(5, 5))
    with torch.no_grad():
        conv.lifespan.copy_(torch.tensor([1, 9, 9]))
        conv.life.copy_(conv.lifespan)
    out = conv(torch.randn(2, 1, 5, 5))
    assert conv.active.tolist() == [F, T, T]
    assert not out[:, 0].any() and out[:, 1:].abs().sum() > 0


def test_swap_in_lifecycle_keeps_weights_and_outputs_of_hidden_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 2)
    )
    x = torch.randn(3, 1, 6, 6)
    expected = model(x)
    swapped = swap_in_lifecycle(model, lifespan=(100, 200), recovery=(10, 20))
    assert isinstance(model[0], LifecycleConv2d) and isinstance(model[3], LifecycleLinear)
    assert type(model[5]) is nn.Linear  # the output layer keeps its plain neurons
    assert len(swapped) == 2
    assert torch.allclose(model(x), expected)
    assert torch.equal(model[3].memory_weight, model[3].weight)
    with pytest.raises(ValueError, match="ReLU"):
        swap_in_lifecycle(model, names=["1"])


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match=r"lifespan \(5, 2\)"):
        LifecycleLinear(2, 2, lifespan=(5, 2))
    with pytest.raises(ValueError, match="revival 'zero'"):
        LifecycleLinear(2, 2, revival="zero")


@pytest.mark.parametrize("conv", [False, True])
def test_a_lysed_unit_outputs_zero_after_batchnorm_and_ramps_up_there(conv):
    """Gated before BatchNorm, a lysed unit's zeros become BN's shift beta after normalization (it
    keeps outputting and training) and the warm-up ramp is normalized away. The gate sits after
    the norm: exactly 0 after BN + ReLU, no gradient to the unit or its BN affine, and 1/k of the
    normalized output right after revival."""
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        x = torch.randn(8, 2, 6, 6)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        x = torch.randn(8, 3)
    with torch.no_grad():
        model[1].bias.fill_(1.0)  # a positive shift: what a gate before the norm would let through
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (layer,) = swap_in_lifecycle(model, optimizer=optimizer, lifespan=(1, 1), recovery=(2, 2), warmup=4)
    assert layer.gated_after == type(model[1]).__name__
    with torch.no_grad():
        layer.lifespan.copy_(torch.tensor([1, 9, 9, 9]))
        layer.life.copy_(layer.lifespan)
    layer.refresh_counters()
    model.train()
    layer.lifecycle_step()  # unit 0 dies
    hidden = model[2](model[1](model[0](x)))
    assert not hidden[:, 0].any() and hidden[:, 1:].abs().sum() > 0
    model(x).pow(2).sum().backward()
    assert not layer.weight.grad[0].any() and model[1].weight.grad[0] == 0 and model[1].bias.grad[0] == 0
    layer.lifecycle_step(), layer.lifecycle_step()  # recovery 2: unit 0 revives with scaler 1/4
    assert layer.active.all() and layer.scaler[0].item() == pytest.approx(0.25)
    normalized = model[1](model[0](x))
    with torch.no_grad():
        ungated = nn.functional.batch_norm(
            model[0](x), None, None, model[1].weight, model[1].bias, training=True, eps=model[1].eps
        )
    assert torch.allclose(normalized[:, 0], 0.25 * ungated[:, 0], atol=1e-5)
    assert torch.allclose(normalized[:, 1:], ungated[:, 1:], atol=1e-5)


def test_a_layer_gated_after_its_norm_keeps_the_gate_in_deep_copies():
    """A copy (an EMA tortoise, a target) gates its own norm by its own layer."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    swap_in_lifecycle(model, lifespan=(1, 1), recovery=(5, 5))
    twin = copy.deepcopy(model).train()
    twin[0].lifecycle_step()  # every unit of the copy dies; the original's stay alive
    x = torch.randn(8, 3)
    with torch.no_grad():  # unbound layers tick on forwards that build a graph: keep the clocks still
        assert not twin[2](twin[1](twin[0](x))).any()
        assert model.train()[2](model[1](model[0](x))).abs().sum() > 0
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    (layer,) = swap_in_lifecycle(plain, names=["0"], norms={})
    assert layer.gated_after is None  # {}: the gate stays on the layer's output


def test_the_lifecycle_intervention_takes_the_clock_over_and_ticks_as_the_optimizer_did():
    """rlplastic.interventions.Lifecycle (what the agents build) drives the layers itself, device
    part then host part, so an agent can capture the device part in a CUDA graph: the optimizer
    no longer ticks them, and (optimizer step + Lifecycle.step()) gives the counters and weights
    the optimizer-driven clock gives."""
    from rlplastic.interventions.options import Lifecycle

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        swap_in_lifecycle(model, optimizer=optimizer, lifespan=(2, 4), recovery=(1, 3), warmup=2)
        return model, optimizer

    (hooked, hooked_opt), (driven, driven_opt) = build(), build()
    clock = Lifecycle(driven)
    x = torch.randn(16, 3)
    for step in range(8):
        for model, optimizer in ((hooked, hooked_opt), (driven, driven_opt)):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
        if step == 0:  # the optimizer alone no longer moves the driven clock
            assert driven[0].life.tolist() == driven[0].lifespan.tolist()
        clock.step()
        for name in ("active", "life", "recovery", "scaler"):
            assert torch.equal(getattr(hooked[0], name), getattr(driven[0], name)), (step, name)
        assert torch.equal(hooked[0].weight, driven[0].weight)
    assert (~hooked[0].active).any() or hooked[0].scaler.lt(1).any()  # deaths happened along the way


def assert_counters_match_host_mirror(layer, step):
    """The layer's counters on the device equal the host's copy that decides deaths and revivals."""
    host = layer._host_counters()
    for name in ("active", "life", "recovery"):
        assert (getattr(layer, name).numpy() == host[name]).all(), (step, name)


def test_hare_tortoise_resets_leave_the_lifecycle_clock_where_its_host_mirror_is():
    """With Hare & Tortoise and lifecycle layers together (the agents' order: the EMA, then the
    lifecycle clock), the tortoise's copy of the counters is taken before each step's tick; a reset
    that copied it back would rewind the hare's counters one tick behind the host mirror that decides
    deaths and revivals, and a checkpoint (which saves the counters) would resume a different run.
    The reset leaves integer and boolean buffers alone; parameters and float buffers it copies."""
    from rlplastic.interventions.base import Interventions
    from rlplastic.interventions.hare_tortoise import HareTortoise
    from rlplastic.interventions.options import Lifecycle, ema_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    swap_in_lifecycle(model, optimizer=optimizer, lifespan=(3, 6), recovery=(2, 4), warmup=2)
    tortoise = ema_target(model)
    hare_tortoise = HareTortoise(model, tortoise, momentum=0.9, reset_every=5)
    interventions = Interventions([hare_tortoise, Lifecycle(model)])
    layer = model[0]
    for step in range(12):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        interventions.step()
        assert_counters_match_host_mirror(layer, step)
    assert hare_tortoise.resets == 2 and (~layer.active).any()  # units died along the way
    counters = {name: getattr(layer, name).clone() for name in ("active", "life", "recovery")}
    hare_tortoise.reset_hare()
    assert torch.equal(layer.weight, tortoise[0].weight) and torch.equal(layer.scaler, tortoise[0].scaler)
    assert all(torch.equal(getattr(layer, name), value) for name, value in counters.items())


@pytest.mark.parametrize("toward", ["fresh", "initial"])
def test_full_resets_redraw_float_buffers_and_leave_the_lifecycle_clock(toward):
    """Shrink & Perturb at shrink 0 (a head reset) re-draws floating-point buffers such as
    BatchNorm's statistics; a lifecycle layer's counters stay with its host mirror (toward="initial"
    would otherwise copy the counters of the snapshot taken at the start)."""
    from rlplastic.interventions.base import Interventions
    from rlplastic.interventions.options import Lifecycle
    from rlplastic.interventions.shrink_perturb import ShrinkPerturb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    swap_in_lifecycle(model, optimizer=optimizer, lifespan=(3, 6), recovery=(2, 4), warmup=2)

    def init_fn(module):  # each layer's own init, BatchNorm's (statistics included) too
        if isinstance(module, nn.Linear | nn.BatchNorm1d):
            module.reset_parameters()

    reset = ShrinkPerturb(model, {"": (0.0, 1.0)}, every=5, optimizer=optimizer, init_fn=init_fn, toward=toward)
    interventions = Interventions([reset, Lifecycle(model)])
    layer, norm = model[0], model[1]
    for step in range(12):
        optimizer.zero_grad()
        model(torch.randn(8, 4) + 3).pow(2).mean().backward()
        optimizer.step()
        interventions.step()
        assert_counters_match_host_mirror(layer, step)
        if step == 9:  # the second reset, just now: the statistics are a fresh BatchNorm's again
            assert torch.equal(norm.running_mean, torch.zeros(16)) and torch.equal(norm.running_var, torch.ones(16))
    assert reset.resets == 2 and (~layer.active).any()
