//! Image decoding with limits, a bit-exact port of Pillow's convolution resampling, and the
//! LLaVA / LLaVA-NeXT preprocessing of transformers 5.23's PIL image processors.
//!
//! Everything here works on 8-bit RGB until the final rescale/normalise, exactly like the PIL
//! backend of transformers (`LlavaImageProcessorPil`, `LlavaNextImageProcessorPil`,
//! `CLIPImageProcessorPil`): the pixel values this module produces are bit-identical to theirs for
//! the same decoded RGB image (see `model/tests/preprocess.rs`).
//!
//! The anyres geometry (`select_best_resolution`, `anyres_grid_shape`, `unpadded_feature_shape`,
//! `image_token_count`) is defined once here; the model uses it to unpad and pack features, the
//! server uses it to count image tokens.
//!
//! - `decode`: decoding with limits, format sniffing, EXIF orientation;
//! - `resample`: Pillow's convolution resampling;
//! - `config`: the preprocessor config ([`PreprocessConfig`], the image preprocessor);
//! - `anyres`: anyres geometry and image token counts;
//! - `preprocess`: pad / resize-crop / anyres preprocessing into [`ProcessedImage`].

mod anyres;
mod config;
mod decode;
mod preprocess;
mod resample;

pub use anyres::{
    anyres_grid_shape, image_token_count, select_best_resolution, unpadded_feature_shape,
    unpadded_feature_shape_with,
};
pub use config::{
    AspectMode, PreprocessConfig, SizeSpec, UnpadRounding, CLIP_MEAN, CLIP_STD,
    LLAVA_NEXT_PINPOINTS,
};
pub use decode::{decode_image, probe_image, sniff_format, ImageLimits};
pub use preprocess::{preprocess, ProcessedImage};
pub use resample::{resize_pil, Resample};

/// Fixtures shared by the submodules' unit tests.
#[cfg(test)]
mod test_support {
    use std::path::Path;

    use image::RgbImage;

    use super::PreprocessConfig;

    pub(super) fn hf_next() -> PreprocessConfig {
        let json = serde_json::json!({
            "image_processor_type": "LlavaNextImageProcessor",
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "do_pad": true,
            "resample": 3
        });
        PreprocessConfig::from_hf_preprocessor(&json, Path::new("test")).unwrap()
    }

    /// The same deterministic pattern tools on the Python side used for the goldens in the tests.
    pub(super) fn pattern(h: u32, w: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 37 + y * 11) % 256) as u8,
                ((y * 53 + x * 3) % 256) as u8,
                ((x * y * 29 + 7) % 256) as u8,
            ])
        })
    }
}
