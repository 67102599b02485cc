"""Random model generator for property-based tests (hypothesis strategies).

A model is a stem conv followed by a sequence of stage blocks drawn from: plain conv,
residual (add), Inception-like concat, depthwise-separable, grouped conv, squeeze-and-
excitation gate, channel split (chunk + concat) and ViT-like attention on tokens; then a
head (global pool → linear, or flatten → linear). Every block's output is, by construction,
a value every path passes through, so it must be a cut point.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Inception(nn.Module):
    def __init__(self, c: int, widths: tuple[int, int, int]):
        super().__init__()
        self.b1 = nn.Conv2d(c, widths[0], 1)
        self.b3 = nn.Sequential(nn.Conv2d(c, widths[1], 1), nn.ReLU(), nn.Conv2d(widths[1], widths[1], 3, padding=1))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, widths[2], 1))
        self.out_channels = sum(widths)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.pool(x)], dim=1)


class DepthwiseSeparable(nn.Module):
    def __init__(self, c: int, out: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, out, 1)

    def forward(self, x):
        return self.pw(F.relu6(self.bn(self.dw(x))))


class Grouped(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.gn = nn.GroupNorm(groups, c)

    def forward(self, x):
        return F.gelu(self.gn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SplitMix(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.branch = nn.Conv2d(c // 2, c // 2, 3, padding=1)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, F.relu(self.branch(b))], dim=1)


class TokenAttention(nn.Module):
    """Map → tokens → pre-norm multi-head attention + MLP → map (ViT-like)."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        n = t.shape[1]
        qkv = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        t = t + self.proj(y)
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return t.transpose(1, 2).reshape(b, c, h, w)


class RandomNet(nn.Module):
    def __init__(self, in_ch: int, stem: int, blocks: list[tuple], head: str, classes: int, size: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, padding=1), nn.BatchNorm2d(stem), nn.ReLU())
        layers: list[nn.Module] = []
        c = stem
        for kind, arg in blocks:
            if kind == "residual":
                layers.append(Residual(c))
            elif kind == "inception":
                mod = Inception(c, arg)
                layers.append(mod)
                c = mod.out_channels
            elif kind == "depthwise":
                layers.append(DepthwiseSeparable(c, arg))
                c = arg
            elif kind == "grouped":
                layers.append(Grouped(c, arg))
            elif kind == "se":
                layers.append(SqueezeExcite(c, arg))
            elif kind == "split":
                layers.append(SplitMix(c))
            elif kind == "attention":
                layers.append(TokenAttention(c, arg))
            elif kind == "conv":
                layers.append(nn.Sequential(nn.Conv2d(c, arg, 3, padding=1), nn.BatchNorm2d(arg), nn.ReLU()))
                c = arg
        self.blocks = nn.Sequential(*layers)
        self.head_kind = head
        self.fc = nn.Linear(c if head == "pool" else c * size * size, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = x.mean((2, 3)) if self.head_kind == "pool" else torch.flatten(x, 1)
        return self.fc(x)


def _divisible_widths(draw, c: int) -> int:
    # widths stay even and divisible by 4 so split/grouped/heads always apply
    return draw(st.sampled_from([8, 12, 16, 24]))


@st.composite
def random_net_specs(draw, max_blocks: int = 6):
    """(constructor kwargs, input shape) of a random RandomNet."""
    size = draw(st.sampled_from([4, 6, 8]))
    stem = draw(st.sampled_from([8, 12, 16]))
    c = stem
    blocks: list[tuple] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(["residual", "inception", "depthwise", "grouped", "se", "split", "attention",
                                     "conv"]))
        if kind == "inception":
            widths = tuple(draw(st.sampled_from([4, 8])) for _ in range(3))
            blocks.append((kind, widths))
            c = sum(widths)
        elif kind in ("depthwise", "conv"):
            c = _divisible_widths(draw, c)
            blocks.append((kind, c))
        elif kind == "grouped":
            blocks.append((kind, draw(st.sampled_from([g for g in (2, 4) if c % g == 0]))))
        elif kind == "se":
            blocks.append((kind, draw(st.sampled_from([2, 4]))))
        elif kind == "split":
            blocks.append((kind, None))
        elif kind == "attention":
            blocks.append((kind, draw(st.sampled_from([h for h in (1, 2, 4) if c % h == 0]))))
        else:
            blocks.append((kind, None))
    head = draw(st.sampled_from(["pool", "flatten"]))
    kwargs = dict(in_ch=3, stem=stem, blocks=blocks, head=head, classes=draw(st.sampled_from([3, 10])), size=size)
    return kwargs, (3, size, size)


def build_random_net(kwargs: dict, seed: int = 0) -> RandomNet:
    torch.manual_seed(seed)
    net = RandomNet(**kwargs).eval()
    with torch.no_grad():  # non-trivial BN statistics so BN is not an identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return net
