"""Reference implementation of the original PoolFormer release (sail-sg/poolformer v1.0).

Clean-room, written from the paper (arXiv 2111.11418) and the release's model code: same
``state_dict()`` keys and shapes as the released checkpoints, and the same forward maths in eval
mode (no dropout / drop path). Tensors are NCHW throughout.

Public API:
    MODEL_NAMES                      -- the 10 supported names
    build(name, num_classes=1000)    -> nn.Module (eval mode)
    randomize_(model, seed)          -> model, every floating state tensor filled with O(1) random values
    save_original(model, path)       -- torch.save(model.state_dict(), path)
"""

import math

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "build", "randomize_", "save_original"]


# ----------------------------------------------------------------------------- parts

class ChannelLayerNorm(nn.Module):
    """LayerNorm over C alone at each position of an NCHW tensor, with weight and bias."""

    def __init__(self, num_channels, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def group_norm(num_channels):
    return nn.GroupNorm(1, num_channels, eps=1e-5)


class PatchEmbed(nn.Module):
    """Stem and downsampling: a single strided conv (key ``proj``), no norm."""

    def __init__(self, in_chans, embed_dim, kernel_size, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, padding)

    def forward(self, x):
        return self.proj(x)


class PosEmbed(nn.Module):
    """Learnable (1, C, H, W) position embedding added to the stage input (key ``pos_embed``)."""

    def __init__(self, dim, size):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, size, size))

    def forward(self, x):
        return x + self.pos_embed


class Pooling(nn.Module):
    def __init__(self, pool_size=3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class Attention(nn.Module):
    """Multi-head self attention over the flattened H*W tokens of an NCHW map."""

    def __init__(self, dim, head_dim=32):
        super().__init__()
        assert dim % head_dim == 0
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        t = x.flatten(2).transpose(1, 2)  # B, N, C
        qkv = self.qkv(t).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B, heads, N, hd
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        t = (attn @ v).transpose(1, 2).reshape(B, N, C)
        t = self.proj(t)
        return t.transpose(1, 2).reshape(B, C, H, W)


class SpatialFC(nn.Module):
    """One Linear(N, N, bias=False) over the flattened spatial axis (N = H*W fixed)."""

    def __init__(self, num_tokens):
        super().__init__()
        self.fc = nn.Linear(num_tokens, num_tokens, bias=False)

    def forward(self, x):
        B, C, H, W = x.shape
        return self.fc(x.flatten(2)).reshape(B, C, H, W)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, mixer, norm_layer, mlp_ratio=4, layer_scale_init=1e-5):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = mixer
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim))

    def forward(self, x):
        x = x + self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x))
        x = x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))
        return x


class OriginalPoolFormer(nn.Module):
    """Flat ``network`` list: stage, downsample, stage, ... with pos embeds as own entries."""

    def __init__(self, depths, dims, mixers, norm_layer, layer_scale_init, pos_embed_stage=None,
                 num_classes=1000, img_size=224):
        super().__init__()
        self.patch_embed = PatchEmbed(3, dims[0], 7, 4, 2)
        network = []
        for i in range(4):
            if pos_embed_stage == i:
                network.append(PosEmbed(dims[i], img_size // (4 * 2 ** i)))
            side = img_size // (4 * 2 ** i)
            blocks = [Block(dims[i], _make_mixer(mixers[i], dims[i], side * side), norm_layer,
                            4, layer_scale_init) for _ in range(depths[i])]
            network.append(nn.Sequential(*blocks))
            if i < 3:
                network.append(PatchEmbed(dims[i], dims[i + 1], 3, 2, 1))
        self.network = nn.ModuleList(network)
        self.norm = norm_layer(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        for m in self.network:
            x = m(x)
        return x

    def forward(self, x):
        x = self.forward_features(x)
        x = self.norm(x)  # norm on the whole final map, THEN average
        return self.head(x.mean([-2, -1]))


def _make_mixer(kind, dim, num_tokens):
    if kind == "pool":
        return Pooling(3)
    if kind == "id":
        return nn.Identity()
    if kind == "attn":
        return Attention(dim, head_dim=32)
    if kind == "fc":
        return SpatialFC(num_tokens)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- configs

_S = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))
_CFGS = {
    "poolformer_s12": dict(_S, mixers=("pool",) * 4, norm="gn", ls=1e-5),
    "poolformer_s24": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), mixers=("pool",) * 4, norm="gn", ls=1e-5),
    "poolformer_s36": dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512), mixers=("pool",) * 4, norm="gn", ls=1e-6),
    "poolformer_m36": dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768), mixers=("pool",) * 4, norm="gn", ls=1e-6),
    "poolformer_m48": dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768), mixers=("pool",) * 4, norm="gn", ls=1e-6),
    "metaformer_id_s12": dict(_S, mixers=("id",) * 4, norm="gn", ls=1e-5),
    "metaformer_pppa_s12_224": dict(_S, mixers=("pool", "pool", "pool", "attn"), norm="ln", ls=1e-5, pos=3),
    "metaformer_ppaa_s12_224": dict(_S, mixers=("pool", "pool", "attn", "attn"), norm="ln", ls=1e-5, pos=2),
    "metaformer_pppf_s12_224": dict(_S, mixers=("pool", "pool", "pool", "fc"), norm="gn", ls=1e-5),
    "metaformer_ppff_s12_224": dict(_S, mixers=("pool", "pool", "fc", "fc"), norm="gn", ls=1e-5),
}
MODEL_NAMES = tuple(_CFGS)

PARAM_COUNTS = {
    "poolformer_s12": 11_915_176,
    "poolformer_s24": 21_388_968,
    "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520,
    "poolformer_m48": 73_473_448,
    "metaformer_id_s12": 11_915_176,
    "metaformer_pppa_s12_224": 14_038_440,
    "metaformer_ppaa_s12_224": 16_535_592,
    "metaformer_pppf_s12_224": 11_919_978,
    "metaformer_ppff_s12_224": 12_150_474,
}


def build(name: str, num_classes: int = 1000) -> nn.Module:
    """Build an original-layout model by release name, in eval mode, with default init."""
    if name not in _CFGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    c = _CFGS[name]
    norm_layer = group_norm if c["norm"] == "gn" else (lambda d: ChannelLayerNorm(d, eps=1e-5))
    model = OriginalPoolFormer(c["depths"], c["dims"], c["mixers"], norm_layer, c["ls"],
                               pos_embed_stage=c.get("pos"), num_classes=num_classes)
    return model.eval()


# ----------------------------------------------------------------------------- helpers

def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every floating tensor of ``model.state_dict()`` with non-trivial random values.

    Values are drawn in float32 on CPU from a generator seeded with ``seed`` (so the result does
    not depend on the model's dtype/device) and copied in place:
      conv / linear weights N(0, 1/sqrt(fan_in)), their biases N(0, 0.1);
      norm weights U(0.5, 1.5), norm biases N(0, 0.1);
      layer scales U(0.5, 1.5) * 0.3; position embeddings N(0, 0.5).
    """
    g = torch.Generator().manual_seed(int(seed))
    modules = dict(model.named_modules())
    norm_types = (nn.GroupNorm, nn.LayerNorm, ChannelLayerNorm)
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(t):
                continue
            prefix, _, leaf = key.rpartition(".")
            owner = modules.get(prefix)
            shape = t.shape
            if "layer_scale" in leaf:
                v = (torch.rand(shape, generator=g) + 0.5) * 0.3
            elif leaf == "pos_embed":
                v = torch.randn(shape, generator=g) * 0.5
            elif isinstance(owner, norm_types):
                v = torch.rand(shape, generator=g) + 0.5 if leaf == "weight" else torch.randn(shape, generator=g) * 0.1
            elif isinstance(owner, (nn.Conv2d, nn.Linear)):
                if leaf == "weight":
                    fan_in = t[0].numel()
                    v = torch.randn(shape, generator=g) / math.sqrt(fan_in)
                else:
                    v = torch.randn(shape, generator=g) * 0.1
            else:
                raise RuntimeError(f"randomize_: no rule for state tensor {key!r}")
            t.copy_(v.to(t.dtype))
    return model


def save_original(model: nn.Module, path) -> None:
    """Save ``model.state_dict()`` as a plain state dict (like the release files)."""
    torch.save(model.state_dict(), path)
