//! `tga-loadtest compare A.json B.json`: two reports side by side, with B/A ratios.

use std::fmt::Write as _;

use crate::report::Report;
use crate::stats::Summary;

/// Whether a larger value is better, for the arrow beside the ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    Neither,
}

struct Row {
    name: String,
    a: Option<f64>,
    b: Option<f64>,
    better: Better,
}

fn rows(a: &Report, b: &Report) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |name: &str, better: Better, f: &dyn Fn(&Report) -> Option<f64>| {
        rows.push(Row {
            name: name.into(),
            a: f(a),
            b: f(b),
            better,
        })
    };
    push("successful requests", Better::Higher, &|r| {
        Some(r.requests.succeeded as f64)
    });
    push("failed requests", Better::Lower, &|r| {
        Some(r.requests.failed as f64)
    });
    push("duration (s)", Better::Neither, &|r| Some(r.duration_s));
    push("output tokens", Better::Neither, &|r| {
        Some(r.tokens.output as f64)
    });
    push("request throughput (req/s)", Better::Higher, &|r| {
        Some(r.throughput.requests_per_s)
    });
    push("output throughput (tok/s)", Better::Higher, &|r| {
        Some(r.throughput.output_tokens_per_s)
    });
    push("total throughput (tok/s)", Better::Higher, &|r| {
        r.throughput.total_tokens_per_s
    });
    push("goodput (req/s)", Better::Higher, &|r| {
        r.throughput.goodput_requests_per_s
    });
    type Pick = fn(&Summary) -> f64;
    let stats: [(&str, Pick); 4] = [
        ("mean", |s| s.mean),
        ("p50", |s| s.p50),
        ("p90", |s| s.p90),
        ("p99", |s| s.p99),
    ];
    type Latency = fn(&Report) -> Option<Summary>;
    let latencies: [(&str, Latency); 5] = [
        ("TTFT", |r| r.latency_ms.ttft),
        ("TPOT", |r| r.latency_ms.tpot),
        ("ITL", |r| r.latency_ms.itl),
        ("E2E", |r| r.latency_ms.e2e),
        ("diagnose E2E", |r| r.latency_ms.diagnose_e2e),
    ];
    for (metric, get) in latencies {
        if get(a).is_none() && get(b).is_none() {
            continue;
        }
        for (stat, pick) in stats {
            push(&format!("{metric} {stat} (ms)"), Better::Lower, &|r| {
                get(r).map(|s| pick(&s))
            });
        }
    }
    rows
}

fn value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e12 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// B/A, with an arrow saying whether B is better (↑) or worse (↓) where that has a meaning.
fn ratio(row: &Row) -> String {
    let (Some(a), Some(b)) = (row.a, row.b) else {
        return "-".into();
    };
    if a == 0.0 {
        return if b == 0.0 { "1.00".into() } else { "-".into() };
    }
    let r = b / a;
    let arrow = match row.better {
        _ if (r - 1.0).abs() < 0.005 => "",
        Better::Higher if r > 1.0 => " ↑",
        Better::Lower if r < 1.0 => " ↑",
        Better::Neither => "",
        _ => " ↓",
    };
    format!("{r:.2}{arrow}")
}

fn label(report: &Report, fallback: &str) -> String {
    if report.label.is_empty() {
        fallback.to_string()
    } else {
        report.label.clone()
    }
}

/// The comparison as a text table or markdown. `names` label the columns when the reports have
/// no label of their own.
pub fn render(a: &Report, b: &Report, names: (&str, &str), markdown: bool) -> String {
    let (la, lb) = (label(a, names.0), label(b, names.1));
    let rows = rows(a, b);
    let mut out = String::new();
    if markdown {
        let _ = writeln!(out, "| metric | {la} | {lb} | ratio (B/A) |");
        let _ = writeln!(out, "|---|---:|---:|---:|");
        for row in &rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                row.name,
                value(row.a),
                value(row.b),
                ratio(row)
            );
        }
    } else {
        for (side, name, report) in [("A", &la, a), ("B", &lb, b)] {
            let arrivals = &report.settings.arrivals;
            if name == arrivals {
                let _ = writeln!(out, "{side} = {name}");
            } else {
                let _ = writeln!(out, "{side} = {name} ({arrivals})");
            }
        }
        let _ = writeln!(out, "{:<28}{:>14}{:>14}{:>14}", "metric", "A", "B", "B/A");
        let _ = writeln!(out, "{}", "-".repeat(70));
        for row in &rows {
            let _ = writeln!(
                out,
                "{:<28}{:>14}{:>14}{:>14}",
                row.name,
                value(row.a),
                value(row.b),
                ratio(row)
            );
        }
    }
    for (name, report) in [(&la, a), (&lb, b)] {
        for failure in &report.failures {
            let _ = writeln!(out, "{name}: FAIL: {failure}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_arrows() {
        let row = |a, b, better| Row {
            name: String::new(),
            a: Some(a),
            b: Some(b),
            better,
        };
        assert_eq!(ratio(&row(10.0, 20.0, Better::Higher)), "2.00 ↑");
        assert_eq!(ratio(&row(10.0, 20.0, Better::Lower)), "2.00 ↓");
        assert_eq!(ratio(&row(10.0, 5.0, Better::Lower)), "0.50 ↑");
        assert_eq!(ratio(&row(10.0, 10.0, Better::Lower)), "1.00");
        assert_eq!(ratio(&row(0.0, 0.0, Better::Lower)), "1.00");
        assert_eq!(ratio(&row(0.0, 3.0, Better::Lower)), "-");
        assert_eq!(value(Some(3.0)), "3");
        assert_eq!(value(Some(1.23456)), "1.23");
    }
}
