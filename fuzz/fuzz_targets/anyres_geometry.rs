//! The anyres geometry shared by preprocessing, the server's image-token count and the model's
//! feature packing, on arbitrary image sizes and pinpoint lists: no panic, results inside their
//! bounds, and the tile grid `preprocess` produces agrees with the geometry functions.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use model::image::{
    anyres_grid_shape, image_token_count, preprocess, select_best_resolution,
    unpadded_feature_shape_with, AspectMode, PreprocessConfig, UnpadRounding,
};

#[derive(Debug, Arbitrary)]
struct Input {
    height: u32,
    width: u32,
    /// (h, w) in units of 14 px (the CLIP patch), so that small lists still reach real sizes.
    pinpoints: Vec<(u8, u8)>,
    truncate: bool,
    /// Also preprocess a synthetic image of this size (when it is small enough to be quick).
    run_preprocess: bool,
}

fuzz_target!(|input: Input| {
    let pinpoints: Vec<(u32, u32)> = input
        .pinpoints
        .iter()
        .take(8)
        .map(|&(h, w)| (u32::from(h.max(1)) * 14, u32::from(w.max(1)) * 14))
        .collect();
    if pinpoints.is_empty() {
        return;
    }
    // The decoder's limits: images reaching the geometry have 1..=8192 px per side.
    let (h, w) = (input.height % 8192 + 1, input.width % 8192 + 1);
    let unpad = if input.truncate {
        UnpadRounding::Truncate
    } else {
        UnpadRounding::Round7
    };

    let best = select_best_resolution(h, w, &pinpoints);
    assert!(pinpoints.contains(&best), "{best:?} not in {pinpoints:?}");
    let tile = 336;
    let (rows, cols) = anyres_grid_shape(h, w, &pinpoints, tile);
    assert_eq!((rows, cols), (best.0 / tile, best.1 / tile));
    let (cur_h, cur_w) = (rows * 24, cols * 24);
    let (uh, uw) = unpadded_feature_shape_with(h, w, cur_h, cur_w, unpad);
    assert!(
        uh <= cur_h && uw <= cur_w,
        "({uh}, {uw}) > ({cur_h}, {cur_w})"
    );

    let mut cfg = PreprocessConfig::clip_defaults(336);
    cfg.aspect = AspectMode::Anyres {
        pinpoints: pinpoints.clone(),
        unpad,
    };
    let count = image_token_count(h, w, &cfg, 24);
    assert_eq!(count, 576 + uh as usize * (uw as usize + 1));

    if input.run_preprocess && u64::from(h) * u64::from(w) <= 1 << 16 {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 100, 50]));
        let p = preprocess(&img, &cfg).expect("preprocess");
        let (grid_rows, grid_cols) = p.grid.expect("anyres grid");
        assert_eq!(p.n_views, 1 + (grid_rows * grid_cols) as usize);
        // preprocess tiles the canvas with partial tiles rounded up (transformers'
        // divide_to_patches); the feature grid rounds down (get_anyres_image_grid_shape).
        assert_eq!(
            (grid_rows, grid_cols),
            (best.0.div_ceil(tile), best.1.div_ceil(tile))
        );
    }
});
