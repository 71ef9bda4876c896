"""dpir-tiny in PyTorch, module for module as docs/ARCHITECTURE.md describes the graph.

Parameter names are the real checkpoint layouts, so `state_dict()` is what gets exported:
- `Mmdit`: SD3's original `mmdit.py` names (`joint_blocks.{i}.x_block.attn.qkv`, ...).
- `Encoder` / `Decoder`: LDM AutoencoderKL names (`down.{i}.block.{j}.norm1`, ...), as
  stored under `encoder.` / `decoder.` in the SD3 VAE.
- `ClipVision`: Hugging Face `CLIPVisionModel` names under `vision_model.`.
- `LqBranch`, `PromptMlp`: our DPIR names (`lq_branch.*`, `local_prompt.*`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

# SD3's latent normalisation; dpir-tiny's VAE is trained to match it (see train.py).
VAE_SCALE = 1.5305
VAE_SHIFT = 0.0609

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TinyConfig:
    # VAE (SD3 layout, fewer channels)
    vae_channels: list = field(default_factory=lambda: [32, 64, 128, 128])
    vae_layers: int = 2
    latent: int = 16
    # MMDiT: SD3 convention heads = depth; hidden = 64 * depth unless set (head dim 64)
    depth: int = 4
    hidden: int = 0
    mlp_hidden: int = 512
    patch: int = 2
    pos_max: int = 16  # = training grid (256 px crops); the engine tiles 512 px images at 256 px
    context_dim: int = 256
    pooled_dim: int = 256
    freq_dim: int = 256
    # CLIP vision
    clip_width: int = 256
    clip_layers: int = 4
    clip_heads: int = 4
    clip_patch: int = 16
    clip_image: int = 112
    clip_mlp: int = 1024
    # DPIR parts
    lq_channels: int = 64
    lq_convs: int = 3
    local_hidden: int = 256
    global_hidden: int = 256
    gate_init: float = 0.5

    def __post_init__(self):
        if self.hidden == 0:
            self.hidden = 64 * self.depth

    @property
    def heads(self) -> int:
        return self.depth

    def to_dict(self) -> dict:
        return asdict(self)


def toy_config() -> TinyConfig:
    """A very small config for tests (same structure, fewer channels)."""
    return TinyConfig(vae_channels=[32, 32], vae_layers=1, depth=2, mlp_hidden=64, pos_max=8,
                      context_dim=32, pooled_dim=32, freq_dim=32, clip_width=64,
                      clip_layers=2, clip_heads=1, clip_patch=8, clip_image=32, clip_mlp=128,
                      lq_channels=16, lq_convs=2, local_hidden=32, global_hidden=32)


# ----------------------------------------------------------------------------------------
# VAE (LDM AutoencoderKL, SD3 flavour: 16 latent channels, no quant convs)
# ----------------------------------------------------------------------------------------

def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convs (LDM `AttnBlock`)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, 1, c, h * w).transpose(2, 3)
        k = self.k(n).reshape(b, 1, c, h * w).transpose(2, 3)
        v = self.v(n).reshape(b, 1, c, h * w).transpose(2, 3)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """LDM encoder; `forward` returns the posterior (mean, logvar), each [B, 16, H/8, W/8]."""

    def __init__(self, ch: list, layers: int, latent: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch[0], 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch[0]
        for i, c in enumerate(ch):
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            for _ in range(layers):
                lvl.block.append(ResnetBlock(cin, c))
                cin = c
            if i != len(ch) - 1:
                lvl.downsample = Downsample(c)
            self.down.append(lvl)
        self.mid = Mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * latent, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar


class Decoder(nn.Module):
    def __init__(self, ch: list, layers: int, latent: int):
        super().__init__()
        cin = ch[-1]
        self.conv_in = nn.Conv2d(latent, cin, 3, 1, 1)
        self.mid = Mid(cin)
        ups = []
        for i in reversed(range(len(ch))):
            lvl = nn.Module()
            lvl.block = nn.ModuleList()
            for _ in range(layers + 1):
                lvl.block.append(ResnetBlock(cin, ch[i]))
                cin = ch[i]
            if i != 0:
                lvl.upsample = Upsample(cin)
            ups.insert(0, lvl)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            lvl = self.up[i]
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Vae(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.encoder = Encoder(cfg.vae_channels, cfg.vae_layers, cfg.latent)
        self.decoder = Decoder(cfg.vae_channels, cfg.vae_layers, cfg.latent)


def to_scaled(mean: torch.Tensor) -> torch.Tensor:
    """Posterior mean -> the latent the diffusion model sees."""
    return (mean - VAE_SHIFT) * VAE_SCALE


def from_scaled(z: torch.Tensor) -> torch.Tensor:
    return z / VAE_SCALE + VAE_SHIFT


# ----------------------------------------------------------------------------------------
# MMDiT (SD3 original names)
# ----------------------------------------------------------------------------------------

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Mlp2(nn.Module):
    """Linear -> SiLU -> Linear, named `mlp.0` / `mlp.2` like SD3's embedders."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cin, cout), nn.SiLU(), nn.Linear(cout, cout))

    def forward(self, x):
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, p: int, cin: int, d: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, d, p, p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, d: int, pre_only: bool):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        if not pre_only:
            self.proj = nn.Linear(d, d)


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DismantledBlock(nn.Module):
    def __init__(self, d: int, mlp_hidden: int, pre_only: bool):
        super().__init__()
        self.pre_only = pre_only
        self.attn = SelfAttention(d, pre_only)
        if not pre_only:
            self.mlp = FeedForward(d, mlp_hidden)
        n = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, n * d))

    def pre_attention(self, x, c):
        mod = self.adaLN_modulation(c)
        if self.pre_only:
            shift, scale = mod.chunk(2, dim=1)
            inter = None
        else:
            shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
            inter = (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        h = modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale)
        return self.attn.qkv(h), inter

    def post_attention(self, attn, inter):
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = inter
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        h = modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


class JointBlock(nn.Module):
    def __init__(self, d: int, mlp_hidden: int, heads: int, pre_only: bool):
        super().__init__()
        self.heads = heads
        self.context_block = DismantledBlock(d, mlp_hidden, pre_only)
        self.x_block = DismantledBlock(d, mlp_hidden, False)

    def forward(self, context, x, c):
        cq, cint = self.context_block.pre_attention(context, c)
        xq, xint = self.x_block.pre_attention(x, c)
        qkv = torch.cat([cq, xq], dim=1)
        b, n, _ = qkv.shape
        hd = qkv.shape[-1] // 3 // self.heads
        qkv = qkv.reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        a = a.transpose(1, 2).reshape(b, n, self.heads * hd)
        lc = context.shape[1]
        ca, xa = a[:, :lc], a[:, lc:]
        if cint is not None:
            context = self.context_block.post_attention(ca, cint)
        else:
            context = None
        x = self.x_block.post_attention(xa, xint)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, d: int, p: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(d, p * p * cout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale))


def sincos_pos_embed(d: int, m: int) -> torch.Tensor:
    """2-D sin-cos table [1, m*m, d] (MAE / SD3 initialisation)."""
    def one(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    g = torch.arange(m, dtype=torch.float64)
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    emb = torch.cat([one(d // 2, gx), one(d // 2, gy)], dim=1)
    return emb.float().unsqueeze(0)


class Mmdit(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        d = cfg.hidden
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg.patch, cfg.latent, d)
        self.t_embedder = Mlp2(cfg.freq_dim, d)
        self.y_embedder = Mlp2(cfg.pooled_dim, d)
        self.context_embedder = nn.Linear(cfg.context_dim, d)
        # Fixed 2-D sin-cos table, stored as `pos_embed` like SD3 (a buffer: not trained).
        self.register_buffer("pos_embed", sincos_pos_embed(d, cfg.pos_max))
        self.joint_blocks = nn.ModuleList(
            [JointBlock(d, cfg.mlp_hidden, cfg.heads, pre_only=(i == cfg.depth - 1))
             for i in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.patch, cfg.latent)

    def cropped_pos_embed(self, gh: int, gw: int):
        m = self.cfg.pos_max
        top, left = (m - gh) // 2, (m - gw) // 2
        pe = self.pos_embed.reshape(1, m, m, -1)[:, top:top + gh, left:left + gw, :]
        return pe.reshape(1, gh * gw, -1)

    def forward(self, x, t, y, context, lq_tokens=None, gate=None):
        """x [B,16,h,w], t [B] (= 1000 sigma), y [B,pooled], context [B,L,ctx],
        lq_tokens [B,N,D] and gate [D] for the LQ injection after joint block 0."""
        b, _, h, w = x.shape
        p = self.cfg.patch
        gh, gw = h // p, w // p
        xt = self.x_embedder(x) + self.cropped_pos_embed(gh, gw)
        c = self.t_embedder(timestep_embedding(t, self.cfg.freq_dim)) + self.y_embedder(y)
        ctx = self.context_embedder(context)
        for i, blk in enumerate(self.joint_blocks):
            ctx, xt = blk(ctx, xt, c)
            if i == 0 and lq_tokens is not None:
                xt = xt + gate * align_features(lq_tokens, xt)
        out = self.final_layer(xt, c)
        out = out.reshape(b, gh, gw, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, -1, gh * p, gw * p)


def align_features(f: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Adaptive feature alignment: f's per-channel token statistics replaced by x's."""
    f32, x32 = f.float(), x.float()
    mf, sf = f32.mean(1, keepdim=True), f32.std(1, unbiased=False, keepdim=True)
    mx, sx = x32.mean(1, keepdim=True), x32.std(1, unbiased=False, keepdim=True)
    return ((f32 - mf) / (sf + eps) * sx + mx).to(x.dtype)


# ----------------------------------------------------------------------------------------
# CLIP vision (Hugging Face names under `vision_model.`)
# ----------------------------------------------------------------------------------------

class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        d = cfg.clip_width
        self.class_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.patch_embedding = nn.Conv2d(3, d, cfg.clip_patch, cfg.clip_patch, bias=False)
        n = (cfg.clip_image // cfg.clip_patch) ** 2 + 1
        self.position_embedding = nn.Embedding(n, d)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, px):
        b = px.shape[0]
        p = self.patch_embedding(px).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(p.dtype).expand(b, 1, -1)
        return torch.cat([cls, p], dim=1) + self.position_embedding.weight.unsqueeze(0)


class ClipAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads

        def split(t):
            return t.reshape(b, n, self.heads, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                           split(self.v_proj(x)))
        return self.out_proj(a.transpose(1, 2).reshape(b, n, d))


class ClipMlp(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class ClipLayer(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        d = cfg.clip_width
        self.self_attn = ClipAttention(d, cfg.clip_heads)
        self.layer_norm1 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = ClipMlp(d, cfg.clip_mlp)
        self.layer_norm2 = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.layers = nn.ModuleList([ClipLayer(cfg) for _ in range(cfg.clip_layers)])


class ClipVisionTransformer(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.clip_width, eps=1e-5)
        self.encoder = ClipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.clip_width, eps=1e-5)


class ClipVision(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = ClipVisionTransformer(cfg)

    def forward(self, px):
        """px: CLIP-normalised [B,3,S,S]. Returns (penultimate [B,1+P,D], pooled [B,D])."""
        vm = self.vision_model
        h = vm.pre_layrnorm(vm.embeddings(px))
        layers = vm.encoder.layers
        for layer in layers[:-1]:
            h = layer(h)
        penultimate = h
        h = layers[-1](h)
        pooled = vm.post_layernorm(h[:, 0])
        return penultimate, pooled


def clip_preprocess(img: torch.Tensor, size: int) -> torch.Tensor:
    """img in [-1,1], [B,3,H,W] -> PIL-style bicubic resize to size x size (as the engine's
    `clip::preprocess`), clamp to [-1,1] -> [0,1] -> CLIP normalisation."""
    x = img.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)
    x = (x.clamp(-1, 1) + 1) * 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------
# DPIR parts (our names)
# ----------------------------------------------------------------------------------------

class LqBranch(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        c = cfg.lq_channels
        self.conv_in = nn.Conv2d(cfg.latent, c, 3, 1, 1)
        self.convs = nn.ModuleList([nn.Conv2d(c, c, 3, 1, 1) for _ in range(cfg.lq_convs - 1)])
        self.proj = nn.Conv2d(c, cfg.hidden, cfg.patch, cfg.patch)

    def forward(self, z):
        h = F.silu(self.conv_in(z))
        for conv in self.convs:
            h = F.silu(conv(h))
        return self.proj(h).flatten(2).transpose(1, 2)


class LqAlign(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.full((cfg.hidden,), float(cfg.gate_init)))


class PromptMlp(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, cout)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DpirParts(nn.Module):
    """Everything in dpir.safetensors except the robust encoder."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.lq_branch = LqBranch(cfg)
        self.lq_align = LqAlign(cfg)
        self.local_prompt = PromptMlp(cfg.clip_width, cfg.local_hidden, cfg.context_dim)
        self.global_prompt = PromptMlp(cfg.clip_width, cfg.global_hidden, cfg.pooled_dim)


class DpirModel(nn.Module):
    """The whole restoration model, for training stage 3 and for the exports."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.mmdit = Mmdit(cfg)
        self.clip = ClipVision(cfg)
        self.dpir = DpirParts(cfg)

    def prompts(self, local_img, global_img):
        """Images in [-1,1] -> (context [B,P,ctx], pooled [B,pooled])."""
        size = self.cfg.clip_image
        pen_l, _ = self.clip(clip_preprocess(local_img, size))
        _, pooled_g = self.clip(clip_preprocess(global_img, size))
        ctx = self.dpir.local_prompt(pen_l[:, 1:])
        y = self.dpir.global_prompt(pooled_g)
        return ctx, y

    def velocity(self, z_t, t, z_lq, ctx, y):
        tokens = self.dpir.lq_branch(z_lq)
        return self.mmdit(z_t, t, y, ctx, tokens, self.dpir.lq_align.gate)


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
