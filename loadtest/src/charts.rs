//! PNG charts for the markdown report: latency CDFs (TTFT, TPOT, ITL, e2e) and throughput over
//! time. Drawn with plotters into an RGB buffer and encoded with `image`; the text uses DejaVu
//! Sans embedded in the binary, so charts look the same on any machine.

use std::error::Error;
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::client::RequestRecord;
use crate::error::{LoadtestError, Result};
use crate::workload::RequestKind;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 800;
const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            tracing::warn!("the embedded chart font did not load; charts will lack text");
        }
    });
}

type DrawResult = std::result::Result<(), Box<dyn Error>>;

fn render(path: &Path, draw: impl FnOnce(&mut [u8]) -> DrawResult) -> Result<()> {
    register_font();
    let fail = |message: String| LoadtestError::Chart {
        path: path.to_path_buf(),
        message,
    };
    let mut buffer = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut buffer).map_err(|e| fail(e.to_string()))?;
    let image =
        image::RgbImage::from_raw(WIDTH, HEIGHT, buffer).expect("buffer sized for the image");
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))
}

/// Empirical CDFs of TTFT, TPOT, ITL and e2e (ms) over the successful chat requests.
pub fn latency_cdfs(records: &[RequestRecord], path: &Path) -> Result<()> {
    let ok: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.succeeded() && r.kind == RequestKind::Chat)
        .collect();
    let ms = |v: f64| v * 1e3;
    let panels: Vec<(&str, Vec<f64>)> = vec![
        ("TTFT", ok.iter().filter_map(|r| r.ttft_s.map(ms)).collect()),
        (
            "TPOT",
            ok.iter().filter_map(|r| r.tpot_s().map(ms)).collect(),
        ),
        (
            "ITL",
            ok.iter()
                .flat_map(|r| r.itl_s.iter().copied().map(ms))
                .collect(),
        ),
        ("E2E", ok.iter().filter_map(|r| r.e2e_s.map(ms)).collect()),
    ];
    render(path, |buffer| {
        let root = BitMapBackend::with_buffer(buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, (name, mut values)) in root.split_evenly((2, 2)).iter().zip(panels) {
            values.sort_by(f64::total_cmp);
            let x_max = values.last().copied().unwrap_or(1.0).max(1e-3) * 1.05;
            let caption = if values.is_empty() {
                format!("{name} CDF (no data)")
            } else {
                format!("{name} CDF ({} samples)", values.len())
            };
            let mut chart = ChartBuilder::on(area)
                .caption(caption, (FONT, 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..x_max, 0f64..1.0)?;
            chart
                .configure_mesh()
                .x_desc("ms")
                .y_desc("fraction of samples")
                .label_style((FONT, 13))
                .draw()?;
            let n = values.len() as f64;
            // A step function: each sample lifts the curve by 1/n at its value.
            let mut points = Vec::with_capacity(values.len() * 2 + 1);
            points.push((0.0, 0.0));
            for (i, v) in values.iter().enumerate() {
                points.push((*v, i as f64 / n));
                points.push((*v, (i + 1) as f64 / n));
            }
            chart.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?;
        }
        root.present()?;
        Ok(())
    })
}

/// Output tokens per second, completed requests per second and requests in flight, in time bins
/// over the run.
pub fn throughput_over_time(records: &[RequestRecord], duration_s: f64, path: &Path) -> Result<()> {
    let end = records
        .iter()
        .map(|r| r.end_s)
        .fold(duration_s, f64::max)
        .max(1e-3);
    // About 40 bins: fine enough to show ramp-up and stalls, coarse enough to average
    // several completions per bin in a long run.
    let bin = (end / 40.0).clamp(0.05, 10.0);
    let bins = (end / bin).ceil() as usize;
    let mut tokens = vec![0.0f64; bins];
    let mut completions = vec![0.0f64; bins];
    let index = |t: f64| ((t / bin) as usize).min(bins - 1);
    for record in records {
        // When the usage count differs from the number of content chunks, each chunk carries
        // its share of the counted tokens.
        let weight = match (record.output_tokens, record.chunk_offsets_s.len()) {
            (Some(n), chunks) if chunks > 0 => n as f64 / chunks as f64,
            _ => 1.0,
        };
        for t in &record.chunk_offsets_s {
            tokens[index(*t)] += weight;
        }
        if record.succeeded() {
            completions[index(record.end_s)] += 1.0;
        }
    }
    let centre = |i: usize| (i as f64 + 0.5) * bin;
    let in_flight: Vec<(f64, f64)> = (0..bins)
        .map(|i| {
            let t = centre(i);
            let n = records
                .iter()
                .filter(|r| r.start_s <= t && t < r.end_s)
                .count();
            (t, n as f64)
        })
        .collect();
    let token_rate: Vec<(f64, f64)> = tokens
        .iter()
        .enumerate()
        .map(|(i, n)| (centre(i), n / bin))
        .collect();
    let request_rate: Vec<(f64, f64)> = completions
        .iter()
        .enumerate()
        .map(|(i, n)| (centre(i), n / bin))
        .collect();
    let y_max = |series: &[(f64, f64)]| series.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;

    let panels = [
        ("Output tokens/s", "tokens/s", token_rate, BLUE),
        (
            "Completed requests/s",
            "requests/s",
            request_rate,
            RGBColor(0, 140, 0),
        ),
        ("Requests in flight", "requests", in_flight, RED),
    ];
    render(path, |buffer| {
        let root = BitMapBackend::with_buffer(buffer, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, (title, unit, series, colour)) in root.split_evenly((3, 1)).iter().zip(panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{title} ({bin:.2} s bins)"), (FONT, 18))
                .margin(8)
                .x_label_area_size(35)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..end, 0f64..y_max(&series))?;
            chart
                .configure_mesh()
                .x_desc("seconds since start")
                .y_desc(unit)
                .label_style((FONT, 12))
                .draw()?;
            chart.draw_series(LineSeries::new(series, colour.stroke_width(2)))?;
        }
        root.present()?;
        Ok(())
    })
}
