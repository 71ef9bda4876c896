//! `dpir inspect` through the real binary: well-formed checkpoints are described, and
//! every malformed one gives one specific line on stderr and a non-zero exit, never a
//! panic. Malformed files are built byte by byte here, not with the loader's writer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use dpir_loader::{DType, MmditConfig};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpir-inspect-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn inspect(paths: &[&Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dpir"))
        .arg("inspect")
        .args(paths)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `dpir inspect` and checks for exactly `error: {msg}` on one line and a failure.
fn expect_error(paths: &[&Path], msg: &str) {
    let (code, _, err) = inspect(paths);
    assert_ne!(code, 0, "{paths:?} should fail");
    assert_eq!(err, format!("error: {msg}\n"), "{paths:?}");
}

/// A safetensors image: 8-byte header length, `header` verbatim, `data_len` data bytes.
fn raw(header: &[u8], data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend(std::iter::repeat_n(0u8, data_len));
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The tiny MMDiT spec as a raw header + zeroed data, with `edit` applied to the spec.
fn tiny_mmdit(edit: impl FnOnce(&mut Vec<(String, Vec<usize>)>)) -> Vec<u8> {
    let mut spec = dpir_loader::mmdit_spec(&MmditConfig::tiny());
    edit(&mut spec);
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (n, s) in &spec {
        let len = s.iter().product::<usize>() * 4;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "F32", "shape": s, "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    raw(
        serde_json::Value::Object(header).to_string().as_bytes(),
        off,
    )
}

#[test]
fn malformed_files_give_one_line_errors() {
    let dir = tmp("malformed");
    let d = dir.display();

    // 1. empty file
    let p = write(&dir, "empty.safetensors", b"");
    expect_error(
        &[&p],
        &format!("{d}/empty.safetensors: empty file, not a safetensors file"),
    );

    // 2. shorter than the 8-byte length prefix
    let p = write(&dir, "short.safetensors", b"\x10\x00\x00");
    expect_error(
        &[&p],
        &format!("{d}/short.safetensors: file of 3 bytes is too short for a safetensors header"),
    );

    // 3. header length past the end of the file
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}          ");
    let p = write(&dir, "hlen.safetensors", &bytes);
    expect_error(
        &[&p],
        &format!(
            "{d}/hlen.safetensors: header length 1000 runs past the end of the file (20 bytes)"
        ),
    );

    // 4. header not JSON
    let p = write(&dir, "notjson.safetensors", &raw(b"not json", 0));
    expect_error(
        &[&p],
        &format!(
            "{d}/notjson.safetensors: header is not valid JSON: expected ident at line 1 column 2"
        ),
    );

    // 5. header not UTF-8
    let p = write(&dir, "utf8.safetensors", &raw(b"{\"\xff\": 1}", 0));
    expect_error(
        &[&p],
        &format!("{d}/utf8.safetensors: header is not valid UTF-8 (byte 2)"),
    );

    // 6. unknown dtype
    let h = br#"{"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}"#;
    let p = write(&dir, "dtype.safetensors", &raw(h, 8));
    expect_error(
        &[&p],
        &format!("{d}/dtype.safetensors: tensor `a`: unknown dtype `F7`"),
    );

    // 7. FP8 recognised and refused
    let h = br#"{"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}"#;
    let p = write(&dir, "f8.safetensors", &raw(h, 8));
    expect_error(&[&p], &format!("{d}/f8.safetensors: tensor `a`: dtype F8_E4M3 is not supported yet (convert the checkpoint to BF16, F16 or F32)"));

    // 8. shape × dtype size ≠ byte length
    let h = br#"{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}"#;
    let p = write(&dir, "size.safetensors", &raw(h, 12));
    expect_error(&[&p], &format!("{d}/size.safetensors: tensor `a`: shape [2, 2] of F32 needs 16 bytes but data offsets [0, 12] hold 12"));

    // 9. offsets past the data section
    let h = br#"{"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}"#;
    let p = write(&dir, "range.safetensors", &raw(h, 16));
    expect_error(&[&p], &format!("{d}/range.safetensors: tensor `a`: data offsets [0, 64] run past the end of the data section (16 bytes; truncated file?)"));

    // 10. overlapping tensors
    let h = br#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}"#;
    let p = write(&dir, "overlap.safetensors", &raw(h, 24));
    expect_error(
        &[&p],
        &format!("{d}/overlap.safetensors: tensors `a` [0, 16] and `b` [8, 24] overlap"),
    );

    // 11. duplicate name in one header
    let h = br#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
    let p = write(&dir, "dup.safetensors", &raw(h, 8));
    expect_error(
        &[&p],
        &format!("{d}/dup.safetensors: tensor `a`: listed twice in the header"),
    );

    // 12. truncated: a valid tiny MMDiT with its last 100 bytes cut off
    let full = tiny_mmdit(|_| {});
    let p = write(&dir, "trunc.safetensors", &full[..full.len() - 100]);
    let (code, _, err) = inspect(&[&p]);
    assert_ne!(code, 0);
    let prefix = format!("error: {d}/trunc.safetensors: tensor `");
    assert!(
        err.starts_with(&prefix) && err.ends_with("truncated file?)\n") && err.lines().count() == 1,
        "{err}"
    );

    // 13. missing required tensor
    let p = write(
        &dir,
        "missing.safetensors",
        &tiny_mmdit(|s| s.retain(|(n, _)| n != "joint_blocks.1.x_block.attn.proj.weight")),
    );
    expect_error(
        &[&p],
        "mmdit: missing tensor `joint_blocks.1.x_block.attn.proj.weight`",
    );

    // 14. wrong shape
    let p = write(
        &dir,
        "shape.safetensors",
        &tiny_mmdit(|s| {
            for (n, sh) in s.iter_mut() {
                if n == "context_embedder.bias" {
                    *sh = vec![129];
                }
            }
        }),
    );
    expect_error(&[&p], &format!("mmdit: tensor `context_embedder.bias` (stored as `context_embedder.bias` in {d}/shape.safetensors): expected shape [128], found [129]"));

    // 15. a tensor the detected config has no place for
    let p = write(
        &dir,
        "extra.safetensors",
        &tiny_mmdit(|s| s.push(("joint_blocks.7.x_block.attn.qkv.bias".into(), vec![384]))),
    );
    expect_error(&[&p], &format!("mmdit: unexpected tensor `joint_blocks.7.x_block.attn.qkv.bias` (stored as `joint_blocks.7.x_block.attn.qkv.bias` in {d}/extra.safetensors)"));

    // 16. a name no component knows
    let h = br#"{"foo.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
    let p = write(&dir, "foo.safetensors", &raw(h, 4));
    expect_error(&[&p], &format!("{d}/foo.safetensors: tensor `foo.weight` belongs to no known component (mmdit, vae, clip_vision, dpir, text encoders)"));

    // 17. directory where a file is expected
    let p = dir.join("folder.safetensors");
    std::fs::create_dir_all(&p).unwrap();
    expect_error(
        &[&p],
        &format!("{d}/folder.safetensors: is a directory, expected a .safetensors file"),
    );

    // 18. no such path
    let p = dir.join("absent.safetensors");
    expect_error(
        &[&p],
        &format!("{d}/absent.safetensors: No such file or directory (os error 2)"),
    );

    // 19. the same tensor in two files
    let h = br#"{"lq_align.gate": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
    let a = write(&dir, "gate-a.safetensors", &raw(h, 4));
    let b = write(&dir, "gate-b.safetensors", &raw(h, 4));
    expect_error(&[&a, &b], &format!("tensor `lq_align.gate` is defined twice: `lq_align.gate` in {d}/gate-a.safetensors and `lq_align.gate` in {d}/gate-b.safetensors"));

    // 20. an integer tensor where a weight belongs
    let h = br#"{"lq_align.gate": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}"#;
    let p = write(&dir, "int.safetensors", &raw(h, 8));
    expect_error(&[&p], &format!("{d}/int.safetensors: tensor `lq_align.gate`: dtype I64 cannot be a model weight (use F32, F16 or BF16)"));

    // 21. reversed offsets
    let h = br#"{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}"#;
    let p = write(&dir, "rev.safetensors", &raw(h, 8));
    expect_error(
        &[&p],
        &format!("{d}/rev.safetensors: tensor `a`: data offsets [8, 4] are reversed"),
    );

    // 22. header entry without a dtype
    let h = br#"{"a": {"shape": [1], "data_offsets": [0, 4]}}"#;
    let p = write(&dir, "nodtype.safetensors", &raw(h, 4));
    expect_error(
        &[&p],
        &format!("{d}/nodtype.safetensors: tensor `a`: bad header entry: missing field `dtype`"),
    );

    // 23. index naming a shard that does not hold the tensor
    let h = br#"{"lq_align.gate": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
    write(&dir, "shard-1.safetensors", &raw(h, 4));
    let idx = write(&dir, "m.safetensors.index.json", br#"{"weight_map": {"lq_align.gate": "shard-1.safetensors", "lq_branch.proj.weight": "shard-1.safetensors"}}"#);
    expect_error(&[&idx], &format!("{d}/m.safetensors.index.json: tensor `lq_branch.proj.weight` is mapped to `shard-1.safetensors`, which does not hold it"));

    // 24. diffusers q/k/v with k missing
    let h = br#"{"transformer_blocks.0.attn.to_q.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}, "transformer_blocks.0.attn.to_v.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4, 8]}}"#;
    let p = write(&dir, "qkv.safetensors", &raw(h, 8));
    expect_error(&[&p], "mmdit: cannot build `joint_blocks.0.x_block.attn.qkv.weight`: part 2 of 3 (q, k, v) is missing");

    // 25. a weight with an empty dimension
    let h = br#"{"lq_align.gate": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}"#;
    let p = write(&dir, "zero.safetensors", &raw(h, 0));
    expect_error(
        &[&p],
        &format!("{d}/zero.safetensors: tensor `lq_align.gate`: shape [0] has a zero dimension"),
    );

    // 26. an index that is not JSON
    let p = write(&dir, "bad.safetensors.index.json", b"{");
    expect_error(&[&p], &format!("{d}/bad.safetensors.index.json: index is not valid JSON: EOF while parsing an object at line 1 column 1"));

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn describes_a_tiny_checkpoint() {
    let dir = tmp("ok");
    let cfg = MmditConfig::tiny();
    let spec = dpir_loader::mmdit_spec(&cfg);
    let tensors: Vec<(String, Vec<usize>, DType, Vec<u8>)> = spec
        .iter()
        .map(|(n, s)| {
            (
                format!("model.diffusion_model.{n}"),
                s.clone(),
                DType::BF16,
                vec![0u8; s.iter().product::<usize>() * 2],
            )
        })
        .collect();
    let p = dir.join("tiny.safetensors");
    dpir_loader::write_safetensors(&p, &tensors).unwrap();
    let (code, out, err) = inspect(&[&p]);
    assert_eq!(code, 0, "{err}");
    println!("{out}");
    let params = dpir_loader::param_count(&spec);
    // Counted independently of the spec: embedders + 2 blocks + final layer of the tiny config.
    let (d, m) = (128usize, 512usize);
    let embed = d * 16 * 4
        + d
        + 64 * d
        + (d * 256 + d + d * d + d)
        + (d * 32 + d + d * d + d)
        + (d * 64 + d);
    let attn = 3 * d * d + 3 * d + 2 * 64;
    let full = attn + d * d + d + 2 * m * d + m + d;
    let block0 = (full + 9 * d * d + 9 * d + attn + d * d + d) + (full + 6 * d * d + 6 * d);
    let block1 = (full + 6 * d * d + 6 * d) + (attn + 2 * d * d + 2 * d);
    let fin = 64 * d + 64 + 2 * d * d + 2 * d;
    assert_eq!(params, embed + block0 + block1 + fin);
    fn grouped(n: usize) -> String {
        if n < 1000 {
            n.to_string()
        } else {
            format!("{},{:03}", grouped(n / 1000), n % 1000)
        }
    }
    let grouped = grouped(params);
    assert!(
        out.contains(
            "mmdit\n  layout:     original (SD3 / LDM names under `model.diffusion_model.`)\n"
        ),
        "{out}"
    );
    assert!(out.contains(&format!("  parameters: {grouped}\n")), "{out}");
    assert!(out.contains("BF16 ×"), "{out}");
    assert!(out.contains("depth 2, hidden 128, heads 2 (head dim 64), patch 2, channels 16→16, pos_embed 8², context 64, pooled 32, t-embed 256, mlp 512, qk-norm yes, attn2 blocks [0]"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Inspecting a ~1 GB F32 checkpoint maps it: the process stays far below 1 GB resident.
#[test]
fn inspect_maps_instead_of_reading() {
    let dir = tmp("rss");
    let cfg = MmditConfig {
        depth: 7,
        hidden: 1024,
        num_heads: 16,
        mlp_hidden: 4096,
        attn2_blocks: vec![false; 7],
        ..MmditConfig::tiny()
    };
    let spec = dpir_loader::mmdit_spec(&cfg);
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (n, s) in &spec {
        let len = s.iter().product::<usize>() * 4;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "F32", "shape": s, "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    assert!(off > 1_000_000_000, "checkpoint is {off} bytes");
    let p = dir.join("big.safetensors");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
        let h = serde_json::Value::Object(header).to_string();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(h.as_bytes()).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut left = off;
        while left > 0 {
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        f.flush().unwrap();
    }
    let (code, out, err) = inspect(&[&p]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("peak resident memory: "))
        .unwrap();
    let mut it = line["peak resident memory: ".len()..].split(' ');
    let value: f64 = it.next().unwrap().parse().unwrap();
    let unit = it.next().unwrap();
    let mib = match unit {
        "B" => value / 1048576.0,
        "KiB" => value / 1024.0,
        "MiB" => value,
        "GiB" => value * 1024.0,
        _ => panic!("{line}"),
    };
    println!("inspect of a {off}-byte F32 checkpoint: {line}");
    assert!(mib < 100.0, "{line}");
}
