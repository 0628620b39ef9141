//! `usnetd-bench eval-plot`: a grouped bar chart as SVG from a CSV of `x,series,value` rows
//! (a header row is skipped when its value column is not a number). Categories and series
//! keep the order of their first appearance. Hand-written SVG, no dependencies.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args as ClapArgs;

/// Options of `eval-plot`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Input CSV (`x,series,value`).
    #[arg(long)]
    pub csv: PathBuf,
    /// Output SVG.
    #[arg(long)]
    pub out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "")]
    pub title: String,
    /// X axis label.
    #[arg(long, default_value = "")]
    pub xlabel: String,
    /// Y axis label.
    #[arg(long, default_value = "")]
    pub ylabel: String,
}

const COLORS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// The data of a chart: categories, series, and values by (category, series).
#[derive(Debug, Default)]
pub struct Chart {
    /// X categories in order.
    pub xs: Vec<String>,
    /// Series in order.
    pub series: Vec<String>,
    /// Values.
    pub values: HashMap<(usize, usize), f64>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Reads `x,series,value` rows; lines whose value does not parse are skipped.
pub fn parse_csv(text: &str) -> Chart {
    let mut c = Chart::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(',').map(str::trim).collect();
        if parts.len() != 3 {
            continue;
        }
        let Ok(v) = parts[2].parse::<f64>() else {
            continue;
        };
        let xi = match c.xs.iter().position(|x| x == parts[0]) {
            Some(i) => i,
            None => {
                c.xs.push(parts[0].to_string());
                c.xs.len() - 1
            }
        };
        let si = match c.series.iter().position(|s| s == parts[1]) {
            Some(i) => i,
            None => {
                c.series.push(parts[1].to_string());
                c.series.len() - 1
            }
        };
        c.values.insert((xi, si), v);
    }
    c
}

/// A "nice" upper bound and tick step for an axis up to `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn tick_label(v: f64) -> String {
    if v >= 1e9 {
        format!("{}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

/// Renders the chart as an SVG document.
pub fn render(c: &Chart, title: &str, xlabel: &str, ylabel: &str) -> String {
    let (w, h) = (900.0, 480.0);
    let (left, right, top, bottom) = (80.0, 190.0, 40.0, 70.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let max = c.values.values().cloned().fold(0.0, f64::max);
    let (ymax, step) = nice_axis(max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    // Grid and y ticks.
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let y = top + ph - v / ymax * ph;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            left + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y + 4.0,
            tick_label(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="black"/>"#,
        top + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="black"/>"#,
        left + pw,
        top + ph,
        top + ph
    );
    let nx = c.xs.len().max(1) as f64;
    let ns = c.series.len().max(1) as f64;
    let group = pw / nx;
    let bar = group * 0.8 / ns;
    for (xi, x) in c.xs.iter().enumerate() {
        let gx = left + group * xi as f64 + group * 0.1;
        for si in 0..c.series.len() {
            if let Some(val) = c.values.get(&(xi, si)) {
                let bh = val / ymax * ph;
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} / {}: {}</title></rect>"#,
                    gx + bar * si as f64,
                    top + ph - bh,
                    bar.max(1.0),
                    bh,
                    COLORS[si % COLORS.len()],
                    escape(x),
                    escape(&c.series[si]),
                    val
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            gx + group * 0.4,
            top + ph + 18.0,
            escape(x)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 20.0,
        escape(xlabel)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(ylabel)
    );
    for (si, name) in c.series.iter().enumerate() {
        let y = top + 10.0 + 20.0 * si as f64;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/>"#,
            y - 10.0,
            COLORS[si % COLORS.len()]
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{y}">{}</text>"#,
            lx + 18.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Runs `eval-plot`.
pub fn run(args: &Args) -> Result<(), String> {
    let text =
        std::fs::read_to_string(&args.csv).map_err(|e| format!("{}: {e}", args.csv.display()))?;
    let chart = parse_csv(&text);
    if chart.values.is_empty() {
        return Err(format!("{}: no data rows", args.csv.display()));
    }
    let svg = render(&chart, &args.title, &args.xlabel, &args.ylabel);
    std::fs::write(&args.out, svg).map_err(|e| format!("{}: {e}", args.out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_become_bars() {
        let c = parse_csv(
            "x,series,value\n64,direct,100\n64,usnetd,80\n128,direct,90\nbad,row\n128,usnetd,n/a\n",
        );
        assert_eq!(c.xs, vec!["64", "128"]);
        assert_eq!(c.series, vec!["direct", "usnetd"]);
        assert_eq!(c.values.len(), 3);
        let svg = render(&c, "t<1>", "x", "y");
        assert_eq!(
            svg.matches("<rect x=").count(),
            3 + 2,
            "3 bars and 2 legend boxes"
        );
        assert!(svg.contains("t&lt;1&gt;"));
        assert!(svg.ends_with("</svg>\n"));
    }

    #[test]
    fn axes_are_nice() {
        assert_eq!(nice_axis(93.0), (100.0, 20.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        let (m, s) = nice_axis(1_234_567.0);
        assert!(m >= 1_234_567.0 && s > 0.0);
    }
}
