"""Real architectures defined only in the tests, for export round trips: a residual CNN, an LSTM classifier, a
transformer block that calls `scaled_dot_product_attention`, a CNN that reuses one `nn.ReLU` at layers of different
widths, and a torchvision-style Bottleneck network whose one `ReLU(inplace=True)` runs three times per block. Each
has a fixed sample shape and a dynamic batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class ResidualCNN(nn.Module):
    """Two residual blocks on 3x16x16 images, 4 classes."""

    input_shape = (3, 16, 16)

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = ResidualBlock(8)
        self.block2 = ResidualBlock(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class LSTMClassifier(nn.Module):
    """A one-hot sequence (4 channels x 20 positions) read by an LSTM, 3 classes."""

    input_shape = (4, 20)

    def __init__(self, classes: int = 3):
        super().__init__()
        self.lstm = nn.LSTM(4, 16, batch_first=True)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        out, _ = self.lstm(x.transpose(1, 2))
        return self.head(out[:, -1])


class AttentionBlock(nn.Module):
    """A pre-norm transformer block on 8 tokens of width 16, with `scaled_dot_product_attention`, 5 classes."""

    input_shape = (8, 16)

    def __init__(self, classes: int = 5, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.norm2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


class SharedReluCNN(nn.Module):
    """The common `self.relu` pattern: one ReLU module after convolutions of 8 and 16 channels and a 32-unit
    linear layer, on 1x12x12 images, 3 classes."""

    input_shape = (1, 12, 12)

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 3 * 3, 32)
        self.head = nn.Linear(32, classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = F.max_pool2d(self.relu(self.conv1(x)), 2)
        x = F.max_pool2d(self.relu(self.conv2(x)), 2)
        return self.head(self.relu(self.fc(x.flatten(1))))


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck: 1x1, 3x3, 1x1 convolutions, one in-place ReLU used three times, and a 1x1
    shortcut convolution (registered last, the layer a registration-order default picks)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BottleneckNet(nn.Module):
    """A stem and two Bottleneck stages (the second strided) on 3x16x16 images, 4 classes."""

    input_shape = (3, 16, 16)

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = Bottleneck(8, 4)
        self.layer2 = Bottleneck(16, 8, stride=2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


ARCHITECTURES = {"residual_cnn": ResidualCNN, "lstm": LSTMClassifier, "attention": AttentionBlock,
                 "shared_relu": SharedReluCNN, "bottleneck": BottleneckNet}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[name]().eval()
