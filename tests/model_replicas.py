"""Structural replicas of timm-style models and a ViT, for the tests that run without timm.

Each copies the module layout that matters to `task_norms` and discovery (the norm types and
where they sit relative to the shared convs/linears), not the exact published configurations:

- `BatchNormAct2d`: timm's fused BatchNorm + dropout + activation (a ``BatchNorm2d`` subclass
  with ``drop`` and ``act`` children).
- `ConvNeXtLike`: stem conv + channels-first LayerNorm, blocks of depthwise conv ->
  permute -> LayerNorm -> Linear -> GELU -> Linear -> layer scale -> permute -> residual.
- `RegNetLike`: conv + `BatchNormAct2d` units, a grouped 3x3, squeeze-and-excitation, a
  projected shortcut; the last unit's norm without activation, activation after the sum.
- `ViTLike`: patch embedding, class token, pre-norm transformer blocks (LayerNorm in front
  of the shared qkv/fc1 linears, residual adds after proj/fc2), final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's layout: BatchNorm2d, then ``drop``, then ``act``."""

    def __init__(self, num_features: int, apply_act: bool = True) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNormAct2d(nn.Module):
    """timm's frozen variant: buffers only, with ``drop`` and ``act`` (GELU here)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = nn.Identity()
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(self.drop(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (timm's channels-first one)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-1))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        x = (x * self.gamma).permute(0, 3, 1, 2)
        return x + shortcut


class ConvNeXtLike(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (8, 16), depth: int = 1, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        stages: list[nn.Module] = []
        for i, dim in enumerate(dims):
            blocks: list[nn.Module] = []
            if i > 0:
                blocks += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            blocks += [ConvNeXtBlock(dim) for _ in range(depth)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.head(self.norm(x))


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class RegNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 4) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, max(1, cin // 4))
        self.conv3 = ConvNormAct(cout, cout, 1, act=False)
        self.downsample = (
            ConvNormAct(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else None
        )
        self.act3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(x + shortcut)


class RegNetLike(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16), classes: int = 5) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, widths[0], 3, stride=2)
        cin = widths[0]
        stages = []
        for w in widths:
            stages.append(RegNetBlock(cin, w, stride=2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTLike(nn.Module):
    """``forward(x: [B, 3, H, W]) -> [B, classes]`` from the class token."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 16, depth: int = 2):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads=2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]
