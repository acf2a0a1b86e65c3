use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
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
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let is_png = match extension.as_deref() {
        Some("svg") => false,
        Some("png") => true,
        _ => {
            return Err(Error::UnsupportedPlotFormat {
                path: path.to_path_buf(),
            })
        }
    };
    if roc.points.is_empty() {
        return Err(Error::Empty { what: "ROC points" });
    }
    let plot_error = |message: String| Error::Plot {
        path: path.to_path_buf(),
        message,
    };
    if is_png {
        ensure_font()?;
        draw(
            BitMapBackend::new(path, SIZE).into_drawing_area(),
            roc,
            title,
        )
        .map_err(|e| plot_error(e.to_string()))
    } else {
        draw(SVGBackend::new(path, SIZE).into_drawing_area(), roc, title)
            .map_err(|e| plot_error(e.to_string()))
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

    #[test]
    fn far_axis_floor() {
        assert_eq!(far_floor(&sample_roc(100)), 1e-4);
        // 60,000 negatives put the first false accept near 1.7e-5.
        assert_eq!(far_floor(&sample_roc(120_000)), 1e-5);
    }
}
