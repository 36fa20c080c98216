//! Image-folder data sets: `dir/CLASS/*.png` and `*.jpg`/`*.jpeg`, one sub-folder per class
//! (sub-folders of a class folder are walked too).
//!
//! Every image is converted to grayscale or RGB and must have one size (or is resized to it);
//! pixels are scaled to [0, 1] and an example has shape `[channels, height, width]`. Bounds
//! come before work: a file over [`MAX_FILE_BYTES`] is not read, an image whose header announces
//! more than [`MAX_SIDE`] a side or [`MAX_PIXELS`] pixels is not decoded (decompression bombs),
//! at most `max_files` images are listed, and the features of all of them (`files x channels x
//! height x width x 4` bytes) must fit in `max_bytes` before the second image is decoded.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use cohort_common::data::{DataError, Dataset};
use cohort_common::peer::escape;
use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits};
use serde::{Deserialize, Serialize};

use super::FileError;

/// The widest or tallest image decoded.
pub const MAX_SIDE: u32 = 16_384;
/// The most pixels one image may have (8192 x 8192).
pub const MAX_PIXELS: u64 = 1 << 26;
/// The largest image file read.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// How deep class folders are walked.
pub const MAX_DEPTH: usize = 8;
/// The most class folders (as many classes as a model head can have).
pub const MAX_CLASSES: usize = cohort_common::data::npy::MAX_CLASSES;

fn default_max_files() -> usize {
    1_000_000
}
fn default_max_bytes() -> u64 {
    4 << 30
}
fn is_false(b: &bool) -> bool {
    !b
}

/// `format = "images"`: a folder with one sub-folder per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFolder {
    /// The folder holding the class folders.
    pub dir: PathBuf,
    /// The class folders' names in class order (class 0 first). Without it: every sub-folder,
    /// sorted by name. With it, a listed class may lack a folder (this site has none of it), and
    /// a folder not listed is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// 1 (grayscale) or 3 (RGB; alpha is dropped). Default: 1 if the first image is grayscale,
    /// else 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// `[height, width]` of every image. Default: the first image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[u32; 2]>,
    /// Resize images of another size to `size` (bilinear); without it they are refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub resize: bool,
    /// Skip files that cannot be read or decoded (counted in a warning) instead of stopping.
    #[serde(default, skip_serializing_if = "is_false")]
    pub skip_unreadable: bool,
    /// The most image files read.
    #[serde(default = "default_max_files")]
    pub max_files: usize,
    /// The most bytes the decoded data set (`f32` pixels) may take.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

/// A path under `dir` as a message shows it: file and folder names are the file system's text,
/// escaped (no forged log lines, no terminal escapes).
fn shown(path: &Path) -> String {
    escape(&path.display().to_string(), 1024)
}

fn bad(path: &Path, problem: String) -> FileError {
    FileError::Data(DataError::Format { origin: shown(path), problem })
}

fn io_error(path: &Path, source: std::io::Error) -> FileError {
    FileError::Io { path: shown(path), source }
}

/// Whether a file name ends in `.png`, `.jpg` or `.jpeg` (any case).
fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// The entries of a folder, hidden ones left out, sorted by name.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let path = entry.map_err(|e| io_error(dir, e))?.path();
        if !is_hidden(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// What the folders hold before any image is decoded.
struct Listing {
    /// Class names in class order, with their folder (`None`: listed in `classes`, no folder).
    classes: Vec<(String, Option<PathBuf>)>,
    /// Image files and their class.
    files: Vec<(PathBuf, u32)>,
    /// Files that are not named as images.
    ignored: usize,
}

impl ImageFolder {
    /// The class names in class order, with their folders; errors when the folder is not one,
    /// has fewer than two classes or more than [`MAX_CLASSES`], or (with `classes`) holds a
    /// folder not listed.
    pub fn class_folders(&self) -> Result<Vec<(String, Option<PathBuf>)>, FileError> {
        let dir = &self.dir;
        if !dir.is_dir() {
            return Err(bad(
                dir,
                "not a folder; `dir` names a folder that holds one sub-folder of images per class".into(),
            ));
        }
        let mut folders = Vec::new();
        for path in entries(dir)? {
            if path.is_dir() {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                folders.push((name, path));
            }
        }
        let classes: Vec<(String, Option<PathBuf>)> = match &self.classes {
            None => folders.into_iter().map(|(name, path)| (name, Some(path))).collect(),
            Some(list) => {
                for (i, name) in list.iter().enumerate() {
                    if list[..i].contains(name) {
                        return Err(bad(dir, format!("classes lists `{name}` twice")));
                    }
                }
                if let Some((name, _)) = folders.iter().find(|(name, _)| !list.contains(name)) {
                    return Err(bad(
                        dir,
                        format!(
                            "the folder `{}` is not among classes = {list:?}; add it to the list, or move it out \
                             of {}",
                            escape(name, 80),
                            shown(dir)
                        ),
                    ));
                }
                list.iter()
                    .map(|name| {
                        let folder = folders.iter().find(|(n, _)| n == name).map(|(_, p)| p.clone());
                        (name.clone(), folder)
                    })
                    .collect()
            }
        };
        match classes.len() {
            0 => Err(bad(dir, "no class folders: put the images of each class in a sub-folder named after it".into())),
            1 => Err(bad(
                dir,
                format!(
                    "only one class (`{}`): a classifier needs at least two. Put each class's images in a folder \
                     of its own; a site that holds one class lists the federation's classes with classes = [...]",
                    escape(&classes[0].0, 80)
                ),
            )),
            n if n > MAX_CLASSES => {
                Err(bad(dir, format!("{n} class folders, more than the {MAX_CLASSES} classes a model head can have")))
            }
            _ => Ok(classes),
        }
    }

    /// Lists the classes and their image files, without decoding any.
    fn listing(&self) -> Result<Listing, FileError> {
        let classes = self.class_folders()?;
        let mut files = Vec::new();
        let mut ignored = 0;
        let mut seen = std::collections::HashSet::new();
        for (label, (_, folder)) in classes.iter().enumerate() {
            if let Some(folder) = folder {
                let mut found = Vec::new();
                self.walk(folder, 0, &mut found, &mut ignored, files.len(), &mut seen)?;
                files.extend(found.into_iter().map(|p| (p, label as u32)));
            }
        }
        if files.is_empty() {
            return Err(bad(&self.dir, "no .png, .jpg or .jpeg files in the class folders".into()));
        }
        Ok(Listing { classes, files, ignored })
    }

    fn walk(
        &self,
        folder: &Path,
        depth: usize,
        found: &mut Vec<PathBuf>,
        ignored: &mut usize,
        before: usize,
        seen: &mut std::collections::HashSet<PathBuf>,
    ) -> Result<(), FileError> {
        if depth > MAX_DEPTH {
            return Err(bad(folder, format!("folders nested more than {MAX_DEPTH} deep (a link loop?)")));
        }
        // Each folder once, however it is reached: links back to a folder would list it again
        // and again (k links to itself: about k^MAX_DEPTH listings), and its images twice.
        let real = std::fs::canonicalize(folder).map_err(|source| FileError::Io { path: shown(folder), source })?;
        if !seen.insert(real) {
            return Err(bad(folder, "is reached twice through links; one folder per class, each once".into()));
        }
        for path in entries(folder)? {
            if path.is_dir() {
                self.walk(&path, depth + 1, found, ignored, before, seen)?;
            } else if is_image_name(&path) {
                if before + found.len() >= self.max_files {
                    return Err(bad(
                        &self.dir,
                        format!(
                            "more than max_files = {} images; raise max_files (each image takes channels x height \
                             x width x 4 bytes of memory), or use fewer images",
                            self.max_files
                        ),
                    ));
                }
                found.push(path);
            } else {
                *ignored += 1;
            }
        }
        Ok(())
    }

    /// A line for `cohort-client check`: where the images are and which folder is which class.
    pub fn describe(&self) -> String {
        match self.class_folders() {
            Ok(classes) => {
                let mut names: Vec<String> = classes
                    .iter()
                    .take(20)
                    .enumerate()
                    .map(|(i, (name, folder))| match folder {
                        Some(_) => format!("{i} `{}`", escape(name, 80)),
                        None => format!("{i} `{}` (no folder)", escape(name, 80)),
                    })
                    .collect();
                if classes.len() > 20 {
                    names.push(format!("... ({} in all)", classes.len()));
                }
                format!("image folders in {}: classes {}", shown(&self.dir), names.join(", "))
            }
            Err(e) => format!("image folders in {}: {e}", shown(&self.dir)),
        }
    }

    /// Reads every image into a data set.
    pub fn load(&self) -> Result<Dataset, FileError> {
        if let Some(c) = self.channels.filter(|c| *c != 1 && *c != 3) {
            return Err(bad(&self.dir, format!("channels = {c}: use 1 (grayscale) or 3 (RGB)")));
        }
        if let Some([h, w]) = self.size.filter(|[h, w]| *h == 0 || *w == 0 || *h > MAX_SIDE || *w > MAX_SIDE) {
            return Err(bad(&self.dir, format!("size = [{h}, {w}]: each side must be 1 to {MAX_SIDE} pixels")));
        }
        let listing = self.listing()?;
        let n = listing.files.len();
        let mut shape: Option<(usize, u32, u32)> = None;
        let mut features = Vec::new();
        let mut labels = Vec::with_capacity(n);
        let mut skipped: Vec<String> = Vec::new();
        for (path, label) in &listing.files {
            let image = match read_image(path) {
                Ok(image) => image,
                Err(problem) if self.skip_unreadable => {
                    skipped.push(format!("{}: {problem}", shown(path)));
                    continue;
                }
                Err(problem) => {
                    return Err(bad(path, format!("{problem}; remove the file, or set skip_unreadable = true")));
                }
            };
            let (channels, height, width) = match shape {
                Some(shape) => shape,
                None => {
                    let channels = self.channels.unwrap_or(if image.color().has_color() { 3 } else { 1 });
                    let [height, width] = self.size.unwrap_or([image.height(), image.width()]);
                    let bytes = (n as u128) * (channels as u128) * (height as u128) * (width as u128) * 4;
                    if bytes > self.max_bytes as u128 {
                        return Err(bad(
                            &self.dir,
                            format!(
                                "{n} images of {channels}x{height}x{width} take {bytes} bytes as features, more than \
                                 max_bytes = {}; raise max_bytes if the machine has the memory, or make them smaller \
                                 with size = [HEIGHT, WIDTH] and resize = true",
                                self.max_bytes
                            ),
                        ));
                    }
                    features.reserve(n * channels * height as usize * width as usize);
                    *shape.insert((channels, height, width))
                }
            };
            let resize = (image.height(), image.width()) != (height, width);
            if resize && !self.resize {
                return Err(bad(
                    path,
                    format!(
                        "{} pixels high and {} wide, the data set's images are {height} high and {width} wide \
                         ({}); set resize = true to resize every image to one size, or resize the file",
                        image.height(),
                        image.width(),
                        if self.size.is_some() { "size" } else { "the size of the first image" }
                    ),
                ));
            }
            if channels == 1 {
                let mut gray = image.to_luma8();
                if resize {
                    gray = image::imageops::resize(&gray, width, height, FilterType::Triangle);
                }
                features.extend(gray.as_raw().iter().map(|&p| p as f32 / 255.0));
            } else {
                let mut rgb = image.to_rgb8();
                if resize {
                    rgb = image::imageops::resize(&rgb, width, height, FilterType::Triangle);
                }
                for c in 0..3 {
                    features.extend(rgb.pixels().map(|p| p.0[c] as f32 / 255.0));
                }
            }
            labels.push(*label);
        }
        if !skipped.is_empty() {
            tracing::warn!(
                "{}: skipped {} of {n} image files that could not be read (skip_unreadable = true); the first: {}",
                shown(&self.dir),
                skipped.len(),
                skipped[0]
            );
        }
        if listing.ignored > 0 {
            tracing::info!(
                "{}: {} files in the class folders are not named .png, .jpg or .jpeg and were left out",
                shown(&self.dir),
                listing.ignored
            );
        }
        let Some((channels, height, width)) = shape else {
            return Err(bad(
                &self.dir,
                format!("none of the {n} image files could be read; the first: {}", skipped[0]),
            ));
        };
        Dataset::new(features, vec![channels, height as usize, width as usize], labels, listing.classes.len())
            .map_err(FileError::Data)
    }
}

/// Reads and decodes one image, checking its size before decoding it. The error says what is
/// wrong with the file (the caller names it).
fn read_image(path: &Path) -> Result<DynamicImage, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("the file is larger than the {MAX_FILE_BYTES} bytes an image file may have"));
    }
    let reader =
        ImageReader::new(Cursor::new(&bytes[..])).with_guessed_format().map_err(|e| format!("cannot read it: {e}"))?;
    let Some(format) = reader.format() else {
        let start = &bytes[..bytes.len().min(8)];
        return Err(format!("not a PNG or JPEG image (it starts with {start:02x?})"));
    };
    let kind = format!("{format:?}").to_uppercase();
    let (width, height) = reader.into_dimensions().map_err(|e| format!("a damaged {kind} header: {e}"))?;
    if width > MAX_SIDE || height > MAX_SIDE || u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(format!(
            "its header announces {width}x{height} pixels (width x height), more than an image may have (at most \
             {MAX_SIDE} a side and {MAX_PIXELS} pixels); shrink it"
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(&bytes[..]));
    reader.set_format(format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    reader.decode().map_err(|e| format!("a damaged or truncated {kind} image: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb, RgbImage};

    fn folder(dir: &Path) -> ImageFolder {
        ImageFolder {
            dir: dir.to_path_buf(),
            classes: None,
            channels: None,
            size: None,
            resize: false,
            skip_unreadable: false,
            max_files: default_max_files(),
            max_bytes: default_max_bytes(),
        }
    }

    /// A `w` x `h` RGB image whose red channel is `shade` and green is the column.
    fn picture(w: u32, h: u32, shade: u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| Rgb([shade, x as u8, 0]))
    }

    fn save(path: &Path, image: &RgbImage, format: ImageFormat) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image.save_with_format(path, format).unwrap();
    }

    fn png_bytes(image: &RgbImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn err(f: &ImageFolder) -> String {
        f.load().unwrap_err().to_string()
    }

    /// The CRC-32 of PNG chunks (ISO 3309), to forge a header.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn reads_png_and_jpeg_class_folders() {
        let dir = tempfile::tempdir().unwrap();
        save(&dir.path().join("cat/a.png"), &picture(4, 3, 255), ImageFormat::Png);
        save(&dir.path().join("cat/nested/b.PNG"), &picture(4, 3, 0), ImageFormat::Png);
        save(&dir.path().join("dog/c.jpg"), &picture(4, 3, 128), ImageFormat::Jpeg);
        std::fs::write(dir.path().join("dog/notes.txt"), "not an image").unwrap();
        std::fs::write(dir.path().join("README"), "beside the class folders").unwrap();
        std::fs::create_dir_all(dir.path().join(".cache")).unwrap();
        let rgb = folder(dir.path()).load().unwrap();
        assert_eq!((rgb.len(), rgb.classes, rgb.feature_shape.clone()), (3, 2, vec![3, 3, 4]));
        assert_eq!(rgb.labels, vec![0, 0, 1]);
        // Channel-first: red plane, then green (the column / 255), then blue.
        assert_eq!(rgb.features[0], 1.0);
        assert_eq!(rgb.features[12 + 3], 3.0 / 255.0);
        assert_eq!(rgb.features[24], 0.0);
        assert!((rgb.features[2 * 36] - 128.0 / 255.0).abs() < 0.05, "JPEG is lossy: {}", rgb.features[72]);

        let gray = ImageFolder { channels: Some(1), ..folder(dir.path()) }.load().unwrap();
        assert_eq!(gray.feature_shape, vec![1, 3, 4]);
        let listed = ImageFolder {
            classes: Some(vec!["dog".into(), "cat".into(), "bird".into()]),
            size: Some([6, 8]),
            resize: true,
            ..folder(dir.path())
        };
        let ds = listed.load().unwrap();
        assert_eq!((ds.labels.clone(), ds.classes, ds.feature_shape.clone()), (vec![0, 1, 1], 3, vec![3, 6, 8]));
        assert!(listed.describe().contains("0 `dog`, 1 `cat`, 2 `bird` (no folder)"), "{}", listed.describe());
    }

    #[test]
    fn damaged_and_hostile_images_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(&d.join("a/1.png"), &picture(5, 5, 10), ImageFormat::Png);
        save(&d.join("b/1.png"), &picture(5, 5, 20), ImageFormat::Png);
        let f = folder(d);
        assert_eq!(f.load().unwrap().len(), 2);

        // A truncated PNG.
        let png = png_bytes(&picture(5, 5, 30));
        std::fs::write(d.join("b/2.png"), &png[..png.len() / 2]).unwrap();
        let e = err(&f);
        assert!(
            e.contains("b/2.png") && e.contains("damaged or truncated PNG") && e.contains("skip_unreadable"),
            "{e}"
        );
        // Skipped and counted instead, when asked.
        let skipping = ImageFolder { skip_unreadable: true, ..folder(d) };
        assert_eq!(skipping.load().unwrap().len(), 2);
        std::fs::remove_file(d.join("b/2.png")).unwrap();

        // A truncated JPEG.
        let mut jpeg = Cursor::new(Vec::new());
        picture(5, 5, 30).write_to(&mut jpeg, ImageFormat::Jpeg).unwrap();
        let jpeg = jpeg.into_inner();
        std::fs::write(d.join("b/3.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
        let e = err(&f);
        assert!(e.contains("b/3.jpg") && e.contains("JPEG"), "{e}");
        std::fs::remove_file(d.join("b/3.jpg")).unwrap();

        // A text file named .png.
        std::fs::write(d.join("a/text.png"), "hello, I am text").unwrap();
        let e = err(&f);
        assert!(e.contains("a/text.png") && e.contains("not a PNG or JPEG image"), "{e}");
        std::fs::remove_file(d.join("a/text.png")).unwrap();

        // A header claiming 100000 x 100000 pixels: refused before decoding; and one within the
        // side limit but past the pixel limit (16384 x 16384 = 2^28 pixels).
        for (side, name) in [(100_000u32, "bomb.png"), (MAX_SIDE, "wide.png")] {
            let mut bomb = png.clone();
            bomb[16..20].copy_from_slice(&side.to_be_bytes());
            bomb[20..24].copy_from_slice(&side.to_be_bytes());
            let crc = crc32(&bomb[12..29]);
            bomb[29..33].copy_from_slice(&crc.to_be_bytes());
            std::fs::write(d.join("a").join(name), &bomb).unwrap();
            let e = err(&f);
            assert!(
                e.contains(&format!("a/{name}")) && e.contains(&format!("{side}x{side}")) && e.contains("shrink"),
                "{e}"
            );
            std::fs::remove_file(d.join("a").join(name)).unwrap();
        }

        // File and folder names are the file system's text: escaped in errors.
        std::fs::write(d.join("a/x\nINFO forged\u{1b}[2J.png"), "text").unwrap();
        let e = err(&f);
        assert!(e.contains("x\\nINFO forged") && e.contains("not a PNG or JPEG"), "{e}");
        assert!(!e.contains(['\n', '\u{1b}']), "{e:?}");
        std::fs::remove_file(d.join("a/x\nINFO forged\u{1b}[2J.png")).unwrap();
        std::fs::create_dir_all(d.join("c\u{1b}[31m")).unwrap();
        let e = err(&ImageFolder { classes: Some(vec!["a".into(), "b".into()]), ..folder(d) });
        assert!(e.contains("the folder `c\\u{1b}[31m` is not among"), "{e}");
        assert!(!folder(d).describe().contains('\u{1b}'), "{}", folder(d).describe());
        std::fs::remove_dir(d.join("c\u{1b}[31m")).unwrap();

        // Mixed sizes without resize; then with it.
        save(&d.join("b/big.png"), &picture(7, 6, 30), ImageFormat::Png);
        let e = err(&f);
        assert!(
            e.contains("b/big.png") && e.contains("6 pixels high and 7 wide") && e.contains("resize = true"),
            "{e}"
        );
        assert_eq!(ImageFolder { resize: true, ..folder(d) }.load().unwrap().feature_shape, vec![3, 5, 5]);

        // Too many files, too many bytes.
        let e = err(&ImageFolder { max_files: 2, ..folder(d) });
        assert!(e.contains("max_files = 2"), "{e}");
        let e = err(&ImageFolder { max_bytes: 100, resize: true, ..folder(d) });
        assert!(e.contains("3 images of 3x5x5 take 900 bytes") && e.contains("max_bytes = 100"), "{e}");

        // Bad settings.
        let e = err(&ImageFolder { channels: Some(2), ..folder(d) });
        assert!(e.contains("channels = 2"), "{e}");
        let e = err(&ImageFolder { size: Some([0, 5]), ..folder(d) });
        assert!(e.contains("size = [0, 5]"), "{e}");
        let e = err(&ImageFolder { classes: Some(vec!["a".into(), "c".into()]), ..folder(d) });
        assert!(e.contains("the folder `b` is not among classes"), "{e}");
        let e = err(&ImageFolder { classes: Some(vec!["a".into(), "b".into(), "a".into()]), ..folder(d) });
        assert!(e.contains("`a` twice"), "{e}");
    }

    #[test]
    fn folders_without_classes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Review finding: links back to a class folder listed it about k^MAX_DEPTH times.
        let looped = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            save(&looped.path().join(class).join("1.png"), &picture(2, 2, 1), ImageFormat::Png);
        }
        for link in ["x", "y", "z"] {
            std::os::unix::fs::symlink(looped.path().join("a"), looped.path().join("a").join(link)).unwrap();
        }
        let e = err(&folder(looped.path()));
        assert!(e.contains("reached twice through links"), "{e}");
        let e = err(&folder(&d.join("missing")));
        assert!(e.contains("missing") && e.contains("not a folder"), "{e}");
        let e = err(&folder(d));
        assert!(e.contains("no class folders"), "{e}");
        save(&d.join("only/1.png"), &picture(2, 2, 1), ImageFormat::Png);
        let e = err(&folder(d));
        assert!(e.contains(&d.display().to_string()) && e.contains("only one class (`only`)"), "{e}");
        std::fs::create_dir_all(d.join("empty")).unwrap();
        std::fs::write(d.join("empty/x.txt"), "").unwrap();
        assert_eq!(folder(d).load().unwrap().label_counts(), vec![0, 1]);
        std::fs::remove_file(d.join("only/1.png")).unwrap();
        let e = err(&folder(d));
        assert!(e.contains("no .png, .jpg or .jpeg files"), "{e}");
    }
}
