//! The snapshot/restore plot: time against guest memory size, one line per
//! target and metric (median, with min–max whiskers), as a PNG.
//!
//! The data comes from results records (a fresh run or a results JSON), so
//! a plot can be redrawn without measuring again. Drawing goes through
//! plotters into an RGB buffer, encoded by the `png` crate; text needs a
//! TrueType font read at run time (Debian's fonts-dejavu-core by default).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{BenchError, Result};
use crate::report::Record;

/// A plotted metric: which scenario and metric name, and the legend text.
struct PlotMetric {
    scenario: &'static str,
    metric: &'static str,
    label: &'static str,
}

/// What the plot shows, in legend order. Firecracker's `restore_to_running`
/// is a new process (spawn included); the vmm's is in-process, and its
/// `process_restore_to_running` is the comparable figure.
const METRICS: &[PlotMetric] = &[
    PlotMetric {
        scenario: "snapshot-full",
        metric: "total",
        label: "pause + full snapshot + resume",
    },
    PlotMetric {
        scenario: "restore-file",
        metric: "restore_to_running",
        label: "restore from file to running",
    },
    PlotMetric {
        scenario: "restore-file",
        metric: "process_restore_to_running",
        label: "restore from file, new process",
    },
    PlotMetric {
        scenario: "restore-uffd",
        metric: "nows_to_running",
        label: "restore via userfaultfd to first instruction",
    },
];

/// One point: a guest size and the metric's summary there, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub mem_mib: u64,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

/// One line of the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// "vmm: pause + full snapshot + resume" (with the vCPU count when the
    /// records hold more than one).
    pub label: String,
    pub target: String,
    /// Points by increasing memory size.
    pub points: Vec<Point>,
}

/// The plotted series from `records`: successful, unlabelled (measured on
/// this machine's KVM) records with a summary in ms. When several records
/// have the same scenario, target, size and vCPUs (results files read
/// together), the later one wins.
pub fn series(records: &[Record]) -> Vec<Series> {
    let many_vcpus = {
        let mut v: Vec<u8> = records.iter().map(|r| r.vcpus).collect();
        v.sort_unstable();
        v.dedup();
        v.len() > 1
    };
    let mut targets: Vec<&str> = Vec::new();
    for r in records {
        if !targets.contains(&r.target.as_str()) {
            targets.push(&r.target);
        }
    }
    let mut out = Vec::new();
    for target in targets {
        for pm in METRICS {
            // (vcpus, mem) -> point; BTreeMap orders by vCPUs, then size.
            let mut points: BTreeMap<(u8, u64), Point> = BTreeMap::new();
            for r in records.iter().filter(|r| {
                r.target == target
                    && r.scenario == pm.scenario
                    && r.error.is_none()
                    && r.label.is_none()
            }) {
                let Some(m) = r.metrics.get(pm.metric).filter(|m| m.unit == "ms") else {
                    continue;
                };
                let Some(s) = m.summary else { continue };
                points.insert(
                    (r.vcpus, r.mem_mib),
                    Point {
                        mem_mib: r.mem_mib,
                        min: s.min,
                        median: s.median,
                        max: s.max,
                    },
                );
            }
            let mut by_vcpus: BTreeMap<u8, Vec<Point>> = BTreeMap::new();
            for ((vcpus, _), p) in points {
                by_vcpus.entry(vcpus).or_default().push(p);
            }
            for (vcpus, points) in by_vcpus {
                let what = if target == "firecracker" && pm.metric == "restore_to_running" {
                    "restore from file, new process"
                } else {
                    pm.label
                };
                let label = if many_vcpus {
                    format!("{target}: {what} ({vcpus} vCPU)")
                } else {
                    format!("{target}: {what}")
                };
                out.push(Series {
                    label,
                    target: target.to_string(),
                    points,
                });
            }
        }
    }
    out
}

/// Where a TrueType font is looked for when none is given.
const DEFAULT_FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// The font file to use: `given`, else the first default that exists.
pub fn find_font(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    DEFAULT_FONTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::Setup(format!(
                "no TrueType font for the plot's text: install fonts-dejavu-core \
                 (resources/install-deps.sh) or pass --font FILE.ttf (looked in {})",
                DEFAULT_FONTS.join(", ")
            ))
        })
}

/// Registers `font` as plotters' sans-serif face (once per process; the
/// bytes must live for the rest of the process, so they are leaked: one
/// font file, a few hundred KiB).
fn register_font(font: &Path) -> Result<()> {
    use std::sync::OnceLock;
    static REGISTERED: OnceLock<PathBuf> = OnceLock::new();
    if let Some(done) = REGISTERED.get() {
        return if done == font {
            Ok(())
        } else {
            Err(BenchError::Setup(format!(
                "plot font already set to {}",
                done.display()
            )))
        };
    }
    let bytes = std::fs::read(font).map_err(BenchError::file("reading font", font))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
        BenchError::Setup(format!("{}: not a usable TrueType font", font.display()))
    })?;
    let _ = REGISTERED.set(font.to_path_buf());
    Ok(())
}

/// The bottom of the time axis, ms.
const MIN_MS: f64 = 0.001;

/// Plot size in pixels.
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 620;

/// Line colours, by series index.
const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
    RGBColor(0, 0, 0),
    RGBColor(0, 0, 128),
];

/// Draws `series` under `title` and `subtitle` and writes a PNG to `out`.
pub fn write_png(
    series: &[Series],
    title: &str,
    subtitle: &str,
    font: &Path,
    out: &Path,
) -> Result<()> {
    let err = |reason: String| BenchError::Plot {
        path: out.to_path_buf(),
        reason,
    };
    let points = || series.iter().flat_map(|s| s.points.iter());
    if points().next().is_none() {
        return Err(err(
            "nothing to plot: no successful snapshot-full, restore-file or restore-uffd \
             record with a time in ms"
                .into(),
        ));
    }
    register_font(font)?;
    let max_mem = points().map(|p| p.mem_mib).max().unwrap_or(1) as f64;
    // A log scale: Firecracker's full snapshot and the vmm's restore differ
    // by two orders of magnitude. Non-positive values (none expected) are
    // clamped to the bottom of the axis.
    let max_ms = points().map(|p| p.max).fold(0.0f64, f64::max).max(MIN_MS);
    let min_ms = points()
        .map(|p| p.min)
        .fold(f64::INFINITY, f64::min)
        .max(MIN_MS);
    let x_range = 0.0..max_mem * 1.08;
    // Headroom above the data for the legend (upper left).
    let y_range = (min_ms / 1.6..max_ms * 2.0 * (1.0 + series.len() as f64)).log_scale();
    let y = |v: f64| v.max(MIN_MS);

    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        let e = |what: &str| {
            let what = what.to_string();
            move |x: DrawingAreaErrorKind<_>| err(format!("{what}: {x}"))
        };
        root.fill(&WHITE).map_err(e("background"))?;
        let (top, rest) = root.split_vertically(58);
        top.draw(&Text::new(
            title.to_string(),
            (14, 8),
            ("sans-serif", 22).into_font(),
        ))
        .map_err(e("title"))?;
        top.draw(&Text::new(
            subtitle.to_string(),
            (14, 34),
            ("sans-serif", 14).into_font().color(&RGBColor(90, 90, 90)),
        ))
        .map_err(e("subtitle"))?;
        let mut chart = ChartBuilder::on(&rest)
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range, y_range)
            .map_err(e("axes"))?;
        chart
            .configure_mesh()
            .x_desc("guest memory (MiB)")
            .y_desc("time (ms, log scale): median, whiskers min..max")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 10.0 {
                    format!("{y:.0}")
                } else if *y >= 1.0 {
                    format!("{y:.1}")
                } else {
                    format!("{y:.2}")
                }
            })
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e("mesh"))?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let line = ShapeStyle::from(color).stroke_width(2);
            let xy: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.mem_mib as f64, y(p.median)))
                .collect();
            chart
                .draw_series(LineSeries::new(xy.clone(), line))
                .map_err(e("line"))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            // Firecracker's points are hollow, the vmm's filled.
            let filled = s.target != "firecracker";
            chart
                .draw_series(xy.iter().map(|&(x, y)| {
                    let style = if filled {
                        color.filled()
                    } else {
                        color.stroke_width(2)
                    };
                    Circle::new((x, y), 4, style)
                }))
                .map_err(e("points"))?;
            chart
                .draw_series(s.points.iter().map(|p| {
                    ErrorBar::new_vertical(
                        p.mem_mib as f64,
                        y(p.min),
                        y(p.median),
                        y(p.max),
                        color,
                        10,
                    )
                }))
                .map_err(e("whiskers"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e("legend"))?;
        root.present().map_err(e("rendering"))?;
    }
    encode_png(&buf, WIDTH, HEIGHT, out)
}

/// Writes an RGB8 buffer as a PNG file (parent directories created).
fn encode_png(rgb: &[u8], width: u32, height: u32, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(BenchError::file("creating", dir))?;
    }
    let file = std::fs::File::create(out).map_err(BenchError::file("creating", out))?;
    let err = |e: png::EncodingError| BenchError::Plot {
        path: out.to_path_buf(),
        reason: format!("PNG encoding: {e}"),
    };
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    let mut writer = enc.write_header().map_err(err)?;
    writer.write_image_data(rgb).map_err(err)?;
    writer.finish().map_err(err)
}

/// The plot's subtitle: the machine it was measured on.
pub fn subtitle(records: &[Record]) -> String {
    let Some(m) = records
        .iter()
        .find(|r| r.label.is_none())
        .map(|r| &r.machine)
    else {
        return String::new();
    };
    let mut s = format!(
        "{}, {} CPUs, host kernel {}, {}",
        m.cpu_model, m.nproc, m.host_kernel, m.kvm_module
    );
    if let Some(d) = &m.started_utc {
        s.push_str(&format!(", {}", d.get(..10).unwrap_or(d)));
    }
    if let Some(load) = m.loadavg.as_deref().and_then(|l| l.split(' ').next()) {
        s.push_str(&format!(", load average {load} at start"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Metrics;

    fn rec(scenario: &str, target: &str, mem: u64, metrics: &[(&str, &[f64])]) -> Record {
        let mut m = Metrics::default();
        for (name, samples) in metrics {
            for v in *samples {
                m.push(name, "ms", *v);
            }
        }
        Record {
            scenario: scenario.into(),
            target: target.into(),
            mem_mib: mem,
            vcpus: 1,
            runs: 1,
            warmup: 0,
            error: None,
            metrics: crate::report::metrics_out(&m),
            notes: vec![],
            details: serde_json::Value::Null,
            machine: crate::machine::MachineInfo::fixture(),
            label: None,
        }
    }

    #[test]
    fn series_from_records() {
        let mut failed = rec("snapshot-full", "vmm", 2048, &[("total", &[1.0])]);
        failed.error = Some("boom".into());
        let mut nested = rec("snapshot-full", "vmm", 4096, &[("total", &[1.0])]);
        nested.label = Some("nested".into());
        let records = vec![
            rec(
                "snapshot-full",
                "vmm",
                512,
                &[("total", &[30.0, 10.0, 20.0])],
            ),
            rec("snapshot-full", "vmm", 128, &[("total", &[5.0])]),
            rec(
                "restore-file",
                "vmm",
                128,
                &[("restore_to_running", &[7.0]), ("restore_build", &[6.0])],
            ),
            rec(
                "restore-file",
                "firecracker",
                128,
                &[("restore_to_running", &[9.0, 11.0])],
            ),
            rec("pause", "vmm", 128, &[("pause", &[0.1])]),
            failed,
            nested,
        ];
        let s = series(&records);
        let labels: Vec<&str> = s.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "vmm: pause + full snapshot + resume",
                "vmm: restore from file to running",
                "firecracker: restore from file, new process",
            ]
        );
        // Sorted by size; the failed and the nested record are left out.
        assert_eq!(
            s[0].points,
            [
                Point {
                    mem_mib: 128,
                    min: 5.0,
                    median: 5.0,
                    max: 5.0
                },
                Point {
                    mem_mib: 512,
                    min: 10.0,
                    median: 20.0,
                    max: 30.0
                },
            ]
        );
        assert_eq!(s[2].points[0].median, 10.0);
        assert_eq!(s[2].target, "firecracker");
    }

    #[test]
    fn later_records_win_and_vcpus_split_lines() {
        let mut two = rec("snapshot-full", "vmm", 128, &[("total", &[50.0])]);
        two.vcpus = 2;
        let records = vec![
            rec("snapshot-full", "vmm", 128, &[("total", &[5.0])]),
            rec("snapshot-full", "vmm", 128, &[("total", &[6.0])]),
            two,
        ];
        let s = series(&records);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, "vmm: pause + full snapshot + resume (1 vCPU)");
        assert_eq!(s[0].points.len(), 1);
        assert_eq!(s[0].points[0].median, 6.0);
        assert_eq!(s[1].label, "vmm: pause + full snapshot + resume (2 vCPU)");
    }

    #[test]
    fn metrics_without_samples_or_not_in_ms_are_skipped() {
        let mut r = rec("snapshot-full", "vmm", 128, &[]);
        let mut m = Metrics::default();
        m.push("total", "bytes", 1.0);
        r.metrics = crate::report::metrics_out(&m);
        assert!(series(&[r, rec("snapshot-full", "vmm", 256, &[])]).is_empty());
    }

    #[test]
    fn png_is_written_or_refused_when_empty() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let out = dir.path().join("plots/p.png");
        let err = write_png(&[], "t", "s", Path::new("/nonexistent.ttf"), &out).unwrap_err();
        assert!(err.to_string().contains("nothing to plot"), "{err}");
        let Ok(font) = find_font(None) else {
            eprintln!("no system font: skipping the rendering half of this test");
            return;
        };
        let records = vec![
            rec("snapshot-full", "vmm", 128, &[("total", &[5.0, 8.0])]),
            rec("snapshot-full", "vmm", 512, &[("total", &[9.0])]),
            rec(
                "restore-file",
                "firecracker",
                128,
                &[("restore_to_running", &[4.0])],
            ),
        ];
        write_png(&series(&records), "title", "sub", &font, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (WIDTH, HEIGHT));
    }
}
