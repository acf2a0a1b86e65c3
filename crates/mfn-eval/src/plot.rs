use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::open_set::OpenSetReport;
use crate::roc::Roc;

/// Environment variable naming a `.ttf`/`.otf` file to render PNG text with.
pub const FONT_ENV: &str = "MFN_FONT";

/// Where common Linux distributions, macOS and Windows keep a plain sans-serif font.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (800, 600);
/// Plot area in pixels: left, right, top, bottom.
const FRAME: (i32, i32, i32, i32) = (90, 770, 60, 520);
/// The FAR axis never starts above this, the range face verification reports care about.
const MAX_FAR_FLOOR: f64 = 1e-4;

/// The font registered with plotters, if any; registration leaks the font
/// bytes, so it must happen at most once per process.
static REGISTERED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Draws `roc` as TAR against FAR (log scale) and writes it to `path`.
///
/// The format follows the extension: `.svg` or `.png` (case-insensitive).
/// The FAR axis spans `1e-4..1`, extended down to the decade of the smallest
/// non-zero FAR when there are more than 10,000 negatives; points with a
/// smaller FAR (including zero) are drawn at the left edge. The caption shows
/// `title` with the AUC and EER, and the EER point is marked.
///
/// SVG text is laid out by the viewer, so SVG needs no font. PNG text is
/// rasterised here and needs a TrueType font: the file named by
/// [`FONT_ENV`] (`MFN_FONT`) or one of a few common system locations.
///
/// # Errors
/// [`Error::UnsupportedPlotFormat`] for other extensions,
/// [`Error::Empty`] when `roc` has no points, [`Error::FontNotFound`] or
/// [`Error::InvalidFont`] when a PNG cannot get a font, and [`Error::Plot`]
/// when drawing or writing the file fails.
pub fn plot_roc(roc: &Roc, path: &Path, title: &str) -> Result<()> {
    let format = Format::of(path)?;
    if roc.points.is_empty() {
        return Err(Error::Empty { what: "ROC points" });
    }
    render(
        path,
        format,
        |root| draw(root, roc, title),
        |root| draw(root, roc, title),
    )
}

/// Draws `report`'s CMC curve, identification rate against rank, and writes it to `path`.
///
/// The format follows the extension as for [`plot_roc`], with the same font
/// needs. The rank axis is linear from 1 to the report's deepest rank; the
/// rate axis ends at 1 and starts at the tenth at or below the lowest rate
/// (0.9 at most), so the curve of a good model is not squashed against the top. The caption shows
/// `title` with the rank-1 rate, and the rank-1 point is marked.
///
/// # Errors
/// [`Error::UnsupportedPlotFormat`] for other extensions, [`Error::Empty`]
/// when the report has no CMC points (only possible for a hand-built report),
/// [`Error::FontNotFound`] or [`Error::InvalidFont`] when a PNG cannot get a
/// font, and [`Error::Plot`] when drawing or writing the file fails.
pub fn plot_cmc(report: &OpenSetReport, path: &Path, title: &str) -> Result<()> {
    let format = Format::of(path)?;
    if report.cmc.is_empty() {
        return Err(Error::Empty { what: "CMC" });
    }
    render(
        path,
        format,
        |root| draw_cmc(root, report, title),
        |root| draw_cmc(root, report, title),
    )
}

/// The image formats a plot can be written in.
#[derive(Clone, Copy)]
enum Format {
    Svg,
    Png,
}

impl Format {
    /// Picks the format from the extension, before any work, so a typo costs nothing.
    fn of(path: &Path) -> Result<Self> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(Error::UnsupportedPlotFormat {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// What a drawing on backend `DB` returns.
type Drawn<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Runs the drawing for the chosen backend and maps its errors to [`Error::Plot`].
///
/// A closure cannot be generic over the backend, so the caller passes the same
/// drawing twice, once per backend type.
fn render<'a>(
    path: &'a Path,
    format: Format,
    png: impl FnOnce(DrawingArea<BitMapBackend<'a>, Shift>) -> Drawn<BitMapBackend<'a>>,
    svg: impl FnOnce(DrawingArea<SVGBackend<'a>, Shift>) -> Drawn<SVGBackend<'a>>,
) -> Result<()> {
    let plot_error = |message: String| Error::Plot {
        path: path.to_path_buf(),
        message,
    };
    match format {
        Format::Png => {
            ensure_font()?;
            png(BitMapBackend::new(path, SIZE).into_drawing_area())
                .map_err(|e| plot_error(e.to_string()))
        }
        Format::Svg => svg(SVGBackend::new(path, SIZE).into_drawing_area())
            .map_err(|e| plot_error(e.to_string())),
    }
}

/// Draws with explicit pixel positions and anchored text only: plotters'
/// chart builder measures text through the registered font even for SVG,
/// and avoiding it is what lets SVG work on machines without fonts.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    roc: &Roc,
    title: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (left, right, top, bottom) = FRAME;
    let far_floor = far_floor(roc);
    let decades = -far_floor.log10().round();
    let x_of = |far: f64| {
        let t = (far.max(far_floor).log10() + decades) / decades;
        left + (t.clamp(0.0, 1.0) * f64::from(right - left)).round() as i32
    };
    let y_of = |tar: f64| bottom - (tar.clamp(0.0, 1.0) * f64::from(bottom - top)).round() as i32;

    let font = |size: f64| TextStyle::from((FAMILY, size).into_font()).color(&BLACK);
    let anchored = |size: f64, h: HPos, v: VPos| font(size).pos(Pos::new(h, v));
    let grid = ShapeStyle::from(RGBColor(220, 220, 220)).stroke_width(1);
    let minor = ShapeStyle::from(RGBColor(240, 240, 240)).stroke_width(1);

    root.fill(&WHITE)?;

    for exp in 0..decades as i32 {
        let base = 10f64.powi(exp - decades as i32);
        for m in 2..10 {
            let x = x_of(base * f64::from(m));
            root.draw(&PathElement::new(vec![(x, top), (x, bottom)], minor))?;
        }
    }
    for exp in -(decades as i32)..=0 {
        let x = x_of(10f64.powi(exp));
        root.draw(&PathElement::new(vec![(x, top), (x, bottom)], grid))?;
        let label = match exp {
            0 => "1".to_string(),
            -1 => "0.1".to_string(),
            -2 => "0.01".to_string(),
            _ => format!("1e{exp}"),
        };
        root.draw(&Text::new(
            label,
            (x, bottom + 8),
            anchored(15.0, HPos::Center, VPos::Top),
        ))?;
    }
    for tenth in 0..=10 {
        let tar = f64::from(tenth) / 10.0;
        let y = y_of(tar);
        root.draw(&PathElement::new(vec![(left, y), (right, y)], grid))?;
        root.draw(&Text::new(
            format!("{tar:.1}"),
            (left - 8, y),
            anchored(15.0, HPos::Right, VPos::Center),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(left, top), (right, bottom)],
        BLACK.stroke_width(1),
    ))?;

    let mut curve: Vec<(i32, i32)> = Vec::with_capacity(roc.points.len());
    for p in &roc.points {
        let xy = (x_of(p.fpr), y_of(p.tpr));
        // Millions of pairs collapse onto a few thousand pixels; keeping only
        // pixel changes keeps SVG files small without changing the picture.
        if curve.last() != Some(&xy) {
            curve.push(xy);
        }
    }
    root.draw(&PathElement::new(curve, BLUE.stroke_width(2)))?;

    let eer_xy = (x_of(roc.eer), y_of(1.0 - roc.eer));
    root.draw(&Circle::new(eer_xy, 5, RED.filled()))?;
    root.draw(&Text::new(
        format!("EER {:.2}%", roc.eer * 100.0),
        (eer_xy.0 + 10, eer_xy.1 + 6),
        anchored(15.0, HPos::Left, VPos::Top),
    ))?;

    let center_x = (left + right) / 2;
    root.draw(&Text::new(
        format!("{title} (AUC {:.4}, EER {:.2}%)", roc.auc, roc.eer * 100.0),
        (center_x, 20),
        anchored(20.0, HPos::Center, VPos::Center),
    ))?;
    root.draw(&Text::new(
        "False accept rate (FAR, log scale)",
        (center_x, bottom + 40),
        anchored(17.0, HPos::Center, VPos::Top),
    ))?;
    root.draw(&Text::new(
        "True accept rate (TAR)",
        (25, (top + bottom) / 2),
        anchored(17.0, HPos::Center, VPos::Center).transform(FontTransform::Rotate270),
    ))?;
    root.present()
}

/// Draws the CMC curve the same way [`draw`] draws a ROC: pixel positions and anchored text only.
fn draw_cmc<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    report: &OpenSetReport,
    title: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (left, right, top, bottom) = FRAME;
    let ranks = report.cmc.len();
    let rate_floor = rate_floor(&report.cmc);
    let x_of = |rank: usize| {
        if ranks < 2 {
            return (left + right) / 2;
        }
        let t = (rank.saturating_sub(1)) as f64 / (ranks - 1) as f64;
        left + (t.clamp(0.0, 1.0) * f64::from(right - left)).round() as i32
    };
    let y_of = |rate: f64| {
        let t = (rate - rate_floor) / (1.0 - rate_floor);
        bottom - (t.clamp(0.0, 1.0) * f64::from(bottom - top)).round() as i32
    };

    let font = |size: f64| TextStyle::from((FAMILY, size).into_font()).color(&BLACK);
    let anchored = |size: f64, h: HPos, v: VPos| font(size).pos(Pos::new(h, v));
    let grid = ShapeStyle::from(RGBColor(220, 220, 220)).stroke_width(1);

    root.fill(&WHITE)?;

    let step = rank_step(ranks);
    let multiples = (step..=ranks).step_by(step).filter(|&r| r != 1);
    for rank in std::iter::once(1).chain(multiples) {
        let x = x_of(rank);
        root.draw(&PathElement::new(vec![(x, top), (x, bottom)], grid))?;
        root.draw(&Text::new(
            rank.to_string(),
            (x, bottom + 8),
            anchored(15.0, HPos::Center, VPos::Top),
        ))?;
    }
    // A floor above zero means finer steps, which need a second decimal.
    let decimals = if rate_floor > 0.0 { 2 } else { 1 };
    for tenth in 0..=10 {
        let rate = rate_floor + (1.0 - rate_floor) * f64::from(tenth) / 10.0;
        let y = y_of(rate);
        root.draw(&PathElement::new(vec![(left, y), (right, y)], grid))?;
        root.draw(&Text::new(
            format!("{rate:.decimals$}"),
            (left - 8, y),
            anchored(15.0, HPos::Right, VPos::Center),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(left, top), (right, bottom)],
        BLACK.stroke_width(1),
    ))?;

    let mut curve: Vec<(i32, i32)> = Vec::with_capacity(ranks.min(2048));
    for (i, &rate) in report.cmc.iter().enumerate() {
        let xy = (x_of(i + 1), y_of(rate));
        // Deep curves collapse onto a few hundred pixels; see `draw`.
        if curve.last() != Some(&xy) {
            curve.push(xy);
        }
    }
    // Markers only while they stay apart; deeper curves would turn them into a thick line.
    if ranks <= 50 {
        for &xy in &curve {
            root.draw(&Circle::new(xy, 3, BLUE.filled()))?;
        }
    }
    root.draw(&PathElement::new(curve, BLUE.stroke_width(2)))?;

    let rank1_xy = (x_of(1), y_of(report.rank1));
    root.draw(&Circle::new(rank1_xy, 5, RED.filled()))?;
    root.draw(&Text::new(
        format!("rank-1 {:.2}%", report.rank1 * 100.0),
        (rank1_xy.0 + 10, rank1_xy.1 + 6),
        anchored(15.0, HPos::Left, VPos::Top),
    ))?;

    let center_x = (left + right) / 2;
    root.draw(&Text::new(
        format!(
            "{title} (rank-1 {:.2}%, {} known probes)",
            report.rank1 * 100.0,
            report.known_probes
        ),
        (center_x, 20),
        anchored(20.0, HPos::Center, VPos::Center),
    ))?;
    root.draw(&Text::new(
        "Rank",
        (center_x, bottom + 40),
        anchored(17.0, HPos::Center, VPos::Top),
    ))?;
    root.draw(&Text::new(
        "Identification rate",
        (25, (top + bottom) / 2),
        anchored(17.0, HPos::Center, VPos::Center).transform(FontTransform::Rotate270),
    ))?;
    root.present()
}

/// Lower end of the rate axis: the tenth at or below the lowest rate, at most 0.9.
fn rate_floor(cmc: &[f64]) -> f64 {
    let lowest = cmc
        .iter()
        .copied()
        .filter(|r| r.is_finite())
        .fold(1.0, f64::min);
    ((lowest * 10.0).floor() / 10.0).clamp(0.0, 0.9)
}

/// Spacing of labelled ranks: 1, 2 or 5 times a power of ten, giving at most ten labels after rank 1.
fn rank_step(ranks: usize) -> usize {
    let mut base = 1usize;
    loop {
        for m in [1, 2, 5] {
            let step = base.saturating_mul(m);
            if ranks / step <= 10 {
                return step;
            }
        }
        base = base.saturating_mul(10);
    }
}

/// Lower end of the FAR axis: `1e-4`, or the decade of the smallest non-zero FAR below it.
fn far_floor(roc: &Roc) -> f64 {
    let smallest = roc
        .points
        .iter()
        .map(|p| p.fpr)
        .filter(|&f| f > 0.0 && f.is_finite())
        .fold(MAX_FAR_FLOOR, f64::min);
    // Beyond 1e-12 the axis would be mostly empty decades.
    10f64.powi(smallest.log10().floor().max(-12.0) as i32)
}

/// Registers a TrueType font with plotters once per process so PNG text can be rasterised.
fn ensure_font() -> Result<()> {
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if registered.is_some() {
        return Ok(());
    }
    let path = find_font(std::env::var_os(FONT_ENV), FONT_CANDIDATES)?;
    let bytes = std::fs::read(&path).map_err(|e| Error::InvalidFont {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // plotters' ab_glyph backend only accepts `&'static` font data; the
    // REGISTERED guard bounds the leak to one font per process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).map_err(|_| {
        Error::InvalidFont {
            path: path.clone(),
            reason: "not a TrueType or OpenType font".to_string(),
        }
    })?;
    *registered = Some(path);
    Ok(())
}

/// Picks the font named by `env` (the value of [`FONT_ENV`]) or else the first existing candidate.
fn find_font(env: Option<OsString>, candidates: &[&str]) -> Result<PathBuf> {
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        // An explicit choice that fails should be reported, not silently replaced.
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::InvalidFont {
                path,
                reason: format!("{FONT_ENV} names a file that does not exist"),
            })
        };
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| Error::FontNotFound {
            searched: candidates.iter().map(PathBuf::from).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roc::roc;
    use crate::testutil::Lcg;

    fn sample_roc(n: usize) -> Roc {
        let mut rng = Lcg::new(77);
        let labels: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let scores: Vec<f64> = labels
            .iter()
            .map(|&same| rng.next_f64() * 0.7 + if same { 0.3 } else { 0.0 })
            .collect();
        roc(&scores, &labels).unwrap()
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mfn-eval-{}-{name}", std::process::id()))
    }

    #[test]
    fn svg_plot() {
        let path = temp_path("roc.svg");
        plot_roc(&sample_roc(2000), &path, "LFW <test> & more").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        assert!(svg.contains("AUC 0."));
        assert!(svg.contains("EER "));
        assert!(svg.contains("False accept rate"));
        assert!(svg.contains("1e-4"));
        // The title is escaped, not injected as markup.
        assert!(svg.contains("LFW &lt;test&gt; &amp; more"));
    }

    #[test]
    fn svg_extension_is_case_insensitive() {
        let path = temp_path("roc-upper.SVG");
        plot_roc(&sample_roc(50), &path, "upper").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.contains("<svg"));
    }

    #[test]
    fn png_plot_renders() {
        // A machine without any font fails here on purpose: PNG plots need one, and the
        // CI script installs DejaVu where it is missing.
        find_font(std::env::var_os(FONT_ENV), FONT_CANDIDATES)
            .expect("PNG plots need a TrueType font: install DejaVu or set MFN_FONT");
        let path = temp_path("roc.png");
        plot_roc(&sample_roc(2000), &path, "LFW").unwrap();
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            png.len() > 5_000,
            "suspiciously small PNG: {} bytes",
            png.len()
        );
    }

    #[test]
    fn unsupported_extension_names_the_path() {
        for name in ["roc.jpg", "roc", "roc.svg.txt"] {
            let path = temp_path(name);
            let err = plot_roc(&sample_roc(10), &path, "x").unwrap_err();
            assert!(matches!(&err, Error::UnsupportedPlotFormat { path: p } if *p == path));
            assert!(err.to_string().contains(name), "{err}");
            assert!(!path.exists());
        }
    }

    #[test]
    fn empty_roc_is_rejected() {
        let mut r = sample_roc(10);
        r.points.clear();
        assert!(matches!(
            plot_roc(&r, &temp_path("empty.svg"), "x"),
            Err(Error::Empty { .. })
        ));
    }

    #[test]
    fn unwritable_path_is_a_plot_error() {
        let path = Path::new("/nonexistent-mfn-eval-dir/roc.svg");
        assert!(matches!(
            plot_roc(&sample_roc(10), path, "x"),
            Err(Error::Plot { .. })
        ));
    }

    #[test]
    fn font_lookup() {
        let err = find_font(None, &["/nonexistent/a.ttf", "/nonexistent/b.ttf"]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(&err, Error::FontNotFound { searched } if searched.len() == 2));
        assert!(
            message.contains(".svg") && message.contains(FONT_ENV),
            "{message}"
        );
        assert!(message.contains("/nonexistent/b.ttf"));

        let err = find_font(Some("/nonexistent/c.ttf".into()), FONT_CANDIDATES).unwrap_err();
        assert!(matches!(err, Error::InvalidFont { .. }));

        let file = temp_path("fake-font.ttf");
        std::fs::write(&file, b"not a font").unwrap();
        let found = find_font(Some(file.clone().into_os_string()), &[]).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(found, file);
        // An empty variable counts as unset.
        assert!(matches!(
            find_font(Some(OsString::new()), &[]),
            Err(Error::FontNotFound { .. })
        ));
    }

    fn sample_cmc(max_rank: usize) -> OpenSetReport {
        use crate::open_set::{evaluate, Probe};
        let mut rng = Lcg::new(91);
        let probes: Vec<Probe> = (0..200u32)
            .map(|i| {
                // Identity i % 20 at a random depth among 30 candidates, some unknown.
                let depth = rng.below(8) as usize;
                let mut ids: Vec<u32> = (0..30).map(|k| 20 + k).collect();
                ids.insert(depth, i % 20);
                let candidates = ids
                    .into_iter()
                    .enumerate()
                    .map(|(r, id)| (id, 0.9 - r as f32 * 0.02))
                    .collect();
                if i % 4 == 0 {
                    Probe::unknown(candidates)
                } else {
                    Probe::known(i % 20, candidates)
                }
            })
            .collect();
        evaluate(&probes, &[0.1], max_rank).unwrap()
    }

    #[test]
    fn cmc_svg_plot() {
        let path = temp_path("cmc.svg");
        let report = sample_cmc(20);
        plot_cmc(&report, &path, "IJB <test> & more").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        assert!(svg.contains(&format!("rank-1 {:.2}%", report.rank1 * 100.0)));
        assert!(svg.contains("Identification rate"));
        // The deepest rank is labelled.
        assert!(svg.contains(">\n20\n</text>"));
        assert!(svg.contains("IJB &lt;test&gt; &amp; more"));
    }

    #[test]
    fn cmc_png_plot_renders() {
        find_font(std::env::var_os(FONT_ENV), FONT_CANDIDATES)
            .expect("PNG plots need a TrueType font: install DejaVu or set MFN_FONT");
        for max_rank in [1, 3, 1000] {
            let path = temp_path(&format!("cmc-{max_rank}.png"));
            plot_cmc(&sample_cmc(max_rank), &path, "IJB").unwrap();
            let png = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            assert!(
                png.len() > 5_000,
                "suspiciously small PNG: {} bytes",
                png.len()
            );
        }
    }

    #[test]
    fn cmc_plot_rejects_bad_input() {
        let path = temp_path("cmc.jpg");
        assert!(matches!(
            plot_cmc(&sample_cmc(5), &path, "x"),
            Err(Error::UnsupportedPlotFormat { .. })
        ));
        assert!(!path.exists());
        let mut empty = sample_cmc(5);
        empty.cmc.clear();
        assert!(matches!(
            plot_cmc(&empty, &temp_path("empty-cmc.svg"), "x"),
            Err(Error::Empty { what: "CMC" })
        ));
        // A hand-built report with nonsense rates still draws.
        let mut odd = sample_cmc(5);
        odd.cmc = vec![f64::NAN, -1.0, 2.0, f64::INFINITY];
        odd.rank1 = f64::NAN;
        let path = temp_path("odd-cmc.svg");
        plot_cmc(&odd, &path, "x").unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn cmc_axes() {
        assert_eq!(rank_step(1), 1);
        assert_eq!(rank_step(10), 1);
        assert_eq!(rank_step(11), 2);
        assert_eq!(rank_step(50), 5);
        assert_eq!(rank_step(100), 10);
        assert_eq!(rank_step(1000), 100);
        assert!(usize::MAX / rank_step(usize::MAX) <= 10);
        assert_eq!(rate_floor(&[0.0, 0.5]), 0.0);
        assert_eq!(rate_floor(&[0.934, 0.99]), 0.9);
        assert_eq!(rate_floor(&[1.0]), 0.9);
        assert_eq!(rate_floor(&[0.47, 0.6]), 0.4);
        assert_eq!(rate_floor(&[f64::NAN, -3.0]), 0.0);
    }

    #[test]
    fn far_axis_floor() {
        assert_eq!(far_floor(&sample_roc(100)), 1e-4);
        // 60,000 negatives put the first false accept near 1.7e-5.
        assert_eq!(far_floor(&sample_roc(120_000)), 1e-5);
    }
}
