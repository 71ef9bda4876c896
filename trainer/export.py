"""Write dpir-tiny's four model files in the real checkpoint layouts (f16 by default):

- `mmdit.safetensors`       SD3 original MMDiT names (`joint_blocks.0.x_block.attn.qkv.weight`)
- `vae.safetensors`         LDM / SD3 VAE names (`encoder.down.0.block.0.norm1.weight`,
                            `decoder.up.3.upsample.conv.weight`); metadata: scaling/shift
- `clip_vision.safetensors` Hugging Face CLIPVisionModel names (`vision_model.…`)
- `dpir.safetensors`        `lq_branch.*`, `lq_align.gate`, `local_prompt.*`,
                            `global_prompt.*`, `robust_encoder.*` (LDM encoder names)

Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os

import torch

from .models import VAE_SCALE, VAE_SHIFT

FILES = ("mmdit.safetensors", "vae.safetensors", "clip_vision.safetensors", "dpir.safetensors")


def _save(tensors: dict, path: str, metadata: dict, dtype) -> None:
    from safetensors.torch import save_file
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    tmp = path + ".tmp"
    save_file(out, tmp, metadata={k: str(v) for k, v in metadata.items()})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def component_tensors(vae, robust, model) -> dict:
    """file name -> {tensor name: tensor}, in the real layouts."""
    dp = model.dpir
    dpir = {}
    for prefix, mod in (("lq_branch.", dp.lq_branch), ("lq_align.", dp.lq_align),
                        ("local_prompt.", dp.local_prompt), ("global_prompt.", dp.global_prompt),
                        ("robust_encoder.", robust)):
        for k, v in mod.state_dict().items():
            dpir[prefix + k] = v
    return {
        "mmdit.safetensors": dict(model.mmdit.state_dict()),
        "vae.safetensors": dict(vae.state_dict()),
        "clip_vision.safetensors": dict(model.clip.state_dict()),
        "dpir.safetensors": dpir,
    }


def export_components(vae, robust, model, cfg, out: str, dtype=torch.float16,
                      extra_meta: dict | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    meta = {"format": "pt", "model": "dpir-tiny", "config": json.dumps(cfg.to_dict())}
    if extra_meta:
        meta.update(extra_meta)
    vae_meta = dict(meta, scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT)
    for name, tensors in component_tensors(vae, robust, model).items():
        _save(tensors, os.path.join(out, name), vae_meta if name == "vae.safetensors" else meta,
              dtype)


def export_all(st, out: str) -> None:
    """Export a training State: EMA weights for the stage-3 parts once stage 3 has run; the
    VAE encoder as the robust encoder until stage 2 has initialised its own."""
    model = st.ema if st.steps["dit"] > 0 else st.model
    robust = st.robust if st.robust_init else st.vae.encoder
    extra = {"steps": json.dumps(st.steps)}
    export_components(st.vae, robust, model, st.cfg, out, extra_meta=extra)


def load_components(st, folder: str) -> list:
    """Initialise a training State from exported model files (f16 is cast up). Returns the
    names of the files that were loaded; missing files are skipped."""
    from safetensors.torch import load_file
    loaded = []
    dev = next(st.vae.parameters()).device

    def get(name):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return None
        loaded.append(name)
        return {k: v.float().to(dev) for k, v in load_file(path).items()}

    t = get("vae.safetensors")
    if t is not None:
        st.vae.load_state_dict(t)
    t = get("mmdit.safetensors")
    if t is not None:
        st.model.mmdit.load_state_dict(t)
    t = get("clip_vision.safetensors")
    if t is not None:
        st.model.clip.load_state_dict(t)
    t = get("dpir.safetensors")
    if t is not None:
        dp = st.model.dpir
        for prefix, mod in (("lq_branch.", dp.lq_branch), ("lq_align.", dp.lq_align),
                            ("local_prompt.", dp.local_prompt),
                            ("global_prompt.", dp.global_prompt),
                            ("robust_encoder.", st.robust)):
            mod.load_state_dict({k[len(prefix):]: v for k, v in t.items()
                                 if k.startswith(prefix)})
        st.robust_init = True
    st.ema.load_state_dict(st.model.state_dict())
    return loaded
