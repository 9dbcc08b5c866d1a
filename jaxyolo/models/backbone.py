"""A YOLOv8-style CSP backbone + PAN neck with width/depth multipliers.

``Backbone(size=...)`` maps images ``(B, S_h, S_w, 3)`` (float, 0..1) to three
feature maps at strides 8, 16, 32: ``[(B, S_h/8, S_w/8, C3), (B, S_h/16,
S_w/16, C4), (B, S_h/32, S_w/32, C5)]``; ``backbone.out_channels`` is
``(C3, C4, C5)``.  Image sides must be multiples of 32.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxyolo.models.layers import C2f, SPPF, ConvBnAct, make_divisible, upsample2x

__all__ = ["ModelSize", "MODEL_SIZES", "Backbone", "STRIDES"]

STRIDES = (8, 16, 32)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Width/depth multipliers on the YOLOv8 base (64..1024 channels, 3/6/6/3 repeats)."""

    width: float
    depth: float
    max_channels: int = 1024

    def channels(self, c: int) -> int:
        """Scaled channel count, rounded up to a multiple of 8 (upstream ``make_divisible``)."""
        return make_divisible(min(c, self.max_channels) * self.width, 8)

    def repeats(self, n: int) -> int:
        return max(round(n * self.depth), 1)


MODEL_SIZES = {
    "pico": ModelSize(width=0.125, depth=0.33),  # 8..128 channels: a laptop CPU trains it in minutes
    "nano": ModelSize(width=0.25, depth=0.33),  # YOLOv8n
    "small": ModelSize(width=0.5, depth=0.33),  # YOLOv8s
}


def resolve_size(size) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)} or a ModelSize, got {size!r}")
    return MODEL_SIZES[size]


class Backbone(nnx.Module):
    """CSPDarknet (C2f blocks, SPPF) + PAN neck producing P3/P4/P5 features."""

    def __init__(self, size="nano", *, in_channels: int = 3, rngs: nnx.Rngs):
        sz = resolve_size(size)
        c = sz.channels
        n = sz.repeats
        c1, c2, c3, c4, c5 = c(64), c(128), c(256), c(512), c(1024)
        self.stem = ConvBnAct(in_channels, c1, 3, 2, rngs=rngs)  # /2
        self.down2 = ConvBnAct(c1, c2, 3, 2, rngs=rngs)  # /4
        self.c2f2 = C2f(c2, c2, n(3), shortcut=True, rngs=rngs)
        self.down3 = ConvBnAct(c2, c3, 3, 2, rngs=rngs)  # /8
        self.c2f3 = C2f(c3, c3, n(6), shortcut=True, rngs=rngs)
        self.down4 = ConvBnAct(c3, c4, 3, 2, rngs=rngs)  # /16
        self.c2f4 = C2f(c4, c4, n(6), shortcut=True, rngs=rngs)
        self.down5 = ConvBnAct(c4, c5, 3, 2, rngs=rngs)  # /32
        self.c2f5 = C2f(c5, c5, n(3), shortcut=True, rngs=rngs)
        self.sppf = SPPF(c5, c5, 5, rngs=rngs)
        # PAN neck: top-down then bottom-up.
        self.td4 = C2f(c5 + c4, c4, n(3), rngs=rngs)
        self.td3 = C2f(c4 + c3, c3, n(3), rngs=rngs)
        self.bu3 = ConvBnAct(c3, c3, 3, 2, rngs=rngs)
        self.bu4 = C2f(c3 + c4, c4, n(3), rngs=rngs)
        self.bu4_down = ConvBnAct(c4, c4, 3, 2, rngs=rngs)
        self.bu5 = C2f(c4 + c5, c5, n(3), rngs=rngs)
        self.out_channels = (c3, c4, c5)
        self.strides = STRIDES

    def __call__(self, x):
        import jax.numpy as jnp

        if x.ndim != 4 or x.shape[-1] != self.stem.conv.in_features:
            raise ValueError(f"images must be (B, H, W, {self.stem.conv.in_features}), got {tuple(x.shape)}")
        if x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {x.shape[1]}x{x.shape[2]}")
        x = self.c2f2(self.down2(self.stem(x)))
        p3 = self.c2f3(self.down3(x))
        p4 = self.c2f4(self.down4(p3))
        p5 = self.sppf(self.c2f5(self.down5(p4)))
        h4 = self.td4(jnp.concatenate([upsample2x(p5), p4], axis=-1))
        o3 = self.td3(jnp.concatenate([upsample2x(h4), p3], axis=-1))
        o4 = self.bu4(jnp.concatenate([self.bu3(o3), h4], axis=-1))
        o5 = self.bu5(jnp.concatenate([self.bu4_down(o4), p5], axis=-1))
        return [o3, o4, o5]
