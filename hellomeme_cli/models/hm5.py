"""HelloMeme v5, v5b and v5c networks (official `hm_blocks.py`, `hm_adapters.py`,
`hm_control.py`, `hm3_denoising_3d.py`), loadable from the released folders
(`songkey/hm5_reference`, `hm5b_reference`, `hm5c_reference`, `hm5_motion`,
`hm5_control_base`, `hm5_control_proj`, `hm5c_control_proj`).

v5 replaces v1's modules wholesale: one control net for either expression encoding
(`HM5ControlNetBase`) whose 4 feature maps `HM5SD15ControlProj` turns into 8 UNet
residuals, reference attention only at the 4 up-block inputs, and a motion module
(`HM5MotionAdapter`) inside the same 2D UNet instead of AnimateDiff's motion UNet.
Position embeddings are computed on the fly (`linear_position_embedding`).

The UNet wrappers put the v3 forward hooks on diffusers' own `UNet2DConditionModel`
blocks (`hm3_unet.HM3InjectionPoints`), acting where the official
`HM3Denoising3D.forward` does:

- after down block i: cache `down_i`; add control `down3_i` (the block's last skip
  sees it too, as the official in-place add); then `motion_down[i]` (the skip keeps
  the pre-motion value);
- before up block i: cache `up_i`; add control `up3_i`; `reference_modules_up[i]`;
  `motion_up[i]`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from hellomeme_cli.models.blocks import _attention, _batch_to_frames, _channels_last_tokens, _frames_to_batch, _per_frame
from hellomeme_cli.models.hm3 import _UpBlockReferenceAdapter
from hellomeme_cli.models.hm3_unet import HM3InjectionPoints
# v4's projectors, feature maps and injection points, token mixer, U-Net and its cross-attention
from hellomeme_cli.models.hm4 import (
    CONTROL_HEADS,
    PROJECTIONS,
    SmallUnet,
    _MixedTokenControlNet,
    _projector_widths,
    _STKCrossAttentionBase,
)
from hellomeme_cli.models.unet import ControlFeatures, DenoiserForward, HookedUNet, ReferenceCache, _Call, load_folder

# The official reference attention's unused time projection is sized for SD1.5's time embedding.
SD15_TIME_EMBED_DIM = 1280
LEVELS = 4  # down outputs and up inputs the v5 modules act at


def linear_position_embedding(length: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """HelloMeme's `get_posembed_linear`: (length, dim) = [sin(pos·omega) | cos(pos·omega)],
    omega_i = 10000^(-i/(dim/2)), computed in float32."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), omega)
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(device=device, dtype=dtype)


def _position(length: int, like: torch.Tensor) -> torch.Tensor:
    return linear_position_embedding(length, like.shape[-1], like.dtype, like.device)


class STKAttentionV5(nn.Module):
    """Rows then columns attend over themselves, optionally concatenated with a
    reference's rows / columns (official `STKAttentionV5` without time embedding or
    temporal attention, the form every v5 module uses). Only the input's half of each
    concatenated sequence is kept, so only that half is computed as queries."""

    def __init__(self, in_channels: int, mid_channels: int, num_attention_heads: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1)
        self.attnx = _attention(mid_channels, num_attention_heads)
        self.attny = _attention(mid_channels, num_attention_heads)
        self.norm = nn.LayerNorm(mid_channels)
        self.proj = nn.Conv2d(mid_channels, in_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None, residual: bool = True) -> torch.Tensor:
        """x, reference: (n, c, h, w) -> (n, c, h, w)."""
        n, _, h, w = x.shape
        rows = _channels_last_tokens(self.conv_in(x))  # n, h, w, m
        ref = None if reference is None else _channels_last_tokens(self.conv_in(reference))
        m = rows.shape[-1]

        keys = rows if ref is None else torch.cat([rows, ref], dim=2)  # n, h, (2)w, m
        keys = self.norm(keys + _position(keys.shape[2], keys))
        keys = keys.reshape(n * h, -1, m)
        rows = self.attnx(keys[:, :w], keys).reshape(n, h, w, m)

        keys = rows if ref is None else torch.cat([rows, ref], dim=1)  # n, (2)h, w, m
        keys = keys.transpose(1, 2)  # n, w, (2)h, m
        keys = self.norm(keys + _position(keys.shape[2], keys))
        keys = keys.reshape(n * w, -1, m)
        cols = self.attny(keys[:, :h], keys).reshape(n, w, h, m)

        out = self.proj(cols.permute(0, 3, 2, 1))
        return x + out if residual else out


class STKCrossAttentionV5(_STKCrossAttentionBase):
    """v4's control cross-attention with HelloMeme's linear positions, computed on the
    fly (official `STKCrossAttentionV5`)."""

    def _pixel_positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        return _position(length, like)

    def _token_positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        return _position(length, like)


class HM5ControlNetBase(_MixedTokenControlNet):
    """v5 (HF `songkey/hm5_control_base`, shared by v5, v5b and v5c): v4's control base
    with `STKCrossAttentionV5`, for any condition size that is a multiple of 8.

    `mid_channels` / `out_channels` are not in the released config.json (the official
    class hard-codes them); their defaults are the release's.
    """

    condition_multiple = 8

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        cross_attention_dim: int = 2048,
        mid_channels: tuple[int, ...] = (320, 640, 1280),
        out_channels: int = 320,
    ):
        super().__init__()
        self._build_token_projections(cross_attention_dim)
        self.ctrl_attn = SmallUnet(in_channels, out_channels, tuple(mid_channels), cross_attention_dim, STKCrossAttentionV5)


class HMProjector(nn.Module):
    """3x3 conv to the UNet width, then row/column self-attention with residual
    (official `HMProjector`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.attn = STKAttentionV5(out_channels, out_channels // 4, CONTROL_HEADS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(b, c_in, f, h, w) -> (b, c_out, f, h, w)."""
        frames = features.shape[2]
        return _batch_to_frames(self.attn(self.proj(_frames_to_batch(features))), frames)


# v4's projectors in the order v5 has always built them, which the random
# initialisation (of the tiny test weights) follows.
PROJECTOR_CONSTRUCTION_ORDER = (
    "map640_to_640",
    "map640_to_1280",
    "map320_to_320",
    "map320_to_640",
    "map320_to_1280",
    "map1280_to_1280",
    "map1280_to_1280_2",
    "map1280_to_1280_3",
)


class HM5SD15ControlProj(ModelMixin, ConfigMixin):
    """The control net's 4 feature maps -> 8 UNet residuals: `down3_i` added after down
    block i, `up3_i` before up block i, each (b, c, f, h', w') (HF
    `songkey/hm5_control_proj`, v5c `songkey/hm5c_control_proj`).

    The projector names are the official ones (they spell SD1.5's widths). The released
    config.json is empty; the width arguments default to the release's.
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        mid_channels: tuple[int, ...] = (320, 640, 1280),
        out_channels: int = 320,
    ):
        super().__init__()
        m0, m1, m2 = mid_channels
        feature_widths = {"feat_0": m2, "feat_1": m1, "feat_2": m0, "feat_3": out_channels}  # HM5ControlNetBase's
        widths = _projector_widths(feature_widths, block_out_channels)
        for name in PROJECTOR_CONSTRUCTION_ORDER:
            self.add_module(name, HMProjector(*widths[name]))

    def forward(self, features: dict[str, torch.Tensor]) -> ControlFeatures:
        """{"feat_0".."feat_3"} from HM5ControlNetBase -> {"down3_0".."down3_3", "up3_0".."up3_3"}."""
        return {key: getattr(self, projector)(features[feat]) for projector, (feat, key) in PROJECTIONS.items()}


class SKReferenceAttentionV5(nn.Module):
    """v5 reference attention (official `SKReferenceAttentionV5`): rows of the hidden
    states attend over themselves and the reference's rows, then columns over
    themselves and the reference's columns; hidden + 3x3 conv of the result.

    The official column pass adds the position embedding of the *row* length (2w),
    which fails unless h == w; the columns here get their own length (2h), the same
    for square inputs. `time_emb_proj` is in the released weights but never used.
    """

    def __init__(
        self, in_channels: int, num_attention_heads: int = 1, blocks_time_embed_dim: int = SD15_TIME_EMBED_DIM
    ):
        super().__init__()
        self.time_emb_proj = nn.Linear(blocks_time_embed_dim, in_channels)
        self.attn1 = _attention(in_channels, num_attention_heads)
        self.attn2 = _attention(in_channels, num_attention_heads)
        self.norm = nn.LayerNorm(in_channels)
        self.proj = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        """hidden_states: (b*f, c, h, w); reference: (b, c, h, w) or (b*f, c, h, w)."""
        n, c, h, w = hidden_states.shape
        ref = _channels_last_tokens(_per_frame(reference, n, num_frames))  # n, h, w, c

        keys = torch.cat([_channels_last_tokens(hidden_states), ref], dim=2)  # n, h, 2w, c
        keys = self.norm(keys + _position(2 * w, keys)).reshape(n * h, 2 * w, c)
        rows = self.attn1(keys[:, :w], keys).reshape(n, h, w, c)

        keys = torch.cat([rows, ref], dim=1).transpose(1, 2)  # n, w, 2h, c
        keys = self.norm(keys + _position(2 * h, keys)).reshape(n * w, 2 * h, c)
        cols = self.attn2(keys[:, :h], keys).reshape(n, w, h, c)
        return hidden_states + self.proj(cols.permute(0, 3, 2, 1))


class STKReferenceModule(nn.Module):
    """v5b / v5c reference attention (official `STKReferenceModule`): the reference
    first passes through its own row/column self-attention (`attn_ref`, no residual),
    then the hidden states attend over themselves and that (`attn`, residual)."""

    def __init__(self, in_channels: int, num_attention_heads: int = 1):
        super().__init__()
        self.attn_ref = STKAttentionV5(in_channels, in_channels, num_attention_heads)
        self.attn = STKAttentionV5(in_channels, in_channels, num_attention_heads)

    def forward(self, hidden_states: torch.Tensor, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        """hidden_states: (b*f, c, h, w); reference: (b, c, h, w) or (b*f, c, h, w)."""
        # attn_ref acts per image, so it runs once per sample, before the per-frame copies.
        reference = _per_frame(self.attn_ref(reference, residual=False), hidden_states.shape[0], num_frames)
        return self.attn(hidden_states, reference)


class HM5ReferenceAdapter(_UpBlockReferenceAdapter):
    """v5 (HF `songkey/hm5_reference`): `SKReferenceAttentionV5` at up blocks 0..3."""

    reference_module = SKReferenceAttentionV5


class HM5bReferenceAdapter(_UpBlockReferenceAdapter):
    """v5b and v5c (HF `songkey/hm5b_reference`, `songkey/hm5c_reference`):
    `STKReferenceModule` at up blocks 0..3."""

    reference_module = STKReferenceModule


class SKMotionModuleV5(nn.Module):
    """Temporal attention over the frames (official `SKMotionModuleV5`): with pad states,
    first over [pad frame 0, the frames, pad frame 1] (`attn_pad`, whose output is added
    to the input hidden states once more: the official 2·hidden + delta), then over the
    frames alone (`attn1`). Both are diffusers' AnimateDiff transformers."""

    def __init__(self, in_channels: int, num_attention_heads: int = 8):
        super().__init__()

        # Alike in shape only to blocks._attention: each spells out one diffusers block's settings.
        def transformer() -> AnimateDiffTransformer3D:
            return AnimateDiffTransformer3D(
                in_channels=in_channels,
                num_attention_heads=num_attention_heads,
                attention_head_dim=in_channels // num_attention_heads,
                dropout=0.0,
                double_self_attention=True,
                positional_embeddings="sinusoidal",
                num_positional_embeddings=32,
            )

        self.attn1 = transformer()
        self.attn_pad = transformer()

    def forward(self, hidden_states: torch.Tensor, pad_states: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """hidden_states (b*f, c, h, w); pad_states (b, c, 2, h, w) or None."""
        x = hidden_states
        if pad_states is not None:
            frames = _batch_to_frames(hidden_states, num_frames)
            padded = torch.cat([pad_states[:, :, :1].to(x.dtype), frames, pad_states[:, :, -1:].to(x.dtype)], dim=2)
            padded = self.attn_pad(_frames_to_batch(padded), num_frames=num_frames + 2)
            padded = _batch_to_frames(padded, num_frames + 2)
            x = _frames_to_batch(padded[:, :, 1:-1]) + hidden_states
        return self.attn1(x, num_frames=num_frames)


class HM5MotionAdapter(ModelMixin, ConfigMixin):
    """Motion modules after every down block (`motion_down`) and at the input of every up
    block (`motion_up`) of the 2D UNet (HF `songkey/hm5_motion`, v5 and v5b video)."""

    @register_to_config
    def __init__(
        self,
        block_down_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        block_up_channels: tuple[int, ...] = (1280, 1280, 1280, 640),
        num_attention_heads: int = 8,
    ):
        super().__init__()
        self.motion_down = nn.ModuleList(SKMotionModuleV5(c, num_attention_heads) for c in block_down_channels)
        self.motion_up = nn.ModuleList(SKMotionModuleV5(c, num_attention_heads) for c in block_up_channels)


@dataclasses.dataclass
class _HM5Call(_Call):
    """What the v3 hooks do during one v5 UNet forward: `_Call`'s, and the v5 motion
    modules, with or without motion pads."""

    motion_adapter: HM5MotionAdapter | None = None  # set only when this call runs the motion modules
    motion_pads: ReferenceCache | None = None

    def motion(self, modules: str, idx: int, hidden: torch.Tensor, temb: torch.Tensor, key: str) -> torch.Tensor:
        """The v5 motion modules take no time embedding."""
        if self.motion_adapter is None:
            return hidden
        pad = None if self.motion_pads is None else self.motion_pads[key]
        return getattr(self.motion_adapter, modules)[idx](hidden, pad, self.num_frames)


class _V5HookedUNet(HookedUNet):
    """A UNet of SD1.5's layout with the v3 injection points, which v5 acts at too."""

    injection_points = HM3InjectionPoints

    def __init__(self, unet: UNet2DConditionModel):
        if len(unet.down_blocks) != LEVELS or len(unet.up_blocks) != LEVELS:
            raise ValueError(f"HelloMeme v5 needs a UNet with {LEVELS} down and {LEVELS} up blocks (SD1.5 layout)")
        super().__init__(unet)


class HM5ReferenceNet(_V5HookedUNet):
    """The SD1.5 UNet at t = 0 on a reference latent; returns the 8 features it caches
    (`down_0..3` after each down block, `up_0..3` entering each up block), each
    (b, c, h', w') (official `unet_ref`). v5c also gives it the reference's own control,
    added as in the denoiser; each entry is taken before its own level's residual."""

    @classmethod
    def from_pretrained(cls, unet_path: str | Path, **kwargs) -> "HM5ReferenceNet":
        return cls(load_folder(UNet2DConditionModel, unet_path, **kwargs))

    def forward(
        self, ref_latents: torch.Tensor, text_embeds: torch.Tensor, control: ControlFeatures | None = None
    ) -> ReferenceCache:
        """ref_latents (b, 4, h, w) or (b, 4, 1, h, w), already scaled; text_embeds (b, 77, C);
        control (v5c): HM5SD15ControlProj of the reference's pose and expression, (b, c, 1, h', w')."""
        return self._capture(ref_latents, text_embeds, _HM5Call(control=control))


def motion_pad_states(first: ReferenceCache, last: ReferenceCache) -> ReferenceCache:
    """The reference net's caches of a window's first and last frame -> the denoiser's
    `motion_pad`: each entry (b, c, 2, h', w')."""
    return {key: torch.stack([first[key], last[key]], dim=2) for key in first}


class HM5DenoisingNet(DenoiserForward, _V5HookedUNet):
    """The v5-family denoiser: the SD1.5 UNet with the reference attentions, the 8
    control residuals and (video) the motion modules injected. Frames are folded into
    the batch; inputs and outputs are (b, c, f, h, w)."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        reference_adapter: HM5ReferenceAdapter | HM5bReferenceAdapter | None = None,
        motion_adapter: HM5MotionAdapter | None = None,
    ):
        super().__init__(unet)
        self.reference_adapter = reference_adapter
        self.motion_adapter = motion_adapter

    @classmethod
    def from_pretrained(
        cls,
        unet_path: str | Path,
        reference_path: str | Path | None,
        motion_path: str | Path | None = None,
        version: str = "v5",
        **kwargs,
    ) -> "HM5DenoisingNet":
        """Load the official folders: a diffusers UNet, the version's reference adapter
        (`hm5_reference`, `hm5b_reference` or `hm5c_reference`) and, for video, `hm5_motion`."""
        if version not in REFERENCE_ADAPTERS:
            raise ValueError(f"HM5DenoisingNet version {version!r} is none of {', '.join(REFERENCE_ADAPTERS)}")
        unet = load_folder(UNet2DConditionModel, unet_path, **kwargs)
        adapter = load_folder(REFERENCE_ADAPTERS[version], reference_path, **kwargs) if reference_path else None
        motion = load_folder(HM5MotionAdapter, motion_path, **kwargs) if motion_path else None
        return cls(unet, adapter, motion)

    def _call(
        self,
        num_frames: int,
        reference: ReferenceCache | None,
        control: ControlFeatures | None,
        motion_pad: ReferenceCache | None = None,
        use_motion: bool = False,
    ) -> _HM5Call:
        """reference from HM5ReferenceNet; control from HM5SD15ControlProj; motion_pad: all 8
        entries (b, c, 2, h', w') (see `motion_pad_states`), used with `use_motion`."""
        if reference is not None and self.reference_adapter is None:
            raise ValueError("HM5DenoisingNet: a reference cache needs a reference adapter (hm5_reference)")
        if use_motion and self.motion_adapter is None:
            raise ValueError("HM5DenoisingNet: use_motion needs a motion adapter (hm5_motion)")
        if use_motion and motion_pad is not None:
            missing = [f"{p}_{i}" for p in ("down", "up") for i in range(LEVELS) if f"{p}_{i}" not in motion_pad]
            if missing:
                raise ValueError(f"HM5DenoisingNet: motion_pad lacks {', '.join(missing)}")
        return _HM5Call(
            num_frames=num_frames, adapter=self.reference_adapter, reference=reference, control=control,
            motion_adapter=self.motion_adapter if use_motion else None, motion_pads=motion_pad if use_motion else None,
        )


# Which reference adapter each version's denoiser loads (v5c: v5b's class, its own weights).
REFERENCE_ADAPTERS = {"v5": HM5ReferenceAdapter, "v5b": HM5bReferenceAdapter, "v5c": HM5bReferenceAdapter}
