//! Images at a site: `image_folder` datasets (one subfolder per class) and `image_csv` ones (a
//! CSV of image paths and labels), decoding (JPEG, PNG), and the preprocessing a run's image
//! encoder declares, the same at training and at prediction.
//!
//! Preprocessing follows LiteMedSAM's own: the image is resized with area averaging (OpenCV's
//! `INTER_AREA`) so that it fits the encoder's square, its intensities are min-max normalised to
//! [0, 1] over the whole image, and grey images get three identical channels. With
//! [`Resize::Pad`] the longest side is scaled to the square and the rest padded with zeros at the
//! bottom and right, as LiteMedSAM does; with [`Resize::Stretch`] (the default) both sides are
//! scaled, so the original shape leaves no trace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medfl_core::spec::{ImageEncoderSpec, Resize};

use crate::data::Table;
use crate::TrainError;

/// File extensions read as images (lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// Column names of an `image_folder` dataset: the image, and its class (the folder's name).
pub const FOLDER_COLUMNS: [&str; 2] = ["image", "label"];

/// An image dataset: a table of image paths and other columns (labels), as a site holds it.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// The folder or the CSV file, named in errors.
    source: PathBuf,
    /// Where relative image paths start.
    base: PathBuf,
    /// Whether it is an `image_folder` (labels are folder names, rows have no lines).
    folder: bool,
    table: Table,
}

/// One labelled image of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledImage {
    /// The image file.
    pub path: PathBuf,
    /// Class index in the run's labels.
    pub label: u32,
}

impl ImageSet {
    /// An `image_folder` dataset: every subfolder of `dir` is a class named after it, holding
    /// images (`.jpg`, `.jpeg`, `.png`; other files and hidden entries are ignored). Columns
    /// are `image` and `label`.
    pub fn load_folder(dir: &Path) -> Result<Self, TrainError> {
        let io = |path: &Path, source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut rows = Vec::new();
        let mut classes = 0;
        for class in sorted_entries(dir).map_err(|e| io(dir, e))? {
            let name = file_name(&class);
            if name.starts_with('.') || !class.is_dir() {
                continue;
            }
            classes += 1;
            for file in sorted_entries(&class).map_err(|e| io(&class, e))? {
                if is_image(&file) && !file_name(&file).starts_with('.') {
                    rows.push(vec![file.to_string_lossy().into_owned(), name.clone()]);
                }
            }
        }
        if rows.is_empty() {
            return Err(TrainError::Task(format!(
                "{}: no images ({}) in {classes} class folders; an image_folder dataset holds \
                 one subfolder of images per class",
                dir.display(),
                IMAGE_EXTENSIONS.join(", ")
            )));
        }
        Ok(Self {
            source: dir.to_path_buf(),
            base: dir.to_path_buf(),
            folder: true,
            table: Table::from_rows(dir, FOLDER_COLUMNS.map(String::from).to_vec(), rows),
        })
    }

    /// An `image_csv` dataset: a CSV with a header row, one image per row; relative image
    /// paths are relative to the CSV file's folder. Which columns hold the image and the label
    /// is the run's to say.
    pub fn load_csv(path: &Path) -> Result<Self, TrainError> {
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(Self {
            source: path.to_path_buf(),
            base,
            folder: false,
            table: Table::load_csv(path)?,
        })
    }

    /// The folder or CSV file it came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Column names.
    pub fn columns(&self) -> &[String] {
        self.table.columns()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether it has no images (never true once loaded).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// How many images each value of the `label` column has; an unknown column is an error
    /// listing the columns.
    pub fn class_counts(&self, label: &str) -> Result<BTreeMap<String, u64>, TrainError> {
        let mut counts = BTreeMap::new();
        for (_, cells) in self.table.cells(&[label])? {
            *counts.entry(cells[0].to_string()).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// The images with their class index in `labels`; errors name the file, line and column.
    /// Files are not opened here.
    pub fn labelled(
        &self,
        image: &str,
        label: &str,
        labels: &[String],
    ) -> Result<Vec<LabelledImage>, TrainError> {
        self.table
            .cells(&[image, label])?
            .into_iter()
            .map(|(line, cells)| {
                let class = labels.iter().position(|l| *l == cells[1]).ok_or_else(|| {
                    if self.folder {
                        return TrainError::Task(format!(
                            "{}: the class folder `{}` is not one of the run's labels {labels:?}",
                            self.source.display(),
                            cells[1]
                        ));
                    }
                    TrainError::Data {
                        path: self.source.clone(),
                        line,
                        message: format!(
                            "column `{label}`: unknown label `{}` (the run expects {labels:?})",
                            cells[1]
                        ),
                    }
                })?;
                if cells[0].is_empty() {
                    return Err(TrainError::Data {
                        path: self.source.clone(),
                        line,
                        message: format!("column `{image}`: no image path"),
                    });
                }
                Ok(LabelledImage {
                    path: self.base.join(cells[0]),
                    label: class as u32,
                })
            })
            .collect()
    }
}

impl ImageSet {
    /// Every image path of column `image`, with its `label` cell as written (any value).
    pub fn labelled_any(
        &self,
        image: &str,
        label: &str,
    ) -> Result<Vec<(PathBuf, String)>, TrainError> {
        Ok(self
            .table
            .cells(&[image, label])?
            .into_iter()
            .map(|(_, cells)| (self.base.join(cells[0]), cells[1].to_string()))
            .collect())
    }

    /// Every image path of column `image`.
    pub fn paths(&self, image: &str) -> Result<Vec<PathBuf>, TrainError> {
        Ok(self
            .table
            .cells(&[image])?
            .into_iter()
            .map(|(_, cells)| self.base.join(cells[0]))
            .collect())
    }
}

/// The entries of `dir`, sorted by name (so every listing of the same folder agrees).
fn sorted_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `path` has an image extension.
pub fn is_image(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A decoded image: `channels` planes (1 grey or 3 colour) of `height × width` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// One row-major plane per channel.
    pub planes: Vec<Vec<f32>>,
}

impl Pixels {
    /// Decodes an image file (JPEG or PNG). Grey images stay one plane; anything with colour
    /// becomes three (alpha dropped).
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::decode(path, &bytes)
    }

    /// Decodes image bytes; `path` names them in errors.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self, TrainError> {
        let unreadable = |e: image::ImageError| TrainError::Data {
            path: path.to_path_buf(),
            line: 0,
            message: format!("not a readable image: {e}"),
        };
        let img = image::load_from_memory(bytes).map_err(unreadable)?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        if width == 0 || height == 0 {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                line: 0,
                message: "the image has no pixels".into(),
            });
        }
        let planes = if img.color().has_color() {
            let rgb = img.to_rgb32f();
            (0..3)
                .map(|c| rgb.pixels().map(|p| p.0[c]).collect())
                .collect()
        } else {
            vec![img.to_luma32f().pixels().map(|p| p.0[0]).collect()]
        };
        Ok(Self {
            width,
            height,
            planes,
        })
    }
}

/// What every image goes through before the encoder, as a run's spec declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preprocess {
    /// Side of the square the encoder sees.
    pub size: usize,
    /// How the image becomes a square.
    pub resize: Resize,
}

impl Preprocess {
    /// The preprocessing of an image encoder spec.
    pub fn of(spec: &ImageEncoderSpec) -> Self {
        Self {
            size: spec.input_size as usize,
            resize: spec.resize,
        }
    }

    /// A stable description, part of every cached embedding's key: change it and embeddings
    /// are computed again.
    pub fn describe(&self) -> String {
        format!(
            "litemedsam-v1 size={} resize={} area minmax rgb",
            self.size,
            self.resize.as_str()
        )
    }

    /// `3 × size × size` values, channels first, in [0, 1].
    pub fn apply(&self, pixels: &Pixels) -> Vec<f32> {
        let s = self.size;
        let (w, h) = (pixels.width, pixels.height);
        let (tw, th) = match self.resize {
            Resize::Stretch => (s, s),
            Resize::Pad => {
                // The longest side becomes `s`, the other in proportion, rounded as LiteMedSAM
                // rounds (`int(side * scale + 0.5)`).
                let scale = s as f64 / w.max(h) as f64;
                let side = |n: usize| ((n as f64 * scale + 0.5) as usize).clamp(1, s);
                (side(w), side(h))
            }
        };
        let resized: Vec<Vec<f32>> = pixels
            .planes
            .iter()
            .map(|p| area_resize(p, w, h, tw, th))
            .collect();
        // Min-max over the whole image, all channels together.
        let (lo, hi) = resized
            .iter()
            .flatten()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let range = (hi - lo).max(1e-8);
        let mut out = vec![0f32; 3 * s * s];
        for c in 0..3 {
            let plane = &resized[c.min(resized.len() - 1)];
            for y in 0..th {
                for x in 0..tw {
                    out[c * s * s + y * s + x] = (plane[y * tw + x] - lo) / range;
                }
            }
        }
        out
    }
}

/// Resamples a `w × h` plane to `tw × th` by area averaging: each output pixel is the mean of
/// the source area it covers, partial pixels weighted by their share (OpenCV's `INTER_AREA`
/// when shrinking).
pub fn area_resize(plane: &[f32], w: usize, h: usize, tw: usize, th: usize) -> Vec<f32> {
    let xs = area_weights(w, tw);
    let ys = area_weights(h, th);
    // Rows first, then columns.
    let mut rows = vec![0f32; h * tw];
    for y in 0..h {
        let src = &plane[y * w..(y + 1) * w];
        for (x, taps) in xs.iter().enumerate() {
            rows[y * tw + x] = taps.iter().map(|&(i, wt)| src[i] * wt).sum();
        }
    }
    let mut out = vec![0f32; th * tw];
    for (y, taps) in ys.iter().enumerate() {
        for x in 0..tw {
            out[y * tw + x] = taps.iter().map(|&(i, wt)| rows[i * tw + x] * wt).sum();
        }
    }
    out
}

/// For each of `to` output cells, the source cells of `from` it covers and their weights
/// (summing to 1).
fn area_weights(from: usize, to: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = from as f64 / to as f64;
    (0..to)
        .map(|o| {
            let (start, end) = (o as f64 * scale, (o + 1) as f64 * scale);
            let first = start.floor() as usize;
            let last = (end.ceil() as usize).min(from);
            (first..last)
                .filter_map(|i| {
                    let overlap = (end.min(i as f64 + 1.) - start.max(i as f64)).max(0.);
                    (overlap > 1e-12).then_some((i, (overlap / scale) as f32))
                })
                .collect()
        })
        .collect()
}

/// A coarse perceptual hash of an image: its grey 8×8 area-averaged thumbnail, one bit per
/// cell above the thumbnail's mean. Near-duplicates (re-encoded, rescaled copies) share it,
/// which is what keeps them on one side of a train/test split.
pub fn coarse_hash(pixels: &Pixels) -> u64 {
    let n = pixels.width * pixels.height;
    let grey: Vec<f32> = (0..n)
        .map(|i| pixels.planes.iter().map(|p| p[i]).sum::<f32>() / pixels.planes.len() as f32)
        .collect();
    let thumb = area_resize(&grey, pixels.width, pixels.height, 8, 8);
    let mean = thumb.iter().sum::<f32>() / 64.;
    thumb
        .iter()
        .enumerate()
        .fold(0u64, |h, (i, &v)| if v > mean { h | 1 << i } else { h })
}

/// Deals `images` into parts holding `wanted[p][c]` images of class `c` (or as close below as
/// whole groups allow), keeping every group of near-duplicates (same [`coarse_hash`]) in one
/// part, so that no copy of a training image is scored as unseen. Groups are dealt in an order
/// the hash bits do not bias, first part first; images no part has room for are left out.
pub fn group_aware_parts(
    images: &[LabelledImage],
    wanted: &[Vec<usize>],
) -> Result<Vec<Vec<LabelledImage>>, TrainError> {
    let mut groups: BTreeMap<(u32, u64), Vec<LabelledImage>> = BTreeMap::new();
    for image in images {
        let hash = coarse_hash(&Pixels::open(&image.path)?);
        // Sorted by the plain hash, the last part would get the images with bright corners.
        let order = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        groups
            .entry((image.label, order))
            .or_default()
            .push(image.clone());
    }
    let mut parts: Vec<Vec<LabelledImage>> = vec![Vec::new(); wanted.len()];
    let mut have = vec![Vec::<usize>::new(); wanted.len()];
    for ((class, _), group) in groups {
        let c = class as usize;
        let room = |p: usize| wanted[p].get(c).copied().unwrap_or(0);
        if let Some(p) = (0..wanted.len())
            .find(|&p| have[p].get(c).copied().unwrap_or(0) + group.len() <= room(p))
        {
            if have[p].len() <= c {
                have[p].resize(c + 1, 0);
            }
            have[p][c] += group.len();
            parts[p].extend(group);
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(width: usize, height: usize, f: impl Fn(usize, usize) -> f32) -> Pixels {
        Pixels {
            width,
            height,
            planes: vec![(0..width * height)
                .map(|i| f(i % width, i / width))
                .collect()],
        }
    }

    #[test]
    fn area_resize_averages_what_each_pixel_covers() {
        // 4 → 2: pairs averaged; 3 → 2: the middle pixel split in halves.
        let plane = [1., 3., 5., 7.];
        assert_eq!(area_resize(&plane, 4, 1, 2, 1), vec![2., 6.]);
        let out = area_resize(&[0., 3., 6.], 3, 1, 2, 1);
        assert!(
            (out[0] - 1.).abs() < 1e-6 && (out[1] - 5.).abs() < 1e-6,
            "{out:?}"
        );
        // The mean is kept by any resize.
        let big = grey(37, 23, |x, y| (x * 7 + y * 3) as f32);
        let small = area_resize(&big.planes[0], 37, 23, 16, 16);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&big.planes[0]) - mean(&small)).abs() < 1e-3);
    }

    #[test]
    fn preprocessing_fills_the_square_normalised_with_three_channels() {
        let img = grey(40, 20, |x, _| x as f32);
        let stretch = Preprocess {
            size: 16,
            resize: Resize::Stretch,
        }
        .apply(&img);
        assert_eq!(stretch.len(), 3 * 16 * 16);
        let (lo, hi) = stretch
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert_eq!((lo, hi), (0., 1.));
        assert_eq!(stretch[..256], stretch[256..512]);
        // Padded: the 40×20 image becomes 16×8 in the top rows, zeros below.
        let pad = Preprocess {
            size: 16,
            resize: Resize::Pad,
        }
        .apply(&img);
        assert!(pad[8 * 16..16 * 16].iter().all(|&v| v == 0.));
        assert!(pad[15] > 0.9, "the top row runs to the right edge");
    }

    #[test]
    fn folders_are_classes_and_csv_paths_are_relative_to_the_csv() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("no", 2), ("yes", 3)] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for i in 0..n {
                let img = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
                img.save(dir.path().join(class).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        std::fs::write(dir.path().join("yes/notes.txt"), "not an image").unwrap();
        let set = ImageSet::load_folder(dir.path()).unwrap();
        assert_eq!(set.len(), 5);
        assert_eq!(set.columns(), ["image", "label"]);
        assert_eq!(
            set.class_counts("label").unwrap(),
            BTreeMap::from([("no".into(), 2), ("yes".into(), 3)])
        );
        assert!(set.class_counts("finding").is_err());
        let labels = ["no".to_string(), "yes".to_string()];
        let images = set.labelled("image", "label", &labels).unwrap();
        assert_eq!(images.iter().filter(|i| i.label == 1).count(), 3);
        let px = Pixels::open(&images[0].path).unwrap();
        assert_eq!((px.width, px.height, px.planes.len()), (5, 4, 1));

        let csv = dir.path().join("list.csv");
        std::fs::write(
            &csv,
            "file,finding\nyes/0.png,tumour\nno/0.png,healthy\nno/1.png,cyst\n",
        )
        .unwrap();
        let set = ImageSet::load_csv(&csv).unwrap();
        let classes = ["healthy".to_string(), "tumour".to_string()];
        let err = set
            .labelled("file", "finding", &classes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("list.csv:4") && err.contains("`cyst`"),
            "{err}"
        );
        let err = set
            .labelled("path", "finding", &classes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no column `path`"), "{err}");
        let err = ImageSet::load_folder(&dir.path().join("no/0.png")).unwrap_err();
        assert!(err.to_string().contains("0.png"), "{err}");
        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, b"not a jpeg").unwrap();
        let err = Pixels::open(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.jpg") && err.contains("not a readable image"),
            "{err}"
        );
    }

    #[test]
    fn near_duplicates_share_a_coarse_hash() {
        let img = grey(64, 48, |x, y| ((x / 8 + y / 8) % 3) as f32 * 80.);
        let shrunk = Pixels {
            width: 32,
            height: 24,
            planes: vec![area_resize(&img.planes[0], 64, 48, 32, 24)],
        };
        assert_eq!(coarse_hash(&img), coarse_hash(&shrunk));
        let other = grey(64, 48, |x, _| x as f32);
        assert_ne!(coarse_hash(&img), coarse_hash(&other));
    }
}
