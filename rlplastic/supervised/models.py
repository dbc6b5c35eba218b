"""The supervised models, each split into `encoder` (to the penultimate features) and `head` (the
last linear layer), so head resets and diagnostics know where the features are. Activations are
nn.ReLU modules, which the top-k sparsity method swaps out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "resnet18", "vgg16", "vit-tiny", "wrn-28-4")
MODELS_WITH_HIDDEN_FC = ("mlp", "vgg16", "vit-tiny")  # resnet18 and wrn-28-4: convs, then the output layer


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class CReLU(nn.Module):
    """[relu(x), -relu(-x)] (Shang et al. 2016; Abbas et al. 2023): doubles the features, so layers
    after it take twice the inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(x), -F.relu(-x)], 1)


def mlp(in_dim: int, classes: int, hidden: int = 100, crelu: bool = False) -> Classifier:
    """3-layer MLP with BatchNorm (two hidden layers of `hidden` units and the output layer). With
    CReLU the hidden layers have hidden // 2 units (the study's halving), whose doubled outputs give
    the next layer `hidden` inputs as before."""
    width = hidden // 2 if crelu else hidden
    act, out = (CReLU, 2 * width) if crelu else (nn.ReLU, width)
    encoder = nn.Sequential(
        nn.Flatten(), nn.Linear(in_dim, width), nn.BatchNorm1d(width), act(),
        nn.Linear(out, width), nn.BatchNorm1d(width), act(),
    )  # fmt: skip
    return Classifier(encoder, nn.Linear(out, classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet18(in_channels: int, classes: int) -> Classifier:
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(encoder, nn.Linear(512, classes))


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(in_channels: int, classes: int, fc: int = 1024) -> Classifier:
    """VGG-16 with BatchNorm and two fully connected layers of `fc` units."""
    layers: list[nn.Module] = []
    cin = in_channels
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    encoder = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, fc), nn.ReLU(), nn.Linear(fc, fc), nn.ReLU()
    )
    return Classifier(encoder, nn.Linear(fc, classes))


class ViTEncoder(nn.Module):
    """Pre-norm ViT: patch embedding, class token, learned positions, transformer blocks; returns
    the normalized class token."""

    def __init__(self, in_channels: int, image: int, patch: int, dim: int, heads: int, depth: int, dropout: float):
        super().__init__()
        self.patches = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        # a GELU module (not the "gelu" string): one module per block that hooks can see (neuronal decay)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation=nn.GELU(), batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos  # shape, not len: fx-traceable
        return self.norm(self.blocks(self.dropout(tokens))[:, 0])


def vit_tiny(in_channels: int, image: int, classes: int) -> Classifier:
    """ViT-Tiny for small images: patch 4, dim 192, 3 heads, depth 12, dropout 0.1."""
    return Classifier(ViTEncoder(in_channels, image, 4, 192, 3, 12, 0.1), nn.Linear(192, classes))


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channels of (N, C, H, W) maps."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight[:, None, None]


def wrn_28_4(in_channels: int, classes: int) -> Classifier:
    """Wide ResNet 28-4 (4 blocks per stage, widths 64/128/256) with RMSNorm, as in the activation
    sparsity study."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
    cin = 16
    for cout, stride in ((64, 1), (128, 2), (256, 2)):
        for i in range(4):
            layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, norm=ChannelRMSNorm))
            cin = cout
    encoder = nn.Sequential(*layers, ChannelRMSNorm(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(encoder, nn.Linear(cin, classes))


def build_model(name: str, sample_shape: tuple[int, ...], classes: int, crelu: bool = False) -> Classifier:
    """sample_shape: (D,) vectors or (C, H, W) images."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    if crelu and name != "mlp":
        raise ValueError(f"--method crelu is implemented for the mlp, not {name}")
    if name == "mlp":
        return mlp(int(torch.tensor(sample_shape).prod()), classes, crelu=crelu)
    if len(sample_shape) != 3:
        raise ValueError(f"model {name} needs images; this data set has vectors of shape {sample_shape}: use mlp")
    channels, height = sample_shape[0], sample_shape[1]
    if name == "resnet18":
        return resnet18(channels, classes)
    if name == "vgg16":
        return vgg16(channels, classes)
    if name == "vit-tiny":
        if height % 4:
            raise ValueError(f"vit-tiny uses 4x4 patches; images of {height}x{height} do not divide")
        return vit_tiny(channels, height, classes)
    return wrn_28_4(channels, classes)
