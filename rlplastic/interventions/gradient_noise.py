from __future__ import annotations

from itertools import accumulate

import torch

from rlplastic.interventions.base import Intervention


class GradientNoise(Intervention):
    """Noisy SGD (Joudaki et al., appendix B): g_t <- g_t + eps_t, eps_t ~ N(0, sigma_t^2 ||g_t||^2 I),
    sigma_t = sigma0 * decay^t, with ||g_t|| the norm of the whole gradient (every parameter the
    optimizer holds). The noise is isotropic: entries whose own gradient is zero (frozen or cloned
    units, the ones noise is meant to free) get as much as any other. The paper's cloning
    experiments use sigma0 0.01 and decay 0.999.

    The noise is added inside optimizer.step() by a step pre-hook, so it works with any optimizer
    and needs no call between backward() and step(). The hook is device work only: sigma_t lives
    on the device (float64) and the hook multiplies it by `decay` after each use, so an update
    captured in a CUDA graph with its optimizer step replays the noise with the right sigma every
    time (graph-safe; draws from `generator`, or the device's default generator, which CUDA graphs
    handle). step() only counts t on the host for metrics() and checkpoints; the noise does not
    depend on it. The noise of all parameters is one normal draw into one flat buffer, of which each
    parameter's noise is a view: eight kernels per step however many parameters the optimizer
    holds.
    """

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
        self.flat_noise = torch.empty(sum(p.numel() for p in self.params), device=self.params[0].device,
                                      dtype=self.params[0].dtype)  # fmt: skip
        offsets = list(accumulate((p.numel() for p in self.params), initial=0))
        self.noise_views = [self.flat_noise[start:end].view_as(p) for p, start, end
                            in zip(self.params, offsets[:-1], offsets[1:], strict=True)]  # fmt: skip
        # sigma_t = sigma0 * decay^t as a running product (one kernel a step, where decay^t from a
        # step counter took three), in float64 like the host's arithmetic in _sigma_after
        self.sigma_device = torch.tensor(sigma0, dtype=torch.float64, device=self.params[0].device)
        self._hook = optimizer.register_step_pre_hook(lambda *_: self._perturb())

    @property
    def sigma(self) -> float:
        return self.sigma0 * self.decay**self.t

    def metrics(self) -> dict[str, float]:
        return {"sigma": self.sigma}

    def host_step(self) -> None:
        self.t += 1  # the host's count of optimizer steps, for metrics and checkpoints

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sigma_device.fill_(self._sigma_after(self.t))

    def _sigma_after(self, t: int) -> float:
        """sigma_t as the device reaches it, one float64 multiplication a step (IEEE doubles on
        both sides), so a resumed run draws with the same sigma as an uninterrupted one, to the bit."""
        sigma = self.sigma0
        for _ in range(t):
            sigma *= self.decay
        return sigma

    @torch.no_grad()
    def _perturb(self) -> None:
        present = [(p.grad, view) for p, view in zip(self.params, self.noise_views, strict=True) if p.grad is not None]
        if self.sigma0 > 0 and present:
            grads, noise = [g for g, _ in present], [view for _, view in present]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # ||g||, on the device
            self.flat_noise.normal_(generator=self.generator).mul_(norm * self.sigma_device)
            torch._foreach_add_(grads, noise)
        self.sigma_device.mul_(self.decay)

    def remove(self) -> None:
        self._hook.remove()
