//! SVG line charts, dependency-free: any number of [`Series`], each drawn
//! against the left or the right y axis, with a legend, axis labels, and
//! "nice" ticks. The seed's figures are of this shape (connections/s and
//! bandwidth against object size, one line per hypervisor).

use std::fmt::Write as _;

/// Which y axis a series is scaled against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Axis {
    #[default]
    Left,
    Right,
}

/// One line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// (x, y) points, drawn in the order given.
    pub points: Vec<(f64, f64)>,
    pub axis: Axis,
    /// CSS colour; `None` picks one from a fixed palette.
    pub color: Option<String>,
    /// Dashed stroke (e.g. to tell a right-axis series apart).
    pub dashed: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            axis: Axis::Left,
            color: None,
            dashed: false,
        }
    }

    pub fn on_right_axis(mut self) -> Self {
        self.axis = Axis::Right;
        self
    }

    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    pub fn color(mut self, color: impl Into<String>) -> Self {
        self.color = Some(color.into());
        self
    }
}

/// A chart's frame: titles, labels, size, optional fixed x ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Label of the right axis; used only when a series is on it.
    pub y2_label: String,
    /// Explicit x ticks `(value, label)`; `None` computes nice ones.
    pub x_ticks: Option<Vec<(f64, String)>>,
    pub width: u32,
    pub height: u32,
}

impl Chart {
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            y2_label: String::new(),
            x_ticks: None,
            width: 800,
            height: 480,
        }
    }
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The palette's `i`-th colour (cycling): give a series the colour of its
/// subject's index, so that it keeps it from chart to chart.
pub fn palette(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Ticks covering `[0, max]` (or `[min, max]`) at 1/2/5×10^k steps.
pub fn nice_ticks(min: f64, max: f64, target: usize) -> Vec<f64> {
    let (min, max) = if (max - min).abs() < f64::EPSILON {
        (min, min + 1.0)
    } else {
        (min, max)
    };
    let raw = (max - min) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (min / step).floor() * step;
    let mut out = Vec::new();
    let mut v = start;
    while v < max + step * 0.999 {
        out.push(v);
        v += step;
        if out.len() > 100 {
            break;
        }
    }
    out
}

/// Short number labels: 1500 → "1.5k", 2000000 → "2M".
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    };
    format!("{s}{suffix}")
}

fn y_range(series: &[&Series]) -> (f64, f64) {
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    (0.0, if max > 0.0 { max * 1.05 } else { 1.0 })
}

/// Renders the chart as a standalone SVG document.
pub fn line_chart_svg(chart: &Chart, series: &[Series]) -> String {
    let (w, h) = (chart.width as f64, chart.height as f64);
    let has_right = series.iter().any(|s| s.axis == Axis::Right);
    let (ml, mr, mt, mb) = (80.0, if has_right { 80.0 } else { 30.0 }, 50.0, 110.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);

    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|v| v.is_finite())
        .collect();
    let x_ticks: Vec<(f64, String)> = match &chart.x_ticks {
        Some(t) => t.clone(),
        None => {
            let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
            nice_ticks(lo, hi, 8)
                .into_iter()
                .map(|v| (v, short_number(v)))
                .collect()
        }
    };
    let x_lo = x_ticks
        .iter()
        .map(|t| t.0)
        .chain(xs.iter().copied())
        .fold(f64::INFINITY, f64::min);
    let x_hi = x_ticks
        .iter()
        .map(|t| t.0)
        .chain(xs.iter().copied())
        .fold(f64::NEG_INFINITY, f64::max);
    let (x_lo, x_hi) = if x_lo.is_finite() && x_hi > x_lo {
        (x_lo, x_hi)
    } else {
        (0.0, 1.0)
    };

    let left: Vec<&Series> = series.iter().filter(|s| s.axis == Axis::Left).collect();
    let right: Vec<&Series> = series.iter().filter(|s| s.axis == Axis::Right).collect();
    let axis_ticks = |ss: &[&Series]| {
        let (lo, hi) = y_range(ss);
        let t = nice_ticks(lo, hi, 6);
        let top = t.last().copied().unwrap_or(hi).max(hi);
        (t, top)
    };
    let (ly_ticks, ly_hi) = axis_ticks(&left);
    let (ry_ticks, ry_hi) = axis_ticks(&right);

    let px = |x: f64| ml + (x - x_lo) / (x_hi - x_lo) * pw;
    let py = |y: f64, hi: f64| mt + ph - (y / hi) * ph;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(&chart.title)
    );
    // Grid and left ticks.
    for t in &ly_ticks {
        let y = py(*t, ly_hi);
        let _ = writeln!(
            o,
            "<line x1=\"{ml}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>",
            ml + pw
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            ml - 6.0,
            y + 4.0,
            short_number(*t)
        );
    }
    if has_right {
        for t in &ry_ticks {
            let y = py(*t, ry_hi);
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="start">{}</text>"#,
                ml + pw + 6.0,
                y + 4.0,
                short_number(*t)
            );
        }
    }
    for (v, label) in &x_ticks {
        let x = px(*v);
        let _ = writeln!(
            o,
            "<line x1=\"{x:.1}\" y1=\"{mt}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#f0f0f0\"/>",
            mt + ph
        );
        let _ = writeln!(
            o,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            mt + ph + 18.0,
            esc(label)
        );
    }
    // Axes.
    let _ = writeln!(
        o,
        r#"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        ml + pw / 2.0,
        mt + ph + 40.0,
        esc(&chart.x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        mt + ph / 2.0,
        esc(&chart.y_label)
    );
    if has_right {
        let _ = writeln!(
            o,
            r#"<text transform="translate({:.1},{:.1}) rotate(90)" text-anchor="middle">{}</text>"#,
            w - 20.0,
            mt + ph / 2.0,
            esc(&chart.y2_label)
        );
    }
    // Lines and points.
    for (i, s) in series.iter().enumerate() {
        let color = s.color.clone().unwrap_or_else(|| palette(i).to_string());
        let hi = if s.axis == Axis::Right { ry_hi } else { ly_hi };
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y, hi)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"><title>{}</title></polyline>"#,
            pts.join(" "),
            esc(&s.name)
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
        }
    }
    // Legend, below the x label.
    let mut lx = ml;
    let ly = mt + ph + 70.0;
    for (i, s) in series.iter().enumerate() {
        let color = s.color.clone().unwrap_or_else(|| palette(i).to_string());
        let dash = if s.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let label = if has_right {
            format!(
                "{} ({})",
                s.name,
                if s.axis == Axis::Right {
                    "right"
                } else {
                    "left"
                }
            )
        } else {
            s.name.clone()
        };
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            esc(&label)
        );
        lx += 50.0 + 7.0 * label.chars().count() as f64;
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = nice_ticks(0.0, 43_000.0, 6);
        assert_eq!(t.first(), Some(&0.0));
        assert!(*t.last().unwrap() >= 43_000.0);
        assert_eq!(short_number(1500.0), "1.5k");
        assert_eq!(short_number(2e6), "2M");
        assert_eq!(short_number(0.0), "0");
    }

    #[test]
    fn renders_two_axes_and_legend() {
        let mut c = Chart::new("native", "object size", "connections/s");
        c.y2_label = "Mbit/s".into();
        c.x_ticks = Some(vec![(0.0, "0".into()), (65536.0, "64K".into())]);
        let svg = line_chart_svg(
            &c,
            &[
                Series::new("conn/s", vec![(0.0, 40000.0), (65536.0, 9000.0)]),
                Series::new("Mbit/s <bw>", vec![(0.0, 0.0), (65536.0, 4000.0)])
                    .on_right_axis()
                    .dashed(),
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("Mbit/s &lt;bw&gt; (right)"));
        assert!(svg.contains(">64K<"));
        assert!(svg.contains("connections/s"));
    }

    #[test]
    fn empty_series_do_not_panic() {
        let svg = line_chart_svg(&Chart::new("t", "x", "y"), &[Series::new("none", vec![])]);
        assert!(svg.contains("</svg>"));
    }
}
