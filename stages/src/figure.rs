//! PNG charts drawn without a font stack: the loss curve (training loss in blue,
//! eval loss in orange, y from 0 to the largest loss) and the reliability diagram.
//! Exact values live in the metrics files; the pictures are for a glance.

use std::path::Path;

const W: usize = 640;
const H: usize = 400;
const PAD: usize = 30;

struct Canvas(Vec<u8>);

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.0[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for dx in -thick / 2..=thick / 2 {
                for dy in -thick / 2..=thick / 2 {
                    self.put(x.round() as i64 + dx, y.round() as i64 + dy, c);
                }
            }
        }
    }
}

/// Draws `train` and `eval` series of (step, loss) into a PNG at `path`.
/// A reliability diagram: for each series (up to two: blue, orange) and each of `bins`
/// equal-width confidence bins, a bar as tall as the accuracy of the items in it (half
/// the bin width each, side by side); the diagonal is perfect calibration.
/// Each series item is (confidence, correct).
pub fn reliability(path: &Path, series: &[Vec<(f64, bool)>], bins: usize) -> std::io::Result<()> {
    let mut c = Canvas(vec![255; W * H * 3]);
    let sx = |x: f64| PAD as f64 + x * (W - 2 * PAD) as f64;
    let sy = |y: f64| (H - PAD) as f64 - y * (H - 2 * PAD) as f64;
    c.grid();
    let colors = [[31, 119, 180], [255, 127, 14]];
    let width = 1.0 / bins as f64;
    for (k, items) in series.iter().enumerate().take(2) {
        for b in 0..bins {
            let inside: Vec<bool> = items
                .iter()
                .filter(|(conf, _)| crate::metrics::calibration::bin_of(*conf, bins) == b)
                .map(|p| p.1)
                .collect();
            if inside.is_empty() {
                continue;
            }
            let acc = inside.iter().filter(|&&x| x).count() as f64 / inside.len() as f64;
            let x0 = sx(b as f64 * width + k as f64 * width / 2.0);
            let x1 = sx(b as f64 * width + (k + 1) as f64 * width / 2.0) - 1.0;
            let mut x = x0;
            while x <= x1 {
                c.line((x, sy(0.0)), (x, sy(acc)), colors[k], 1);
                x += 1.0;
            }
        }
    }
    c.line((sx(0.0), sy(0.0)), (sx(1.0), sy(1.0)), [120, 120, 120], 1);
    c.axes();
    c.save(path)
}

impl Canvas {
    /// Five light horizontal lines at 0, ¼, ½, ¾ and all of the plot height.
    fn grid(&mut self) {
        for i in 0..=4 {
            let y = (H - PAD) as f64 - i as f64 / 4.0 * (H - 2 * PAD) as f64;
            self.line((PAD as f64, y), ((W - PAD) as f64, y), [225, 225, 225], 1);
        }
    }

    /// The x and y axes.
    fn axes(&mut self) {
        let (l, r, t, b) = (PAD as f64, (W - PAD) as f64, PAD as f64, (H - PAD) as f64);
        self.line((l, b), (r, b), [60, 60, 60], 1);
        self.line((l, t), (l, b), [60, 60, 60], 1);
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(std::io::Error::other)?;
            w.write_image_data(&self.0).map_err(std::io::Error::other)?;
        }
        crate::fsio::write_atomic(path, &bytes)
    }
}

/// Training loss (blue) and eval loss (orange) against the step.
pub fn loss_curve(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> std::io::Result<()> {
    let mut c = Canvas(vec![255; W * H * 3]);
    let max_x = train.iter().chain(eval).map(|p| p.0).fold(1.0, f64::max);
    let max_y = train
        .iter()
        .chain(eval)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(1e-9, f64::max)
        * 1.05;
    let sx = |x: f64| PAD as f64 + x / max_x * (W - 2 * PAD) as f64;
    let sy = |y: f64| (H - PAD) as f64 - y / max_y * (H - 2 * PAD) as f64;
    c.grid();
    c.axes();
    for (series, color, thick) in [(train, [31, 119, 180], 1), (eval, [255, 127, 14], 3)] {
        for w in series.windows(2) {
            c.line(
                (sx(w[0].0), sy(w[0].1)),
                (sx(w[1].0), sy(w[1].1)),
                color,
                thick,
            );
        }
        if let [only] = series {
            c.line(
                (sx(only.0) - 2.0, sy(only.1)),
                (sx(only.0) + 2.0, sy(only.1)),
                color,
                thick,
            );
        }
    }
    c.save(path)
}
