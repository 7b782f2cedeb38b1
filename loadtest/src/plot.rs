//! `--plot`: throughput, CPU and latency of a run over time, as one SVG.

use crate::report::Report;
use plotters::prelude::*;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

/// Three panels sharing the time axis: forwarded packets/s; server and
/// generator CPU; latency p50 and p99.
pub fn svg(report: &Report, path: &Path) -> Result<(), PlotError> {
    draw(report, path).map_err(|e| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

type Series = Vec<(f64, f64)>;
/// A panel's y label and its lines.
type Panel = (&'static str, Vec<(&'static str, Series, RGBColor)>);

fn draw(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let t = &report.timeline;
    let end = t.last().map_or(1.0, |s| s.t_s).max(1.0);
    let series = |f: &dyn Fn(&crate::report::Sample) -> Option<f64>| -> Series {
        t.iter().filter_map(|s| Some((s.t_s, f(s)?))).collect()
    };
    let panels: [Panel; 3] = [
        (
            "forwarded packets/s",
            vec![("forwarded", series(&|s| Some(s.forwarded_per_s)), BLUE)],
        ),
        (
            "CPU, % of a core",
            vec![
                ("server", series(&|s| s.server_cpu_percent), RED),
                (
                    "generator",
                    series(&|s| Some(s.generator_cpu_percent)),
                    BLACK,
                ),
            ],
        ),
        (
            "latency, ms",
            vec![
                ("p50", series(&|s| s.latency_p50_ms), GREEN),
                ("p99", series(&|s| s.latency_p99_ms), MAGENTA),
            ],
        ),
    ];
    let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} on {}: {} participants, {} room(s)",
        report.scenario, report.target, report.participants.joined, report.plan.rooms
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    for (area, (label, lines)) in root.split_evenly((3, 1)).iter().zip(panels) {
        let top = lines
            .iter()
            .flat_map(|(_, s, _)| s.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(label)
            .draw()?;
        for (name, points, color) in lines {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
