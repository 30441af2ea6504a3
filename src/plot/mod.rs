//! Line charts (top-1 against test size, one line per model) as SVG or PNG.
//!
//! One layout serves both formats: the chart is computed once as primitives (lines, markers,
//! text) in pixel coordinates, then written as SVG text or rasterised into an RGB image with a
//! small embedded bitmap font (so a PNG needs no font on the machine). A plotting crate would
//! bring a font stack (fontconfig or a TTF to ship) for one chart; this is ~200 lines.

mod font;

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One line of the chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A vertical dashed line (the training size) and its label.
    pub marker: Option<(f64, String)>,
}

const W: f64 = 800.0;
const H: f64 = 500.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

enum Prim {
    Line {
        a: (f64, f64),
        b: (f64, f64),
        color: [u8; 3],
        width: f64,
        dashed: bool,
    },
    Dot {
        c: (f64, f64),
        color: [u8; 3],
    },
    Text {
        at: (f64, f64),
        text: String,
        color: [u8; 3],
        anchor_end: bool,
    },
}

/// Round numbers for axis ticks covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut v = Vec::new();
    while t <= hi + 1e-9 {
        v.push(t);
        t += step;
    }
    v
}

fn fmt_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

impl Chart {
    fn layout(&self) -> Result<Vec<Prim>> {
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .collect();
        if pts.is_empty() {
            bail!("nothing to plot");
        }
        let (mut x0, mut x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        if let Some((m, _)) = &self.marker {
            x0 = x0.min(*m);
            x1 = x1.max(*m);
        }
        let (mut y0, mut y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let pad = ((y1 - y0) * 0.1).max(0.5);
        y0 -= pad;
        y1 += pad;
        let xpad = ((x1 - x0) * 0.05).max(1.0);
        let (x0, x1) = (x0 - xpad, x1 + xpad);
        let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
        let py = |y: f64| H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
        let black = [0, 0, 0];
        let grey = [200, 200, 200];
        let mut p = Vec::new();
        for t in ticks(y0, y1) {
            p.push(Prim::Line {
                a: (LEFT, py(t)),
                b: (W - RIGHT, py(t)),
                color: grey,
                width: 1.0,
                dashed: false,
            });
            p.push(Prim::Text {
                at: (LEFT - 6.0, py(t) + 4.0),
                text: fmt_tick(t),
                color: black,
                anchor_end: true,
            });
        }
        for t in ticks(x0, x1) {
            p.push(Prim::Line {
                a: (px(t), H - BOTTOM),
                b: (px(t), H - BOTTOM + 5.0),
                color: black,
                width: 1.0,
                dashed: false,
            });
            let s = fmt_tick(t);
            let w = s.len() as f64 * font::WIDTH as f64;
            p.push(Prim::Text {
                at: (px(t) - w / 2.0, H - BOTTOM + 20.0),
                text: s,
                color: black,
                anchor_end: false,
            });
        }
        p.push(Prim::Line {
            a: (LEFT, TOP),
            b: (LEFT, H - BOTTOM),
            color: black,
            width: 1.0,
            dashed: false,
        });
        p.push(Prim::Line {
            a: (LEFT, H - BOTTOM),
            b: (W - RIGHT, H - BOTTOM),
            color: black,
            width: 1.0,
            dashed: false,
        });
        if let Some((m, label)) = &self.marker {
            p.push(Prim::Line {
                a: (px(*m), TOP),
                b: (px(*m), H - BOTTOM),
                color: [90, 90, 90],
                width: 1.5,
                dashed: true,
            });
            p.push(Prim::Text {
                at: (px(*m) + 4.0, TOP + 12.0),
                text: label.clone(),
                color: [90, 90, 90],
                anchor_end: false,
            });
        }
        for (i, s) in self.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let mut sorted = s.points.clone();
            sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in sorted.windows(2) {
                p.push(Prim::Line {
                    a: (px(w[0].0), py(w[0].1)),
                    b: (px(w[1].0), py(w[1].1)),
                    color: c,
                    width: 2.0,
                    dashed: false,
                });
            }
            for q in &sorted {
                p.push(Prim::Dot {
                    c: (px(q.0), py(q.1)),
                    color: c,
                });
            }
            let ly = TOP + 20.0 + 20.0 * i as f64;
            p.push(Prim::Line {
                a: (W - RIGHT + 15.0, ly - 4.0),
                b: (W - RIGHT + 35.0, ly - 4.0),
                color: c,
                width: 2.0,
                dashed: false,
            });
            let label: String = s.label.chars().take(20).collect();
            p.push(Prim::Text {
                at: (W - RIGHT + 40.0, ly),
                text: label,
                color: black,
                anchor_end: false,
            });
        }
        p.push(Prim::Text {
            at: (LEFT, TOP - 15.0),
            text: self.title.clone(),
            color: black,
            anchor_end: false,
        });
        let xw = self.x_label.len() as f64 * font::WIDTH as f64;
        p.push(Prim::Text {
            at: ((LEFT + W - RIGHT - xw) / 2.0, H - 15.0),
            text: self.x_label.clone(),
            color: black,
            anchor_end: false,
        });
        p.push(Prim::Text {
            at: (5.0, TOP - 15.0 + 16.0),
            text: self.y_label.clone(),
            color: black,
            anchor_end: false,
        });
        Ok(p)
    }

    pub fn to_svg(&self) -> Result<String> {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let rgb = |c: [u8; 3]| format!("rgb({},{},{})", c[0], c[1], c[2]);
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"monospace\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        for p in self.layout()? {
            match p {
                Prim::Line { a, b, color, width, dashed } => out.push_str(&format!(
                    "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"{width}\"{}/>\n",
                    a.0,
                    a.1,
                    b.0,
                    b.1,
                    rgb(color),
                    if dashed { " stroke-dasharray=\"6,4\"" } else { "" }
                )),
                Prim::Dot { c, color } => {
                    out.push_str(&format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"/>\n", c.0, c.1, rgb(color)))
                }
                Prim::Text { at, text, color, anchor_end } => out.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{}\"{}>{}</text>\n",
                    at.0,
                    at.1,
                    rgb(color),
                    if anchor_end { " text-anchor=\"end\"" } else { "" },
                    esc(&text)
                )),
            }
        }
        out.push_str("</svg>\n");
        Ok(out)
    }

    pub fn to_rgb(&self) -> Result<(u32, u32, Vec<u8>)> {
        let (w, h) = (W as usize, H as usize);
        let mut img = vec![255u8; w * h * 3];
        let mut put = |x: i64, y: i64, c: [u8; 3]| {
            if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h {
                let i = (y as usize * w + x as usize) * 3;
                img[i..i + 3].copy_from_slice(&c);
            }
        };
        for p in self.layout()? {
            match p {
                Prim::Line {
                    a,
                    b,
                    color,
                    width,
                    dashed,
                } => {
                    let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt().max(1.0);
                    let steps = (len * 2.0) as usize;
                    let r = (width / 2.0).max(0.5);
                    for s in 0..=steps {
                        let t = s as f64 / steps.max(1) as f64;
                        if dashed && ((t * len) as usize / 5) % 2 == 1 {
                            continue;
                        }
                        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
                        let ri = r.ceil() as i64;
                        for dy in -ri..=ri {
                            for dx in -ri..=ri {
                                if ((dx * dx + dy * dy) as f64) <= r * r + 0.25 {
                                    put(x.round() as i64 + dx, y.round() as i64 + dy, color);
                                }
                            }
                        }
                    }
                }
                Prim::Dot { c, color } => {
                    for dy in -4i64..=4 {
                        for dx in -4i64..=4 {
                            if dx * dx + dy * dy <= 12 {
                                put(c.0.round() as i64 + dx, c.1.round() as i64 + dy, color);
                            }
                        }
                    }
                }
                Prim::Text {
                    at,
                    text,
                    color,
                    anchor_end,
                } => {
                    let tw = (text.chars().count() * font::WIDTH) as f64;
                    let x0 = if anchor_end { at.0 - tw } else { at.0 };
                    let y0 = at.1 - (font::HEIGHT as f64 - 3.0);
                    for (k, ch) in text.chars().enumerate() {
                        let code = ch as u32;
                        let g = if (32..127).contains(&code) {
                            &font::GLYPHS[(code - 32) as usize]
                        } else {
                            &font::GLYPHS[('?' as u32 - 32) as usize]
                        };
                        for (row, bits) in g.iter().enumerate() {
                            for col in 0..font::WIDTH {
                                if bits & (1 << col) != 0 {
                                    put(
                                        (x0 + (k * font::WIDTH + col) as f64) as i64,
                                        (y0 + row as f64) as i64,
                                        color,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok((w as u32, h as u32, img))
    }

    /// The chart encoded as PNG or SVG, by `path`'s extension.
    pub fn encode_for(&self, path: &Path) -> Result<Vec<u8>> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("svg") => Ok(self.to_svg()?.into_bytes()),
            Some("png") => {
                let (w, h, rgb) = self.to_rgb()?;
                let img = image::RgbImage::from_raw(w, h, rgb).context("chart buffer size")?;
                let mut bytes = Vec::new();
                img.write_to(
                    &mut std::io::Cursor::new(&mut bytes),
                    image::ImageFormat::Png,
                )?;
                Ok(bytes)
            }
            _ => bail!("{}: --plot writes .png or .svg", path.display()),
        }
    }
}
