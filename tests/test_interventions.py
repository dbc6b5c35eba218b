"""Each intervention's rule on small modules with known numbers."""

import pytest
import torch
from torch import nn

from rlplastic.init import torch_default_init, xavier_uniform_zero_bias
from rlplastic.interventions import (
    ContinualBackprop,
    GradientNoise,
    HareTortoise,
    HeadReset,
    ReDo,
    ShrinkPerturb,
    clear_optimizer_state,
    fresh_copy,
    hidden_layers,
    neuron_scores,
)


def fresh_state(optimizer, param) -> bool:
    """The optimizer state of `param` is what a fresh one would be: absent, or all zeros (Adam)."""
    state = optimizer.state.get(param, {})
    return all(not (v.any() if torch.is_tensor(v) else v) for v in state.values())


class MLP(nn.Module):
    def __init__(self, sizes=(3, 4, 4, 2)):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]), nn.ReLU())
        self.head = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.head(self.encoder(x))


def train_steps(model, optimizer, steps, seed=0, interventions=()):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 3, generator=generator)
        y = torch.stack([x.sum(1), x[:, 0] - x[:, 1]], 1)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for intervention in interventions:
            intervention.step()
        losses.append(loss.item())
    return losses


def adam_state(optimizer, param):
    return {k: v.clone() for k, v in optimizer.state[param].items()}


# Hare & Tortoise
def test_hare_tortoise_ema_of_params_and_buffers_then_copy_not_alias():
    hare = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    tortoise = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        hare[0].weight.fill_(1.0), tortoise[0].weight.fill_(0.0)
        hare[1].running_mean.fill_(2.0), tortoise[1].running_mean.fill_(0.0)
        hare[1].num_batches_tracked.fill_(7)
    weight = hare[0].weight
    ht = HareTortoise(hare, tortoise, momentum=0.9, reset_every=3)
    ht.step()
    assert tortoise[0].weight.item() == pytest.approx(0.1)
    assert tortoise[1].running_mean.item() == pytest.approx(0.2)
    assert tortoise[1].num_batches_tracked.item() == 7
    ht.step()
    assert tortoise[0].weight.item() == pytest.approx(0.19)
    assert hare[0].weight.item() == 1.0  # no reset before step 3
    ht.step()
    assert tortoise[0].weight.item() == pytest.approx(0.271)
    assert hare[0].weight.item() == pytest.approx(0.271) and hare[1].running_mean.item() == pytest.approx(0.542)
    assert hare[0].weight is weight  # in place: the optimizer's reference stays valid
    with torch.no_grad():
        hare[0].weight.add_(1.0)
    assert tortoise[0].weight.item() == pytest.approx(0.271)  # a copy, not an alias
    assert ht.resets == 1


def test_hare_tortoise_keeps_optimizer_state_unless_asked():
    torch.manual_seed(0)
    hare, tortoise = MLP(), MLP()
    optimizer = torch.optim.Adam(hare.parameters(), lr=1e-2)
    ht = HareTortoise(hare, tortoise, momentum=0.99, reset_every=5, optimizer=optimizer)
    train_steps(hare, optimizer, 5, interventions=[ht])
    assert ht.resets == 1 and all(p in optimizer.state for p in hare.parameters())
    ht_clearing = HareTortoise(hare, tortoise, reset_every=1, optimizer=optimizer, reset_optimizer=True)
    ht_clearing.step()
    assert all(fresh_state(optimizer, p) for p in hare.parameters())


def test_hare_tortoise_rejects_one_network_for_both():
    net = MLP()
    with pytest.raises(ValueError, match="two networks"):
        HareTortoise(net, net)


# Shrink & Perturb, head reset
def test_head_reset_draws_what_the_init_scheme_draws_and_clears_only_its_optimizer_state():
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 10)
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    encoder_state = [adam_state(optimizer, p) for p in model.encoder.parameters()]
    head_weight = model.head.weight

    reset = HeadReset(model, ["head"], every=1, optimizer=optimizer)
    torch.manual_seed(123)
    expected = fresh_copy(model.head, torch_default_init)
    torch.manual_seed(123)
    reset.step()
    assert torch.equal(model.head.weight, expected.weight) and torch.equal(model.head.bias, expected.bias)
    assert model.head.weight is head_weight
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.parameters(), encoder_before, strict=True))
    assert all(fresh_state(optimizer, p) for p in model.head.parameters())
    for p, before in zip(model.encoder.parameters(), encoder_state, strict=True):  # untouched: unchanged
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in before.items())


def test_a_reset_head_still_trains_after_the_reset():
    torch.manual_seed(0)
    model = MLP((3, 32, 32, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    before = train_steps(model, optimizer, 200)
    HeadReset(model, ["head"], every=1, optimizer=optimizer).step()
    after_reset = model.head.weight.clone()
    after = train_steps(model, optimizer, 200, seed=1)
    assert not torch.equal(model.head.weight, after_reset)
    reached_before, reached_after = sum(before[-20:]) / 20, sum(after[-20:]) / 20
    assert after[0] > 100 * reached_before  # the reset really forgot the fit ...
    assert reached_after < 3 * reached_before  # ... and training recovered it


def test_shrink_perturb_mixes_with_a_fresh_draw():
    torch.manual_seed(0)
    model = MLP()
    before = [p.clone() for p in model.parameters()]
    sp = ShrinkPerturb(model, {"": (0.4, 0.1)}, every=2)
    torch.manual_seed(7)
    fresh = fresh_copy(model, torch_default_init)
    sp.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # not due yet
    torch.manual_seed(7)
    sp.step()
    for p, b, f in zip(model.parameters(), before, fresh.parameters(), strict=True):
        assert torch.allclose(p, 0.4 * b + 0.1 * f)


def test_shrink_toward_the_original_init():
    torch.manual_seed(0)
    model = MLP()
    initial = [p.clone() for p in model.parameters()]
    sp = ShrinkPerturb(model, {"": (0.2, 0.8)}, toward="initial")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, optimizer, 20)
    trained = [p.clone() for p in model.parameters()]
    sp.apply()
    for p, t, i in zip(model.parameters(), trained, initial, strict=True):
        assert torch.allclose(p, 0.2 * t + 0.8 * i)


def test_per_submodule_groups_express_bbf_style_resets_on_online_and_target():
    torch.manual_seed(0)
    online, target = MLP(), MLP()
    encoder_before = [p.clone() for p in online.encoder.parameters()]
    sp = ShrinkPerturb([online, target], {"encoder": (0.5, 0.5), "head": (0.0, 1.0)})
    torch.manual_seed(3)
    fresh_encoder = fresh_copy(online.encoder, torch_default_init)
    fresh_head = fresh_copy(online.head, torch_default_init)
    torch.manual_seed(3)
    sp.apply()
    for p, b, f in zip(online.encoder.parameters(), encoder_before, fresh_encoder.parameters(), strict=True):
        assert torch.allclose(p, 0.5 * b + 0.5 * f)
    assert torch.equal(online.head.weight, fresh_head.weight)
    assert not torch.equal(target.head.weight, online.head.weight)  # the target draws its own sample


def test_shrink_perturb_names_unknown_submodules():
    with pytest.raises(ValueError, match=r"\['tail'\].*'encoder', 'head'"):
        ShrinkPerturb(MLP(), {"tail": (0.0, 1.0)})


# ReDo
def test_neuron_scores_are_normalized_mean_abs_activations():
    h = torch.tensor([[1.0, 0.0, -2.0], [3.0, 0.0, 2.0]])
    assert torch.allclose(neuron_scores(h), torch.tensor([2.0, 0.0, 2.0]) / (4.0 / 3.0))
    conv = torch.zeros(2, 2, 2, 2)
    conv[:, 0] = 1.0  # channel 0 active everywhere, channel 1 dead
    assert torch.allclose(neuron_scores(conv), torch.tensor([2.0, 0.0]))


def test_hidden_layers_follow_branches_and_skip_the_output_layer():
    model = MLP()
    pairs = [(layer, following) for layer, following in hidden_layers(model)]
    assert [layer for layer, _ in pairs] == [model.encoder[0], model.encoder[2]]
    assert pairs[1][1] == [model.head]


def planted_dormant_mlp():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.encoder[0].weight[2] = 0.0
        model.encoder[0].bias[2] = -1.0  # unit 2 of layer 1 never fires
    return model


def test_redo_recycles_dormant_units_and_their_adam_entries_only():
    model = planted_dormant_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, 3)
    first, second = model.encoder[0], model.encoder[2]
    assert first.weight[2].abs().sum() == 0  # ReLU blocked its gradient: still dormant
    state_before = {p: adam_state(optimizer, p) for p in model.parameters()}
    second_before = second.weight.clone()
    head_before = model.head.weight.clone()
    head_bias_before = model.head.bias.clone()
    batch = torch.randn(256, 3)
    redo = ReDo(model, optimizer, batch_fn=lambda: batch, tau=0.0, every=1)
    masks = redo.dormant_masks(batch)
    assert masks[0].tolist() == [False, False, True, False]
    torch.manual_seed(11)
    expected_row = fresh_copy(first, torch_default_init).weight[2].clone()
    torch.manual_seed(11)
    redo.step()
    assert redo.recycled[-1] == masks[0].sum() + masks[1].sum()
    assert torch.equal(first.weight[2], expected_row) and first.bias[2] == 0  # incoming fresh, bias 0
    kept_rows = ~masks[1]  # rows of layer 2 that were not themselves recycled (fresh incoming)
    assert kept_rows.any()
    assert not second.weight[kept_rows, 2].any()  # outgoing zero
    others = [0, 1, 3]
    assert torch.equal(second.weight[kept_rows][:, others], second_before[kept_rows][:, others])
    recycled_in_2 = masks[1].nonzero().flatten()
    assert not model.head.weight[:, recycled_in_2].any()
    assert torch.equal(model.head.weight[:, kept_rows], head_before[:, kept_rows])
    assert torch.equal(model.head.bias, head_bias_before)  # the output layer is never recycled
    # Adam: moments zeroed at the recycled entries, step kept, every other entry unchanged
    s = optimizer.state[first.weight]
    assert not s["exp_avg"][2].any() and not s["exp_avg_sq"][2].any()
    assert s["step"] == state_before[first.weight]["step"]
    assert torch.equal(s["exp_avg"][others], state_before[first.weight]["exp_avg"][others])
    assert not optimizer.state[second.weight]["exp_avg"][:, 2].any()
    for k, v in state_before[model.head.bias].items():
        assert torch.equal(optimizer.state[model.head.bias][k], v)


def test_recycled_units_train_again():
    model = planted_dormant_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = torch.randn(256, 3)
    ReDo(model, optimizer, batch_fn=lambda: batch, tau=0.0, every=1).step()
    row = model.encoder[0].weight[2].clone()
    train_steps(model, optimizer, 50)
    assert not torch.equal(model.encoder[0].weight[2], row)
    assert model.encoder[2].weight[:, 2].abs().sum() > 0  # outgoing weights grew back from zero


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_redo_conv_channel_feeding_a_linear_layer_zeroes_its_spatial_block():
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        model.conv.weight[1] = 0.0
        model.conv.bias[1] = -1.0
    fc_before = model.fc.weight.clone()
    batch = torch.randn(64, 1, 4, 4)
    redo = ReDo(model, None, batch_fn=lambda: batch, tau=0.0, every=1)
    redo.step()
    assert redo.recycled == [1]
    assert model.conv.weight[1].abs().sum() > 0 and model.conv.bias[1] == 0
    assert not model.fc.weight[:, 4:8].any()  # channel 1 owns flattened columns 4..7
    assert torch.equal(model.fc.weight[:, :4], fc_before[:, :4])
    assert torch.equal(model.fc.weight[:, 8:], fc_before[:, 8:])


# Continual backprop
def tiny_cbp_net():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[2.0, 0.5]]))
        net[2].bias.fill_(0.25)
    return net


def test_cbp_utility_is_an_ema_of_activation_times_outgoing_magnitude():
    net = tiny_cbp_net()
    cbp = ContinualBackprop(net, None, replacement_rate=0.0, decay=0.9, maturity=0)
    x = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # h = x: mean |h| = [2, 2]
    net(x).sum().backward()
    cbp.step()
    state = cbp.state[0]
    assert torch.allclose(state["utility"], 0.1 * torch.tensor([2.0 * 2.0, 2.0 * 0.5]))
    assert torch.allclose(state["mean_activation"], torch.tensor([0.2, 0.2]))
    with torch.no_grad():
        net(10 * x)  # no graph: an acting or target forward, not captured
    cbp.step()  # the EMA moves toward the last training forward's statistics again, not the acting one's
    assert torch.allclose(state["utility"], 0.19 * torch.tensor([2.0 * 2.0, 2.0 * 0.5]))
    assert state["age"].tolist() == [2.0, 2.0]


def test_cbp_device_and_host_parts_and_a_resume_that_keeps_its_tensors():
    """device_step() moves the statistics (device work a CUDA graph may capture), host_step()
    counts ages and replaces units; loading a checkpoint copies into the existing tensors, which
    a captured graph goes on reading."""
    net = tiny_cbp_net()
    cbp = ContinualBackprop(net, None, replacement_rate=0.0, decay=0.9, maturity=0)
    net(torch.tensor([[1.0, 3.0], [3.0, 1.0]])).sum().backward()
    state = cbp.state[0]
    cbp.device_step()
    assert state["age"].tolist() == [1.0, 1.0] and state["host_age"].tolist() == [0, 0]
    cbp.host_step()
    assert state["host_age"].tolist() == [1, 1]
    saved = cbp.state_dict()
    tensors = {key: state[key] for key in ("utility", "mean_activation", "age", "batch_abs", "batch_mean")}
    cbp.device_step(), cbp.host_step()
    cbp.load_state_dict(saved)
    for key, tensor in tensors.items():
        assert state[key] is tensor  # the same storage, refilled
    assert state["age"].tolist() == [1.0, 1.0] and state["host_age"].tolist() == [1, 1]
    assert torch.allclose(state["utility"], 0.1 * torch.tensor([2.0 * 2.0, 2.0 * 0.5]))


def test_cbp_replaces_the_lowest_utility_mature_unit_and_moves_its_contribution_to_the_bias():
    net = tiny_cbp_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    cbp = ContinualBackprop(
        net, optimizer, replacement_rate=0.5, decay=0.9, maturity=0, init_fn=xavier_uniform_zero_bias
    )
    x = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    optimizer.zero_grad()
    net(x).sum().backward()
    optimizer.step()
    w_out = net[2].weight.detach().clone()
    bias_out = net[2].bias.item()
    torch.manual_seed(5)
    expected_row = fresh_copy(net[0], xavier_uniform_zero_bias).weight[1].clone()
    torch.manual_seed(5)
    cbp.step()  # 2 eligible units * 0.5 = 1 replacement: unit 1 has the lower utility (outgoing 0.5)
    assert cbp.replaced == 1
    assert torch.equal(net[0].weight[1], expected_row) and net[0].bias[1] == 0
    assert net[2].weight[0, 1] == 0 and net[2].weight[0, 0] == w_out[0, 0]
    # bias-corrected mean activation: 0.1 * 2 / (1 - 0.9) = 2; contribution w_out * 2
    assert net[2].bias.item() == pytest.approx(bias_out + w_out[0, 1].item() * 2.0)
    assert cbp.state[0]["age"].tolist() == [1.0, 0.0] and cbp.state[0]["host_age"].tolist() == [1, 0]
    assert not optimizer.state[net[0].weight]["exp_avg"][1].any()
    assert optimizer.state[net[0].weight]["exp_avg"][0].any()


# Gradient noise
def test_gradient_noise_is_isotropic_with_the_gradient_norm_and_decays():
    """eps ~ N(0, sigma^2 ||g||^2 I): zero-gradient entries get the same noise as the others."""
    p, q = nn.Parameter(torch.zeros(3000)), nn.Parameter(torch.zeros(2, 500))
    optimizer = torch.optim.SGD([p, q], lr=1.0)
    noise = GradientNoise(optimizer, sigma0=0.5, decay=0.5, generator=torch.Generator().manual_seed(0))
    p.grad = torch.zeros(3000)
    p.grad[:4] = torch.tensor([0.0, 3.0, 0.0, 4.0])  # ||g|| = 5 over both parameters
    q.grad = torch.zeros(2, 500)
    gradient = torch.cat([p.grad.flatten(), q.grad.flatten()])
    optimizer.step()
    noise.step()  # the host's count (metrics, checkpoints); the noise itself counts on the device
    added = torch.cat([-p.detach(), -q.detach().flatten()]) - gradient  # SGD, lr 1: the update minus g
    assert abs(added.std().item() - 0.5 * 5.0) < 0.1 and abs(added.mean().item()) < 0.1
    assert added[:4].abs().sum() > 0 and (-q.detach()).abs().mean() > 1.0  # zero-gradient entries move too
    assert noise.t == 1 and noise.sigma == 0.25
    assert noise.sigma_device.item() == 0.25  # the optimizer step moved on the device's sigma the noise reads


def test_gradient_noise_draws_each_parameter_its_own_noise_and_skips_those_without_a_gradient():
    """One flat draw per step, each parameter's noise a slice of it: parameters get different noise,
    a parameter with no gradient (frozen, unused) gets none and counts nothing in ||g||."""
    p, q, frozen = (nn.Parameter(torch.zeros(2000)) for _ in range(3))
    optimizer = torch.optim.SGD([p, frozen, q], lr=1.0)
    GradientNoise(optimizer, sigma0=0.5, decay=0.5, generator=torch.Generator().manual_seed(2))  # hooks the optimizer
    p.grad, q.grad = torch.zeros(2000), torch.zeros(2000)
    p.grad[0], q.grad[0] = 3.0, 4.0  # ||g|| = 5 over p and q
    g_p, g_q = p.grad.clone(), q.grad.clone()
    optimizer.step()
    assert not frozen.any()
    added_p, added_q = -p.detach() - g_p, -q.detach() - g_q
    assert not torch.equal(added_p, added_q)
    assert abs(torch.cat([added_p, added_q]).std().item() - 0.5 * 5.0) < 0.1


def test_gradient_noise_reads_sigma_from_the_device():
    """The hook (captured in an agent's CUDA graph with the optimizer step) scales the noise by
    sigma0 * decay^t kept on the device; a checkpoint restores it from t."""
    p = nn.Parameter(torch.zeros(4000))
    optimizer = torch.optim.SGD([p], lr=1.0)
    noise = GradientNoise(optimizer, sigma0=0.5, decay=0.5, generator=torch.Generator().manual_seed(1))
    noise.load_state_dict({"t": 3})  # as a resumed run
    assert noise.t == 3 and noise.sigma_device.item() == 0.5 * 0.5**3
    p.grad = torch.zeros(4000)
    p.grad[:2] = torch.tensor([3.0, 4.0])  # ||g|| = 5
    gradient = p.grad.clone()
    optimizer.step()
    added = -p.detach() - gradient
    assert abs(added.std().item() - 0.5 * 0.5**3 * 5.0) < 0.01  # sigma_3 ||g|| = 0.3125
    assert noise.sigma_device.item() == 0.5 * 0.5**4 and noise.t == 3  # the host counts in step(), once per step
    assert GradientNoise(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)).sigma == 0.01  # the paper's


def test_gradient_noise_resumed_keeps_the_uninterrupted_sigma_to_the_bit():
    """The device's sigma is a running product; a checkpoint restores it from t by the same float64
    multiplications, so a resumed run scales its noise exactly as one that never stopped."""
    running = GradientNoise(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=1.0), sigma0=0.01, decay=0.999)
    for _ in range(1234):
        running._perturb()  # what the optimizer's pre-hook runs at every step
    resumed = GradientNoise(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=1.0), sigma0=0.01, decay=0.999)
    resumed.load_state_dict({"t": 1234})
    assert resumed.sigma_device.item() == running.sigma_device.item()
    assert resumed.sigma_device.item() == pytest.approx(0.01 * 0.999**1234, rel=1e-12)


def test_cbp_on_conv_channels_feeding_a_linear_layer():
    torch.manual_seed(0)
    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen weights: only CBP changes them
    cbp = ContinualBackprop(model, optimizer, replacement_rate=0.34, decay=0.9, maturity=0)
    x = torch.randn(16, 1, 4, 4)
    model(x).sum().backward()
    fc_before, fc_bias_before = model.fc.weight.clone(), model.fc.bias.clone()
    h = torch.relu(model.conv(x)).detach()
    cbp.step()  # 3 eligible channels * 0.34 = 1 replacement
    assert cbp.replaced == 1
    magnitude = fc_before.abs().mean(0).view(3, 4).sum(1)  # each channel owns 4 flattened inputs
    utility = h.abs().mean(dim=(0, 2, 3)) * magnitude
    replaced = int(utility.argmin())
    block = slice(4 * replaced, 4 * replaced + 4)
    assert not model.fc.weight[:, block].any() and model.conv.bias[replaced] == 0
    mean_h = h.mean(dim=(0, 2, 3))[replaced]  # bias-corrected: 0.1 * m / (1 - 0.9)
    expected_bias = fc_bias_before + fc_before[:, block].sum(1) * mean_h
    assert torch.allclose(model.fc.bias, expected_bias, atol=1e-6)


def test_cleared_adam_state_equals_a_fresh_one_and_keeps_its_memory():
    """clear_optimizer_state zeroes Adam's moments and step in place: the next step is the one a
    fresh state would take, and the tensors a captured CUDA graph reads stay the same objects."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.Adam(a.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt_a.zero_grad()
        a(x).pow(2).sum().backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())  # same parameters; b's optimizer has never stepped
    memory = [opt_a.state[p]["exp_avg"] for p in a.parameters()]
    clear_optimizer_state(opt_a, a.parameters())
    assert all(opt_a.state[p]["exp_avg"] is m for p, m in zip(a.parameters(), memory, strict=True))
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_hare_tortoise_step_is_its_device_step_then_its_host_step():
    torch.manual_seed(0)
    hare, tortoise = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    ht = HareTortoise(hare, tortoise, momentum=0.5, reset_every=2)
    assert ht.graph_safe
    before = tortoise.weight.clone()
    ht.device_step()  # the EMA, no schedule
    torch.testing.assert_close(tortoise.weight, 0.5 * before + 0.5 * hare.weight)
    assert ht.due.count == 0
    ht.host_step(), ht.host_step()  # the second call is due: hare <- tortoise
    assert ht.resets == 1 and torch.equal(hare.weight, tortoise.weight)
    assert ContinualBackprop.graph_safe and GradientNoise.graph_safe  # device work in hooks and device_step


def test_cbp_redraws_units_with_the_networks_own_init():
    """By default a replaced unit's incoming weights are what the layer's own reset_parameters
    draws (not a fixed scheme); an agent passes the init its network was built with."""
    from rlplastic.init import torch_default_init

    for init_fn in (None, xavier_uniform_zero_bias):
        torch.manual_seed(0)
        model = MLP()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        kwargs = {} if init_fn is None else {"init_fn": init_fn}
        cbp = ContinualBackprop(model, optimizer, replacement_rate=1.0, decay=0.5, maturity=0, **kwargs)
        model(torch.randn(8, 3)).sum().backward()
        layer = cbp.layers[0][0]
        before = layer.weight.detach().clone()
        torch.manual_seed(7)
        expected = fresh_copy(layer, init_fn or torch_default_init).weight
        torch.manual_seed(7)
        cbp.step()  # every mature unit of the first layer is due: all are replaced, in one draw
        replaced = (layer.weight != before).any(1)
        assert replaced.any() and torch.equal(layer.weight[replaced], expected[replaced])


class _ResidualNet(nn.Module):
    """stem -> block (conv1 -> relu -> conv2, + identity) -> relu -> pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        return self.head(x.mean((2, 3)))


def test_redo_never_recycles_across_a_residual_shortcut():
    """The stem's and conv2's channels join the identity path: zeroing the next layer's weights on
    such a channel would cut the whole residual channel, so only conv1 (whose units reach conv2 one
    to one) is recyclable; the probe still measures all three."""
    from rlplastic.introspection import recyclable_layers

    torch.manual_seed(0)
    model = _ResidualNet()
    assert [layer for layer, _ in hidden_layers(model)] == [model.stem, model.conv1, model.conv2]
    assert [layer for layer, _ in recyclable_layers(model)] == [model.conv1]
    with torch.no_grad():
        for layer in (model.stem, model.conv1, model.conv2):
            layer.bias[0] = -100.0  # channel 0 of every layer is dead
    head_before, conv2_before = model.head.weight.clone(), model.conv2.weight.clone()
    redo = ReDo(model, None, batch_fn=lambda: torch.randn(16, 1, 6, 6), tau=0.0, every=1)
    redo.step()
    assert redo.recycled == [1]  # conv1's channel 0 only
    assert torch.equal(model.head.weight, head_before)  # the residual stream's channels are untouched
    assert not model.conv2.weight[:, 0].any() and torch.equal(model.conv2.weight[:, 1:], conv2_before[:, 1:])
    cbp = ContinualBackprop(model, None)
    assert [layer for layer, _ in cbp.layers] == [model.conv1]


@pytest.mark.parametrize(
    "between",
    [nn.Mish(), nn.Softplus(), nn.Hardswish(), nn.ReLU6(), nn.PReLU(4), nn.SELU(), nn.LeakyReLU(0.1)],
    ids=lambda m: type(m).__name__,
)
def test_a_layer_behind_any_elementwise_activation_is_recyclable(between):
    """An activation that acts on each unit alone keeps unit i of a layer as unit i of the next
    layer's input; a norm over the units (LayerNorm) mixes them, so its layer is left alone."""
    from rlplastic.introspection import recyclable_layers

    model = nn.Sequential(nn.Linear(3, 4), between, nn.Linear(4, 2))
    assert [layer for layer, _ in recyclable_layers(model)] == [model[0]]
    mixed = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert recyclable_layers(mixed) == []


def test_a_layer_behind_padding_and_pooling_is_recyclable():
    """Padding and pooling act on each channel alone (DrQ's 'SAME' convolutions pad before each conv)."""
    from rlplastic.introspection import recyclable_layers

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ZeroPad2d((0, 1, 0, 1)), nn.ReflectionPad2d(1), nn.MaxPool2d(2),
                          nn.Conv2d(3, 2, 3), nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(2))  # fmt: skip
    model(torch.zeros(1, 1, 12, 12))
    assert [layer for layer, _ in recyclable_layers(model)] == [model[0], model[4]]


def test_the_interventions_container_steps_saves_and_reports_each_ones_activity():
    """Interventions: one step() for all, state_dict round trip, metrics() under each one's name
    (no device sync: host counters), and lifecycle_metrics for lifecycle layers."""
    from rlplastic.interventions import Interventions, lifecycle_metrics, swap_in_lifecycle

    torch.manual_seed(0)
    model, target = MLP(), MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randn(64, 3)
    redo = ReDo(model, optimizer, batch_fn=lambda: batch, tau=0.0, every=3)
    interventions = Interventions([
        HareTortoise(model, target, momentum=0.9, reset_every=2),
        redo,
        GradientNoise(optimizer, sigma0=0.01, decay=0.5),
    ])  # fmt: skip
    train_steps(model, optimizer, 6, interventions=interventions)
    metrics = interventions.metrics()
    assert metrics["hare_tortoise/resets"] == 3 and len(redo.recycled) == 2  # ReDo passes at steps 3 and 6
    assert metrics["re_do/recycled"] == sum(redo.recycled) and metrics["re_do/recycled_last"] == redo.recycled[-1]
    assert metrics["gradient_noise/sigma"] == pytest.approx(0.01 * 0.5**6)
    assert interventions.graph_safe  # every per-step part is device work
    saved = interventions.state_dict()
    fresh = Interventions([HareTortoise(model, target, 0.9, 2), ReDo(model, optimizer, lambda: batch, 0.0, every=3),
                           GradientNoise(optimizer, 0.01, 0.5)])  # fmt: skip
    fresh.load_state_dict(saved)
    assert fresh.metrics() == metrics
    with pytest.raises(ValueError, match="2 saved intervention states for 3"):
        fresh.load_state_dict(saved[:2])
    swap_in_lifecycle(model, optimizer=optimizer, lifespan=(1, 1), recovery=(5, 5))
    train_steps(model, optimizer, 1)
    assert lifecycle_metrics(model) == {"lifecycle/dead": 1.0} and lifecycle_metrics(MLP()) == {}


def test_tracing_tells_which_layers_reach_the_next_one_non_negative():
    """CBP's |h| and h sums are one reduction when the traced path makes h >= 0 whatever the
    weights: a ReLU followed only by zero padding, pooling or flattening; not a Tanh, a LeakyReLU,
    a ReLU followed by a shift, nor a raw layer output."""
    from rlplastic.introspection import layer_links

    def flags(*middle):
        return [link.nonnegative for link in layer_links(nn.Sequential(nn.Linear(3, 4), *middle, nn.Linear(4, 2)))]

    assert flags(nn.ReLU()) == [True] and flags(nn.Sigmoid(), nn.Dropout(0.1)) == [True]
    assert flags(nn.Tanh()) == [False] and flags(nn.LeakyReLU()) == [False] and flags() == [False]
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.ZeroPad2d(1), nn.MaxPool2d(2), nn.Conv2d(3, 3, 3),
                         nn.ReLU(), nn.ConstantPad2d(1, -1.0), nn.Conv2d(3, 2, 3))  # fmt: skip
    assert [link.nonnegative for link in layer_links(conv)] == [True, False]  # padding with -1 breaks it

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).flatten(1) - 0.5)

    assert [link.nonnegative for link in layer_links(Shifted())] == [False]


def test_cbp_after_a_relu_sums_once_and_keeps_its_numbers():
    """On a ReLU network the sums of |h| and h are one tensor and one reduction; the utilities,
    mean activations and replacements equal those of the two-sum path exactly (|h| = h)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    results, counts = [], []
    for explicit in (False, True):
        torch.manual_seed(0)
        model = ConvNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        layers = [(model.conv, [model.fc])] if explicit else None  # given: nothing traced, two sums
        cbp = ContinualBackprop(model, optimizer, replacement_rate=0.2, decay=0.9, maturity=2, layers=layers)
        assert (cbp.state[0]["batch_mean"] is cbp.state[0]["batch_abs"]) is not explicit
        for _ in range(8):
            x = torch.randn(16, 1, 4, 4)
            optimizer.zero_grad()
            with Count() as count:
                loss = model(x).pow(2).sum()
            loss.backward()
            optimizer.step()
            cbp.step()
        counts.append(count.ops)
        results.append([p.detach().clone() for p in model.parameters()] + [cbp.state[0]["utility"].clone(),
                       cbp.state[0]["mean_activation"].clone(), torch.tensor(float(cbp.replaced))])  # fmt: skip
    assert results[1][-1] > 0  # units were replaced
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert counts[0] < counts[1]  # the forward's statistics: fewer operators
