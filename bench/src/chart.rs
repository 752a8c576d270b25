//! A small SVG line chart of cost per operation against existing volumes.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::report::Series;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 64.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = ["#1b6ca8", "#d95f02", "#2ca02c", "#7b3294", "#a6611a", "#555555"];

/// The chart as an SVG document. The x axis is categorical (0, 1,000,
/// 10,000 sit evenly spaced), the y axis linear from zero, so a flat line
/// means a cost independent of the number of volumes.
pub fn svg(series: &[Series]) -> String {
    let xs: Vec<usize> =
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect::<BTreeSet<_>>().into_iter().collect();
    // Scaled to the medians: one repetition slowed down by the machine's
    // load would otherwise flatten every line; it is drawn at the top edge.
    let ymax = nice(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0, f64::max) * 1.3);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x_of = |n: usize| {
        let i = xs.iter().position(|x| *x == n).unwrap_or(0) as f64;
        LEFT + if xs.len() > 1 { i * pw / (xs.len() - 1) as f64 } else { pw / 2.0 }
    };
    let y_of = |v: f64| TOP + ph - v / ymax * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16" font-weight="bold">Time per CreateVolume + DeleteVolume pair</text>"#,
        LEFT + pw / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="44" text-anchor="middle" fill="#555">lower is better · lines: medians · rings: repetitions (↑ off scale) · dashed: peer</text>"##,
        LEFT + pw / 2.0
    );
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let y = y_of(v);
        let _ = writeln!(s, r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/>"##, LEFT + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, LEFT - 8.0, y + 4.0, label(v));
    }
    for &n in &xs {
        let x = x_of(n);
        let _ = writeln!(s, r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#eee"/>"##, TOP + ph);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, TOP + ph + 20.0, thousands(n));
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" stroke="#333"/><line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#333"/>"##,
        TOP + ph,
        LEFT + pw,
        TOP + ph,
        TOP + ph
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">volumes already existing</text>"#,
        LEFT + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {}) rotate(-90)" text-anchor="middle">µs per pair (wall time / pairs)</text>"#,
        TOP + ph / 2.0
    );
    for (i, line) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if line.ours { "" } else { r#" stroke-dasharray="6 4""# };
        let points: Vec<String> = line.points.iter().map(|&(n, v)| format!("{:.1},{:.1}", x_of(n), y_of(v))).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.5"{dash}/>"#,
            points.join(" ")
        );
        for &(n, v) in &line.each {
            let (x, y) = (x_of(n), y_of(v.min(ymax)));
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="none" stroke="{color}" opacity="0.7"><title>{v:.0} µs</title></circle>"#
            );
            if v > ymax {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-size="11" fill="{color}">↑ {}</text>"#,
                    x + 6.0,
                    y + 4.0 + 12.0 * i as f64,
                    label(v)
                );
            }
        }
        for &(n, v) in &line.points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"><title>{v:.0} µs</title></circle>"#,
                x_of(n),
                y_of(v)
            );
        }
        let ly = TOP + 10.0 + 24.0 * i as f64;
        let lx = LEFT + pw + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2.5"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 28.0,
            lx + 36.0,
            ly + 4.0,
            line.label
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Rounds an axis maximum up to 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|c| *c >= v).unwrap_or(10.0 * p)
}

fn label(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0} ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice(730.0), 1000.0);
        assert_eq!(nice(1.3), 2.0);
        assert_eq!(nice(0.0), 1.0);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(10_000), "10,000");
    }
}
