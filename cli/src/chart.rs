//! The SVG chart of `demo --report`: the time-to-key distribution of each rekey, drawn with
//! plotters' SVG backend (its text is SVG `<text>`, so no font files are needed).

use std::path::Path;

use plotters::prelude::*;
use rekeycast::demo::RekeyFigures;
use rekeycast::sim::rekey::quantile;

use super::ms;

/// Writes the chart to `path`: for each message (x), the range from the fastest to the slowest
/// member as a grey bar, and lines through the p50, p90, p99 and maximum time to key (y, ms, on
/// a logarithmic scale).
pub fn time_to_key_svg(path: &Path, rekeys: &[RekeyFigures]) -> anyhow::Result<()> {
    let series = |q: f64| -> Vec<(f64, f64)> {
        rekeys
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.time_to_key_us.is_empty())
            .map(|(i, r)| ((i + 1) as f64, ms(quantile(&r.time_to_key_us, q))))
            .collect()
    };
    // A logarithmic time axis: the tail (members that needed repair) is an order of magnitude
    // or two above the median, and both matter.
    let top = rekeys
        .iter()
        .filter_map(|r| r.time_to_key_us.last().copied())
        .max()
        .map_or(1.0, ms)
        .max(1.0)
        * 1.5;
    let bottom = rekeys
        .iter()
        .filter_map(|r| r.time_to_key_us.first().copied())
        .min()
        .map_or(0.1, ms)
        .clamp(0.01, top / 10.0)
        / 1.5;
    let right = rekeys.len().max(1) as f64 + 0.5;

    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "rekeycast demo: time to key per message (ms)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5f64..right, (bottom..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("message (1 admits the first members)")
        .y_desc("time to key (ms, log scale)")
        .x_labels(rekeys.len().clamp(2, 25))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    let range = BLACK.mix(0.2).stroke_width(6);
    for (i, r) in rekeys.iter().enumerate() {
        if let (Some(first), Some(last)) = (r.time_to_key_us.first(), r.time_to_key_us.last()) {
            let x = (i + 1) as f64;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, ms(*first)), (x, ms(*last))],
                range,
            )))?;
        }
    }
    let lines: [(&str, f64, RGBColor); 4] = [
        ("p50", 0.5, BLUE),
        ("p90", 0.9, CYAN),
        ("p99", 0.99, MAGENTA),
        ("max", 1.0, RED),
    ];
    for (label, q, color) in lines {
        chart
            .draw_series(LineSeries::new(series(q), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
