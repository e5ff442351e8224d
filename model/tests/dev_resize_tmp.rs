// TEMPORARY dev test (helper B): compares resize_pil with Pillow on cases from /tmp/rs_dev.
use model::image::{resize_pil, Resample};
#[test]
fn dev_resize_vs_pillow() {
    let data = std::fs::read("/tmp/rs_dev/resize_cases.bin").unwrap();
    let mut off = 0;
    let rd = |o: &mut usize| { let v = u32::from_le_bytes(data[*o..*o+4].try_into().unwrap()); *o += 4; v };
    let (mut n, mut bad) = (0, 0);
    while off < data.len() {
        let (w, h, ow, oh, f) = (rd(&mut off), rd(&mut off), rd(&mut off), rd(&mut off), rd(&mut off));
        let inp = data[off..off + (w*h*3) as usize].to_vec(); off += (w*h*3) as usize;
        let exp = &data[off..off + (ow*oh*3) as usize]; off += (ow*oh*3) as usize;
        let img = image::RgbImage::from_raw(w, h, inp).unwrap();
        let r = resize_pil(&img, ow, oh, if f == 3 { Resample::Bicubic } else { Resample::Bilinear });
        let diff = r.as_raw().iter().zip(exp).filter(|(a, b)| a != b).count();
        let maxd = r.as_raw().iter().zip(exp).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap_or(0);
        if diff > 0 { bad += 1; eprintln!("case {n}: {w}x{h} -> {ow}x{oh} f{f}: {diff} differ, max {maxd}"); }
        n += 1;
    }
    eprintln!("{n} cases, {bad} mismatching");
    assert_eq!(bad, 0);
}
