"""Each measurement on constructed inputs with known answers."""

import pytest
import torch
from torch import nn

from rlplastic.diagnostics import (
    PlasticityProbe,
    dead_fraction,
    distance_from_init,
    dormant_ratio,
    duplicate_fraction,
    effective_rank,
    expected_calibration_error,
    hessian_top_eigenvalue,
    initial_weights,
    lipschitz_bound,
    saturated_fraction,
    spectral_norm_ratio,
    srank,
    stable_rank,
    weight_magnitude,
    zero_activation_ratio,
    zero_gradient_ratio,
)


def test_ranks_of_rank_one_and_identity_matrices():
    u, v = torch.randn(50, 1), torch.randn(1, 8)
    rank_one = u @ v
    assert effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-3)
    assert srank(rank_one).item() == 1 and stable_rank(rank_one).item() == pytest.approx(1.0, abs=1e-4)
    identity = torch.eye(10)
    assert effective_rank(identity).item() == pytest.approx(10.0, abs=1e-4)
    assert srank(identity).item() == 10  # 9 of 10 equal values hold only 90% < 99%
    assert srank(identity, delta=0.15).item() == 9
    # centred, the identity loses one direction: 9 equal eigenvalues -> Renyi-2 rank 9
    assert stable_rank(identity).item() == pytest.approx(9.0, rel=1e-5)
    two = torch.diag(torch.tensor([3.0, 1.0]))
    assert spectral_norm_ratio(two).item() == pytest.approx(10 / 9)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(two).item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item())


def test_stable_rank_is_the_renyi2_rank_of_the_centred_features():
    """||H~||_F^4 / tr((H~^T H~)^2): orthogonal centred columns of squared norms 4 and 16 give
    (4 + 16)^2 / (4^2 + 16^2) = 400 / 272; adding a constant to a unit changes nothing."""
    h = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [-1.0, 2.0]])
    assert stable_rank(h).item() == pytest.approx(400 / 272)
    assert stable_rank(h + torch.tensor([5.0, -3.0])).item() == pytest.approx(400 / 272)
    centred = h - h.mean(0)
    by_definition = torch.linalg.norm(centred) ** 4 / torch.trace((centred.T @ centred) @ (centred.T @ centred))
    wide = torch.randn(30, 200)
    wide_centred = wide - wide.mean(0)
    assert stable_rank(wide).item() == pytest.approx(
        (
            torch.linalg.norm(wide_centred) ** 4
            / torch.trace((wide_centred.T @ wide_centred) @ (wide_centred.T @ wide_centred))
        ).item(),
        rel=1e-4,
    )
    assert stable_rank(h).item() == pytest.approx(by_definition.item())


def planted_layer():
    """10 units on 200 samples: units 3 and 7 dead, unit 9 a scaled copy of unit 0."""
    torch.manual_seed(0)
    h = torch.relu(torch.randn(200, 10)) + 0.01
    h[:, 3] = 0.0
    h[:, 7] = 0.0
    h[:, 9] = 2.0 * h[:, 0]
    return h


def test_planted_dead_and_duplicate_units():
    h = planted_layer()
    assert dead_fraction(h).item() == pytest.approx(0.2)
    assert duplicate_fraction(h).item() == pytest.approx(0.1)
    assert dormant_ratio(h, 0.0).item() == pytest.approx(0.2)
    assert zero_activation_ratio(h).item() == pytest.approx(0.2)
    h[:5, 5] = 1.0  # a unit silent on 97.5% of samples counts as dead, not on 95% exactly
    h[5:, 5] = 0.0
    assert dead_fraction(h).item() == pytest.approx(0.3)


def test_dormant_ratio_thresholds_the_normalized_score():
    h = torch.tensor([[1.0, 0.1, 0.0, 2.9]]).repeat(4, 1)  # layer mean 1.0: scores 1, 0.1, 0, 2.9
    assert dormant_ratio(h, 0.0).item() == 0.25
    assert dormant_ratio(h, 0.1).item() == 0.5
    assert dormant_ratio(h, 0.025).item() == 0.25


def test_hessian_top_eigenvalue_of_a_quadratic():
    a = torch.diag(torch.tensor([5.0, 2.0, -1.0]))
    x = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    value = hessian_top_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=50, seed=1)
    assert value.item() == pytest.approx(5.0, rel=1e-4)
    again = hessian_top_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=3, seed=1)
    assert again.item() == hessian_top_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=3, seed=1).item()


def test_lipschitz_bound_multiplies_spectral_norms():
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1))  # norm 3
        model[3].weight.zero_()
        model[3].weight[0, 0], model[3].weight[1, 1] = 2.0, 0.5  # norm 2
    assert lipschitz_bound(model, torch.randn(4, 2, 2, 2)).item() == pytest.approx(6.0, rel=1e-4)


def test_conv_operator_norm_of_a_3x3_box_filter_approaches_9():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    bound = lipschitz_bound(nn.Sequential(conv), torch.randn(1, 1, 64, 64), iterations=200).item()
    assert 8.9 < bound <= 9.0  # zero padding keeps it just under the circulant norm 9


def test_expected_calibration_error():
    labels = torch.zeros(10, dtype=torch.long)
    logit = torch.log(torch.tensor(0.8 / 0.2))  # two classes, confidence 0.8 in class 0
    logits = torch.tensor([[logit, 0.0]]).repeat(10, 1)
    assert expected_calibration_error(logits, labels).item() == pytest.approx(0.2, abs=1e-5)  # 100% right
    labels[:2] = 1  # 80% right at confidence 0.8: calibrated
    assert expected_calibration_error(logits, labels).item() == pytest.approx(0.0, abs=1e-5)
    labels[:6] = 1  # 40% right at 0.8
    assert expected_calibration_error(logits, labels).item() == pytest.approx(0.4, abs=1e-5)


def test_weight_magnitude_distance_and_gradients():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(2.0)
    assert weight_magnitude(model).item() == pytest.approx(1.0 + 4.0)  # biases excluded
    start = initial_weights(model)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    assert distance_from_init(model, start).item() == pytest.approx(0.25)
    model(torch.tensor([[1.0, 0.0]])).sum().backward()
    # grad of layer 0's weight: column 1 sees input 0 -> 2 of 4 entries zero; other grads nonzero
    assert zero_gradient_ratio(model).item() == pytest.approx(2 / 9)


def test_probe_reports_every_layer_and_the_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # two dead units in the first hidden layer ...
        model[0].bias[2:] = 100.0  # ... and six that always fire
    probe = PlasticityProbe(model, torch.randn(64, 4))
    metrics = probe.measure()
    assert metrics["dead/0"] == pytest.approx(0.25) and metrics["dormant_0.0/0"] == pytest.approx(0.25)
    assert "effective_rank/2" in metrics and "srank/all" in metrics and "4" not in {k.split("/")[1] for k in metrics}
    assert metrics["dead/all"] == pytest.approx((2 + 8 * metrics["dead/2"]) / 16)
    assert metrics["distance_from_init/all"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_probe_measures_after_batchnorm_and_activation_and_the_backbone_output():
    """Measured on the layer's own output, a unit that BN + ReLU silence looks alive; the probe
    reads what the next layer receives. '/all' ranks are those of the features the output layer
    receives (here pooled channels), not of the last conv's maps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias.fill_(5.0)  # every pre-BN output positive and varied ...
        model[1].bias[:3] = -100.0  # ... but units 0-2 are silenced after BN + ReLU
    model.eval()  # running stats (0, 1): BN is an affine map here
    metrics = PlasticityProbe(model, torch.randn(64, 4)).measure()
    assert metrics["dead/0"] == pytest.approx(0.5) and metrics["dormant_0.0/0"] == pytest.approx(0.5)

    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))  # fmt: skip
    probe = PlasticityProbe(conv, torch.randn(32, 1, 6, 6))
    metrics = probe.measure()
    pooled = conv[3](conv[2](conv[1](conv[0](probe.probe_batch)))).detach()
    assert metrics["effective_rank/all"] == pytest.approx(effective_rank(pooled).item(), rel=1e-5)
    maps = conv[1](conv[0](probe.probe_batch)).detach()  # the last conv's maps: what '/all' used to read
    assert metrics["effective_rank/all"] != pytest.approx(effective_rank(maps).item(), rel=1e-3)


def test_saturated_units_and_zero_feature_gradients_follow_the_papers_definition():
    """Joudaki et al., appendix B: unit j is saturated when |G_ij| / max(mean_i |H_ij|, eps) < 1e-4
    on more than 99% of the samples, G the loss gradient at its pre-activation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # units 0 and 1 never fire: zero gradient, saturated
    x, y = torch.randn(128, 4), torch.randint(0, 3, (128,))
    probe = PlasticityProbe(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))
    metrics = probe.measure()
    assert metrics["saturated/0"] == pytest.approx(2 / 8) and metrics["saturated/all"] == pytest.approx(2 / 8)
    assert metrics["zero_gradient/0"] >= 2 / 8
    assert all(p.grad is None for p in model.parameters())  # the probe's backward leaves no gradients
    h = torch.ones(100, 2)
    g = torch.stack([torch.full((100,), 1e-6), torch.full((100,), 1e-2)], 1)
    assert saturated_fraction(h, g).item() == pytest.approx(0.5)
