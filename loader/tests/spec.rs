//! Shape-only specs: detection round trips and published parameter counts.

use dpir_loader::*;

#[test]
fn detect_round_trips_mmdit() {
    for cfg in [
        MmditConfig::sd3_medium(),
        MmditConfig::sd35_medium(),
        MmditConfig::sd35_large(),
        MmditConfig::tiny(),
    ] {
        let got = detect_mmdit(&shape_map(&mmdit_spec(&cfg))).unwrap();
        assert_eq!(got, cfg);
    }
}

#[test]
fn detect_round_trips_vae() {
    for cfg in [
        VaeConfig::sd3(),
        VaeConfig::tiny(),
        VaeConfig::tiny().encoder_only(),
        VaeConfig {
            has_encoder: false,
            ..VaeConfig::sd3()
        },
    ] {
        let got = detect_vae(&shape_map(&vae_spec(&cfg)), "vae", (32, 1.5305, 0.0609)).unwrap();
        assert_eq!(got, cfg);
    }
}

#[test]
fn detect_round_trips_clip_and_dpir() {
    for cfg in [ClipVisionConfig::vit_l14(), ClipVisionConfig::tiny()] {
        let s = shape_map(&clip_vision_spec(&cfg));
        assert_eq!(detect_clip_vision(&s, Some(cfg.heads), None).unwrap(), cfg);
    }
    // Without config.json heads are hidden / 64: true for both.
    let cfg = ClipVisionConfig {
        projection_dim: None,
        ..ClipVisionConfig::vit_l14()
    };
    assert_eq!(
        detect_clip_vision(&shape_map(&clip_vision_spec(&cfg)), None, None).unwrap(),
        cfg
    );
    for cfg in [DpirConfig::sd35_medium(), DpirConfig::tiny()] {
        let got = detect_dpir(&shape_map(&dpir_spec(&cfg))).unwrap();
        assert_eq!(
            got,
            DpirConfig {
                has_robust_encoder: false,
                ..cfg
            }
        );
    }
}

/// Parameter count of an MMDiT written out as a formula (independent of the spec's
/// enumeration of names).
fn closed_form(c: &MmditConfig) -> usize {
    let (d, m, p) = (c.hidden, c.mlp_hidden, c.patch_size);
    let qk = if c.qk_norm { 2 * c.head_dim() } else { 0 };
    let lin = |o: usize, i: usize| o * i + o;
    let embed = lin(d, c.in_channels * p * p)
        + c.pos_embed_max_size * c.pos_embed_max_size * d
        + lin(d, c.frequency_embedding_size)
        + lin(d, d)
        + lin(d, c.pooled_dim)
        + lin(d, d)
        + lin(d, c.context_dim);
    let attn = lin(3 * d, d) + qk;
    let full = attn + lin(d, d) + lin(m, d) + lin(d, m);
    let blocks: usize = (0..c.depth)
        .map(|i| {
            let attn2 = c.attn2_blocks[i];
            let x = full
                + lin(if attn2 { 9 } else { 6 } * d, d)
                + if attn2 { attn + lin(d, d) } else { 0 };
            let ctx = if i + 1 == c.depth {
                attn + lin(2 * d, d)
            } else {
                full + lin(6 * d, d)
            };
            x + ctx
        })
        .sum();
    embed + blocks + lin(p * p * c.out_channels, d) + lin(2 * d, d)
}

/// Published sizes: SD3 medium "2B", SD3.5 medium "2.5B", SD3.5 large "8.1B" (model
/// cards). diffusers counts `pos_embed` as a buffer, not a parameter: without it SD3
/// medium is 2,028,328,000, the figure diffusers' `num_parameters()` reports.
#[test]
fn published_parameter_counts() {
    let count = |c: &MmditConfig| param_count(&mmdit_spec(c));
    let pos = |c: &MmditConfig| c.pos_embed_max_size * c.pos_embed_max_size * c.hidden;
    for c in [
        MmditConfig::sd3_medium(),
        MmditConfig::sd35_medium(),
        MmditConfig::sd35_large(),
        MmditConfig::tiny(),
    ] {
        assert_eq!(count(&c), closed_form(&c));
    }
    let sd3m = MmditConfig::sd3_medium();
    let sd35m = MmditConfig::sd35_medium();
    let sd35l = MmditConfig::sd35_large();
    assert_eq!(count(&sd3m), 2_084_951_104);
    assert_eq!(count(&sd3m) - pos(&sd3m), 2_028_328_000);
    assert_eq!(count(&sd35m), 2_469_663_936);
    assert_eq!(count(&sd35l), 8_146_280_768);
    let billions = |n: usize| (n as f64 / 1e8).round() / 10.0;
    assert_eq!(billions(count(&sd35m)), 2.5);
    assert_eq!(billions(count(&sd35l)), 8.1);
    assert_eq!(billions(count(&sd3m)), 2.1);
    // SD3 VAE = SDXL's AutoencoderKL (83,653,863) with 16 instead of 4 latent channels
    // and no quant convs: + 24·512·9 + 24 (encoder conv_out) + 12·512·9 (decoder
    // conv_in) − 72 (quant_conv) − 20 (post_quant_conv).
    assert_eq!(
        param_count(&vae_spec(&VaeConfig::sd3())),
        83_653_863 + 24 * 512 * 9 + 24 + 12 * 512 * 9 - 72 - 20
    );
    assert_eq!(
        param_count(&vae_encoder_spec(&VaeConfig::sd3(), "encoder")),
        34_274_208
    );
    assert_eq!(
        param_count(&dpir_spec(&DpirConfig::sd35_medium())),
        30_610_368
    );
    // CLIP ViT-L/14 vision tower 303,179,776 + 768×1024 projection.
    assert_eq!(
        param_count(&clip_vision_spec(&ClipVisionConfig::vit_l14())),
        303_179_776 + 768 * 1024
    );
}

#[test]
fn specs_have_unique_names() {
    for spec in [
        mmdit_spec(&MmditConfig::sd35_medium()),
        vae_spec(&VaeConfig::sd3()),
        clip_vision_spec(&ClipVisionConfig::vit_l14()),
        dpir_spec(&DpirConfig::sd35_medium()),
    ] {
        assert_eq!(shape_map(&spec).len(), spec.len());
    }
}
