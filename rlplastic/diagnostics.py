"""Measurements of plasticity loss (Sokar et al. 2023; Joudaki et al.), as plain functions on tensors
and modules.

Feature functions take a (samples x units) activation matrix h; conv activations (N, C, H, W) are
accepted where a per-unit statistic makes sense (dormant ratio) and flattened to
(N*H*W, C) elsewhere by `as_unit_matrix`. PlasticityProbe hooks a model's hidden layers and
computes them all on a fixed probe batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rlplastic.interventions.redo import neuron_scores
from rlplastic.introspection import received_features, trace_layers

DORMANT_TAUS = (0.0, 0.025, 0.1)


def as_unit_matrix(h: torch.Tensor) -> torch.Tensor:
    """(N, units) stays; (N, C, positions...) -> (N * positions, C): each position is a sample of each
    channel."""
    if h.dim() > 2:
        return h.movedim(1, -1).reshape(-1, h.shape[1])
    return h


# Unit statistics
def dormant_ratio(h: torch.Tensor, tau: float) -> torch.Tensor:
    """Fraction of units whose ReDo score (mean |h| over the layer's mean) is <= tau."""
    return (neuron_scores(h) <= tau).float().mean()


def dead_fraction(h: torch.Tensor, eps: float = 1e-7, share: float = 0.95) -> torch.Tensor:
    """Fraction of units with |h| < eps on more than `share` of the samples."""
    h = as_unit_matrix(h)
    return ((h.abs() < eps).float().mean(0) > share).float().mean()


def duplicate_fraction(h: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """Fraction of units whose activation column has cosine similarity > threshold with an earlier
    unit's: the redundant copies (a pair of identical units counts once). Silent units (zero
    columns) are never duplicates: they are what dead_fraction counts."""
    h = as_unit_matrix(h).float()
    norms = h.norm(dim=0)
    cosine = (h.T @ h) / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
    earlier = torch.ones_like(cosine, dtype=torch.bool).tril(-1)
    alive = norms > 1e-12
    duplicated = ((cosine > threshold) & earlier & alive[None, :]).any(1) & alive
    return duplicated.float().mean()


def zero_activation_ratio(h: torch.Tensor) -> torch.Tensor:
    """Fraction of exactly-zero entries of the features."""
    return (h == 0).float().mean()


# Rank of the feature matrix
def singular_values(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(as_unit_matrix(h).float())


def effective_rank(h: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """exp of the entropy of the normalized singular values (Roy & Vetterli). Pass `s`, the
    singular values, to skip the SVD."""
    s = singular_values(h) if s is None else s
    p = s / s.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp()


def srank(h: torch.Tensor, delta: float = 0.01, s: torch.Tensor | None = None) -> torch.Tensor:
    """Smallest k whose top-k singular values hold a 1 - delta share of their sum (Kumar et al.)."""
    s = singular_values(h) if s is None else s
    share = s.cumsum(0) / s.sum().clamp_min(1e-12)
    return (share < 1 - delta).sum() + 1


def stable_rank(h: torch.Tensor) -> torch.Tensor:
    """||H~||_F^4 / tr((H~^T H~)^2) of the mean-centred features H~ (Joudaki et al., appendix B:
    the Renyi-2 effective rank (tr M)^2 / ||M||_F^2 of M = H~^T H~). Computed on the smaller of
    H~^T H~ and H~ H~^T, which share their trace and Frobenius norm."""
    centred = as_unit_matrix(h).float()
    centred = centred - centred.mean(0, keepdim=True)
    gram = centred.T @ centred if centred.shape[0] > centred.shape[1] else centred @ centred.T
    return gram.trace() ** 2 / (gram**2).sum().clamp_min(1e-24)


def spectral_norm_ratio(h: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """||H||_F^2 / ||H||_2^2 of the raw features (another quantity often called stable rank)."""
    s = singular_values(h) if s is None else s
    return (s**2).sum() / (s[0] ** 2).clamp_min(1e-12)


# Weights and gradients
def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1]


def weight_magnitude(model: nn.Module) -> torch.Tensor:
    """Sum over layers of the mean squared weight."""
    return sum((w.detach() ** 2).mean() for w in _weights(model))


def initial_weights(model: nn.Module, snapshot: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """A snapshot for distance_from_init. Given `snapshot`, copies of model.parameters() in their
    order taken at the same moment, its weights are reused rather than copied a second time."""
    if snapshot is None:
        return [w.detach().clone() for w in _weights(model)]
    copies = {id(p): copy for p, copy in zip(model.parameters(), snapshot, strict=True)}
    return [copies[id(w)] for w in _weights(model)]


def distance_from_init(model: nn.Module, initial: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean squared difference from the initial weights."""
    return sum(((w.detach() - w0) ** 2).mean() for w, w0 in zip(_weights(model), initial, strict=True))


def saturated_fraction(h: torch.Tensor, g: torch.Tensor, tau: float = 1e-4, share: float = 0.99,
                       eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """Fraction of units whose feature gradient is negligible against their activation (Joudaki et
    al., appendix B): |G_ij| / max(mean_i |H_ij|, eps) < tau on more than `share` of the samples i.
    h: the units' outputs, g: the per-sample loss gradient with respect to them, same shape. The
    probe takes both at the layer's output (the unit's pre-activation), where a unit whose
    activation has zero slope (a dead ReLU, a saturated tanh) gets zero gradient."""
    h, g = as_unit_matrix(h), as_unit_matrix(g)
    scale = h.abs().mean(0).clamp_min(eps)
    return ((g.abs() / scale < tau).float().mean(0) > share).float().mean()


def zero_feature_gradient_ratio(g: torch.Tensor) -> torch.Tensor:
    """Fraction of exactly-zero entries of the feature gradients (units that pass no gradient back)."""
    return (g == 0).float().mean()


def zero_gradient_ratio(model: nn.Module) -> torch.Tensor:
    """Fraction of parameter entries whose current gradient is exactly zero."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    zeros = sum((g == 0).sum() for g in grads)
    return zeros / max(sum(g.numel() for g in grads), 1)


def gradient_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


# Curvature, smoothness, calibration
def hessian_top_eigenvalue(
    loss_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], iterations: int = 20, seed: int = 0
) -> torch.Tensor:
    """Largest-magnitude eigenvalue of the loss Hessian by power iteration on Hessian-vector
    products (double backprop). Deterministic given `seed`. Attention runs on the math kernel here:
    the fused (flash / memory-efficient) kernels have no second derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in params if p.requires_grad]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    eigenvalue = torch.zeros(())
    for _ in range(iterations):
        norm = torch.sqrt(sum((v**2).sum() for v in vector))
        vector = [v / norm for v in vector]
        hvp = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)
        eigenvalue = sum((h * v).sum() for h, v in zip(hvp, vector, strict=True))
        vector = [h.detach() for h in hvp]
    return eigenvalue.detach()


def _conv_spectral_norm(conv: nn.Conv2d, input_shape: tuple[int, int, int], iterations: int, seed: int) -> torch.Tensor:
    """Operator norm of the (linear part of the) convolution on inputs of `input_shape`, by power
    iteration with the convolution and its transpose."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((1, *input_shape), generator=generator).to(conv.weight.device)
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    for _ in range(iterations):
        x = x / x.norm()
        y = F.conv2d(x, conv.weight, **kwargs)
        x = torch.nn.grad.conv2d_input(x.shape, conv.weight, y, **kwargs)  # the transpose, A^T y
    return F.conv2d(x / x.norm(), conv.weight, **kwargs).norm()


@torch.no_grad()
def lipschitz_bound(model: nn.Module, example: torch.Tensor, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Product of the layers' spectral norms, an upper bound on the Lipschitz constant of a network
    of 1-Lipschitz activations. Conv operator norms are estimated by power iteration on inputs of
    the shape each conv sees for `example` (one sample)."""
    shapes: dict[nn.Module, tuple] = {}
    hooks = [
        m.register_forward_hook(lambda m, inputs, _: shapes.__setitem__(m, tuple(inputs[0].shape[1:])))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        model(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    bound = torch.ones((), device=example.device)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = bound * torch.linalg.matrix_norm(m.weight, ord=2)
        elif isinstance(m, nn.Conv2d):
            bound = bound * _conv_spectral_norm(m, shapes[m], iterations, seed)
    return bound


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> torch.Tensor:
    """sum over confidence bins of |accuracy - confidence| weighted by the bin's share of samples."""
    confidence, prediction = F.softmax(logits.float(), dim=1).max(1)
    correct = (prediction == labels).float()
    edges = torch.linspace(0, 1, bins + 1, device=logits.device)
    bin_index = torch.bucketize(confidence, edges[1:-1], right=True)
    ece = torch.zeros((), device=logits.device)
    for b in range(bins):
        in_bin = bin_index == b
        share = in_bin.float().mean()
        gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs() if in_bin.any() else 0.0
        ece = ece + share * gap
    return ece


class PlasticityProbe:
    """Hooks a model's hidden layers and measures them on a fixed probe batch.

        probe = PlasticityProbe(q_network, probe_states)
        metrics = probe.measure()   # {"dormant_0.1/encoder.4": ..., "effective_rank/all": ...}

    Per hidden layer, on what its units deliver to the next layer (the input the next layer
    receives: after norm and activation): dormant ratios (tau 0, 0.025, 0.1), dead and duplicate
    fractions, effective rank, srank, stable rank, zero-activation ratio. For the whole network
    ("/all"): the unit ratios pooled over all hidden units, the ranks of the backbone's output
    features (what the output layer receives), weight magnitude, distance from the weights at
    construction (or `initial`), and the gradient norm and zero ratio of the parameter gradients
    present (`zero_param_gradient`).

    With `loss_fn` (model output -> loss summed over the probe batch, so each sample's gradient is
    its own), also the feature-gradient measures of Joudaki et al. (appendix B): per layer the
    saturated fraction and the zero ratio of the gradient at the layer's output, the units'
    pre-activations (`saturated`, `zero_gradient`), pooled in "/all". One host sync per call. probe_batch may be
    set later (an agent takes it from replay once there is one). Pass `layers` as (layer, [layers
    it feeds]) pairs for models fx cannot trace.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batch: torch.Tensor | None,
        layers: Sequence[tuple[nn.Module, Sequence[nn.Module]]] | None = None,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        initial: Sequence[torch.Tensor] | None = None,
    ):
        self.model, self.probe_batch, self.loss_fn = model, probe_batch, loss_fn
        heads: list[nn.Module] = []
        if layers is None:
            links, heads = trace_layers(model)  # one trace for the hidden layers and the heads
            layers = [(link.layer, link.following) for link in links]
        self.pairs = [(layer, list(following)) for layer, following in layers]
        names = {module: name for name, module in model.named_modules()}
        self.names = [names[layer] for layer, _ in self.pairs]
        self.output_layer = heads[0] if heads else None
        self.initial = list(initial) if initial is not None else initial_weights(model)

    def features(self) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor] | None]:
        """(per hidden layer: what its units deliver, the backbone's output features, per hidden
        layer: (its output, the loss gradient there) or None) on one eval-mode forward."""
        received: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        hooks = []
        for i, (layer, following) in enumerate(self.pairs):
            hooks.append(following[0].register_forward_pre_hook(lambda _m, a, i=i: received.__setitem__(i, a[0])))
            if self.loss_fn is not None:
                hooks.append(layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out)))
        backbone: list[torch.Tensor] = []
        if self.output_layer is not None:
            hooks.append(self.output_layer.register_forward_pre_hook(lambda _m, a: backbone.append(a[0])))
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.set_grad_enabled(self.loss_fn is not None):
                output = self.model(self.probe_batch)
                gradients = None
                if self.loss_fn is not None:
                    pre = [outputs[i] for i in range(len(self.pairs))]
                    gradients = torch.autograd.grad(self.loss_fn(output), pre, allow_unused=True)
                    gradients = [torch.zeros_like(p) if g is None else g for p, g in zip(pre, gradients, strict=True)]
        finally:
            self.model.train(was_training)
            for hook in hooks:
                hook.remove()
        features = [received_features(layer, received[i].detach()) for i, (layer, _) in enumerate(self.pairs)]
        last = backbone[0].detach().flatten(1) if backbone else features[-1]
        if gradients is not None:
            gradients = [
                (received_features(layer, outputs[i].detach()), received_features(layer, g))
                for i, ((layer, _), g) in enumerate(zip(self.pairs, gradients, strict=True))
            ]
        return features, last, gradients

    def state_dict(self) -> dict:
        """The reference weights and the fixed probe batch, for a resumed run."""
        return {"initial": self.initial, "probe_batch": self.probe_batch}

    def load_state_dict(self, state: dict) -> None:
        self.initial, self.probe_batch = list(state["initial"]), state["probe_batch"]

    def measure(self) -> dict[str, float]:
        values: dict[str, torch.Tensor] = {}
        features, backbone, gradients = self.features()
        for name, h in zip(self.names, features, strict=True):
            for key, value in self._feature_stats(h).items():
                values[f"{key}/{name}"] = value
        # whole network: every hidden unit pooled (each scored within its own layer)
        scores = torch.cat([neuron_scores(h) for h in features])
        for tau in DORMANT_TAUS:
            values[f"dormant_{tau}/all"] = (scores <= tau).float().mean()
        units = torch.tensor([h.shape[1] for h in features], dtype=torch.float32, device=scores.device)
        values["dead/all"] = (torch.stack([dead_fraction(h) for h in features]) * units).sum() / units.sum()
        if gradients is not None:
            saturated = torch.stack([saturated_fraction(out, g) for out, g in gradients])
            zero = torch.stack([zero_feature_gradient_ratio(g) for _, g in gradients])
            for name, sat, zer in zip(self.names, saturated, zero, strict=True):
                values[f"saturated/{name}"], values[f"zero_gradient/{name}"] = sat, zer
            grad_units = torch.tensor([float(g.shape[1]) for _, g in gradients], device=zero.device)
            values["saturated/all"] = (saturated * grad_units).sum() / grad_units.sum()
            entries = torch.tensor([float(g.numel()) for _, g in gradients], device=zero.device)
            values["zero_gradient/all"] = (zero * entries).sum() / entries.sum()
        s = singular_values(backbone)
        values["effective_rank/all"] = effective_rank(backbone, s=s)
        values["srank/all"] = srank(backbone, s=s).float()
        values["stable_rank/all"] = stable_rank(backbone)
        values["weight_magnitude/all"] = weight_magnitude(self.model)
        values["distance_from_init/all"] = distance_from_init(self.model, self.initial)
        if any(p.grad is not None for p in self.model.parameters()):
            values["gradient_norm/all"] = gradient_norm(self.model)
            values["zero_param_gradient/all"] = zero_gradient_ratio(self.model)
        stacked = torch.stack([v.float().reshape(()) for v in values.values()]).cpu()  # the one sync
        return dict(zip(values, stacked.tolist(), strict=True))

    @staticmethod
    def _feature_stats(h: torch.Tensor) -> dict[str, torch.Tensor]:
        stats = {f"dormant_{tau}": dormant_ratio(h, tau) for tau in DORMANT_TAUS}
        stats["dead"] = dead_fraction(h)
        stats["duplicate"] = duplicate_fraction(h)
        stats["zero_activation"] = zero_activation_ratio(h)
        s = singular_values(h)  # once for the three ranks
        stats["effective_rank"] = effective_rank(h, s=s)
        stats["srank"] = srank(h, s=s).float()
        stats["stable_rank"] = stable_rank(h)
        return stats
