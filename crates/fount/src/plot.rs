//! The loss curve of a run as a PNG: training loss per step and validation loss where measured,
//! on labelled axes.

use std::path::Path;

use anyhow::{bail, Context, Result};

const W: usize = 800;
const H: usize = 480;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 50;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const AXIS: Rgb = [60, 60, 60];
const GRID: Rgb = [225, 225, 225];
const TRAIN: Rgb = [31, 119, 180];
const VAL: Rgb = [255, 127, 14];

/// A 3×5 pixel font for the characters the chart writes.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        'a' => [0b000, 0b110, 0b011, 0b101, 0b111],
        'e' => [0b111, 0b101, 0b111, 0b100, 0b111],
        'i' => [0b010, 0b000, 0b010, 0b010, 0b010],
        'l' => [0b110, 0b010, 0b010, 0b010, 0b111],
        'n' => [0b000, 0b110, 0b101, 0b101, 0b101],
        'o' => [0b000, 0b111, 0b101, 0b101, 0b111],
        'p' => [0b111, 0b101, 0b111, 0b100, 0b100],
        'r' => [0b000, 0b111, 0b100, 0b100, 0b100],
        's' => [0b000, 0b011, 0b100, 0b001, 0b110],
        't' => [0b010, 0b111, 0b010, 0b010, 0b011],
        'v' => [0b000, 0b101, 0b101, 0b101, 0b010],
        _ => [0; 5],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: WHITE.repeat(W * H),
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line, two pixels wide.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            self.set(x.round() as i64, y.round() as i64, c);
            self.set(x.round() as i64, y.round() as i64 + 1, c);
        }
    }

    /// Text at 2× scale with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + k as i64 * 8 + col * 2 + dx, y + row as i64 * 2 + dy, c);
                        }
                    }
                }
            }
        }
    }
}

/// A tick label: short, in the font's characters.
fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws the training loss of every step of `metrics` (a `metrics.jsonl`) and the validation
/// losses into a PNG at `out`.
pub fn loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = fs_err::read_to_string(metrics)?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not a metrics line", metrics.display()))?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64().filter(|l| l.is_finite()) {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64().filter(|l| l.is_finite()) {
            val.push((step, l));
        }
    }
    if train.is_empty() {
        bail!("{} has no steps", metrics.display());
    }
    let x_max = train.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = train.iter().chain(&val).map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |(x, y): (f64, f64)| {
        (
            LEFT as f64 + x / x_max * pw,
            TOP as f64 + (1.0 - y / y_max) * ph,
        )
    };
    let mut c = Canvas::new();
    for i in 0..=5 {
        let y = y_max * i as f64 / 5.0;
        let (_, py) = to_px((0.0, y));
        c.line((LEFT as f64, py), ((W - RIGHT) as f64, py), GRID);
        c.text(8, py as i64 - 5, &label(y), AXIS);
        let x = x_max * i as f64 / 5.0;
        let (px, _) = to_px((x, 0.0));
        c.line((px, TOP as f64), (px, (H - BOTTOM) as f64), GRID);
        c.text(
            px as i64 - 8,
            (H - BOTTOM) as i64 + 10,
            &format!("{:.0}", x),
            AXIS,
        );
    }
    c.line(
        (LEFT as f64, TOP as f64),
        (LEFT as f64, (H - BOTTOM) as f64),
        AXIS,
    );
    c.line(
        (LEFT as f64, (H - BOTTOM) as f64),
        ((W - RIGHT) as f64, (H - BOTTOM) as f64),
        AXIS,
    );
    c.text(LEFT as i64, 12, "loss", AXIS);
    c.text((W / 2) as i64 - 16, (H - 18) as i64, "step", AXIS);
    c.text((W - RIGHT) as i64 - 120, 12, "train", TRAIN);
    c.text((W - RIGHT) as i64 - 60, 12, "val", VAL);
    for w in train.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), TRAIN);
    }
    for w in val.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), VAL);
    }
    for &p in &val {
        let (x, y) = to_px(p);
        for dx in -3..=3 {
            for dy in -3..=3 {
                c.set(x as i64 + dx, y as i64 + dy, VAL);
            }
        }
    }
    let file = std::io::BufWriter::new(fs_err::File::create(out)?);
    let mut enc = png::Encoder::new(file, W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let what = || format!("writing {}", out.display());
    let mut w = enc.write_header().with_context(what)?;
    w.write_image_data(&c.px).with_context(what)?;
    w.finish().with_context(what)?;
    Ok(())
}
