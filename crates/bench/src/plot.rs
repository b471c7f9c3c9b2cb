//! The benchmark's plots, drawn with plotters into PNG files: downtime against database
//! size per strategy, client latency over time around the change, and the initial copy's
//! time against size per copy method beside dump and restore.

use super::BenchResult;
use super::strategies::Measured;
use anyhow::{Context, anyhow};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A named, coloured series of (database size in MB, value) points.
type Line = (String, RGBColor, Vec<(f64, f64)>);

const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

const STRATEGIES: [(&str, RGBColor); 3] = [
    ("pgflip", RGBColor(0, 114, 178)),
    ("conventional (dump/restore)", RGBColor(213, 94, 0)),
    ("in-place (pg_upgrade --link)", RGBColor(0, 158, 115)),
];

/// plotters draws text with a font it is given: DejaVu Sans from the system (the setup
/// script installs fonts-dejavu-core).
fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONT_FILES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or("no DejaVu Sans font found: install fonts-dejavu-core (make setup)")?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
            .map_err(|_| "the DejaVu Sans font does not load".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn strategies(m: [&Measured; 3]) -> impl Iterator<Item = (&'static str, RGBColor, &Measured)> {
    STRATEGIES
        .into_iter()
        .zip(m)
        .map(|((name, color), m)| (name, color, m))
}

pub fn draw(r: &BenchResult, out: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
    register_font()?;
    let by_size = out.join(format!("{stem}-downtime.png"));
    downtime_by_size(r, &by_size).context("drawing the downtime plot")?;
    let largest = r.sizes.last().context("no sizes")?;
    let around = out.join(format!("{stem}-latency.png"));
    latency_around_switch(
        [&largest.pgflip, &largest.conventional, &largest.in_place],
        largest.size_mb,
        &around,
    )
    .context("drawing the latency plot")?;
    let copies = out.join(format!("{stem}-initial-copy.png"));
    initial_copy_by_size(r, &copies).context("drawing the initial copy plot")?;
    Ok(vec![by_size, around, copies])
}

/// Seconds to copy the data before the switch can start: each pgflip copy method (from
/// the commit until green is in sync) and the conventional dump and restore.
fn initial_copy_by_size(r: &BenchResult, path: &Path) -> anyhow::Result<()> {
    let mut lines: Vec<Line> = super::report::copy_methods(r)
        .into_iter()
        .enumerate()
        .map(|(i, method)| {
            let points = r
                .sizes
                .iter()
                .filter_map(|s| s.pgflip_runs().nth(i)?.pgflip.as_ref().map(|p| (s, p)))
                .map(|(s, p)| (s.size_mb as f64, p.initial_sync_s))
                .collect();
            let color = [RGBColor(0, 114, 178), RGBColor(86, 180, 233)][i.min(1)];
            (format!("pgflip, {method} copy"), color, points)
        })
        .collect();
    lines.push((
        "dump | restore".into(),
        STRATEGIES[1].1,
        r.sizes
            .iter()
            .filter_map(|s| Some((s.size_mb as f64, s.conventional.dump_restore_s?)))
            .collect(),
    ));
    lines_by_size(
        path,
        &format!("Initial copy under load, PostgreSQL {} → {}", r.from, r.to),
        "time to copy (s, log scale)",
        &|s| format!("{s:.1}"),
        lines,
    )
}

fn downtime_by_size(r: &BenchResult, path: &Path) -> anyhow::Result<()> {
    let lines = STRATEGIES
        .into_iter()
        .enumerate()
        .map(|(i, (name, color))| {
            let points = r
                .sizes
                .iter()
                .map(|s| {
                    let m = [&s.pgflip, &s.conventional, &s.in_place][i];
                    (s.size_mb as f64, m.downtime_ms.max(1.0))
                })
                .collect();
            (name.to_string(), color, points)
        })
        .collect();
    lines_by_size(
        path,
        &format!("Downtime seen by clients, PostgreSQL {} → {}", r.from, r.to),
        "downtime (ms, log scale)",
        &|ms| format!("{ms:.0}"),
        lines,
    )
}

/// One line per series against database size, both axes logarithmic.
fn lines_by_size(
    path: &Path,
    caption: &str,
    y_desc: &str,
    y_label: &dyn Fn(&f64) -> String,
    lines: Vec<Line>,
) -> anyhow::Result<()> {
    let points = || lines.iter().flat_map(|l| l.2.iter());
    let max_size = points().map(|p| p.0).fold(1.0f64, f64::max);
    let min_size = points().map(|p| p.0).fold(max_size, f64::min);
    let max_y = points().map(|p| p.1).fold(1.0f64, f64::max) * 2.0;
    let min_y = points().map(|p| p.1).fold(max_y, f64::min).max(0.01) / 2.0;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            ((min_size / 2.0)..(max_size * 2.0)).log_scale(),
            (min_y..max_y).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("database size (MB, log scale)")
        .y_desc(y_desc)
        // A log axis gets a label at every minor step; whole numbers at a few are enough.
        .x_labels(6)
        .x_label_formatter(&|mb| format!("{mb:.0}"))
        .y_label_formatter(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (name, color, points) in lines {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 5, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

fn latency_around_switch(m: [&Measured; 3], size_mb: u64, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = m.iter().flat_map(|s| s.series.iter());
    let (x_min, x_max, y_max) = points.fold((0.0f64, 1.0f64, 1.0f64), |(a, b, c), (x, y)| {
        (a.min(*x), b.max(*x), c.max(*y))
    });
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Client latency around the change, {size_mb} MB (max per 20 ms)"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_min / 1000.0)..(x_max / 1000.0),
            (0.1f64..y_max * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("seconds from the start of the change")
        .y_desc("transaction latency (ms, log scale)")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (name, color, s) in strategies(m) {
        let runs = runs_of_completions(&s.series);
        // One-pixel lines: plotters joins wider ones with miters, which turn a one-bucket
        // peak into a spike far above its value.
        for run in runs.iter().filter(|r| r.len() > 1) {
            chart.draw_series(LineSeries::new(run.clone(), color.stroke_width(1)))?;
        }
        chart.draw_series(
            runs.iter()
                .filter(|r| r.len() == 1)
                .map(|r| Circle::new(r[0], 2, color.filled())),
        )?;
        // The legend entry, drawn once with nothing to show on the chart itself.
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 15))
        // Upper left: before the change no transaction waits long, so nothing hides there.
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The latency series (ms from the change, max latency per bucket) cut where no
/// transaction completed: a stop shows as a gap, not as a line drawn across it.
fn runs_of_completions(series: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for &(x, y) in series {
        if y > 0.0 {
            runs.last_mut().expect("never empty").push((x / 1000.0, y));
        } else if runs.last().is_some_and(|r| !r.is_empty()) {
            runs.push(Vec::new());
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_cuts_the_line() {
        let series = [
            (0.0, 1.0),
            (20.0, 2.0),
            (40.0, 0.0),
            (60.0, 0.0),
            (80.0, 900.0),
        ];
        assert_eq!(
            runs_of_completions(&series),
            vec![vec![(0.0, 1.0), (0.02, 2.0)], vec![(0.08, 900.0)]]
        );
    }
}
