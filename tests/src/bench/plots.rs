//! SVG plots of a report (plotters, SVG backend only).

use std::path::{Path, PathBuf};

use plotters::{coord::Shift, prelude::*};

use super::report::{Figure, Group, Report};

/// Colours of the series, in order: ours first.
const COLOURS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// A line: its legend and `(services, value)` points.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

/// Writes every plot the report has data for into `dir`; returns the files.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let datapath = datapath_lines(report);
    if !datapath.is_empty() {
        written.push(svg(dir.join("datapath.svg"), (900, 520), |root| {
            line_chart(
                root,
                "Datapath cost per packet (BPF_PROG_TEST_RUN, median)",
                "ns per packet",
                &datapath,
            )
        })?);
    }
    let connections = traffic_lines(report, "connections_per_second");
    let requests = traffic_lines(report, "requests_per_second");
    if !connections.is_empty() {
        written.push(svg(dir.join("traffic.svg"), (1100, 480), |root| {
            let (left, right) = root.split_horizontally(550);
            line_chart(
                &left,
                "New TCP connections per second",
                "connections/s",
                &connections,
            )?;
            line_chart(
                &right,
                "Requests per second (keep-alive)",
                "requests/s",
                &requests,
            )
        })?);
    }
    let bars = control_plane_bars(report);
    if !bars.is_empty() {
        let height = 140 + 90 * bars.len() as u32;
        written.push(svg(
            dir.join("control-plane.svg"),
            (1100, height),
            |root| bar_charts(root, &bars),
        )?);
    }
    Ok(written)
}

/// Draws one SVG file of `size` pixels with `draw`; returns its path.
fn svg(
    path: PathBuf,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    {
        let root = SVGBackend::new(&path, size).into_drawing_area();
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    Ok(path)
}

fn plot_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {error:?}")
}

/// Ours per path and flow kind, and the floor, against the Service count.
fn datapath_lines(report: &Report) -> Vec<Line> {
    let figures: Vec<&Figure> = report
        .group(Group::Datapath)
        .filter(|f| f.services.is_some())
        .collect();
    let mut series: Vec<&str> = Vec::new();
    for f in &figures {
        if !series.contains(&f.series.as_str()) {
            series.push(&f.series);
        }
    }
    let mut lines: Vec<Line> = series
        .iter()
        .map(|s| Line {
            label: s.replace('_', " "),
            points: figures
                .iter()
                .filter(|f| f.series == *s)
                .map(|f| (f.services.unwrap_or(1) as f64, f.ours))
                .collect(),
        })
        .collect();
    if let Some(first) = series.first() {
        lines.push(Line {
            label: "floor (pass-only program)".to_owned(),
            points: figures
                .iter()
                .filter(|f| f.series == *first)
                .filter_map(|f| Some((f.services? as f64, f.baseline_named("floor")?.value)))
                .collect(),
        });
    }
    lines
}

/// Ours, iptables and nftables for one traffic series.
fn traffic_lines(report: &Report, series: &str) -> Vec<Line> {
    let figures: Vec<&Figure> = report
        .group(Group::Traffic)
        .filter(|f| f.series == series)
        .collect();
    if figures.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![Line {
        label: "ours (eBPF)".to_owned(),
        points: figures
            .iter()
            .filter_map(|f| Some((f.services? as f64, f.ours)))
            .collect(),
    }];
    for name in ["iptables", "nftables"] {
        lines.push(Line {
            label: format!("kube-proxy {name}"),
            points: figures
                .iter()
                .filter_map(|f| Some((f.services? as f64, f.baseline_named(name)?.value)))
                .collect(),
        });
    }
    lines
}

/// One panel of bars: title, unit, `(label, value)` per bar.
type Bars = (String, String, Vec<(String, f64)>);

/// The control-plane figures that have baselines, as bar panels.
fn control_plane_bars(report: &Report) -> Vec<Bars> {
    report
        .group(Group::ControlPlane)
        .filter(|f| !f.baselines.is_empty())
        .map(|f| {
            let mut bars = vec![("ours".to_owned(), f.ours)];
            bars.extend(f.baselines.iter().map(|b| (b.name.clone(), b.value)));
            (f.name.clone(), f.unit.clone(), bars)
        })
        .collect()
}

/// A log-x line chart of `lines` against the Service count.
fn line_chart(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    y_label: &str,
    lines: &[Line],
) -> anyhow::Result<()> {
    area.fill(&WHITE).map_err(plot_error)?;
    let all = lines.iter().flat_map(|l| l.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max) * 2.0;
    let y_max = all
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.5f64..x_max).log_scale(), 0f64..y_max.max(1.0))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("Services programmed")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(plot_error)?;
    for (line, colour) in lines.iter().zip(COLOURS.iter().cycle()) {
        let points: Vec<(f64, f64)> = line
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(line.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// Horizontal bar panels, one under the other.
fn bar_charts(area: &DrawingArea<SVGBackend, Shift>, panels: &[Bars]) -> anyhow::Result<()> {
    area.fill(&WHITE).map_err(plot_error)?;
    let areas = area.split_evenly((panels.len(), 1));
    for (panel_area, (title, unit, bars)) in areas.iter().zip(panels) {
        let x_max = bars
            .iter()
            .map(|b| b.1)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.25;
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(panel_area)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(130)
            .build_cartesian_2d(0f64..x_max.max(1e-9), 0f64..bars.len() as f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(bars.len() * 2 + 1)
            .y_label_formatter(&|y| {
                let index = y.floor() as usize;
                if (y - index as f64 - 0.5).abs() < 0.01 {
                    labels.get(index).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_desc(unit.as_str())
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, value))| {
                let colour = COLOURS[i % COLOURS.len()];
                Rectangle::new(
                    [(0.0, i as f64 + 0.15), (*value, i as f64 + 0.85)],
                    colour.filled(),
                )
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, value))| {
                Text::new(
                    super::report::number(*value),
                    (*value, i as f64 + 0.35),
                    ("sans-serif", 13),
                )
            }))
            .map_err(plot_error)?;
    }
    Ok(())
}
