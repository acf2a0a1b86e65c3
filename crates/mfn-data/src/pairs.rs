//! The LFW pair protocol: `pairs.txt` and the images it names.
//!
//! The file starts with a header `folds n` (View 2: `10 300`) or a single `n` (View 1),
//! followed, for each fold, by `n` same-person lines `name n1 n2` and `n`
//! different-person lines `name1 n1 name2 n2`. Fields are separated by tabs or spaces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::quote;
use crate::{Error, Result};

/// One LFW image: a person's name and the 1-based photo number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    /// The person, as the folder is named (`Aaron_Peirsol`).
    pub name: String,
    /// The photo number (`1` for `Aaron_Peirsol_0001.jpg`).
    pub number: u32,
}

impl ImageRef {
    /// The file under an LFW image folder: `root/name/name_NNNN.ext`.
    pub fn path(&self, root: &Path, ext: &str) -> PathBuf {
        root.join(&self.name)
            .join(format!("{}_{:04}.{ext}", self.name, self.number))
    }
}

/// One line of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The first image.
    pub a: ImageRef,
    /// The second image.
    pub b: ImageRef,
    /// Whether both show the same person.
    pub same: bool,
    /// 0-based fold index.
    pub fold: usize,
}

/// A parsed pairs file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pairs {
    /// All pairs in file order.
    pub pairs: Vec<Pair>,
    /// Number of folds.
    pub folds: usize,
}

/// Pairs files longer than this are refused before they are read: LFW's `pairs.txt` (6,000
/// pairs) is 100 KB, so this leaves room for some 10 million pairs.
pub const MAX_PAIRS_FILE_BYTES: u64 = 256 << 20;

/// Longest name a pair may give: a name is a folder and a file name, and file systems
/// keep those under 256 bytes.
pub const MAX_NAME_BYTES: usize = 255;

fn parse_number(field: &str, path: &Path, line: usize, what: &str) -> Result<u32> {
    field.parse().map_err(|_| Error::Pairs {
        path: path.to_path_buf(),
        line,
        message: format!("{what} `{}` is not a number", quote(field)),
    })
}

/// Checks that `name` is one plain folder name, so that [`ImageRef::path`] stays inside
/// the image folder it is given.
fn check_name(name: &str) -> std::result::Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "name `{}` {why}: a name is one folder name inside the images folder",
            quote(name)
        ))
    };
    if name.len() > MAX_NAME_BYTES {
        return refuse(&format!(
            "is {} bytes long, more than the {MAX_NAME_BYTES} a file name may take",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return refuse("holds a control character");
    }
    if name == "." || name == ".." {
        return refuse("would leave the folder");
    }
    if name.contains(['/', '\\']) {
        return refuse("holds a path separator (an absolute path, or a path into another folder)");
    }
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(_)), None) => Ok(()),
        _ => refuse("is not a plain folder name"),
    }
}

impl Pairs {
    /// Reads and parses a pairs file of at most [`MAX_PAIRS_FILE_BYTES`].
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |line, message| Error::Pairs {
            path: path.to_path_buf(),
            line,
            message,
        };
        let text = crate::text::read_text(path, MAX_PAIRS_FILE_BYTES, "pairs file", bad)?;
        Self::parse(&text, path)
    }

    /// Parses the text of a pairs file; `path` is only used in error messages.
    ///
    /// Nothing is allocated from the header's counts: they must agree with the lines the
    /// file has. Names must be plain folder names (no absolute paths, no `..`, no path
    /// separators, no control characters), so that every image stays inside the image
    /// folder. Text from the file that an error message shows is escaped and shortened.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let err = |line: usize, message: String| Error::Pairs {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let Some((hline, header)) = lines.next() else {
            return Err(Error::EmptyPairs {
                path: path.to_path_buf(),
            });
        };
        let mut hfields = header.split_whitespace();
        let h: Vec<&str> = hfields.by_ref().take(2).collect();
        if hfields.next().is_some() {
            return Err(err(
                hline,
                "header must be `folds pairs_per_fold` or `pairs`, found more than 2 fields".into(),
            ));
        }
        let (folds, per_side) = match h.as_slice() {
            [n] => (1, parse_number(n, path, hline, "pair count")?),
            [f, n] => (
                parse_number(f, path, hline, "fold count")?,
                parse_number(n, path, hline, "pairs per fold")?,
            ),
            _ => return Err(err(hline, "the header has no fields".into())),
        };
        let (folds, per_side) = (folds as usize, per_side as usize);
        let per_fold = 2 * per_side;
        if folds == 0 || per_side == 0 {
            return Err(Error::EmptyPairs {
                path: path.to_path_buf(),
            });
        }
        // At most 2^32 * 2^33: u128 cannot overflow.
        let promised = folds as u128 * per_fold as u128;
        let available = lines.clone().count();
        if promised > available as u128 {
            return Err(err(
                hline,
                format!(
                    "the header promises {folds} folds of {per_fold} pairs ({promised}), the \
                     file has {available} line(s) of pairs"
                ),
            ));
        }
        // `promised` fits in usize now: it is at most the number of lines.
        let promised = promised as usize;
        let mut pairs = Vec::with_capacity(promised);
        let mut last_line = hline;
        for (line, text) in lines {
            last_line = line;
            let mut fields = text.split_whitespace();
            let f: Vec<&str> = fields.by_ref().take(4).collect();
            let extra = fields.count();
            let name = |n: &str| -> Result<String> {
                check_name(n).map_err(|m| err(line, m))?;
                Ok(n.to_string())
            };
            let pair = match (f.as_slice(), extra) {
                ([n, n1, n2], 0) => {
                    let n = name(n)?;
                    Pair {
                        a: ImageRef {
                            name: n.clone(),
                            number: parse_number(n1, path, line, "photo number")?,
                        },
                        b: ImageRef {
                            name: n,
                            number: parse_number(n2, path, line, "photo number")?,
                        },
                        same: true,
                        fold: pairs.len() / per_fold,
                    }
                }
                ([name1, n1, name2, n2], 0) => Pair {
                    a: ImageRef {
                        name: name(name1)?,
                        number: parse_number(n1, path, line, "photo number")?,
                    },
                    b: ImageRef {
                        name: name(name2)?,
                        number: parse_number(n2, path, line, "photo number")?,
                    },
                    same: false,
                    fold: pairs.len() / per_fold,
                },
                _ => {
                    return Err(err(
                        line,
                        format!(
                            "expected `name n1 n2` or `name1 n1 name2 n2`, found {} fields",
                            f.len() + extra
                        ),
                    ))
                }
            };
            if pairs.len() == promised {
                return Err(err(
                    line,
                    format!("the header promises {promised} pairs, this line is one more"),
                ));
            }
            pairs.push(pair);
        }
        if pairs.len() != promised {
            return Err(err(
                last_line,
                format!(
                    "the header promises {folds} folds of {per_fold} pairs ({promised}), the file has {}",
                    pairs.len()
                ),
            ));
        }
        Ok(Self { pairs, folds })
    }

    /// Every image the pairs use, once each, in order of first use.
    pub fn unique_images(&self) -> Vec<ImageRef> {
        self.index().0
    }

    /// The unique images and, for each pair, the positions of its two images in that list,
    /// so that each image is embedded once.
    pub fn index(&self) -> (Vec<ImageRef>, Vec<[usize; 2]>) {
        let mut unique: Vec<ImageRef> = Vec::new();
        let mut position: HashMap<ImageRef, usize> = HashMap::new();
        let mut slot = |r: &ImageRef| -> usize {
            if let Some(&i) = position.get(r) {
                return i;
            }
            unique.push(r.clone());
            position.insert(r.clone(), unique.len() - 1);
            unique.len() - 1
        };
        let idx = self
            .pairs
            .iter()
            .map(|p| [slot(&p.a), slot(&p.b)])
            .collect();
        (unique, idx)
    }

    /// Labels (`true` = same person) in pair order.
    pub fn labels(&self) -> Vec<bool> {
        self.pairs.iter().map(|p| p.same).collect()
    }

    /// Fold index of each pair, in pair order.
    pub fn fold_ids(&self) -> Vec<usize> {
        self.pairs.iter().map(|p| p.fold).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pairs> {
        Pairs::parse(text, Path::new("pairs.txt"))
    }

    fn line_of(err: Error) -> usize {
        match err {
            Error::Pairs { line, .. } => line,
            other => panic!("expected a Pairs error, got {other}"),
        }
    }

    #[test]
    fn both_line_forms_folds_and_labels() {
        let text = "2\t1\nA\t1\t2\nB\t1\tC\t3\nD 4 5\nA 2 E 1\n";
        let p = parse(text).unwrap();
        assert_eq!(p.folds, 2);
        assert_eq!(p.labels(), [true, false, true, false]);
        assert_eq!(p.fold_ids(), [0, 0, 1, 1]);
        assert_eq!(
            p.pairs[1].b,
            ImageRef {
                name: "C".into(),
                number: 3
            }
        );
        let (unique, index) = p.index();
        // A_0002 appears twice but is listed once.
        assert_eq!(unique.len(), 7);
        assert_eq!(index[0], [0, 1]);
        assert_eq!(index[3][0], 1);
    }

    #[test]
    fn view1_single_number_header() {
        let p = parse("1\nA 1 2\nA 1 B 1\n").unwrap();
        assert_eq!(p.folds, 1);
        assert_eq!(p.pairs.len(), 2);
    }

    #[test]
    fn wrong_field_count_gives_the_line_number() {
        let err = parse("1 1\nA 1 2\n\nA 1 B\n").unwrap_err();
        assert!(err.to_string().starts_with("pairs.txt:4:"), "{err}");
        assert_eq!(line_of(err), 4);
        assert_eq!(
            line_of(parse("1 1\nA 1 2 3 4 5\nA 1 B 1\n").unwrap_err()),
            2
        );
    }

    #[test]
    fn bad_numbers_and_headers() {
        assert_eq!(line_of(parse("1 1\nA one 2\nA 1 B 1\n").unwrap_err()), 2);
        assert_eq!(line_of(parse("ten 300\n").unwrap_err()), 1);
        assert_eq!(line_of(parse("1 2 3\n").unwrap_err()), 1);
    }

    #[test]
    fn count_must_match_the_header() {
        let short = parse("1 2\nA 1 2\nA 1 B 1\n").unwrap_err();
        assert!(
            short.to_string().contains("promises 1 folds of 4 pairs"),
            "{short}"
        );
        assert_eq!(
            line_of(parse("1 1\nA 1 2\nA 1 B 1\nC 1 2\n").unwrap_err()),
            4
        );
    }

    #[test]
    fn empty_files_are_errors() {
        for text in ["", "\n\n  \n", "0 300\n"] {
            assert!(
                matches!(parse(text), Err(Error::EmptyPairs { .. })),
                "{text:?}"
            );
        }
    }

    #[test]
    fn huge_headers_allocate_nothing() {
        for header in ["4294967295 4294967295", "10000 10000", "4294967295"] {
            let err = parse(&format!("{header}\nA 1 2\nA 1 B 1\n")).unwrap_err();
            assert_eq!(line_of_ref(&err), 1, "{err}");
            assert!(
                err.to_string().contains("the file has 2 line(s) of pairs"),
                "{err}"
            );
        }
    }

    fn line_of_ref(err: &Error) -> usize {
        match err {
            Error::Pairs { line, .. } => *line,
            other => panic!("expected a Pairs error, got {other}"),
        }
    }

    #[test]
    fn names_stay_inside_the_images_folder() {
        for (name, why) in [
            ("/etc/passwd", "path separator"),
            ("..", "would leave the folder"),
            (".", "would leave the folder"),
            ("a/../../b", "path separator"),
            ("a\\b", "path separator"),
            ("a\u{1b}[2Jb", "control character"),
        ] {
            for text in [
                format!("1 1\n{name} 1 2\nA 1 B 1\n"),
                format!("1 1\nA 1 2\nA 1 {name} 1\n"),
            ] {
                let err = parse(&text).unwrap_err();
                let s = err.to_string();
                assert!(s.contains(why), "{name:?}: {s}");
                assert!(!s.contains('\u{1b}'), "{s}");
                assert!(s.starts_with("pairs.txt:"), "{s}");
            }
        }
        let long = "n".repeat(256);
        assert!(parse(&format!("1 1\n{long} 1 2\nA 1 B 1\n"))
            .unwrap_err()
            .to_string()
            .contains("256 bytes long"));
        // Names LFW has are fine.
        parse("1 1\nJean-Pierre_Raffarin 1 2\nBill_O'Reilly 1 Abdullah_al-Attiyah 1\n").unwrap();
    }

    #[test]
    fn echoed_fields_are_escaped_and_short() {
        let field = format!("1\u{7}{}", "9".repeat(10_000_000));
        let err = parse(&format!("1 1\nA {field} 2\nA 1 B 1\n")).unwrap_err();
        let s = err.to_string();
        assert!(s.len() < 300, "{} bytes", s.len());
        assert!(s.contains("1\\u{7}999") && s.contains('…'), "{s}");
        let err = parse(&format!("1 1\nA 1 2 {}\nA 1 B 1\n", "x ".repeat(1_000_000))).unwrap_err();
        assert!(err.to_string().contains("found 1000003 fields"), "{err}");
    }

    #[test]
    fn image_paths_follow_the_lfw_layout() {
        let r = ImageRef {
            name: "Aaron_Peirsol".into(),
            number: 12,
        };
        assert_eq!(
            r.path(Path::new("/lfw"), "jpg"),
            Path::new("/lfw/Aaron_Peirsol/Aaron_Peirsol_0012.jpg")
        );
    }
}
