//! Uploaded image bytes through the server's image path: `decode_image` with the server's
//! default limits, then `preprocess` in each aspect mode the server can be configured with
//! (LLaVA-NeXT anyres, LLaVA-1.5 pad-to-square, CLIP resize + centre crop). Any input may be
//! refused with an error; none may panic, and every accepted image must yield well-formed views.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use model::image::{
    decode_image, image_token_count, preprocess, AspectMode, ImageLimits, PreprocessConfig,
};

static CONFIGS: LazyLock<Vec<PreprocessConfig>> = LazyLock::new(|| {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let anyres = PreprocessConfig::from_hf_dir(&fixtures.join("tiny-llava-next"))
        .expect("tiny-llava-next preprocessor config")
        .expect("tiny-llava-next has an image processor");
    let pad = PreprocessConfig::from_hf_dir(&fixtures.join("tiny-llava"))
        .expect("tiny-llava preprocessor config")
        .expect("tiny-llava has an image processor");
    assert!(matches!(anyres.aspect, AspectMode::Anyres { .. }));
    assert_eq!(pad.aspect, AspectMode::PadToSquare);
    vec![anyres, pad, PreprocessConfig::clip_defaults(336)]
});

fuzz_target!(|data: &[u8]| {
    let limits = ImageLimits::default();
    let Ok(img) = decode_image(data, &limits) else {
        return;
    };
    let (w, h) = img.dimensions();
    assert!(w >= 1 && h >= 1 && w <= limits.max_side && h <= limits.max_side);
    for cfg in CONFIGS.iter() {
        let p = preprocess(&img, cfg).expect("a decoded image always preprocesses");
        let (vh, vw) = p.size;
        assert_eq!(p.size, cfg.view_size());
        assert_eq!(p.original_hw, (h, w));
        assert_eq!(
            p.pixel_values.len(),
            p.n_views * 3 * vh as usize * vw as usize
        );
        assert!(p.pixel_values.iter().all(|v| v.is_finite()));
        match (&cfg.aspect, p.grid) {
            (AspectMode::Anyres { .. }, Some((rows, cols))) => {
                assert_eq!(p.n_views, 1 + (rows * cols) as usize)
            }
            (AspectMode::Anyres { .. }, None) => panic!("anyres without a grid"),
            (_, grid) => assert_eq!((p.n_views, grid), (1, None)),
        }
        // 24 = 336 / 14 patches per side, as the server counts them for the tiny model.
        assert!(image_token_count(h, w, cfg, 24) >= 24 * 24);
    }
});
