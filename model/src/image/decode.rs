//! Decoding with limits: format sniffing, header-stage size checks, EXIF orientation and PIL's
//! `convert("RGB")`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{ModelError, Result};

/// What an uploaded image may cost before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded size accepted.
    pub max_bytes: usize,
    /// Largest width or height (as stored, before EXIF rotation).
    pub max_side: u32,
    /// Largest width * height.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    /// 20 MiB, 8192 px per side, 32 Mpx: a 32 Mpx RGBA decode is 128 MiB; pad-to-square of a
    /// 8192-px-long strip allocates at most 8192² * 3 bytes (192 MiB).
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            max_side: 8192,
            max_pixels: 1 << 25,
        }
    }
}

/// The formats the server accepts, recognised by their magic bytes (the declared MIME type or file
/// name is not trusted). Anything else is `UnsupportedImageFormat`, with the format's name when
/// `image` recognises it (TIFF, AVIF, ...).
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat> {
    let fmt = if bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(ImageFormat::Gif)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::WebP)
    } else if bytes.starts_with(b"BM") && bytes.len() >= 26 {
        Some(ImageFormat::Bmp)
    } else {
        None
    };
    fmt.ok_or_else(|| {
        let name = image::guess_format(bytes)
            .ok()
            .map(|f| format!("{f:?}").to_lowercase());
        ModelError::UnsupportedImageFormat(name)
    })
}

fn decode_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::ImageDecode(e.to_string())
}

/// Decodes an uploaded image to 8-bit RGB as transformers' `load_image` does
/// (`PIL.ImageOps.exif_transpose(image).convert("RGB")`):
/// - the format is sniffed from the bytes (JPEG, PNG, WebP, GIF first frame, BMP);
/// - the byte size and the header's dimensions are checked before any pixel is decoded, so a
///   decompression bomb costs a header parse;
/// - EXIF orientation is applied;
/// - grey is replicated to RGB and alpha is dropped, not composited (`convert("RGB")`; LLaVA's own
///   loader does the same). 16-bit samples keep their high byte, as PIL reads 16-bit RGB(A)/LA PNGs
///   (PIL saturates 16-bit grey to 255 instead; we take the high byte there too).
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    let (mut decoder, (width, height)) = checked_decoder(bytes, limits)?;
    // Decode-stage limits: the decoders enforce these too, as a second line of defence.
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8) + (64 << 20));
    decoder.set_limits(decode_limits).map_err(decode_err)?;
    let orientation = decoder.orientation().unwrap_or_else(|e| {
        tracing::debug!("ignoring unreadable EXIF orientation: {e}");
        image::metadata::Orientation::NoTransforms
    });
    let decoded = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    tracing::debug!(
        width,
        height,
        color = ?decoded.color(),
        ?orientation,
        "decoded image"
    );
    let mut rgb = DynamicImage::ImageRgb8(to_rgb_dropping_alpha(decoded));
    rgb.apply_orientation(orientation);
    Ok(rgb.into_rgb8())
}

/// The `(height, width)` [`decode_image`] would return (EXIF rotation applied), from the header
/// alone: the byte and dimension limits are checked, no pixel is decoded. Validation counts image
/// tokens with it before it decodes anything.
pub fn probe_image(bytes: &[u8], limits: &ImageLimits) -> Result<(u32, u32)> {
    use image::metadata::Orientation;
    let (mut decoder, (width, height)) = checked_decoder(bytes, limits)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok(match orientation {
        Orientation::Rotate90
        | Orientation::Rotate270
        | Orientation::Rotate90FlipH
        | Orientation::Rotate270FlipH => (width, height),
        _ => (height, width),
    })
}

/// The sniffed format's decoder with its header read, and `(width, height)` as stored, once the
/// byte size and the dimensions are within `limits`.
fn checked_decoder<'a>(
    bytes: &'a [u8],
    limits: &ImageLimits,
) -> Result<(Box<dyn image::ImageDecoder + 'a>, (u32, u32))> {
    if bytes.len() > limits.max_bytes {
        return Err(ModelError::ImageBytesTooLarge {
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let format = sniff_format(bytes)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // Header-stage limits: no dimension limit yet (we want to report the dimensions ourselves),
    // only a cap on what the header parse may allocate (PNG text chunks and the like).
    let mut header_limits = Limits::default();
    header_limits.max_alloc = Some(64 * 1024 * 1024);
    reader.limits(header_limits);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    let too_large = width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels;
    if too_large {
        return Err(ModelError::ImageTooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ModelError::ImageDecode(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    tracing::debug!(?format, width, height, "image header");
    Ok((Box::new(decoder), (width, height)))
}

/// PIL `convert("RGB")`: L → (L, L, L); LA / RGBA → alpha dropped; 16-bit → high byte.
fn to_rgb_dropping_alpha(img: DynamicImage) -> RgbImage {
    fn build<const C: usize, T: Copy>(
        w: u32,
        h: u32,
        raw: &[T],
        px: impl Fn(&[T]) -> [u8; 3],
    ) -> RgbImage {
        let mut out = Vec::with_capacity(w as usize * h as usize * 3);
        for p in raw.chunks_exact(C) {
            out.extend_from_slice(&px(p));
        }
        RgbImage::from_raw(w, h, out).expect("buffer size matches dimensions")
    }
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma8(i) => build::<1, u8>(w, h, i.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(i) => build::<2, u8>(w, h, i.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageRgba8(i) => build::<4, u8>(w, h, i.as_raw(), |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma16(i) => build::<1, u16>(w, h, i.as_raw(), |p| [hi(p[0]); 3]),
        DynamicImage::ImageLumaA16(i) => build::<2, u16>(w, h, i.as_raw(), |p| [hi(p[0]); 3]),
        DynamicImage::ImageRgb16(i) => {
            build::<3, u16>(w, h, i.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        DynamicImage::ImageRgba16(i) => {
            build::<4, u16>(w, h, i.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::png::PngEncoder;
    use image::{ExtendedColorType, ImageEncoder};

    fn png_bytes(w: u32, h: u32, data: &[u8], color: ExtendedColorType) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(data, w, h, color)
            .unwrap();
        out
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut crc_in = kind.to_vec();
        crc_in.extend_from_slice(data);
        c.extend_from_slice(&crc32(&crc_in).to_be_bytes());
        c
    }

    /// A big-endian TIFF block holding only the Orientation tag.
    fn exif_orientation(o: u16) -> Vec<u8> {
        let mut t = b"MM\0\x2a\0\0\0\x08".to_vec();
        t.extend_from_slice(&1u16.to_be_bytes());
        t.extend_from_slice(&0x0112u16.to_be_bytes());
        t.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&o.to_be_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&0u32.to_be_bytes());
        t
    }

    #[test]
    fn sniffs_the_five_formats_and_refuses_others() {
        let png = png_bytes(1, 1, &[1, 2, 3], ExtendedColorType::Rgb8);
        assert_eq!(sniff_format(&png).unwrap(), ImageFormat::Png);
        assert_eq!(
            sniff_format(&[0xFF, 0xD8, 0xFF, 0xE0]).unwrap(),
            ImageFormat::Jpeg
        );
        assert_eq!(sniff_format(b"GIF89a......").unwrap(), ImageFormat::Gif);
        assert_eq!(
            sniff_format(b"RIFF\0\0\0\0WEBPVP8 ").unwrap(),
            ImageFormat::WebP
        );
        let mut bmp = b"BM".to_vec();
        bmp.resize(54, 0);
        assert_eq!(sniff_format(&bmp).unwrap(), ImageFormat::Bmp);
        match sniff_format(b"II*\0\x08\0\0\0") {
            Err(ModelError::UnsupportedImageFormat(Some(name))) => assert_eq!(name, "tiff"),
            other => panic!("{other:?}"),
        }
        for junk in [&b""[..], b"hello world", b"<svg xmlns='...'>"] {
            assert!(matches!(
                decode_image(junk, &ImageLimits::default()),
                Err(ModelError::UnsupportedImageFormat(None))
            ));
        }
    }

    #[test]
    fn limits_are_checked_before_decoding() {
        let data = vec![7u8; 100 * 50 * 3];
        let png = png_bytes(100, 50, &data, ExtendedColorType::Rgb8);
        let ok = decode_image(&png, &ImageLimits::default()).unwrap();
        assert_eq!(ok.dimensions(), (100, 50));
        let small_bytes = ImageLimits {
            max_bytes: png.len() - 1,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, &small_bytes),
            Err(ModelError::ImageBytesTooLarge { .. })
        ));
        let narrow = ImageLimits {
            max_side: 99,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, &narrow),
            Err(ModelError::ImageTooLarge {
                width: 100,
                height: 50,
                ..
            })
        ));
        let few = ImageLimits {
            max_pixels: 4999,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, &few),
            Err(ModelError::ImageTooLarge { .. })
        ));
    }

    #[test]
    fn a_png_bomb_header_is_refused_without_decoding() {
        // A valid signature and IHDR claiming 100000 x 100000 RGB (30 GB decoded), a token IDAT.
        let mut ihdr = 100_000u32.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        png.extend(png_chunk(b"IHDR", &ihdr));
        png.extend(png_chunk(
            b"IDAT",
            &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        png.extend(png_chunk(b"IEND", &[]));
        let lenient = ImageLimits {
            max_side: u32::MAX,
            ..Default::default()
        };
        for limits in [ImageLimits::default(), lenient] {
            match decode_image(&png, &limits) {
                Err(ModelError::ImageTooLarge { width, height, .. }) => {
                    assert_eq!((width, height), (100_000, 100_000))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 3 wide x 2 tall, stored; orientation 6 = rotate 90 degrees clockwise to display.
        let stored: Vec<u8> = (0..6u8).flat_map(|i| [i * 40, 0, 0]).collect();
        let plain = png_bytes(3, 2, &stored, ExtendedColorType::Rgb8);
        // eXIf goes before IDAT: after the 8-byte signature and the 25-byte IHDR chunk.
        let mut png = plain[..33].to_vec();
        png.extend(png_chunk(b"eXIf", &exif_orientation(6)));
        png.extend_from_slice(&plain[33..]);
        let img = decode_image(&png, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (2, 3));
        // The header probe says the same (height, width) without decoding.
        assert_eq!(
            probe_image(&png, &ImageLimits::default()).unwrap(),
            (img.height(), img.width())
        );
        assert_eq!(
            probe_image(&plain, &ImageLimits::default()).unwrap(),
            (2, 3)
        );
        // Rotating clockwise puts the stored bottom-left pixel (index 3) at the top-left.
        let reds: Vec<u8> = img.pixels().map(|p| p[0]).collect();
        assert_eq!(reds, vec![120, 0, 160, 40, 200, 80]);

        // JPEG: APP1 "Exif\0\0" right after SOI.
        let mut jpg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95)
            .write_image(&vec![128u8; 16 * 8 * 3], 16, 8, ExtendedColorType::Rgb8)
            .unwrap();
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(exif_orientation(6));
        let mut with_exif = jpg[..2].to_vec();
        with_exif.extend_from_slice(&[0xFF, 0xE1]);
        with_exif.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        with_exif.extend(app1);
        with_exif.extend_from_slice(&jpg[2..]);
        let img = decode_image(&with_exif, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (8, 16));
        let img = decode_image(&jpg, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (16, 8));
    }

    #[test]
    fn grey_and_alpha_become_rgb_like_pil_convert() {
        // LA: grey replicated, alpha dropped (even fully transparent pixels keep their value).
        let la = png_bytes(2, 1, &[10, 0, 200, 255], ExtendedColorType::La8);
        let img = decode_image(&la, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![10, 10, 10, 200, 200, 200]);
        let rgba = png_bytes(1, 1, &[1, 2, 3, 0], ExtendedColorType::Rgba8);
        let img = decode_image(&rgba, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![1, 2, 3]);
        // 16-bit RGB keeps the high byte, as PIL's "RGB;16B" unpacker does.
        let rgb16: Vec<u8> = [0x1234u16, 0xFF00, 0x00FF]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let png = png_bytes(1, 1, &rgb16, ExtendedColorType::Rgb16);
        let img = decode_image(&png, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![0x12, 0xFF, 0x00]);
        let grey = png_bytes(3, 1, &[0, 128, 255], ExtendedColorType::L8);
        let img = decode_image(&grey, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![0, 0, 0, 128, 128, 128, 255, 255, 255]);
    }
}
