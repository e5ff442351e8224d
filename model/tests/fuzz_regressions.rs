//! Inputs that broke the image path, found with the fuzz targets in `fuzz/` (see
//! fuzz/README.md), kept with their bytes inline so that `cargo test` replays them without the
//! fuzz tooling.

use std::path::Path;

use model::image::{
    decode_image, preprocess, AspectMode, ImageLimits, PreprocessConfig, CLIP_MEAN, CLIP_STD,
};

fn configs() -> Vec<(&'static str, PreprocessConfig)> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let hf = |dir: &str| {
        PreprocessConfig::from_hf_dir(&fixtures.join(dir))
            .unwrap()
            .unwrap()
    };
    let (anyres, pad) = (hf("tiny-llava-next"), hf("tiny-llava"));
    assert!(matches!(anyres.aspect, AspectMode::Anyres { .. }));
    assert_eq!(pad.aspect, AspectMode::PadToSquare);
    vec![
        ("anyres", anyres),
        ("pad", pad),
        ("resize_crop", PreprocessConfig::clip_defaults(336)),
    ]
}

/// A 99-byte grey (value 128) PNG of 1x8192 pixels, inside the default limits. CLIP's
/// shortest-edge resize (HF `llava` without padding, original-format "square" checkpoints) turned
/// it into a 336x2752512 image, 2.8 GB, before the 336x336 centre crop kept one view of it: one
/// request could take gigabytes and tens of seconds. Resize + crop now computes only the crop.
const THIN_STRIP_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x20, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x3e, 0x9f, 0x71,
    0x6c, 0x00, 0x00, 0x00, 0x2a, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0xed, 0xc2, 0x31, 0x0d, 0x00,
    0x00, 0x0c, 0x03, 0xa0, 0xa6, 0xca, 0x2b, 0x7d, 0x32, 0xf6, 0x10, 0xc8, 0x1a, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0xd7, 0x01, 0x79,
    0x60, 0x40, 0x7f, 0xe7, 0xd3, 0x34, 0xe3, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

#[test]
fn a_thin_strip_is_cheap_in_every_mode() {
    let img = decode_image(THIN_STRIP_PNG, &ImageLimits::default()).unwrap();
    assert_eq!(img.dimensions(), (1, 8192));
    for (mode, cfg) in configs() {
        let started = std::time::Instant::now();
        let p = preprocess(&img, &cfg).unwrap();
        assert_eq!(p.size, (336, 336), "{mode}");
        assert_eq!(p.pixel_values.len(), p.n_views * 3 * 336 * 336, "{mode}");
        if mode == "resize_crop" {
            // The crop lies inside the resized strip, which is uniform grey: every value is
            // 128 rescaled and normalised.
            assert_eq!(p.n_views, 1);
            for c in 0..3 {
                let x = (128.0f64 / 255.0) as f32;
                let expected = (x - CLIP_MEAN[c] as f32) / CLIP_STD[c] as f32;
                let plane = &p.pixel_values[c * 336 * 336..(c + 1) * 336 * 336];
                assert!(plane.iter().all(|&v| v == expected), "{mode} channel {c}");
            }
        }
        // Before the fix the resize alone took tens of seconds (and 2.8 GB); generous for slow
        // CI machines and unoptimised builds.
        assert!(
            started.elapsed().as_secs() < 20,
            "{mode}: {:?}",
            started.elapsed()
        );
    }
}
