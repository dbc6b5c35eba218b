from __future__ import annotations

import torch

from rlplastic.interventions.base import Intervention


class GradientNoise(Intervention):
    """Noisy SGD (Joudaki et al., appendix B): g_t <- g_t + eps_t, eps_t ~ N(0, sigma_t^2 ||g_t||^2 I),
    sigma_t = sigma0 * decay^t, with ||g_t|| the norm of the whole gradient (every parameter the
    optimizer holds). The noise is isotropic: entries whose own gradient is zero (frozen or cloned
    units, the ones noise is meant to free) get as much as any other. The paper's cloning
    experiments use sigma0 0.01 and decay 0.999.

    The noise is added inside optimizer.step() by a step pre-hook, so it works with any optimizer
    and needs no call between backward() and step(); its step() does nothing and only exists so the
    object sits in the same list as the other interventions. The cost is one normal draw per parameter per step.
    """

    graph_safe = False  # decides on the host every step

    state_keys = ("t",)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sigma0: float = 0.01,
        decay: float = 0.999,
        generator: torch.Generator | None = None,
    ):
        if sigma0 < 0 or not 0 < decay <= 1:
            raise ValueError(f"sigma0 {sigma0} must be >= 0 and decay {decay} in (0, 1]")
        self.sigma0, self.decay, self.generator, self.t = sigma0, decay, generator, 0
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._hook = optimizer.register_step_pre_hook(lambda *_: self._perturb())

    @property
    def sigma(self) -> float:
        return self.sigma0 * self.decay**self.t

    def metrics(self) -> dict[str, float]:
        return {"sigma": self.sigma}

    @torch.no_grad()
    def _perturb(self) -> None:
        sigma = self.sigma
        grads = [p.grad for p in self.params if p.grad is not None]
        if sigma > 0 and grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # ||g||, on the device
            noise = [torch.randn(g.shape, device=g.device, dtype=g.dtype, generator=self.generator) for g in grads]
            torch._foreach_mul_(noise, norm * sigma)
            torch._foreach_add_(grads, noise)
        self.t += 1

    def remove(self) -> None:
        self._hook.remove()
