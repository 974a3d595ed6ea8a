//! Figures every stage draws the same way, through `plotters`: a line chart with several
//! series, grouped bars, histograms and the reliability diagram. Each has a title,
//! labelled axes with tick values and, with more than one series, a legend; each is
//! written as a PNG (for a glance, and for `report.md`) and as an SVG next to it (for
//! `pipe report`). Text uses DejaVu Sans embedded in the binary (the `dejavu` crate), so
//! no system font is needed. Writes are atomic. Exact values live in the metrics files.

use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Pixel size of every figure.
pub const SIZE: (u32, u32) = (800, 500);

/// Series colours (matplotlib's tab10, so figures look like what users know).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// What a figure shows.
#[derive(Debug, Clone)]
pub enum Figure {
    /// Lines through `(x, y)` points, one per series.
    Lines {
        /// Title.
        title: String,
        /// X axis label.
        x: String,
        /// Y axis label.
        y: String,
        /// `(name, points)`.
        series: Vec<(String, Vec<(f64, f64)>)>,
    },
    /// Grouped bars: one group per category, one bar per series.
    Bars {
        /// Title.
        title: String,
        /// X axis label.
        x: String,
        /// Y axis label.
        y: String,
        /// Category names.
        categories: Vec<String>,
        /// `(name, one value per category)`.
        series: Vec<(String, Vec<f64>)>,
    },
    /// Counts of values in `bins` equal bins over their common range.
    Histogram {
        /// Title.
        title: String,
        /// X axis label (what the values are).
        x: String,
        /// `(name, values)`.
        series: Vec<(String, Vec<f64>)>,
        /// Bins.
        bins: usize,
    },
    /// Accuracy per confidence bin against the diagonal of perfect calibration, with the
    /// number of items above each bar.
    Reliability {
        /// Title.
        title: String,
        /// `(name, (confidence, correct) items)`.
        series: Vec<(String, Vec<(f64, bool)>)>,
        /// Equal-width confidence bins over [0, 1].
        bins: usize,
    },
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            let bytes = match style {
                FontStyle::Bold => dejavu::sans::bold(),
                _ => dejavu::sans::regular(),
            };
            // The bytes are a valid TrueType font shipped by the crate.
            let _ = plotters::style::register_font("sans-serif", style, bytes);
        }
    });
}

fn font(size: u32) -> TextStyle<'static> {
    ("sans-serif", size).into_font().color(&BLACK)
}

/// `[lo, hi]` with a margin, and never empty.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let d = lo.abs().max(1.0) * 0.05;
        return (lo - d, hi + d);
    }
    let m = (hi - lo) * 0.05;
    (lo - m, hi + m)
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        })
}

impl Figure {
    fn title(&self) -> &str {
        match self {
            Figure::Lines { title, .. }
            | Figure::Bars { title, .. }
            | Figure::Histogram { title, .. }
            | Figure::Reliability { title, .. } => title,
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(self.title(), font(24))
            .margin(16)
            .x_label_area_size(52)
            .y_label_area_size(72);
        match self {
            Figure::Lines { x, y, series, .. } => {
                let (x0, x1) = bounds(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
                let (y0, y1) = bounds(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
                let (x0, x1) = padded(x0, x1);
                let (y0, mut y1) = padded(y0, y1);
                if series.len() >= 2 {
                    // Headroom for the legend (upper right), so it never hides a line
                    // that ends high, as a metric rising to its best does.
                    y1 += (y1 - y0) * (0.07 * series.len() as f64 + 0.05);
                }
                let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;
                let whole = series
                    .iter()
                    .flat_map(|s| s.1.iter())
                    .all(|p| p.0.fract() == 0.0);
                mesh(&mut chart, x, y, whole)?;
                for (i, (name, pts)) in series.iter().enumerate() {
                    let c = COLORS[i % COLORS.len()];
                    let pts: Vec<(f64, f64)> =
                        pts.iter().copied().filter(|p| p.1.is_finite()).collect();
                    chart
                        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(3))
                        });
                    // Few points (an eval every N steps): mark them.
                    if pts.len() <= 40 {
                        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
                    }
                }
                legend(&mut chart, series.len())?;
            }
            Figure::Bars {
                x,
                y,
                categories,
                series,
                ..
            } => {
                let (lo, hi) = bounds(series.iter().flat_map(|s| s.1.iter().copied()));
                let (lo, hi) = (lo.min(0.0), hi.max(0.0));
                let (_, hi) = padded(lo, hi);
                let n = categories.len().max(1);
                let mut chart = builder.build_cartesian_2d(0f64..n as f64, lo..hi)?;
                let names = categories.clone();
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_desc(x.as_str())
                    .y_desc(y.as_str())
                    .x_labels(n * 2 + 1)
                    .x_label_formatter(&move |v| {
                        let i = v.floor() as usize;
                        if (v - i as f64 - 0.5).abs() < 0.01 {
                            names.get(i).cloned().unwrap_or_default()
                        } else {
                            String::new()
                        }
                    })
                    .label_style(font(14))
                    .axis_desc_style(font(16))
                    .draw()?;
                let k = series.len().max(1) as f64;
                for (si, (name, vals)) in series.iter().enumerate() {
                    let c = COLORS[si % COLORS.len()];
                    chart
                        .draw_series(vals.iter().enumerate().map(|(ci, &v)| {
                            let x0 = ci as f64 + 0.1 + 0.8 * si as f64 / k;
                            let x1 = x0 + 0.8 / k - 0.02;
                            Rectangle::new([(x0, 0.0), (x1, v)], c.filled())
                        }))?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled())
                        });
                }
                legend(&mut chart, series.len())?;
            }
            Figure::Histogram {
                x, series, bins, ..
            } => {
                let bins = (*bins).max(1);
                let (lo, hi) = bounds(series.iter().flat_map(|s| s.1.iter().copied()));
                let (lo, hi) = match (lo.is_finite(), hi - lo > 1e-12) {
                    (false, _) => (0.0, 1.0),
                    // All values equal: one unit around them, not a range of zero.
                    (true, false) => (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0)),
                    (true, true) => (lo, hi),
                };
                let width = (hi - lo) / bins as f64;
                let counts: Vec<Vec<usize>> = series
                    .iter()
                    .map(|(_, v)| {
                        let mut c = vec![0usize; bins];
                        for &x in v.iter().filter(|x| x.is_finite()) {
                            let b = (((x - lo) / width) as usize).min(bins - 1);
                            c[b] += 1;
                        }
                        c
                    })
                    .collect();
                let top = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
                let mut chart =
                    builder.build_cartesian_2d(lo..lo + width * bins as f64, 0f64..top * 1.1)?;
                chart
                    .configure_mesh()
                    .x_desc(x.as_str())
                    .y_desc("count")
                    // Counts are whole: no label at the fractional ticks of a small range.
                    .y_label_formatter(&|v| {
                        if (v - v.round()).abs() < 1e-9 {
                            format!("{v:.0}")
                        } else {
                            String::new()
                        }
                    })
                    .label_style(font(14))
                    .axis_desc_style(font(16))
                    .light_line_style(BLACK.mix(0.06))
                    .bold_line_style(BLACK.mix(0.15))
                    .draw()?;
                let k = series.len().max(1) as f64;
                for (si, ((name, _), c)) in series.iter().zip(&counts).enumerate() {
                    let col = COLORS[si % COLORS.len()];
                    chart
                        .draw_series(c.iter().enumerate().map(|(b, &n)| {
                            let x0 = lo + width * (b as f64 + si as f64 / k);
                            let x1 = x0 + width / k - width * 0.04;
                            Rectangle::new([(x0, 0.0), (x1, n as f64)], col.mix(0.85).filled())
                        }))?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled())
                        });
                }
                legend(&mut chart, series.len())?;
            }
            Figure::Reliability { series, bins, .. } => {
                let bins = (*bins).max(1);
                let mut chart = builder.build_cartesian_2d(0f64..1f64, 0f64..1.1f64)?;
                mesh(&mut chart, "confidence", "accuracy", false)?;
                let w = 1.0 / bins as f64;
                let k = series.len().max(1) as f64;
                if series.iter().all(|(_, items)| items.is_empty()) {
                    chart.draw_series(std::iter::once(Text::new(
                        "no item has a confidence (every output failed to parse?)",
                        (0.22, 0.55),
                        font(16),
                    )))?;
                }
                for (si, (name, items)) in series.iter().enumerate() {
                    let c = COLORS[si % COLORS.len()];
                    let mut bars = Vec::new();
                    for b in 0..bins {
                        let inside: Vec<bool> = items
                            .iter()
                            .filter(|(conf, _)| {
                                crate::metrics::calibration::bin_of(*conf, bins) == b
                            })
                            .map(|p| p.1)
                            .collect();
                        if inside.is_empty() {
                            continue;
                        }
                        let acc =
                            inside.iter().filter(|&&x| x).count() as f64 / inside.len() as f64;
                        let x0 = b as f64 * w + w * si as f64 / k;
                        bars.push((x0, x0 + w / k, acc, inside.len()));
                    }
                    chart
                        .draw_series(bars.iter().map(|&(x0, x1, acc, _)| {
                            Rectangle::new([(x0, 0.0), (x1 - w * 0.02, acc)], c.mix(0.85).filled())
                        }))?
                        // A series without items (no reply parsed) says so instead of
                        // leaving a reader to look for its bars.
                        .label(if items.is_empty() {
                            format!("{name} (no items)")
                        } else {
                            format!("{name} ({} items)", items.len())
                        })
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled())
                        });
                    chart.draw_series(bars.iter().map(|&(x0, x1, acc, n)| {
                        Text::new(
                            format!("{n}"),
                            ((x0 + x1) / 2.0 - w * 0.05 / k.max(1.0), acc + 0.05),
                            font(11),
                        )
                    }))?;
                }
                // The diagonal on top of the bars.
                chart
                    .draw_series(LineSeries::new(
                        vec![(0.0, 0.0), (1.0, 1.0)],
                        BLACK.mix(0.6).stroke_width(2),
                    ))?
                    .label("perfect calibration")
                    .legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 22, y)], BLACK.mix(0.6).stroke_width(2))
                    });
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.4))
                    .label_font(font(14))
                    .draw()?;
            }
        }
        root.present()
    }

    /// Writes the figure as `path` (PNG) and the same path with `.svg`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        register_font();
        let (w, h) = SIZE;
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
            self.draw(&root)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let mut png_bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png_bytes, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Best);
            let mut wr = enc.write_header().map_err(std::io::Error::other)?;
            wr.write_image_data(&rgb).map_err(std::io::Error::other)?;
        }
        crate::fsio::write_atomic(path, &png_bytes)?;
        crate::fsio::write_atomic(&path.with_extension("svg"), self.svg()?.as_bytes())
    }

    /// The figure as an SVG document (what [`Figure::save`] writes beside the PNG), for
    /// pages that inline it.
    pub fn svg(&self) -> std::io::Result<String> {
        register_font();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            self.draw(&root)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(svg)
    }
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A tick value: integers without decimals (optimizer steps), others with at most three.
fn tick(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Axes with their labels; `whole_x` (x values are steps or counts) labels only whole ticks.
fn mesh<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    x: &str,
    y: &str,
    whole_x: bool,
) -> DrawResult<DB> {
    let x_tick = move |v: &f64| {
        if whole_x && (v - v.round()).abs() > 1e-9 {
            String::new()
        } else {
            tick(v)
        }
    };
    chart
        .configure_mesh()
        .x_desc(x)
        .y_desc(y)
        .x_label_formatter(&x_tick)
        .label_style(font(14))
        .axis_desc_style(font(16))
        .light_line_style(BLACK.mix(0.06))
        .bold_line_style(BLACK.mix(0.15))
        .draw()
}

fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    entries: usize,
) -> DrawResult<DB> {
    if entries < 2 {
        return Ok(());
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(font(14))
        .draw()
}

/// Training loss and eval loss against the optimizer step.
pub fn loss_curve(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> std::io::Result<()> {
    let mut series = vec![("train loss".to_string(), train.to_vec())];
    if !eval.is_empty() {
        series.push(("eval loss".to_string(), eval.to_vec()));
    }
    Figure::Lines {
        title: "Training loss".into(),
        x: "optimizer step".into(),
        y: "mean token cross-entropy".into(),
        series,
    }
    .save(path)
}

/// A reliability diagram of named series of (confidence, correct) items.
pub fn reliability(
    path: &Path,
    series: &[(String, Vec<(f64, bool)>)],
    bins: usize,
) -> std::io::Result<()> {
    Figure::Reliability {
        title: "Reliability: accuracy per confidence bin (numbers: items in the bin)".into(),
        series: series.to_vec(),
        bins,
    }
    .save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (width, height, non-white pixels, dark pixels in the title band) of a PNG.
    fn inspect(path: &Path) -> (u32, u32, usize, usize) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        let (w, h) = (info.width, info.height);
        let px = |x: u32, y: u32| {
            let i = ((y * w + x) * 3) as usize;
            (buf[i], buf[i + 1], buf[i + 2])
        };
        let mut ink = 0;
        let mut title = 0;
        for y in 0..h {
            for x in 0..w {
                let (r, g, b) = px(x, y);
                if (r, g, b) != (255, 255, 255) {
                    ink += 1;
                }
                if y < 40 && r < 80 && g < 80 && b < 80 {
                    title += 1;
                }
            }
        }
        (w, h, ink, title)
    }

    #[test]
    fn every_figure_kind_renders_text_axes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        // PIPE_FIGURE_DIR=DIR keeps the figures there, to look at them.
        let keep = std::env::var_os("PIPE_FIGURE_DIR").map(std::path::PathBuf::from);
        let dir_path = keep.clone().unwrap_or_else(|| dir.path().to_path_buf());
        let two = |a: f64| -> Vec<(f64, f64)> {
            (0..50)
                .map(|i| (i as f64, a / (1.0 + i as f64 * 0.1)))
                .collect()
        };
        let items: Vec<(f64, bool)> = (0..200)
            .map(|i| ((i % 10) as f64 / 10.0 + 0.05, i % 3 != 0))
            .collect();
        let figs = [
            (
                "lines",
                Figure::Lines {
                    title: "Training loss".into(),
                    x: "optimizer step".into(),
                    y: "loss".into(),
                    series: vec![("train".into(), two(3.0)), ("eval".into(), two(3.5))],
                },
            ),
            (
                "bars",
                Figure::Bars {
                    title: "Metrics".into(),
                    x: "metric".into(),
                    y: "value".into(),
                    categories: vec!["em".into(), "f1".into(), "ece".into()],
                    series: vec![
                        ("base".into(), vec![0.4, 0.6, 0.1]),
                        ("sft".into(), vec![0.5, 0.7, 0.05]),
                    ],
                },
            ),
            (
                "histogram_two",
                Figure::Histogram {
                    title: "Two held-out margins".into(),
                    x: "r(chosen) - r(rejected)".into(),
                    series: vec![("held-out pairs".into(), vec![0.22, 0.53])],
                    bins: 20,
                },
            ),
            (
                "histogram",
                Figure::Histogram {
                    title: "Margins".into(),
                    x: "r(chosen) - r(rejected)".into(),
                    series: vec![(
                        "held out".into(),
                        (0..300)
                            .map(|i| ((i * 37) % 101) as f64 / 25.0 - 1.0)
                            .collect(),
                    )],
                    bins: 20,
                },
            ),
            (
                "reliability",
                Figure::Reliability {
                    title: "Reliability".into(),
                    series: vec![("base".into(), items.clone()), ("sft".into(), items)],
                    bins: 10,
                },
            ),
        ];
        for (name, fig) in &figs {
            let path = dir_path.as_path().join(format!("{name}.png"));
            fig.save(&path).unwrap();
            let (w, h, ink, title) = inspect(&path);
            assert_eq!((w, h), SIZE, "{name}");
            let total = (w * h) as usize;
            assert!(
                ink > total / 50,
                "{name}: nearly blank ({ink} of {total} pixels drawn)"
            );
            assert!(ink < total * 9 / 10, "{name}: nearly all ink");
            assert!(
                title > 100,
                "{name}: no title text ({title} dark pixels on top)"
            );
            let svg = std::fs::read_to_string(path.with_extension("svg")).unwrap();
            assert!(svg.contains(fig.title()), "{name}: the SVG lacks its title");
            assert!(
                svg.matches("<text").count() >= 8,
                "{name}: the SVG has too few labels"
            );
        }
        // Axis labels and the legend names are in the SVG.
        let svg = std::fs::read_to_string(dir_path.as_path().join("lines.svg")).unwrap();
        for label in ["optimizer step", "loss", "train", "eval"] {
            assert!(svg.contains(label), "lines.svg lacks `{label}`");
        }
    }

    #[test]
    fn empty_and_constant_series_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flat.png");
        Figure::Lines {
            title: "Flat".into(),
            x: "step".into(),
            y: "loss".into(),
            series: vec![("train".into(), vec![(1.0, 2.0)])],
        }
        .save(&path)
        .unwrap();
        assert_eq!(inspect(&path).0, SIZE.0);
        Figure::Histogram {
            title: "Empty".into(),
            x: "margin".into(),
            series: vec![("none".into(), vec![])],
            bins: 10,
        }
        .save(&dir.path().join("empty.png"))
        .unwrap();
    }
}
