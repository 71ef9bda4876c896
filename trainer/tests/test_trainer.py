"""Trainer tests on the toy config (CPU, a few seconds each)."""

import json
import os
import tempfile
import unittest

import torch

from trainer import data as D
from trainer import model_card
from trainer import train as T
from trainer.export import component_tensors, export_components, load_components
from trainer.models import DpirModel, toy_config
from trainer.tests.common import make_pairs, make_photos


def run(photos, out, stage, steps, extra=()):
    args = ["--data", photos, "--out", out, "--toy", "--crop", "32", "--stage", stage,
            "--steps", str(steps), "--device", "cpu", "--quiet"] + list(extra)
    assert T.main(args) == 0
    return torch.load(os.path.join(out, "work", "state.pt"), weights_only=False)


class TrainerTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        cls.tmp = tempfile.TemporaryDirectory()
        cls.photos = make_photos(os.path.join(cls.tmp.name, "photos"))
        cls.pairs = make_pairs(os.path.join(cls.tmp.name, "pairs"), n=40)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def out(self, name):
        return os.path.join(self.tmp.name, name)

    def test_losses_go_down(self):
        # Per stage: mean loss over the last 5 of 40 steps below the first 5.
        for stage, extra in (("vae", ["--lr-vae", "2e-3"]),
                             ("dit", ["--lr-dit", "1e-3", "--pairs", self.pairs,
                                      "--val", self.photos])):
            out = self.out(f"down-{stage}")
            st = run(self.photos, out, stage, 40,
                     extra + ["--batch-vae", "4", "--batch-dit", "4"])
            curve = [p["loss"] for p in st["losses"][stage]]
            self.assertEqual(len(curve), 40)
            first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
            self.assertLess(last, 0.8 * first, f"{stage}: {first:.4f} -> {last:.4f}")
        # The end-of-run check ran and wrote its PSNRs to losses.json.
        with open(os.path.join(out, "losses.json")) as f:
            ev = json.load(f)["curves"]["eval"]
        self.assertEqual(len(ev), 1)
        self.assertIn("dit_s20_str0.6_cfg1.0", ev[0])
        self.assertGreater(ev[0]["bicubic"], 10.0)

    def test_vae_decoder_only_keeps_the_encoder(self):
        # The decoder learns (loss falls) while the encoder, and so every latent the MMDiT
        # and the robust encoder were trained on, stays bit for bit what it was.
        base = run(self.photos, self.out("dec-base"), "vae", 2, ["--batch-vae", "4"])
        init = self.out("dec-init")
        cfg = toy_config()
        from trainer.models import Encoder, Vae
        vae = Vae(cfg)
        vae.load_state_dict(base["vae"])
        export_components(vae, Encoder(cfg.vae_channels, cfg.vae_layers, cfg.latent),
                          DpirModel(cfg), cfg, init, dtype=torch.float32)
        st = run(self.photos, self.out("dec-only"), "vae", 40,
                 ["--batch-vae", "4", "--lr-vae", "2e-3", "--vae-decoder-only",
                  "--init-from", init])
        enc0 = {k: v for k, v in base["vae"].items() if k.startswith("encoder.")}
        enc1 = {k: v for k, v in st["vae"].items() if k.startswith("encoder.")}
        self.assertEqual(enc0.keys(), enc1.keys())
        for k in enc0:
            self.assertTrue(torch.equal(enc0[k], enc1[k]), k)
        dec_moved = any(not torch.equal(v, st["vae"][k]) for k, v in base["vae"].items()
                        if k.startswith("decoder."))
        self.assertTrue(dec_moved, "decoder did not train")
        # Steps alternate: HQ latents (even), the robust encoder's LQ latents (odd).
        logs = st["losses"]["vae"]
        self.assertEqual(len(logs), 40)
        self.assertTrue(all(("psnr_lq" in p) == (i % 2 == 1) for i, p in enumerate(logs)))
        curve = [p["loss"] for p in logs[::2]]
        first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
        self.assertLess(last, first, f"{first:.4f} -> {last:.4f}")
        # The model card names the fine-tune from what losses.json recorded of the run.
        out = self.out("dec-only")
        self.assertEqual(model_card.main([out, "--losses",
                                          os.path.join(self.out("dec-base"), "losses.json"),
                                          "--finetune",
                                          os.path.join(out, "losses.json") + "=a test box"]), 0)
        with open(os.path.join(out, "MODEL_CARD.md")) as f:
            card = f.read()
        self.assertIn("- Fine-tune 1 on a test box: VAE decoder only (encoders frozen) "
                      "(32² crops, batch 4, lr 0.002), 40 steps / ", card)

    def test_lr_schedule(self):
        # Warm-up by steps; with --cooldown, a linear fall to 0 over the stage's last minutes.
        self.assertAlmostEqual(T.lr_factor(0, 50, 0.0, None, 0.0), 1 / 50)
        self.assertEqual(T.lr_factor(80, 50, 0.0, None, 600.0), 1.0)
        self.assertEqual(T.lr_factor(80, 50, 100.0, 1000.0, 600.0), 1.0)
        self.assertAlmostEqual(T.lr_factor(80, 50, 700.0, 1000.0, 600.0), 0.5)
        self.assertAlmostEqual(T.lr_factor(9, 50, 700.0, 1000.0, 600.0), 0.1)
        self.assertEqual(T.lr_factor(80, 50, 1200.0, 1000.0, 600.0), 0.0)
        self.assertEqual(T.lr_factor(80, 50, 999.0, 1000.0, 0.0), 1.0)

    def test_worst_pixels(self):
        # 10x10 images: ceil(0.005 * 100) = 1 pixel each; the error is averaged over channels.
        target = torch.zeros(2, 3, 10, 10)
        rec = target.clone()
        rec[0, :, 4, 7] = 3.0
        rec[0, 0, 1, 1] = 0.9
        rec[1, 2, 9, 0] = -0.5
        self.assertAlmostEqual(T.worst_pixels(rec, target).item(), (3.0 + 0.5 / 3) / 2, places=6)
        # 40x40: the worst 8 pixels of each image.
        rec = torch.zeros(1, 1, 40, 40)
        rec.view(-1)[:10] = torch.arange(1.0, 11.0)
        self.assertAlmostEqual(T.worst_pixels(rec, torch.zeros_like(rec)).item(),
                               sum(range(3, 11)) / 8, places=5)
        run = {"crop": 128, "lr_vae": 1e-4, "worst_pixels": 0.25}
        self.assertEqual(model_card.what_trained(run, "vae"),
                         "VAE (128² crops, lr 0.0001, worst-pixel loss 0.25)")

    def test_latent_outliers_finds_the_canyon_wren_dot(self):
        # The bundled model on the bundled example: the largest latent sits at the wren's eye,
        # and the decoder's activation there grows to > 50x the median (a dot in the output).
        from trainer import latent_outliers
        root = os.path.join(os.path.dirname(__file__), "..", "..")
        t = latent_outliers.trace(os.path.join(root, "models", "dpir-tiny"),
                                  os.path.join(root, "examples", "canyon-wren.png"))
        self.assertEqual(t["at"], (8, 24, 34))
        self.assertAlmostEqual(t["z"].abs().max().item(), 17.6, delta=0.1)
        names = [r[0] for r in t["rows"]]
        self.assertEqual(names[0], "conv_in")
        self.assertEqual(names[-1], "norm_out + SiLU")
        name, shape, mx, near, med = t["rows"][-2]  # the last ResNet block
        self.assertEqual((name, shape), ("up0.block2", (32, 512, 512)))
        self.assertEqual(near, mx)
        self.assertGreater(mx / med, 50)
        self.assertLess(t["rows"][0][2] / t["rows"][0][4], 10)

    def test_resume_matches_uninterrupted(self):
        # Train 4 steps == train 2 steps, stop, resume to 4: same losses and weights.
        for stage in ("vae", "robust", "dit"):
            extra = ["--pairs", self.pairs] if stage != "vae" else []
            a = run(self.photos, self.out(f"a-{stage}"), stage, 4, extra)
            run(self.photos, self.out(f"b-{stage}"), stage, 2, extra)
            b = run(self.photos, self.out(f"b-{stage}"), stage, 4, extra)
            la = [p["loss"] for p in a["losses"][stage]]
            lb = [p["loss"] for p in b["losses"][stage]]
            self.assertEqual(len(la), 4)
            self.assertEqual(len(lb), 4)
            for x, y in zip(la, lb):
                self.assertAlmostEqual(x, y, delta=1e-5 * max(1.0, abs(x)), msg=stage)
            for key in ("vae", "robust", "model", "ema"):
                for name, ta in a[key].items():
                    tb = b[key][name]
                    err = (ta.float() - tb.float()).abs().max().item()
                    self.assertLess(err, 1e-5, f"{stage}: {key}.{name} differs by {err}")

    def test_stand_in_degradation_without_pairs(self):
        st = run(self.photos, self.out("nopairs"), "robust", 2)
        self.assertEqual(st["steps"]["robust"], 2)
        self.assertTrue(all(torch.isfinite(torch.tensor(p["loss"]))
                            for p in st["losses"]["robust"]))

    def test_export_layout_and_reload(self):
        cfg = toy_config()
        torch.manual_seed(3)
        st = T.State(cfg, torch.device("cpu"), 3)
        with torch.no_grad():
            st.model.dpir.lq_align.gate.fill_(0.7)
        out = self.out("export")
        export_components(st.vae, st.robust, st.model, cfg, out)
        from safetensors import safe_open
        with safe_open(os.path.join(out, "mmdit.safetensors"), "pt") as f:
            keys = set(f.keys())
            self.assertEqual(f.get_tensor("pos_embed").dtype, torch.float16)
            self.assertEqual(tuple(f.get_tensor("pos_embed").shape), (1, 64, cfg.hidden))
        for k in ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                  "y_embedder.mlp.0.weight", "context_embedder.weight",
                  "joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.mlp.fc2.bias",
                  "joint_blocks.0.x_block.adaLN_modulation.1.weight",
                  "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"):
            self.assertIn(k, keys)
        last = f"joint_blocks.{cfg.depth - 1}.context_block."
        self.assertIn(last + "attn.qkv.weight", keys)
        self.assertNotIn(last + "attn.proj.weight", keys)
        self.assertNotIn(last + "mlp.fc1.weight", keys)
        with safe_open(os.path.join(out, "mmdit.safetensors"), "pt") as f:
            self.assertEqual(f.get_tensor(last + "adaLN_modulation.1.weight").shape[0], 2 * cfg.hidden)
        with safe_open(os.path.join(out, "vae.safetensors"), "pt") as f:
            keys = set(f.keys())
            self.assertEqual(f.metadata()["scaling_factor"], "1.5305")
        for k in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                  "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight",
                  "decoder.up.0.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight",
                  "encoder.conv_out.weight", "decoder.conv_in.weight"):
            self.assertIn(k, keys)
        self.assertFalse(any("quant_conv" in k for k in keys))
        with safe_open(os.path.join(out, "clip_vision.safetensors"), "pt") as f:
            keys = set(f.keys())
        for k in ("vision_model.embeddings.class_embedding",
                  "vision_model.embeddings.patch_embedding.weight",
                  "vision_model.embeddings.position_embedding.weight",
                  "vision_model.pre_layrnorm.weight", "vision_model.post_layernorm.bias",
                  "vision_model.encoder.layers.0.self_attn.q_proj.weight",
                  "vision_model.encoder.layers.1.mlp.fc2.weight",
                  "vision_model.encoder.layers.0.layer_norm2.bias"):
            self.assertIn(k, keys)
        with safe_open(os.path.join(out, "dpir.safetensors"), "pt") as f:
            keys = set(f.keys())
        for k in ("lq_branch.conv_in.weight", "lq_branch.convs.0.weight", "lq_branch.proj.weight",
                  "lq_align.gate", "local_prompt.fc1.weight", "global_prompt.fc2.bias",
                  "robust_encoder.conv_in.weight", "robust_encoder.mid.attn_1.v.weight"):
            self.assertIn(k, keys)
        self.assertFalse(any(k.startswith("robust_encoder.encoder.") for k in keys))
        # Reload (f16 -> f32) gives the same tensors to f16 precision.
        st2 = T.State(cfg, torch.device("cpu"), 99)
        self.assertEqual(len(load_components(st2, out)), 4)
        ref = component_tensors(st.vae, st.robust, st.model)
        got = component_tensors(st2.vae, st2.robust, st2.model)
        for fname, tensors in ref.items():
            for k, v in tensors.items():
                err = (v.float() - got[fname][k].float()).abs().max().item()
                self.assertLessEqual(err, 1e-3 * max(1.0, v.abs().max().item()), k)

    def test_zero_gate_is_plain_sd3(self):
        cfg = toy_config()
        torch.manual_seed(5)
        m = DpirModel(cfg).eval()
        x = torch.randn(2, cfg.latent, 8, 8)
        t = torch.tensor([100.0, 900.0])
        y = torch.randn(2, cfg.pooled_dim)
        ctx = torch.randn(2, 5, cfg.context_dim)
        z_lq = torch.randn(2, cfg.latent, 8, 8)
        with torch.no_grad():
            plain = m.mmdit(x, t, y, ctx)
            m.dpir.lq_align.gate.zero_()
            gated = m.velocity(x, t, z_lq, ctx, y)
            m.dpir.lq_align.gate.fill_(0.5)
            on = m.velocity(x, t, z_lq, ctx, y)
        self.assertTrue(torch.equal(plain, gated))
        self.assertGreater((on - plain).abs().max().item(), 1e-3)

    def test_pair_crops_line_up(self):
        store = D.PairStore(self.pairs, 4)
        self.assertEqual(len(store), 40)
        g = torch.Generator().manual_seed(0)
        hq, lq, glob = store.batch(g, 6, 32, torch.device("cpu"))
        self.assertEqual(tuple(hq.shape), (6, 3, 32, 32))
        self.assertEqual(tuple(lq.shape), (6, 3, 8, 8))
        self.assertEqual(tuple(glob.shape), (6, 3, 16, 16))
        # The LQ crop is the area-downscaled HQ crop (up to 8-bit rounding).
        down = torch.nn.functional.avg_pool2d(hq, 4)
        self.assertLess((down - lq).abs().max().item(), 2.5 / 127.5)


if __name__ == "__main__":
    unittest.main()
