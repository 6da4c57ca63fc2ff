"""The GLM-4.1V vision tower: a ViT over 14x14 (x2 frames) patches with 2D rotary and interpolated
absolute position embeddings, then a 2x2 downsample and a patch merger into the text model's width.

Module names follow the checkpoint (`model.visual.*`). Images are independent: each attends only to its
own patches, so running images one at a time or together gives the same embeddings.

Patch order (as the image processor writes `pixel_values`): for each image, 2x2 merge windows in row-major
order, and inside a window its four patches row-major. Four consecutive patches therefore become one
image token after the downsample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.errors import ModelLoadError
from loom.layers.activation import SiluAndMul
from loom.layers.linear import Linear, MergedLinear
from loom.layers.norm import RMSNorm
from loom.models.config import VisionConfig


def window_positions(h: int, w: int, merge: int) -> torch.Tensor:
    """[h * w, 2] (row, column) of each patch of an h x w grid, in merge-window order."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: windows row-major, patches row-major inside each
    return torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionPatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride over one patch: a linear map of the flattened patch. Kept as
    a Conv3d weight ([out, C, T, P, P], the checkpoint's shape) and applied as a matmul."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel)
        self.proj.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_patches, C * T * P * P] -> [num_patches, hidden]."""
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1), self.proj.bias)


class VisionEmbeddings(nn.Module):
    """Learned absolute positions for a square grid (24 x 24 for 336-pixel images), resampled bicubically to
    each image's own grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.side**2, cfg.hidden_size)
        self.position_embedding.requires_grad_(False)

    def forward(self, h: int, w: int, positions: torch.Tensor) -> torch.Tensor:
        """[h * w, hidden] position embeddings of an h x w grid's patches at `positions` ([n, 2] rows, cols)."""
        weight = self.position_embedding.weight
        table = weight.view(self.side, self.side, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, D, s, s]
        # Sample at patch centres, in grid_sample's [-1, 1] coordinates (x is the column).
        pos = positions.to(weight.device, torch.float32)
        x = (pos[:, 1] + 0.5) / w * 2 - 1
        y = (pos[:, 0] + 0.5) / h * 2 - 1
        grid = torch.stack((x, y), dim=-1).view(1, -1, 1, 2)
        out = F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return out.view(out.shape[1], -1).t().to(weight.dtype)  # [n, D]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [n, hidden], the patches of ONE image; cos, sin: [n, head_dim]. Full (non-causal) attention."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [n, H, D]
        # Rotary in float32 whatever the activations' dtype, as the reference does.
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        # 4-D [1, H, n, D]: with 3-D inputs CPU SDPA takes its unfused math path (3-8x slower here).
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)[0]
        return self.proj(out.transpose(0, 1).reshape(n, -1))  # [H, n, D] -> [n, H * D]


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, [intermediate] * 2, [0, 1])
        self.down_proj = Linear(intermediate, hidden)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        # The block MLP's width is the text model's (out_hidden_size), as in the checkpoint.
        self.mlp = VisionMLP(cfg.hidden_size, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.proj = Linear(dim, dim)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.post_projection_norm.requires_grad_(False)
        self.gate_up_proj = MergedLinear(dim, [context_dim] * 2, [0, 1])
        self.down_proj = Linear(context_dim, dim)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Glm4vVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ModelLoadError(
                f"vision hidden_act {cfg.hidden_act!r} is not supported (GLM-4.1V uses silu)"
            )
        self.config = cfg
        self.merge = cfg.spatial_merge_size
        self.patch_embed = VisionPatchEmbed(cfg)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embeddings = VisionEmbeddings(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.downsample = nn.Conv2d(cfg.hidden_size, cfg.out_hidden_size, self.merge, stride=self.merge)
        self.downsample.requires_grad_(False)
        self.merger = VisionPatchMerger(cfg.out_hidden_size, cfg.intermediate_size)
        head_dim = cfg.hidden_size // cfg.num_heads
        # 2D rotary over head_dim / 2 pairs: the first half turn with the patch's row, the rest with its column.
        dim = head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """pixel_values: [sum of t*h*w, C * T * P * P] as the image processor lays them out; grid_thw: each
        image's (t, h, w) in patches. Returns one [t * h * w / merge^2, out_hidden] tensor per image."""
        patches = self.post_conv_layernorm(self.patch_embed(pixel_values))
        outs, start = [], 0
        for t, h, w in grid_thw:
            if t != 1:
                raise ValueError(f"only still images (t = 1) are supported, got a grid of t = {t}")
            n = h * w
            outs.append(self._encode(patches[start : start + n], h, w))
            start += n
        if start != patches.shape[0]:
            raise ValueError(f"grid_thw covers {start} patches but pixel_values has {patches.shape[0]}")
        return outs

    def _encode(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        positions = window_positions(h, w, self.merge).to(x.device)  # [n, 2]
        x = x + self.embeddings(h, w, positions).to(x.dtype)
        angles = (positions.unsqueeze(-1).float() * self.inv_freq).flatten(1)  # [n, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)  # [n, head_dim]
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.post_layernorm(x)
        # Each merge x merge window of patches -> one token: [n / m^2, D, m, m] -> [n / m^2, out]
        x = x.view(-1, self.merge, self.merge, x.shape[-1]).permute(0, 3, 1, 2)
        x = F.linear(x.flatten(1), self.downsample.weight.flatten(1), self.downsample.bias)
        return self.merger(x)
