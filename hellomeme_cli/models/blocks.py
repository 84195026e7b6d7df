"""Spatial Knitting attention blocks of HelloMeme v1 (official `hm_blocks.py`).

Spatial Knitting attends along rows, then along columns, so an H x W feature map
costs O(H W (H + W)) attention instead of O((H W)^2). Parameter names match the
released checkpoints exactly.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from torch import nn


def _attention(query_dim: int, heads: int, cross_attention_dim: int | None = None) -> Attention:
    return Attention(
        query_dim=query_dim,
        heads=heads,
        dim_head=query_dim // heads,
        dropout=0.0,
        bias=False,
        cross_attention_dim=cross_attention_dim,
        upcast_attention=False,
        out_bias=True,
    )


def _channels_last_tokens(x: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h, w, c)."""
    return x.permute(0, 2, 3, 1)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b*f, c, h, w), frames of one sample kept together."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def _batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b*f, c, h, w) -> (b, c, f, h, w)."""
    n, c, h, w = x.shape
    return x.reshape(n // frames, frames, c, h, w).transpose(1, 2)


def _per_frame(reference: torch.Tensor, batch_frames: int, num_frames: int) -> torch.Tensor:
    """A per-sample reference entry (b, ...) repeated for every frame (b*f, ...)."""
    return reference if reference.shape[0] == batch_frames else reference.repeat_interleave(num_frames, dim=0)


class ResidualDownBlock(nn.Module):
    """torchvision's `BasicBlock` at stride 2 with instance norm and a SiLU 1x1 shortcut.

    The official control nets build it from torchvision; it is written out here so
    the product does not depend on torchvision (there is no CPU build of it).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.InstanceNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.InstanceNorm2d(out_channels)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=2, bias=False),
            nn.InstanceNorm2d(out_channels),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class SKCrossAttention(nn.Module):
    """Spatial Knitting cross-attention: a strided residual block, then every row and
    every column of the map attends to the expression tokens (official `SKCrossAttention`).

    The tokens are the same for every row of one image, so attending row by row
    equals attending over all pixels at once with row-wise positions; that is how
    it is computed here, without repeating the tokens h (or w) times.
    """

    def __init__(
        self,
        channel_in: int,
        channel_out: int,
        heads: int = 8,
        cross_attention_dim: int = 320,
        num_positional_embeddings: int = 64,
        num_positional_embeddings_hidden: int = 64,
    ):
        super().__init__()
        self.conv = ResidualDownBlock(channel_in, channel_out)
        self.pos_embed = SinusoidalPositionalEmbedding(channel_out, max_seq_length=num_positional_embeddings)
        self.pos_embed_hidden = SinusoidalPositionalEmbedding(
            cross_attention_dim, max_seq_length=num_positional_embeddings_hidden
        )
        self.norm1 = nn.LayerNorm(channel_out)
        self.attn1 = _attention(channel_out, heads, cross_attention_dim)
        self.norm2 = nn.LayerNorm(channel_out)
        self.attn2 = _attention(channel_out, heads, cross_attention_dim)
        self.ff = FeedForward(
            channel_out, dropout=0.0, activation_fn="geglu", final_dropout=False, inner_dim=channel_out * 2, bias=True
        )
        self.proj = nn.Conv2d(channel_out, channel_out, kernel_size=3, padding=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x: (n, c_in, H, W); tokens: (n, L, cross_attention_dim) -> (n, c_out, H/2, W/2)."""
        x = self.conv(x)
        n, c, h, w = x.shape
        tokens = self.pos_embed_hidden(tokens)
        positions = self.pos_embed.pe[0]

        # rows: each pixel carries the position of its column
        x = _channels_last_tokens(x) + positions[:w]
        x = self.attn1(self.norm1(x.reshape(n, h * w, c)), tokens).reshape(n, h, w, c)
        # columns: each pixel carries the position of its row
        x = x + positions[:h, None]
        x = self.ff(self.attn2(self.norm2(x.reshape(n, h * w, c)), tokens))
        return self.proj(x.reshape(n, h, w, c).permute(0, 3, 1, 2))


class SKReferenceAttention(nn.Module):
    """Spatial Knitting reference attention (official `SKReferenceAttention`).

    Each row of the denoiser's features attends over itself concatenated with the
    same row of the reference features; then each column of that result attends
    over itself concatenated with the reference column. Only the denoiser's half of
    each output is kept, so only that half is computed as queries.
    """

    def __init__(self, in_channels: int, num_attention_heads: int = 1, num_positional_embeddings: int = 64 * 2):
        super().__init__()
        self.pos_embed = SinusoidalPositionalEmbedding(in_channels, max_seq_length=num_positional_embeddings)
        self.attn1 = _attention(in_channels, num_attention_heads)
        self.attn2 = _attention(in_channels, num_attention_heads)
        self.norm = nn.LayerNorm(in_channels)
        self.proj = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor, reference: torch.Tensor, num_frames: int) -> torch.Tensor:
        """hidden_states: (b*f, c, h, w); reference: (b, c, h, w) or (b*f, c, h, w)."""
        n, c, h, w = hidden_states.shape
        reference = _per_frame(reference, n, num_frames)

        rows = torch.cat([hidden_states, reference], dim=3)  # n, c, h, 2w
        rows = self.norm(self.pos_embed(_channels_last_tokens(rows).reshape(n * h, 2 * w, c)))
        rows = self.attn1(rows[:, :w], rows)  # (n h), w, c

        cols = torch.cat([rows.reshape(n, h, w, c), _channels_last_tokens(reference)], dim=1)  # n, 2h, w, c
        cols = self.norm(self.pos_embed(cols.transpose(1, 2).reshape(n * w, 2 * h, c)))
        cols = self.attn2(cols[:, :h], cols)  # (n w), h, c

        cols = cols.reshape(n, w, h, c).permute(0, 3, 2, 1)
        return hidden_states + self.proj(cols)
