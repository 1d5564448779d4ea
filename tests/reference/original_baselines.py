"""Reference implementation of the original MetaFormer baselines release (sail-sg/metaformer).

Clean-room, written from the paper (arXiv 2210.13452) and the release's model code:
IdentityFormer, RandFormer, PoolFormerV2, ConvFormer and CAFormer with the same ``state_dict()``
keys and shapes as the released checkpoints and the same forward maths in eval mode (no dropout /
drop path).
Like the original, blocks are computed on (B, H, W, C) tensors.

Public API:
    MODEL_NAMES                      -- the 23 supported names
    build(name, num_classes=1000)    -> nn.Module (eval mode)
    randomize_(model, seed)          -> model, every floating state tensor filled with O(1) random values
    save_original(model, path)       -- torch.save(model.state_dict(), path)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_NAMES", "build", "randomize_", "save_original"]


# ----------------------------------------------------------------------------- parts

class Scale(nn.Module):
    """Per-channel learnable scale on the last (channel) axis; key ``scale``."""

    def __init__(self, dim, init_value=1.0):
        super().__init__()
        self.scale = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.scale


class StarReLU(nn.Module):
    """s * relu(x) ** 2 + b with learnable scalars (keys ``scale``, ``bias``, shape (1,))."""

    def __init__(self, scale_value=1.0, bias_value=0.0):
        super().__init__()
        self.scale = nn.Parameter(scale_value * torch.ones(1))
        self.bias = nn.Parameter(bias_value * torch.ones(1))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


class SquaredReLU(nn.Module):
    def forward(self, x):
        return F.relu(x) ** 2


class LayerNormNoBias(nn.Module):
    """Normalise a (B, H, W, C) tensor over ``dims``; per-channel weight, no bias.

    dims=(-1,)      : channel LayerNorm without bias.
    dims=(1, 2, 3)  : "modified LayerNorm" (GroupNorm with one group, no bias).
    """

    def __init__(self, dim, dims=(-1,), eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dims = tuple(dims)
        self.eps = eps

    def forward(self, x):
        c = x - x.mean(self.dims, keepdim=True)
        s = c.pow(2).mean(self.dims, keepdim=True)
        return c / torch.sqrt(s + self.eps) * self.weight


def channel_ln(dim):
    return LayerNormNoBias(dim, dims=(-1,), eps=1e-6)


def modified_ln(dim):
    return LayerNormNoBias(dim, dims=(1, 2, 3), eps=1e-6)


class Downsampling(nn.Module):
    """pre_norm (NHWC) -> conv (NCHW) -> post_norm (NHWC). Input/output NHWC except the stem input."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, padding, pre_norm=None, post_norm=None,
                 pre_permute=False):
        super().__init__()
        self.pre_norm = pre_norm(in_ch) if pre_norm else nn.Identity()
        self.pre_permute = pre_permute
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding)
        self.post_norm = post_norm(out_ch) if post_norm else nn.Identity()

    def forward(self, x):
        x = self.pre_norm(x)
        if self.pre_permute:  # NHWC -> NCHW (not for the stem, whose input is an NCHW image)
            x = x.permute(0, 3, 1, 2)
        x = self.conv(x).permute(0, 2, 3, 1)
        return self.post_norm(x)


class IdentityMixer(nn.Identity):
    pass


class RandomMixing(nn.Module):
    def __init__(self, num_tokens):
        super().__init__()
        self.random_matrix = nn.Parameter(torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1),
                                          requires_grad=False)

    def forward(self, x):
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        x = torch.einsum("mn,bnc->bmc", self.random_matrix, x)
        return x.reshape(B, H, W, C)


class Pooling(nn.Module):
    def __init__(self, pool_size=3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x):
        y = x.permute(0, 3, 1, 2)
        y = self.pool(y)
        return y.permute(0, 2, 3, 1) - x


class SepConv(nn.Module):
    def __init__(self, dim, expansion_ratio=2, kernel_size=7, padding=3):
        super().__init__()
        med = int(expansion_ratio * dim)
        self.pwconv1 = nn.Linear(dim, med, bias=False)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(med, med, kernel_size, padding=padding, groups=med, bias=False)
        self.act2 = nn.Identity()
        self.pwconv2 = nn.Linear(med, dim, bias=False)

    def forward(self, x):
        x = self.act1(self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(self.act2(x))


class Attention(nn.Module):
    def __init__(self, dim, head_dim=32):
        super().__init__()
        assert dim % head_dim == 0
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, mlp_ratio=4):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = StarReLU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MlpHead(nn.Module):
    def __init__(self, dim, num_classes, mlp_ratio=4):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = SquaredReLU()
        self.norm = nn.LayerNorm(hidden)  # default eps 1e-5, with bias (original; timm uses 1e-6)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class MetaFormerBlock(nn.Module):
    def __init__(self, dim, token_mixer, norm_layer, res_scale):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer
        self.layer_scale1 = nn.Identity()
        self.res_scale1 = Scale(dim, 1.0) if res_scale else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, 4)
        self.layer_scale2 = nn.Identity()
        self.res_scale2 = Scale(dim, 1.0) if res_scale else nn.Identity()

    def forward(self, x):
        x = self.res_scale1(x) + self.layer_scale1(self.token_mixer(self.norm1(x)))
        x = self.res_scale2(x) + self.layer_scale2(self.mlp(self.norm2(x)))
        return x


class OriginalMetaFormer(nn.Module):
    def __init__(self, depths, dims, mixers, norm_layer, mlp_head, num_classes=1000, img_size=224):
        super().__init__()
        layers = [Downsampling(3, dims[0], 7, 4, 2, post_norm=channel_ln)]
        for i in range(1, 4):
            layers.append(Downsampling(dims[i - 1], dims[i], 3, 2, 1, pre_norm=channel_ln, pre_permute=True))
        self.downsample_layers = nn.ModuleList(layers)
        stages = []
        for i in range(4):
            side = img_size // (4 * 2 ** i)
            blocks = [MetaFormerBlock(dims[i], _make_mixer(mixers[i], dims[i], side * side), norm_layer,
                                      res_scale=(i >= 2))
                      for _ in range(depths[i])]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        if num_classes <= 0:
            self.head = nn.Identity()
        elif mlp_head:
            self.head = MlpHead(dims[-1], num_classes)
        else:
            self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x):
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([1, 2]))  # (B, H, W, C) -> (B, C)

    def forward(self, x):
        return self.head(self.forward_features(x))


def _make_mixer(kind, dim, num_tokens):
    if kind == "id":
        return IdentityMixer()
    if kind == "rand":
        return RandomMixing(num_tokens)
    if kind == "pool":
        return Pooling(3)
    if kind == "sepconv":
        return SepConv(dim)
    if kind == "attn":
        return Attention(dim, head_dim=32)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- configs

_SHAPES = {
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512)),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512)),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512)),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768)),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768)),
}
_SHAPES_CONV = {
    "s18": ((3, 3, 9, 3), (64, 128, 320, 512)),
    "s36": ((3, 12, 18, 3), (64, 128, 320, 512)),
    "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
    "b36": ((3, 12, 18, 3), (128, 256, 512, 768)),
}
_FAMILIES = {
    # family: (mixers, norm for norm1/norm2, MlpHead?, shapes)
    "identityformer": (("id",) * 4, modified_ln, False, _SHAPES),
    "randformer": (("id", "id", "rand", "rand"), modified_ln, False, _SHAPES),
    "poolformerv2": (("pool",) * 4, modified_ln, False, _SHAPES),
    "convformer": (("sepconv",) * 4, channel_ln, True, _SHAPES_CONV),
    "caformer": (("sepconv", "sepconv", "attn", "attn"), channel_ln, True, _SHAPES_CONV),
}
MODEL_NAMES = tuple(f"{fam}_{size}" for fam, spec in _FAMILIES.items() for size in spec[3])

PARAM_COUNTS = {
    "identityformer_s12": 11_891_712, "identityformer_s24": 21_341_464, "identityformer_s36": 30_791_216,
    "identityformer_m36": 56_077_168, "identityformer_m48": 73_346_056,
    "randformer_s12": 12_127_010, "randformer_s24": 21_812_060, "randformer_s36": 31_497_110,
    "randformer_m36": 56_783_062, "randformer_m48": 74_287_248,
    "poolformerv2_s12": 11_891_712, "poolformerv2_s24": 21_341_464, "poolformerv2_s36": 30_791_216,
    "poolformerv2_m36": 56_077_168, "poolformerv2_m48": 73_346_056,
    "convformer_s18": 26_774_448, "convformer_s36": 40_012_152, "convformer_m36": 57_051_640,
    "convformer_b36": 99_882_616,
    "caformer_s18": 26_341_656, "caformer_s36": 39_297_102, "caformer_m36": 56_204_878,
    "caformer_b36": 98_753_614,
}


def build(name: str, num_classes: int = 1000) -> nn.Module:
    """Build an original-layout baseline by release name, in eval mode, with default init."""
    fam, _, size = name.partition("_")
    if fam not in _FAMILIES or size not in _FAMILIES[fam][3]:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    mixers, norm_layer, mlp_head, shapes = _FAMILIES[fam]
    depths, dims = shapes[size]
    model = OriginalMetaFormer(depths, dims, mixers, norm_layer, mlp_head, num_classes=num_classes)
    return model.eval()


# ----------------------------------------------------------------------------- helpers

def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every floating tensor of ``model.state_dict()`` with non-trivial random values.

    Values are drawn in float32 on CPU from a generator seeded with ``seed`` (so the result does
    not depend on the model's dtype/device) and copied in place:
      conv / linear weights N(0, 1/sqrt(fan_in)), their biases N(0, 0.1);
      norm weights U(0.5, 1.5), norm biases N(0, 0.1);
      res scales U(0.5, 1.5); StarReLU scale U(0.5, 1.0), bias N(0, 0.1);
      random_matrix: softmax(2 * N(0, 1)) over the last axis (rows still sum to 1).
    """
    g = torch.Generator().manual_seed(int(seed))
    modules = dict(model.named_modules())
    norm_types = (nn.LayerNorm, nn.GroupNorm, LayerNormNoBias)
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(t):
                continue
            prefix, _, leaf = key.rpartition(".")
            owner = modules.get(prefix)
            shape = t.shape
            if isinstance(owner, RandomMixing):
                v = torch.softmax(2.0 * torch.randn(shape, generator=g), dim=-1)
            elif isinstance(owner, Scale):
                v = torch.rand(shape, generator=g) + 0.5
            elif isinstance(owner, StarReLU):
                v = (torch.rand(shape, generator=g) * 0.5 + 0.5) if leaf == "scale" \
                    else torch.randn(shape, generator=g) * 0.1
            elif isinstance(owner, norm_types):
                v = torch.rand(shape, generator=g) + 0.5 if leaf == "weight" else torch.randn(shape, generator=g) * 0.1
            elif isinstance(owner, (nn.Conv2d, nn.Linear)):
                if leaf == "weight":
                    v = torch.randn(shape, generator=g) / math.sqrt(t[0].numel())
                else:
                    v = torch.randn(shape, generator=g) * 0.1
            else:
                raise RuntimeError(f"randomize_: no rule for state tensor {key!r}")
            t.copy_(v.to(t.dtype))
    return model


def save_original(model: nn.Module, path) -> None:
    """Save ``model.state_dict()`` as a plain state dict (like the release files)."""
    torch.save(model.state_dict(), path)
