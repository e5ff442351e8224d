//! PNG plots of the evaluation report: the per-layer curves (mean p_refusal and mean image–text
//! cosine, one line per run kind; the paper's layer-wise figures) and the DSR per category, one
//! bar per run kind (the paper's Table 1 as a chart). Drawn with plotters into an RGB buffer and
//! encoded with `image`; the text uses DejaVu Sans embedded in the binary, so the plots look the
//! same on any machine (as the load generator's charts do).

use std::error::Error;
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::eval::{EvalError, EvalReport};

/// File names, relative to the output directory (the markdown report links them).
pub const CURVES_FILE: &str = "curves.png";
pub const DSR_FILE: &str = "dsr.png";

const WIDTH: u32 = 1200;
const CURVES_HEIGHT: u32 = 1000;
const DSR_HEIGHT: u32 = 700;
const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            tracing::warn!("the embedded plot font did not load; plots will lack text");
        }
    });
}

type DrawResult = std::result::Result<(), Box<dyn Error>>;

/// The series legend of every plot: a framed, mostly opaque box at `position`.
fn legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&mut [u8]) -> DrawResult,
) -> Result<(), EvalError> {
    register_font();
    let fail = |message: String| EvalError::Plot {
        path: path.to_path_buf(),
        message,
    };
    let mut buffer = vec![0u8; (width * height * 3) as usize];
    draw(&mut buffer).map_err(|e| fail(e.to_string()))?;
    let image =
        image::RgbImage::from_raw(width, height, buffer).expect("buffer sized for the image");
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))
}

/// One colour per run kind, fixed so that the two plots agree: image blue, text red, their
/// intervened variants a related hue.
fn colour(kind: &str) -> RGBColor {
    match kind {
        "image" => RGBColor(31, 119, 180),
        "text" => RGBColor(214, 39, 40),
        "image_aligned" => RGBColor(44, 160, 44),
        "text_masked" => RGBColor(148, 103, 189),
        _ => RGBColor(90, 90, 90),
    }
}

/// `[lo, hi]` padded by 8 % (a flat series gets a band around it), clamped to `bounds`.
fn padded_range(values: impl Iterator<Item = f64>, bounds: (f64, f64)) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return bounds;
    }
    let pad = ((hi - lo) * 0.08).max(1e-3 * hi.abs().max(1e-3));
    ((lo - pad).max(bounds.0), (hi + pad).min(bounds.1))
}

/// `curves.png`: two panels over the layers 0..=N (0 = embeddings), mean p_refusal on top, mean
/// `cos_image_text` below, one line per run kind. Layers without a value (no run had one, e.g.
/// cosines of text runs, which have no image) are left out, so a line breaks there.
pub fn curves(report: &EvalReport, path: &Path) -> Result<(), EvalError> {
    type Getter = fn(&crate::eval::RunSummary) -> &Vec<Option<f64>>;
    let panels: [(&str, &str, Getter, (f64, f64)); 2] = [
        (
            "Mean p_refusal per layer (logit lens)",
            "p_refusal",
            |r| &r.mean_p_refusal,
            (0.0, 1.0),
        ),
        (
            "Mean cosine image–text per layer (image positions vs caption)",
            "cos_image_text",
            |r| &r.mean_cos_image_text,
            (-1.0, 1.0),
        ),
    ];
    let n = report.n_layers;
    render(path, (WIDTH, CURVES_HEIGHT), |buffer| {
        let root = BitMapBackend::with_buffer(buffer, (WIDTH, CURVES_HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, (title, unit, get, bounds)) in root.split_evenly((2, 1)).iter().zip(panels) {
            let series: Vec<(&str, Vec<(f64, f64)>)> = report
                .runs
                .iter()
                .map(|(kind, run)| {
                    let points = get(run)
                        .iter()
                        .enumerate()
                        .filter_map(|(j, v)| v.filter(|v| v.is_finite()).map(|v| (j as f64, v)))
                        .collect();
                    (kind.as_str(), points)
                })
                .collect();
            let (y_lo, y_hi) = padded_range(
                series.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)),
                bounds,
            );
            let empty = series.iter().all(|(_, p)| p.is_empty());
            let caption = if empty {
                format!("{title} (no values)")
            } else {
                title.to_string()
            };
            let mut chart = ChartBuilder::on(area)
                .caption(caption, (FONT, 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(-0.25f64..n as f64 + 0.25, y_lo..y_hi)?;
            chart
                .configure_mesh()
                // At most one label per layer; plotters picks round steps, so label only
                // whole layers.
                .x_labels((n + 1).min(17))
                .x_label_formatter(&|x| {
                    if (x - x.round()).abs() < 1e-9 {
                        format!("{}", x.round() as i64)
                    } else {
                        String::new()
                    }
                })
                .x_desc("layer (0 = embeddings)")
                .y_desc(unit)
                .label_style((FONT, 13))
                .light_line_style(WHITE)
                .draw()?;
            let mut labelled = false;
            for (kind, points) in series {
                if points.is_empty() {
                    continue;
                }
                let c = colour(kind);
                // Consecutive layers are joined; a gap (a layer without a value) breaks the line.
                let mut segments: Vec<Vec<(f64, f64)>> = Vec::new();
                for p in &points {
                    match segments.last_mut() {
                        Some(s) if s.last().is_some_and(|q| p.0 - q.0 < 1.5) => s.push(*p),
                        _ => segments.push(vec![*p]),
                    }
                }
                for segment in segments {
                    chart.draw_series(LineSeries::new(segment, c.stroke_width(2)))?;
                }
                chart
                    .draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled())))?
                    .label(kind)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                    });
                labelled = true;
            }
            if labelled {
                legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
            }
        }
        root.present()?;
        Ok(())
    })
}

/// `dsr.png`: the defense success rate per category, one bar per run kind (grouped), with the
/// overall rate as the last group and each bar labelled with its percentage.
pub fn dsr(report: &EvalReport, path: &Path) -> Result<(), EvalError> {
    let mut categories: Vec<&str> = report
        .runs
        .values()
        .flat_map(|r| r.dsr_by_category.keys().map(String::as_str))
        .collect();
    categories.sort_unstable();
    categories.dedup();
    let mut groups: Vec<String> = categories.iter().map(|c| c.to_string()).collect();
    groups.push("all".into());
    let kinds: Vec<&str> = report.runs.keys().map(String::as_str).collect();
    render(path, (WIDTH, DSR_HEIGHT), |buffer| {
        let root = BitMapBackend::with_buffer(buffer, (WIDTH, DSR_HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let caption = if kinds.is_empty() {
            "Defense success rate by category (no runs)".to_string()
        } else {
            format!("Defense success rate by category (judge: {})", report.judge)
        };
        // Groups sit at whole x positions, so the mesh labels fall on them; the headroom
        // above 100 % holds the bar labels and the legend.
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, (FONT, 20))
            .margin(16)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..groups.len() as f64 - 0.5, 0f64..1.3)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-9 && i >= 0.0 {
                    groups.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_labels(14)
            .y_label_formatter(&|y| {
                if *y <= 1.0 + 1e-9 {
                    format!("{:.0} %", 100.0 * y)
                } else {
                    String::new()
                }
            })
            .y_desc("DSR (refused / total)")
            .label_style((FONT, 14))
            .light_line_style(WHITE)
            .draw()?;
        let width = 0.8 / kinds.len().max(1) as f64;
        let value_style =
            TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
        for (k, kind) in kinds.iter().enumerate() {
            let run = &report.runs[*kind];
            let c = colour(kind);
            let bars: Vec<(f64, f64)> = groups
                .iter()
                .enumerate()
                .filter_map(|(g, name)| {
                    let cell = if g == categories.len() {
                        Some(&run.dsr)
                    } else {
                        run.dsr_by_category.get(name)
                    };
                    let left = g as f64 - 0.4 + k as f64 * width;
                    cell.and_then(|c| c.dsr).map(|d| (left, d))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|&(left, d)| {
                    Rectangle::new([(left, 0.0), (left + width * 0.92, d)], c.filled())
                }))?
                .label(*kind)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
            chart.draw_series(bars.iter().map(|&(left, d)| {
                Text::new(
                    format!("{:.0}%", 100.0 * d),
                    (left + width * 0.46, d + 0.01),
                    value_style.clone(),
                )
            }))?;
        }
        if !kinds.is_empty() {
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        root.present()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::eval::{EvalConfig, RunKind, RunRecord};

    fn record(item: usize, category: &str, run: RunKind, refused: bool) -> RunRecord {
        let f = item as f64;
        RunRecord {
            item,
            category: category.into(),
            run,
            answer: String::new(),
            refused,
            activation_layer: Some(2),
            start_layer: Some(1),
            end_layer: Some(3),
            // Layer 2 has no p_refusal (a gap the line must break at); text runs no cosines.
            p_refusal: (0..5)
                .map(|j| (j != 2).then_some(0.02 * j as f64 + 0.01 * f))
                .collect(),
            cos_image_text: (0..5)
                .map(|j| matches!(run, RunKind::Image).then(|| 0.1 + 0.15 * j as f64 - 0.01 * f))
                .collect(),
        }
    }

    #[test]
    fn plots_draw_every_run_kind_and_survive_gaps_and_emptiness() {
        let mut records = Vec::new();
        for (i, category) in ["gun", "knife", "drugs"].iter().enumerate() {
            records.push(record(i, category, RunKind::Image, i == 0));
            records.push(record(i, category, RunKind::Text, i != 2));
            records.push(record(i, category, RunKind::TextMasked, false));
        }
        let config = EvalConfig {
            data: "d.jsonl".into(),
            out: "out".into(),
            align_layers: None,
            mask_layers: Some((1, 2)),
            max_tokens: 4,
            refusal_tokens: None,
            concurrency: 1,
            progress: false,
        };
        let dir = std::env::temp_dir().join(format!("tga-eval-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let full = EvalReport::from_records("m", 4, 3, &records, &config);
        let empty = EvalReport::from_records("m", 4, 0, &[], &config);
        for (tag, report) in [("full", &full), ("empty", &empty)] {
            let curves_path = dir.join(format!("{tag}-{CURVES_FILE}"));
            let dsr_path = dir.join(format!("{tag}-{DSR_FILE}"));
            curves(report, &curves_path).unwrap();
            dsr(report, &dsr_path).unwrap();
            for (path, height) in [(&curves_path, CURVES_HEIGHT), (&dsr_path, DSR_HEIGHT)] {
                let png = image::open(path).unwrap().to_rgb8();
                assert_eq!(png.dimensions(), (WIDTH, height));
                let colours: HashSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
                for kind in ["image", "text", "text_masked"] {
                    let RGBColor(r, g, b) = colour(kind);
                    assert_eq!(
                        colours.contains(&[r, g, b]),
                        tag == "full",
                        "{tag} {}: {kind}",
                        path.display()
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
