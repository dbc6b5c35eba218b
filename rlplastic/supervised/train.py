"""Supervised plasticity protocols (Lee et al. 2024 warm-start, Yang 2025 lifecycle): fresh,
warm-start and continual training with the interventions of rlplastic.interventions and the
diagnostics of rlplastic.diagnostics.

The whole data set lives on the training device; batches are index gathers and augmentation is a
batched crop + flip there, so the hot loop runs no per-sample Python.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlplastic.checkpoints import read_checkpoint, save_checkpoint
from rlplastic.cli import seed_problems
from rlplastic.cuda_graphs import CapturedSteps, graph_capture_available
from rlplastic.diagnostics import (
    PlasticityProbe,
    expected_calibration_error,
    hessian_top_eigenvalue,
    initial_weights,
    lipschitz_bound,
)
from rlplastic.files import FolderError, append_line, file_destination_problem, make_folder
from rlplastic.init import torch_default_init
from rlplastic.interventions import (
    HareTortoise,
    HeadReset,
    Interventions,
    LifecycleConv2d,
    LifecycleLinear,
    ReDo,
    ShrinkPerturb,
    swap_in_lifecycle,
)
from rlplastic.interventions.base import Every
from rlplastic.interventions.lifecycle import REVIVALS
from rlplastic.introspection import hidden_layers
from rlplastic.machine import git_commit, resolve_device, seed_everything, set_cpu_threads
from rlplastic.supervised.data import DATASETS, Dataset, load_dataset, subset_with_noise
from rlplastic.supervised.models import MODELS, MODELS_WITH_HIDDEN_FC, Classifier, CReLU, build_model

PROTOCOLS = ("fresh", "warm-start", "continual")
METHODS = (
    "baseline", "l2", "augment", "spectral-decoupling", "regen", "crelu", "redo", "head-reset", "shrink-perturb",
    "ema", "hare-tortoise", "lifecycle", "lifecycle-he", "lifecycle-xavier", "lifecycle-nowarmup",
    "lifecycle-he-nowarmup", "lifecycle-xavier-nowarmup", "neuronal-decay", "topk-cycle", "topk-accuracy",
    "topk-plateau",
)  # fmt: skip
# Yang 2025, section 4.2: the ablations of LCL, as (revival, warm-up) presets of --lc-revival / --lc-warmup
LIFECYCLE_ABLATIONS = {
    "lifecycle": (None, None), "lifecycle-he": ("he", None), "lifecycle-xavier": ("xavier", None),
    "lifecycle-nowarmup": ("memory", 0), "lifecycle-he-nowarmup": ("he", 0), "lifecycle-xavier-nowarmup": ("xavier", 0),
}  # fmt: skip
LIFECYCLE_LAYERS = ("fc", "conv", "all")
BOUNDARY_METHODS = ("head-reset", "shrink-perturb")  # act when the data changes: need warm-start or continual
# learning rate and weight decay of each model's reference setting (the papers' appendices)
MODEL_DEFAULTS = {"mlp": (1e-3, 1e-4), "resnet18": (1e-3, 1e-5), "vit-tiny": (3e-3, 0.05), "vgg16": (1e-3, 1e-4),
                  "wrn-28-4": (1e-3, 1e-4)}  # fmt: skip


@dataclass
class RunConfig:
    """One supervised run: data, model, protocol, method and their settings."""

    dataset: Literal[DATASETS] = "mnist1d"
    """data set (mnist1d and digits need no files; the others read --data-dir)"""
    data_dir: str | None = None
    """folder with the data set's files (CIFAR pickle batches, MNIST IDX, Tiny-ImageNet)"""
    model: Literal[MODELS] = "mlp"
    protocol: Literal[PROTOCOLS] = "warm-start"
    method: Literal[METHODS] = "baseline"
    subset: float = 0.1
    """warm-start: share of the training set in phase 1"""
    noise: float = 0.5
    """warm-start: label noise in phase 1; continual: noise of the first chunk (falls to 0)"""
    epochs: int = 100
    """fresh: all; warm-start: phase 2 (phase 1 gets epochs / subset, equal updates); continual: per chunk"""
    seed: int = 0
    batch_size: int = 256
    lr: float | None = None
    """AdamW learning rate (default: the model's, from the papers' appendices)"""
    weight_decay: float | None = None
    """AdamW weight decay (default: the model's)"""
    warmup: float = 0.1
    """share of each phase's steps with the learning rate rising from 0"""
    schedule: Literal["constant", "cosine"] = "constant"
    """after the warm-up: constant, or cosine to 0 (the lifecycle tables)"""
    augment: bool = False
    """crop + flip with any method (the lifecycle tables); --method augment is baseline + this"""
    grad_clip: float = 0.5
    """gradient norm clip (0 = none)"""
    chunks: int = 10
    """continual: number of chunks"""
    buffer: int = 0
    """continual: 0 = full access to earlier chunks, else a sample buffer of this size"""
    strength: float | None = None
    """regularizer weight of l2 / spectral-decoupling / regen / neuronal-decay (default per method)"""
    ht_momentum: float = 0.999
    """Hare & Tortoise and EMA: momentum of the tortoise"""
    ht_reset_epochs: int = 10
    """Hare & Tortoise: epochs of the data being trained on between resets (a subset epoch in phase 1)"""
    ht_horizon: float = 0.0
    """Hare & Tortoise / EMA: EMA horizon 1/(1-momentum) as a share of each phase's steps (0: --ht-momentum)"""
    ht_reset_share: float = 0.0
    """Hare & Tortoise: reset period as a share of each phase's steps (0: --ht-reset-epochs)"""
    lc_layers: Literal[LIFECYCLE_LAYERS] = "fc"
    """lifecycle on the hidden fully connected layers (the paper), conv channels, or both"""
    lc_lifespan: tuple[int, int] = (1_000, 5_000)
    """lifecycle: range of the units' lifespans, in steps"""
    lc_recovery: tuple[int, int] = (100, 500)
    """lifecycle: range of the recovery times, in steps"""
    lc_warmup: int = 10
    """lifecycle: warm-up steps k of a revived unit (the -nowarmup ablations: 0)"""
    lc_revival: Literal[REVIVALS] = "memory"
    """lifecycle: revival from memory, or a fresh He / Xavier draw (the -he / -xavier ablations)"""
    redo_tau: float = 0.1
    """ReDo: dormancy threshold tau"""
    redo_every_epochs: int = 5
    """ReDo: epochs of the data trained on between recycling passes (Lee et al. 2024: 5)"""
    topk_min: float = 0.1
    """top-k: smallest keep ratio"""
    topk_decay: float = 0.9
    """top-k: keep-ratio multiplier per compression step"""
    topk_cycle: int = 10
    """topk-cycle: epochs between returns to dense"""
    topk_tolerance: float = 0.02
    """topk-accuracy: allowed training-accuracy drop; topk-plateau: relative loss improvement counted as flat"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    """torch's CPU threads; 0 = OMP_NUM_THREADS when set, else the cores this process may use (runs side
    by side on the same cores each want their share, e.g. --threads 1)"""
    amp: Literal["fp32", "bf16"] = "fp32"
    """precision of the training forward: bf16 autocast, the loss in float32; evaluation stays fp32"""
    channels_last: bool = False
    """image models and batches in channels-last memory format (what GPU tensor cores want)"""
    compile: bool = False
    """torch.compile the training forward (methods that hook the forward are refused)"""
    cuda_graph: bool = False
    """capture each training step (forward, backward, optimizer step) once in a CUDA graph and replay it:
    no kernel launches from Python (CUDA only, ignored on a CPU; methods that hook the forward are refused)"""
    log_every: int = 0
    """epochs between progress lines (accuracies are recorded every epoch); 0 = about 10 per phase"""
    hessian: bool = True
    """compute the Hessian top eigenvalue at the end (double backprop)"""
    tb_dir: str | None = None
    """tensorboard folder for this run's scalars"""
    checkpoint_dir: str | None = None
    """checkpoint every epoch in this folder; the same command again resumes the run"""


STRENGTHS = {"l2": 1e-4, "spectral-decoupling": 1e-2, "regen": 1e-2, "neuronal-decay": 1e-3}


# Methods that hook the model's forward or change what it computes between steps: a compiled
# forward would recompile at every change and a captured step would go on computing the old one,
# so --compile and --cuda-graph refuse them.
NOT_COMPILED = ("redo", "neuronal-decay", *LIFECYCLE_ABLATIONS, "topk-cycle", "topk-accuracy", "topk-plateau")


def validate(config: RunConfig) -> list[str]:
    problems = [f"--threads {config.threads}: must be >= 0 (0 = auto)"] if config.threads < 0 else []
    allowed = ", ".join(m for m in METHODS if m not in NOT_COMPILED)
    for flag, on in (("--compile", config.compile), ("--cuda-graph", config.cuda_graph)):
        if on and config.method in NOT_COMPILED:
            problems.append(f"{flag} with --method {config.method}: it hooks or changes the forward between steps; "
                            f"use {flag} with one of {allowed}")  # fmt: skip
    if config.amp == "bf16" and config.device != "cpu" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            problems.append("--amp bf16: this GPU does not support bfloat16; use --amp fp32")
    for name, allowed in (("dataset", DATASETS), ("model", MODELS), ("protocol", PROTOCOLS), ("method", METHODS)):
        if getattr(config, name) not in allowed:
            problems.append(f"--{name} {getattr(config, name)}: allowed {', '.join(allowed)}")
    if config.method in BOUNDARY_METHODS and config.protocol == "fresh":
        problems.append(f"--method {config.method} acts when the data changes: use --protocol warm-start or continual")
    if config.method == "crelu" and config.model != "mlp":
        problems.append(f"--method crelu is implemented for --model mlp, not {config.model}")
    if not 0 < config.subset <= 1 or not 0 <= config.noise <= 1:
        problems.append(f"--subset {config.subset} / --noise {config.noise}: need 0 < subset <= 1, 0 <= noise <= 1")
    if not 0 <= config.ht_horizon <= 1 or not 0 <= config.ht_reset_share <= 1:
        problems.append(f"--ht-horizon {config.ht_horizon} / --ht-reset-share {config.ht_reset_share}: "
                        "shares of a phase's steps, need 0 (off) or a value in (0, 1]")  # fmt: skip
    for name in ("epochs", "batch_size", "chunks", "ht_reset_epochs", "redo_every_epochs", "topk_cycle"):
        if getattr(config, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(config, name)}: must be a positive integer")
    problems += seed_problems("--seed", config.seed)
    if config.buffer < 0 or config.log_every < 0:
        problems.append(f"--buffer {config.buffer} / --log-every {config.log_every}: must be >= 0")
    if config.schedule not in ("constant", "cosine"):
        problems.append(f"--schedule {config.schedule}: allowed constant, cosine")
    if (config.augment or config.method == "augment") and config.dataset == "mnist1d":
        problems.append("augmentation (crop + flip) needs images; mnist1d holds 1-D signals")
    if not 0 <= config.warmup < 1 or config.grad_clip < 0:
        problems.append(f"--warmup {config.warmup} / --grad-clip {config.grad_clip}: need warmup in [0, 1), clip >= 0")
    problems += validate_lifecycle(config)
    if not 0 < config.topk_min <= 1 or not 0 < config.topk_decay <= 1:
        problems.append(f"--topk-min {config.topk_min} / --topk-decay {config.topk_decay}: must lie in (0, 1]")
    try:
        resolve_device(config.device)
    except ValueError as e:
        problems.append(str(e))
    return problems


def lifecycle_settings(config: RunConfig) -> tuple[str, int]:
    """(revival, warm-up) of a lifecycle method: the ablation's preset where it sets one."""
    revival, warmup = LIFECYCLE_ABLATIONS[config.method]
    return revival or config.lc_revival, config.lc_warmup if warmup is None else warmup


def validate_lifecycle(config: RunConfig) -> list[str]:
    problems = []
    if config.lc_layers not in LIFECYCLE_LAYERS:
        problems.append(f"--lc-layers {config.lc_layers}: allowed {', '.join(LIFECYCLE_LAYERS)}")
    for name in ("lc_lifespan", "lc_recovery"):
        lo, hi = getattr(config, name)
        if not 1 <= lo <= hi:
            problems.append(f"--{name.replace('_', '-')} {lo} {hi}: need 1 <= low <= high")
    if config.lc_warmup < 0 or config.lc_revival not in REVIVALS:
        problems.append(f"--lc-warmup {config.lc_warmup} / --lc-revival {config.lc_revival}: need warm-up >= 0, "
                        f"revival one of {', '.join(REVIVALS)}")  # fmt: skip
    if config.method in LIFECYCLE_ABLATIONS:
        if config.lc_layers == "fc" and config.model not in MODELS_WITH_HIDDEN_FC:
            problems.append(f"--model {config.model} has no hidden fully connected layer (its only Linear is the "
                            "output layer): use --lc-layers conv or all")  # fmt: skip
        revival, warmup = LIFECYCLE_ABLATIONS[config.method]
        if revival is not None and config.lc_revival not in ("memory", revival):
            problems.append(f"--lc-revival {config.lc_revival} contradicts --method {config.method}: "
                            "use --method lifecycle with --lc-revival")  # fmt: skip
        if warmup is not None and config.lc_warmup not in (10, warmup):
            problems.append(f"--lc-warmup {config.lc_warmup} contradicts --method {config.method} (no warm-up)")
    return problems


def lifecycle_layer_names(model: nn.Module, layers: str) -> list[str]:
    """The hidden layers lifecycle applies to: "fc" the hidden fully connected layers (Yang 2025
    applies it to those; a transformer block's MLP hidden layer counts), "conv" the hidden conv
    layers (the paper's future work), "all" both. Output layers never."""
    names = {module: name for name, module in model.named_modules()}
    hidden = [layer for layer, _ in hidden_layers(model)]
    fc = [names[m] for m in hidden if isinstance(m, nn.Linear)]
    # fx keeps transformer blocks whole; their feed-forward hidden layer is linear1 (linear2 feeds the
    # residual stream). vit-tiny's 3 heads keep PyTorch's fused inference path (which would bypass
    # the gate) off: it needs an even head count.
    fc += [f"{name}.linear1" for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    conv = [names[m] for m in hidden if isinstance(m, nn.Conv2d)]
    return {"fc": fc, "conv": conv, "all": fc + conv}[layers]


ACTIVATIONS = (nn.ReLU, nn.GELU, CReLU)


def record_hidden_activations(model: nn.Module, store: list[torch.Tensor]) -> None:
    """Append every hidden activation module's output to `store`, on training forwards that build
    a graph only (neuronal decay's penalty; evaluation forwards keep nothing)."""

    def record(module: nn.Module, _inputs, out: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            store.append(out)

    modules = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    if not modules:
        raise ValueError(f"neuronal decay: {type(model).__name__} has no activation modules ({ACTIVATIONS})")
    for m in modules:
        m.register_forward_hook(record)


class TopKController:
    """Keep ratio of the top-k activation sparsity on a fixed schedule: shrinks by `decay` every
    epoch down to `minimum`, and returns to dense (1.0) every `cycle` epochs."""

    def __init__(self, minimum: float, decay: float, cycle: int):
        self.minimum, self.decay, self.cycle = minimum, decay, cycle
        self.keep, self.epoch = 1.0, 0

    def next_epoch(self, train_acc: float = 0.0, loss: float = 0.0) -> None:
        self.epoch += 1
        self.keep = 1.0 if self.epoch % self.cycle == 0 else max(self.minimum, self.keep * self.decay)


class AdaptiveTopKController(TopKController):
    """The two adaptive controllers of the activation-sparsity study, which compress the keep ratio
    step by step and reset it to dense. The study names them without giving their rules; these are
    our reading, one epoch a step:

    - "accuracy": each dense epoch sets the reference training accuracy; the keep ratio shrinks by
      `decay` while the epoch's training accuracy stays within `tolerance` of it, and returns to
      dense when it falls further or the ratio would pass `minimum`.
    - "plateau": the keep ratio shrinks by `decay` whenever the training loss has stopped falling
      (relative improvement over the previous epoch below `tolerance`), holds while it falls, and
      returns to dense once it would pass `minimum`.
    """

    STRATEGIES = ("accuracy", "plateau")

    def __init__(self, strategy: str, minimum: float, decay: float, tolerance: float):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: allowed {', '.join(self.STRATEGIES)}")
        super().__init__(minimum, decay, cycle=0)
        self.strategy, self.tolerance = strategy, tolerance
        self.reference, self.previous_loss, self.resets = None, None, 0

    def next_epoch(self, train_acc: float = 0.0, loss: float = 0.0) -> None:
        self.epoch += 1
        if self.strategy == "accuracy":
            if self.keep >= 1.0:
                self.reference = train_acc
                compress = True
            else:
                compress = train_acc >= self.reference - self.tolerance
        else:
            previous, self.previous_loss = self.previous_loss, loss
            compress = previous is not None and (previous - loss) < self.tolerance * abs(previous)
            if not compress:
                return
        if compress and self.keep * self.decay >= self.minimum:
            self.keep *= self.decay
        else:
            self.keep = 1.0
            self.resets += 1


def keep_top(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Zero all but each sample's largest `keep` share of entries (all positions of a map pooled)."""
    if keep >= 1.0:
        return x
    flat = x.flatten(1)
    k = max(1, int(math.ceil(keep * flat.shape[1])))
    threshold = flat.topk(k, dim=1).values[:, -1:]
    return (flat * (flat >= threshold)).view_as(x)


torch.fx.wrap("keep_top")  # one opaque call when the diagnostics trace the model


class TopKActivation(nn.Module):
    """The activation, then keep each sample's largest `controller.keep` share of units."""

    def __init__(self, activation: nn.Module, controller: TopKController):
        super().__init__()
        self.activation, self.controller = activation, controller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return keep_top(self.activation(x), self.controller.keep)


def swap_activations(module: nn.Module, controller: TopKController) -> int:
    """Wrap every ReLU / GELU module of `module` in a TopKActivation; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU | nn.GELU):
            setattr(module, name, TopKActivation(child, controller))
            count += 1
        else:
            count += swap_activations(child, controller)
    return count


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad 4, random 32x32 (any size) crop at offsets 0..8, horizontal flip with p 0.5."""
    b, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (b, 2), device=x.device, generator=generator)
    rows = (offsets[:, :1] + torch.arange(h, device=x.device))[:, :, None]
    cols = (offsets[:, 1:] + torch.arange(w, device=x.device))[:, None, :]
    crops = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


@torch.no_grad()
def accuracy_and_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024):
    was_training = model.training
    model.eval()
    logits = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    model.train(was_training)
    return (logits.argmax(1) == y).float().mean(), logits


class Trainer:
    """One run: the model, the method's pieces, and a train() per phase or chunk."""

    def __init__(self, config: RunConfig, data: Dataset, device: torch.device):
        self.config, self.data, self.device = config, data, device
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.graphed = config.cuda_graph and graph_capture_available(device)  # off on a CPU
        lr, wd = MODEL_DEFAULTS[config.model]
        self.lr = config.lr if config.lr is not None else lr
        self.weight_decay = config.weight_decay if config.weight_decay is not None else wd
        self.strength = config.strength if config.strength is not None else STRENGTHS.get(config.method, 0.0)
        self.model: Classifier = build_model(config.model, data.x_train.shape[1:], data.num_classes,
                                             crelu=config.method == "crelu").to(device)  # fmt: skip
        self.channels_last = config.channels_last and data.x_train.ndim == 4
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)  # in place: the parameters stay the same objects
        self.topk = None
        if config.method == "topk-cycle":
            self.topk = TopKController(config.topk_min, config.topk_decay, config.topk_cycle)
        elif config.method in ("topk-accuracy", "topk-plateau"):
            strategy = config.method.removeprefix("topk-")
            self.topk = AdaptiveTopKController(strategy, config.topk_min, config.topk_decay, config.topk_tolerance)
        if self.topk is not None and not swap_activations(self.model, self.topk):
            raise ValueError(f"top-k sparsity: {config.model} has no ReLU / GELU modules")
        if config.method in LIFECYCLE_ABLATIONS:
            revival, warmup = lifecycle_settings(config)
            names = lifecycle_layer_names(self.model, config.lc_layers)
            if not names:  # validate() refuses these before any work; a model built outside it may land here
                raise ValueError(f"--model {config.model} has no hidden {config.lc_layers} layers for lifecycle")
            # a layer followed by BatchNorm is gated after the norm (swap_in_lifecycle finds it)
            swap_in_lifecycle(self.model, names, lifespan=tuple(config.lc_lifespan),
                              recovery=tuple(config.lc_recovery), warmup=warmup, revival=revival)  # fmt: skip
        self.initial = [p.detach().clone() for p in self.model.parameters()]  # regen's anchor
        self.initial_weights = initial_weights(self.model, self.initial)  # distance_from_init measures from here
        self.shadow = None  # EMA / tortoise network used for evaluation
        if config.method in ("ema", "hare-tortoise"):
            self.shadow = copy.deepcopy(self.model).requires_grad_(False)
        self.activations: list[torch.Tensor] = []
        if config.method == "neuronal-decay":
            record_hidden_activations(self.model, self.activations)
        if config.method == "shrink-perturb":  # the warm-start study: 0.2 theta + 0.8 theta_init
            self.shrink_perturb = ShrinkPerturb(self.model, {"": (0.2, 0.8)}, toward="initial")
        self.steps = 0
        # the training forward; compiled after every module swap above, so it sees the final model
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.data_x = torch.as_tensor(data.x_train[:256]).to(device)  # replaced by the data of each phase
        self.new_optimizer()

    def new_optimizer(self) -> None:
        # fused: one kernel for all tensors; a captured step reads the learning rate from a device
        # tensor (the schedule fills it in place) and its step count from the device (capturable)
        lr = torch.tensor(self.lr, device=self.device) if self.graphed else self.lr
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.weight_decay,
                                           fused=True, capturable=self.graphed)  # fmt: skip
        for m in self.model.modules():
            if isinstance(m, LifecycleLinear | LifecycleConv2d):
                m.bind_optimizer(self.optimizer)
        # Periods count epochs of the data being trained on: train() sets them for each phase or chunk.
        interventions = []
        if self.shadow is not None:
            interventions.append(HareTortoise(self.model, self.shadow, self.config.ht_momentum, 0))
        if self.config.method == "redo":
            interventions.append(ReDo(self.model, self.optimizer, self.redo_batch, tau=self.config.redo_tau,
                                      every=0, init_fn=torch_default_init))  # fmt: skip
        self.interventions = Interventions(interventions)

    def schedule_interventions(self, n: int, epochs: int) -> None:
        """Set the periods of Hare & Tortoise (--ht-reset-epochs) and ReDo (--redo-every-epochs) in
        epochs of the n samples trained on now for `epochs` epochs (Lee et al. 2024, section 4: a
        reset every 10 epochs of the phase's data, so 10 subset epochs in warm-start phase 1), the
        counts starting afresh. With --ht-horizon / --ht-reset-share the tortoise's momentum and the
        reset period are instead fixed shares of this phase's steps, so they scale with the run."""
        config, phase_steps = self.config, epochs * self.steps_per_epoch(n)
        for intervention in self.interventions:
            if isinstance(intervention, HareTortoise):
                if config.ht_horizon:
                    intervention.momentum = 1.0 - 1.0 / max(1.0, config.ht_horizon * phase_steps)
                if config.method != "hare-tortoise":
                    continue  # EMA: no resets
                period = config.ht_reset_epochs * self.steps_per_epoch(n)
                if config.ht_reset_share:
                    period = max(1, round(config.ht_reset_share * phase_steps))
                intervention.due = Every(period)
            elif isinstance(intervention, ReDo):
                intervention.due = Every(self.config.redo_every_epochs * self.steps_per_epoch(n))

    def redo_batch(self) -> torch.Tensor:
        """256 samples of the data trained on now, to score units with."""
        x = self.data_x
        return x[torch.randint(0, len(x), (256,), device=x.device, generator=self.generator)]

    def steps_per_epoch(self, n: int) -> int:
        return math.ceil(n / self.config.batch_size)

    @property
    def evaluated(self) -> nn.Module:
        return self.shadow if self.shadow is not None else self.model

    def boundary(self) -> None:
        """The data changed (phase or chunk switch): boundary methods act now."""
        if self.config.method == "head-reset":
            HeadReset(self.model, ["head"], every=0, optimizer=self.optimizer, init_fn=torch_default_init).apply()
        elif self.config.method == "shrink-perturb":
            self.shrink_perturb.optimizer = self.optimizer
            self.shrink_perturb.apply()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.activations.clear()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
            logits = self.forward(x)
        logits = logits.float()  # the loss and the regularizers in float32
        loss = F.cross_entropy(logits, y)
        method, strength = self.config.method, self.strength
        if method == "l2":
            loss = loss + strength * sum((p**2).sum() for p in self.model.parameters())
        elif method == "spectral-decoupling":
            loss = loss + strength * logits.pow(2).mean()
        elif method == "regen":
            params = list(self.model.parameters())
            loss = loss + strength * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, self.initial, strict=True))
        elif method == "neuronal-decay":
            loss = loss + strength * torch.stack([a.pow(2).mean() for a in self.activations]).mean()
        return loss

    def train(self, x: torch.Tensor, y: torch.Tensor, epochs: int, phase: str, history: list, writer, log,
              start_epoch: int = 0, restore: dict | None = None, on_epoch_end=None) -> None:  # fmt: skip
        """`epochs` passes over (x, y), a fresh warm-up of the learning rate, progress per epoch.
        Resuming: start after `start_epoch` finished epochs with the `restore` state of
        state_dict(); on_epoch_end(epoch, schedule) runs after each epoch (checkpoints). A
        non-finite epoch loss stops the run (SystemExit naming the phase and epoch)."""
        self.data_x = x
        n = len(x)
        self.schedule_interventions(n, epochs)
        steps = epochs * self.steps_per_epoch(n)
        warmup_steps = int(self.config.warmup * steps)
        cosine = self.config.schedule == "cosine"

        def factor(s: int) -> float:
            if s < warmup_steps:
                return (s + 1) / warmup_steps
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (s - warmup_steps) / max(1, steps - warmup_steps)))

        schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        if restore is not None:
            self.load_state_dict(restore, schedule)
        augment = self.config.augment or self.config.method == "augment"
        log_every = self.config.log_every or max(1, epochs // 10)
        self.model.train()
        step = self.stepper(x, y, augment)  # new graphs per phase: data, optimizer and checkpoint state may change
        for epoch in range(start_epoch + 1, epochs + 1):
            order = torch.randperm(n, device=self.device, generator=self.generator)
            loss_sum = torch.zeros((), device=self.device)
            for start in range(0, n, self.config.batch_size):
                idx = order[start : start + self.config.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on one sample
                    continue
                loss = step(idx)
                schedule.step()
                self.interventions.step()
                loss_sum += loss
                self.steps += 1
            # accuracies every epoch (history, tensorboard); a progress line every log_every epochs
            train_acc, _ = accuracy_and_logits(self.evaluated, x, y)
            test_acc, _ = accuracy_and_logits(self.evaluated, self.test_x, self.test_y)
            row = {"phase": phase, "epoch": epoch, "loss": loss_sum.item() / self.steps_per_epoch(n),
                   "train_acc": train_acc.item(), "test_acc": test_acc.item()}  # fmt: skip
            if not math.isfinite(row["loss"]):  # read here anyway: no extra sync
                raise SystemExit(f"supervised: training diverged in {phase} epoch {epoch} (loss {row['loss']}); "
                                 "no result line written; the last good checkpoint, if any, is kept")  # fmt: skip
            if self.topk is not None:  # the epoch's keep ratio, then the controller's step
                row["keep"] = self.topk.keep
                self.topk.next_epoch(row["train_acc"], row["loss"])
            history.append(row)
            if writer:
                for key in ("loss", "train_acc", "test_acc"):
                    writer.add_scalar(f"{phase}/{key}", row[key], epoch)
            if epoch % log_every == 0 or epoch == epochs:
                log(f"{phase} epoch {epoch}/{epochs} loss {row['loss']:.4f} train_acc {row['train_acc']:.4f} "
                    f"test_acc {row['test_acc']:.4f}")  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(epoch, schedule)

    def stepper(self, x: torch.Tensor, y: torch.Tensor, augment: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """step(idx) -> loss: one training step on the samples idx of (x, y), as train() takes it:
        train_step itself, or with --cuda-graph on CUDA its capture, one graph per batch size (the
        last batch of an epoch may be smaller), each reading its batch's indices from a tensor
        filled in place. The schedule and interventions run eagerly between steps, in place.
        scripts/bench_supervised.py times this very step."""
        if not self.graphed:
            return lambda idx: self.train_step(x, y, idx, augment)
        indices: dict[int, torch.Tensor] = {}
        captured = CapturedSteps(lambda size: self.train_step(x, y, indices[size], augment),
                                 generators=[self.generator])  # fmt: skip

        def step(idx: torch.Tensor) -> torch.Tensor:
            indices.setdefault(len(idx), torch.empty_like(idx)).copy_(idx)
            return captured(len(idx))

        return step

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, augment: bool) -> torch.Tensor:
        """One gradient step on the samples `idx` of (x, y); the loss, detached. No host sync, fixed
        shapes: capturable in a CUDA graph."""
        xb, yb = x[idx], y[idx]
        if augment:
            xb = crop_flip(xb, self.generator)
        loss = self.loss(xb, yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def state_dict(self, schedule) -> dict:
        """Everything training changes, for a checkpoint at the end of an epoch (plain data)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "shadow": self.shadow.state_dict() if self.shadow is not None else None,
            "schedule": schedule.state_dict(), "interventions": self.interventions.state_dict(),
            "topk": dict(vars(self.topk)) if self.topk is not None else None, "steps": self.steps,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
        }  # fmt: skip

    def load_state_dict(self, state: dict, schedule=None) -> None:
        """Restore state_dict(); without `schedule` (between stages: each stage has its own) the
        learning-rate schedule is left alone."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.graphed:  # a checkpoint's learning rate arrives as a CPU tensor: back on the device
            for group in self.optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], device=self.device)
        if self.shadow is not None:
            self.shadow.load_state_dict(state["shadow"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        self.interventions.load_state_dict(state["interventions"])
        if self.topk is not None:
            vars(self.topk).update(state["topk"])
        self.steps = state["steps"]
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())

    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The probe's measures on 256 training samples; the feature-gradient ones (saturated units,
        zero feature gradients) from their summed cross-entropy, distances from the start of training."""
        labels = y[:256]
        # the last batch's parameter gradients are transient (a resumed run has none): the feature
        # gradients of the probe's own loss replace them
        self.optimizer.zero_grad(set_to_none=True)
        probe = PlasticityProbe(self.model, x[:256], initial=self.initial_weights,
                                loss_fn=lambda logits: F.cross_entropy(logits, labels, reduction="sum"))  # fmt: skip
        return probe.measure()


def run(config: RunConfig, out: str | Path | None = None, log=print) -> dict:
    """Train one (dataset, model, protocol, method, seed) and append its result line to `out`."""
    problems = validate(config)
    if problems:
        raise ValueError("invalid arguments:\n  " + "\n  ".join(problems))
    start = time.time()
    for flag, folder in (("--tb-dir", config.tb_dir), ("--checkpoint-dir", config.checkpoint_dir),
                         (f"--out {out}: its folder", Path(out).parent if out else None)):  # fmt: skip
        if folder:  # before any work: a folder that cannot be made would lose it
            make_folder(folder, flag)
    problem = file_destination_problem(out, "--out") if out is not None else None
    if problem:
        raise FolderError(problem)
    checkpoint_path = checkpoint_file(config)
    earlier = result_in(out, config) if out is not None else None
    if earlier is not None:  # run again (a script of runs restarted): one line per run, never two
        log(f"supervised: {out} already holds this run ({earlier.get('run_id')}, the same settings and seed): "
            "not run again (another --out runs it anew)")  # fmt: skip
        if checkpoint_path:
            checkpoint_path.unlink(missing_ok=True)  # killed after its line was appended: done
        return earlier
    code_commit = git_commit(__file__)  # the code that runs, read now: HEAD may move while it runs
    set_cpu_threads(config.threads)
    device = resolve_device(config.device)
    data = load_dataset(config.dataset, config.data_dir)
    x_train, y_train, x_test, y_test = (torch.as_tensor(a).to(device) for a in
                                        (data.x_train, data.y_train, data.x_test, data.y_test))  # fmt: skip
    stages, records = protocol_stages(config, data, x_train, y_train, device)  # seeded by their own generators
    smallest = min(len(stage.y) for stage in stages)
    if config.batch_size > smallest:
        raise ValueError(f"--batch-size {config.batch_size}: larger than the {smallest} training samples of the "
                         f"smallest {config.protocol} stage of {config.dataset}; use a smaller batch")  # fmt: skip
    seed_everything(config.seed)
    trainer = Trainer(config, data, device)
    trainer.test_x, trainer.test_y = x_test, y_test
    writer = None
    if config.tb_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config.tb_dir)
    history: list[dict] = []
    diagnostics: dict[str, dict] = {}
    log(f"supervised: {config.dataset} {config.model} {config.protocol} {config.method} seed {config.seed} on {device}")

    saved = read_checkpoint(checkpoint_path, "cpu", "supervised") if checkpoint_path else None
    if saved and saved.get("result") is not None:  # killed between its checkpoint and its result line
        return finish(saved["result"], out, checkpoint_path, log)
    resume_stage, resume_epoch = (saved["stage"], saved["epoch"]) if saved else (0, 0)
    stage_done = saved is not None and resume_epoch == stages[resume_stage].epochs
    if saved:
        history, diagnostics = saved["history"], saved["diagnostics"]
        log(f"supervised: resumed from {checkpoint_path} after {stages[resume_stage].name} epoch {resume_epoch}")
        if stage_done:  # killed between stages: the state at the end of the finished one
            if stages[resume_stage].new_optimizer:
                trainer.new_optimizer()  # that stage's optimizer, whose state the checkpoint holds
            trainer.load_state_dict(saved["trainer"])
    for k, stage in enumerate(stages):
        if k < resume_stage or (k == resume_stage and stage_done):
            continue
        restore = None
        if k == resume_stage and saved:
            restore = saved["trainer"]
            if stage.new_optimizer:
                trainer.new_optimizer()  # the structure of this stage; its state comes from the checkpoint
        else:
            if stage.boundary:
                trainer.boundary()
            if stage.new_optimizer:
                trainer.new_optimizer()  # warm-start: the optimizer is re-created between phases

        def end_of_epoch(epoch: int, schedule, k=k, stage=stage) -> None:
            if epoch == stage.epochs and stage.diagnose:
                diagnostics[stage.name] = trainer.diagnostics(x_train, y_train)
            if checkpoint_path:
                state = {"config": asdict(config), "stage": k, "epoch": epoch, "trainer": trainer.state_dict(schedule),
                         "history": history, "diagnostics": diagnostics, "result": None}  # fmt: skip
                save_checkpoint(checkpoint_path, state, "supervised")

        trainer.train(stage.x, stage.y, stage.epochs, stage.name, history, writer, log,
                      start_epoch=resume_epoch if restore is not None else 0, restore=restore,
                      on_epoch_end=end_of_epoch)  # fmt: skip
    final_x, final_y = stages[-1].x, stages[-1].y

    model = trainer.evaluated
    model.eval()
    test_acc, test_logits = accuracy_and_logits(model, x_test, y_test)
    train_acc, _ = accuracy_and_logits(model, final_x, final_y)
    diagnostics["end"] = trainer.diagnostics(x_train, y_train)
    result = {
        "dataset": config.dataset, "model": config.model, "protocol": config.protocol, "method": config.method,
        "seed": config.seed, "subset": config.subset, "noise": config.noise, "epochs": config.epochs,
        "test_acc": test_acc.item(), "train_acc": train_acc.item(),
        "ece": expected_calibration_error(test_logits, y_test).item(),
        "lipschitz": lipschitz_bound(model, x_test[:1]).item(),
        "hessian": None, "mca": None,
    }  # fmt: skip
    if config.hessian:
        batch_x, batch_y = x_train[:256], y_train[:256]
        model.eval()  # BatchNorm in inference mode: the loss is a function of the parameters alone
        frozen = [p for p in model.parameters() if not p.requires_grad]  # an EMA / tortoise copy
        model.requires_grad_(True)
        result["hessian"] = hessian_top_eigenvalue(
            lambda: F.cross_entropy(model(batch_x), batch_y), model.parameters(), iterations=10, seed=config.seed
        ).item()
        for p in frozen:
            p.requires_grad_(False)
    if data.corruptions:
        accs = [accuracy_and_logits(model, *(torch.as_tensor(a).to(device) for a in pair))[0].item()
                for pair in data.corruptions.values()]  # fmt: skip
        result["mca"] = float(np.mean(accs))
    result |= {
        "run_id": f"{checkpoint_path.stem if checkpoint_path else 'run'}-{uuid.uuid4().hex[:8]}",
        "history": history, "diagnostics": diagnostics, "data": records, "config": asdict(config),
        "device": str(device), "wall_time_s": time.time() - start, "git_commit": code_commit,
        "torch_version": str(torch.__version__),
    }  # fmt: skip
    if writer:
        writer.add_scalar("final/test_acc", result["test_acc"], 0)
        writer.close()
    if checkpoint_path:  # the result first joins the checkpoint: a kill from here on loses nothing
        save_checkpoint(checkpoint_path, {"config": asdict(config), "result": result}, "supervised")
    return finish(result, out, checkpoint_path, log)


def finish(result: dict, out, checkpoint_path: Path | None, log) -> dict:
    """Append the result line, then drop the checkpoint. Once: a run whose line is already in `out`
    (killed after the append, before the checkpoint went) never gets here (run returns it first)."""
    if out is not None:
        try:
            append_jsonl(out, result)
        except OSError as e:  # a full disk, say: the result survives in the checkpoint, or on stderr
            if checkpoint_path:
                raise SystemExit(f"supervised: {e.strerror or e}; the result is kept in {checkpoint_path}: run the "
                                 "same command again to append it") from None  # fmt: skip
            print(json.dumps(result), file=sys.stderr)
            reason = e.strerror or e
            raise SystemExit(f"supervised: {reason}; its result line is printed above, to append by hand") from None
    if checkpoint_path:
        checkpoint_path.unlink(missing_ok=True)
    log(f"supervised: test_acc {result['test_acc']:.4f} train_acc {result['train_acc']:.4f} "
        f"ece {result['ece']:.4f} in {result['wall_time_s']:.0f}s")  # fmt: skip
    return result


def _rows_if_any(path: str | Path) -> list[dict]:
    return read_jsonl(path) if Path(path).exists() else []


@dataclass
class Stage:
    """One phase (warm-start) or chunk (continual) of a protocol: its data and epochs, and what
    happens when it starts."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    boundary: bool = False  # boundary methods act (head reset, Shrink & Perturb) as the data changes
    new_optimizer: bool = False  # the optimizer is re-created
    diagnose: bool = False  # probe at the stage's end


def protocol_stages(config: RunConfig, data: Dataset, x_train, y_train, device) -> tuple[list[Stage], list[dict]]:
    """The stages of the protocol and the record of the data each sees (subset, noise)."""
    if config.protocol == "fresh":
        return [Stage("fresh", x_train, y_train, config.epochs)], []
    if config.protocol == "warm-start":
        idx, noisy, record = subset_with_noise(data.y_train, config.subset, config.noise, data.num_classes, config.seed)
        x1, y1 = x_train[torch.as_tensor(idx, device=device)], torch.as_tensor(noisy, device=device)
        phase1_epochs = max(1, round(config.epochs / config.subset))  # equal gradient updates in both phases
        phase2 = Stage("phase2", x_train, y_train, config.epochs, boundary=True, new_optimizer=True)
        return [Stage("phase1", x1, y1, phase1_epochs, diagnose=True), phase2], [record]
    order = np.random.default_rng(config.seed).permutation(len(data.y_train))
    seen_idx: list[np.ndarray] = []
    seen_labels: list[np.ndarray] = []
    buffer_rng = np.random.default_rng(config.seed + 1)
    stages, records = [], []
    for i, chunk in enumerate(np.array_split(order, config.chunks)):
        noise = config.noise * (1 - i / max(1, config.chunks - 1))  # falls linearly to 0
        rng = np.random.default_rng(config.seed * 1000 + i)
        labels = data.y_train[chunk].copy()
        replaced = rng.random(len(chunk)) < noise
        labels[replaced] = rng.integers(0, data.num_classes, replaced.sum())
        records.append({"chunk": i, "noise": noise, "size": len(chunk), "replaced": int(replaced.sum())})
        if config.buffer and seen_idx:
            pool_idx, pool_labels = np.concatenate(seen_idx), np.concatenate(seen_labels)
            keep = buffer_rng.permutation(len(pool_idx))[: config.buffer]
            idx, lab = np.concatenate([pool_idx[keep], chunk]), np.concatenate([pool_labels[keep], labels])
        else:
            idx, lab = np.concatenate([*seen_idx, chunk]), np.concatenate([*seen_labels, labels])
        seen_idx.append(chunk)
        seen_labels.append(labels)
        x, y = x_train[torch.as_tensor(idx, device=device)], torch.as_tensor(lab, device=device)
        stages.append(Stage(f"chunk{i}", x, y, config.epochs, boundary=i > 0))
    return stages, records


# where and how a run reports, not what it measures
NOT_MEASURED = ("checkpoint_dir", "log_every", "tb_dir", "device", "threads")


def run_key(config: dict) -> str:
    """What identifies a run (its settings and seed) as one string, from a config dict (asdict of a
    RunConfig, or a result line's "config"): two runs with the same key are the same run."""
    settings = {k: v for k, v in config.items() if k not in NOT_MEASURED}
    return json.dumps(settings, sort_keys=True, default=str)


def result_in(path: str | Path, config: RunConfig) -> dict | None:
    """The result line of this run (same settings and seed) in the JSON-lines file `path`, if any."""
    key = run_key(asdict(config))
    return next((row for row in _rows_if_any(path) if isinstance(row, dict)
                 and isinstance(row.get("config"), dict) and run_key(row["config"]) == key), None)  # fmt: skip


def checkpoint_file(config: RunConfig) -> Path | None:
    """<checkpoint_dir>/<dataset>_<model>_<protocol>_<method>_seed<seed>_<hash of the config>.pt"""
    if not config.checkpoint_dir:
        return None
    digest = hashlib.sha256(run_key(asdict(config)).encode()).hexdigest()[:10]
    name = f"{config.dataset}_{config.model}_{config.protocol}_{config.method}_seed{config.seed}_{digest}.pt"
    return Path(config.checkpoint_dir) / name


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line (rlplastic.files.append_line): one writer at a time, what is there never
    rewritten, so several runs appending to one file at once all land."""
    append_line(path, row)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not a JSON line ({e})") from None
    return rows
