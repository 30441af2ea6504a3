//! `ckpt::data`: folders of images -> batches, checked against torchvision.
//!
//! The references were made by `fixtures/make_image_fixtures.py` (torchvision 0.29, Pillow 13
//! with libjpeg-turbo 3.2 and libwebp 1.6); no PyTorch is needed here. Pixel tolerances are in
//! 8-bit levels before normalisation (1 level = 1/255). The bound is a mean below 1 level
//! and a max below 4 per image; what ckpt achieves is tighter and is what these tests hold:
//! decoding identical to PIL's for every format and mode (JPEG included: libjpeg-turbo with
//! PIL's settings), and resizing within 1 level (fixed-point filter coefficients of 16 bits
//! against PIL's 22), below 0.1 level on average.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ckpt::data::{
    self, decode_file, transform_many, CropMode, CropParams, DataConfig, Dataset, DatasetOptions,
    DecodeOptions, DecodedImage, EvalTransform, Interpolation, Loader, LoaderOptions, Normalize,
    Shard, TrainTransform, Transform,
};
use ckpt::report::Reporter;
use safetensors::Dtype;

use crate::util::{fixture, read_st, TestDir, T};

fn images_dir() -> PathBuf {
    fixture("images")
}

fn refs(name: &str) -> HashMap<String, T> {
    read_st(&fixture(&format!("expected/pixels/{name}.safetensors")))
}

fn params() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("expected/pixels/params.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The fixture image called `name` (file stem), by its path in params.json.
fn image_path(name: &str) -> PathBuf {
    let rel = params()["images"][name].as_str().unwrap().to_string();
    images_dir().join(rel)
}

fn decode(name: &str) -> DecodedImage {
    decode_file(&image_path(name), &DecodeOptions::default()).unwrap()
}

fn quiet() -> Reporter {
    Reporter::new(true)
}

/// (mean, max) absolute difference in levels between our 8-bit RGB and a reference [H, W, 3].
fn diff(got: &DecodedImage, want: &T, what: &str) -> (f64, u8) {
    assert_eq!(want.dtype, Dtype::U8, "{what}");
    assert_eq!(
        want.shape,
        vec![got.height() as usize, got.width() as usize, 3],
        "{what}: shape"
    );
    let g = got.to_rgb();
    let mut sum = 0u64;
    let mut max = 0u8;
    for (a, b) in g.iter().zip(&want.data) {
        let d = a.abs_diff(*b);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / g.len() as f64, max)
}

fn eval(size: u32, interpolation: Interpolation) -> EvalTransform {
    EvalTransform {
        size,
        crop_pct: 0.875,
        interpolation,
        ..EvalTransform::default()
    }
}

#[test]
fn scan_orders_classes_and_files_as_imagefolder() {
    let ds = Dataset::scan(&images_dir(), &DatasetOptions::default()).unwrap();
    let text = std::fs::read_to_string(fixture("expected/pixels/imagefolder.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let classes: Vec<String> = want["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ds.classes, classes);
    let samples: Vec<(String, i64)> = want["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_str().unwrap().to_string(), s[1].as_i64().unwrap()))
        .collect();
    let got: Vec<(String, i64)> = ds
        .items
        .iter()
        .map(|it| {
            let rel = it.path.strip_prefix(images_dir()).unwrap();
            (rel.to_string_lossy().into_owned(), it.label.unwrap())
        })
        .collect();
    assert_eq!(got, samples);
    assert_eq!(ds.total, samples.len());
    assert!(ds.is_labelled());
}

#[test]
fn every_input_decodes_as_pil_convert_rgb() {
    // JPEG 4:2:0, grey, CMYK (Adobe), EXIF-tagged; PNG RGB, RGBA and LA (alpha dropped), palette
    // with transparency, 1-bit, 16-bit grey (clipped to 255), 16-bit RGB (high byte); BMP;
    // lossless and lossy WebP. The three largest photographs have no decoded reference (their
    // resized ones below cover them).
    let decoded = refs("decoded");
    let mut checked = 0;
    for (key, want) in &decoded {
        let name = key.split('@').next().unwrap();
        let opts = DecodeOptions {
            exif_transpose: key.ends_with("@exif"),
            ..DecodeOptions::default()
        };
        let got = decode_file(&image_path(name), &opts).unwrap();
        let (mean, max) = diff(&got, want, key);
        assert_eq!(
            max, 0,
            "{key}: decoded pixels differ from PIL's (mean {mean})"
        );
        checked += 1;
    }
    assert_eq!(checked, 13);
}

#[test]
fn exif_orientation_is_ignored_unless_asked() {
    let decoded = refs("decoded");
    let path = image_path("exif6");
    let plain = decode_file(&path, &DecodeOptions::default()).unwrap();
    let turned = decode_file(
        &path,
        &DecodeOptions {
            exif_transpose: true,
            ..DecodeOptions::default()
        },
    )
    .unwrap();
    assert_eq!((plain.width(), plain.height()), (75, 50));
    assert_eq!((turned.width(), turned.height()), (50, 75));
    assert_eq!(diff(&turned, &decoded["exif6@exif"], "exif6@exif").1, 0);
    assert_eq!(diff(&plain, &decoded["exif6"], "exif6").1, 0);
}

#[test]
fn eval_transform_matches_torchvision_resize_center_crop() {
    // Every reference `<name>@<interp>@<S>`: Resize(floor(S / 0.875)) + CenterCrop(S) in PIL.
    // Measured: mean at most 0.05 (digit, 8x8 upscaled), 0.005 for the photographs; max 1.
    let eval_refs = refs("eval");
    let mut worst: HashMap<(String, u32), (f64, u8)> = HashMap::new();
    let mut failures = Vec::new();
    let mut count = 0;
    for (key, want) in &eval_refs {
        let parts: Vec<&str> = key.split('@').collect();
        let interp = match parts[1] {
            "bilinear" => Interpolation::Bilinear,
            "bicubic" => Interpolation::Bicubic,
            _ => continue,
        };
        let size: u32 = parts[2].parse().unwrap();
        let got = eval(size, interp).apply_u8(&decode(parts[0])).unwrap();
        let (mean, max) = diff(&got, want, key);
        eprintln!("{key}: mean {mean:.3} max {max}");
        let within = mean < 0.1 && max <= 1;
        if !within {
            failures.push(format!("{key}: mean {mean} max {max}"));
        }
        let w = worst.entry((parts[1].to_string(), size)).or_default();
        w.0 = w.0.max(mean);
        w.1 = w.1.max(max);
        count += 1;
    }
    assert!(count >= 30, "only {count} references");
    let mut table: Vec<_> = worst.into_iter().collect();
    table.sort_by(|a, b| a.0.cmp(&b.0));
    for ((interp, size), (mean, max)) in table {
        eprintln!("{interp} {size}: worst image mean {mean:.3} max {max}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn squash_pad_and_resized_crop_match_torchvision() {
    let eval_refs = refs("eval");
    let p = params();
    for name in ["astronaut", "coffee"] {
        let img = decode(name);
        let squash = EvalTransform {
            size: 64,
            crop_pct: 0.875,
            interpolation: Interpolation::Bicubic,
            crop_mode: CropMode::Squash,
            ..EvalTransform::default()
        };
        // crop_pct > 1: the resized image (55 px) is smaller than the crop; zeros around it.
        let pad = EvalTransform {
            size: 64,
            crop_pct: 1.15,
            ..EvalTransform::default()
        };
        let b = &p["rrc_box_top_left_h_w"][name];
        let box_ = CropParams {
            top: b[0].as_u64().unwrap() as u32,
            left: b[1].as_u64().unwrap() as u32,
            height: b[2].as_u64().unwrap() as u32,
            width: b[3].as_u64().unwrap() as u32,
            flip: true,
        };
        let rrc = TrainTransform {
            size: 64,
            ..TrainTransform::default()
        };
        let cases = [
            ("squash", squash.apply_u8(&img).unwrap()),
            ("pad", pad.apply_u8(&img).unwrap()),
            ("rrc", rrc.apply_u8_with(&img, &box_).unwrap()),
        ];
        for (what, got) in cases {
            let key = format!("{name}@{what}@64");
            let (mean, max) = diff(&got, &eval_refs[&key], &key);
            eprintln!("{key}: mean {mean:.3} max {max}");
            assert!(mean < 0.1 && max <= 1, "{key}: mean {mean} max {max}");
        }
    }
}

#[test]
fn normalisation_is_torchvisions_to_the_bit() {
    let normalized = refs("normalized");
    let eval_refs = refs("eval");
    let table = Normalize::default().table();
    for name in ["astronaut", "coffee"] {
        let key = format!("{name}@bilinear@32");
        let want = crate::util::as_f64(&normalized[&key]);
        assert_eq!(normalized[&key].shape, vec![3, 32, 32]);
        // torchvision's own 8-bit image through our table: identical f32 values.
        let u8ref = &eval_refs[&key].data;
        for (i, w) in want.iter().enumerate() {
            let (c, pix) = (i / 1024, i % 1024);
            let ours = table[c][u8ref[pix * 3 + c] as usize];
            assert_eq!(ours, *w as f32, "{key}[{i}]");
        }
        // The whole pipeline: within one level, scaled by 1/std.
        let got = eval(32, Interpolation::Bilinear)
            .apply(&decode(name))
            .unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .enumerate()
            .map(|(i, (g, w))| (*g as f64 - w).abs() * data::IMAGENET_STD[i / 1024] as f64 * 255.0)
            .fold(0.0, f64::max);
        assert!(worst < 1.01, "{key}: worst difference {worst} levels");
    }
}

#[test]
fn eval_plan_uses_torchvisions_rounding() {
    let t = EvalTransform::default(); // 224, 0.875: resize to 256
    let p = t.plan(500, 375);
    // long side int(256 * 500 / 375) = 341; crop offset round(117 / 2) = round(58.5) = 58 (half
    // to even); round(16) = 16.
    assert_eq!((p.resized_width, p.resized_height), (341, 256));
    assert_eq!((p.window.x, p.window.y), (58, 16));
    assert_eq!((p.window.width, p.window.height), (224, 224));
    let p = t.plan(375, 501); // int(256 * 501 / 375) = 342: offset round(59) = 59
    assert_eq!((p.resized_width, p.resized_height), (256, 342));
    assert_eq!((p.window.x, p.window.y), (16, 59));
    let p = t.plan(224, 336); // 336 * 256 / 224 = 384 exactly; round(80) = 80
    assert_eq!((p.resized_width, p.resized_height), (256, 384));
    let t = EvalTransform {
        size: 224,
        crop_pct: 0.9,
        ..EvalTransform::default()
    };
    assert_eq!(t.scale_size(), 248); // floor(248.88)
    let p = t.plan(333, 333);
    assert_eq!(
        (p.resized_width, p.window.x, p.window.y),
        (248, 12, 12),
        "round(12.0)"
    );
    let p = EvalTransform {
        size: 224,
        crop_pct: 0.95,
        ..EvalTransform::default()
    }
    .plan(400, 300); // scale 235, long int(235 * 400 / 300) = 313; round(44.5) = 44, round(5.5) = 6
    assert_eq!((p.resized_width, p.resized_height), (313, 235));
    assert_eq!((p.window.x, p.window.y), (44, 6));
}

#[test]
fn one_decode_feeds_several_sizes() {
    let img = decode("astronaut");
    let ts = [
        eval(32, Interpolation::Bilinear),
        eval(64, Interpolation::Bicubic),
        eval(128, Interpolation::Bilinear),
    ];
    let many = transform_many(&img, &ts).unwrap();
    assert_eq!(many.len(), 3);
    for (t, got) in ts.iter().zip(&many) {
        assert_eq!(got, &t.apply(&img).unwrap());
        assert_eq!(got.len(), 3 * t.size as usize * t.size as usize);
    }
}

fn collect(loader: Loader) -> Vec<data::Batch> {
    loader.map(|b| b.unwrap()).collect()
}

#[test]
fn batches_are_the_same_for_one_and_several_threads() {
    let ds = Dataset::scan(&images_dir(), &DatasetOptions::default()).unwrap();
    for transform in [
        Transform::Eval(eval(48, Interpolation::Bicubic)),
        Transform::Train(TrainTransform {
            size: 40,
            seed: 7,
            ..TrainTransform::default()
        }),
    ] {
        let run = |threads| {
            let opts = LoaderOptions {
                batch_size: 4,
                threads: Some(threads),
                prefetch: 2,
                ..LoaderOptions::default()
            };
            collect(Loader::new(&ds, transform, &opts, &quiet()).unwrap())
        };
        let one = run(1);
        let three = run(3);
        assert_eq!(one.len(), 4); // 15 images in batches of 4
        assert_eq!(one, three, "batches differ between 1 and 3 threads");
        assert_eq!(one[3].n, 3);
        let labels: Vec<i64> = one.iter().flat_map(|b| b.labels.clone().unwrap()).collect();
        let want: Vec<i64> = ds.items.iter().map(|it| it.label.unwrap()).collect();
        assert_eq!(labels, want);
        let paths: Vec<PathBuf> = one.iter().flat_map(|b| b.paths.clone()).collect();
        assert_eq!(
            paths,
            ds.items.iter().map(|i| i.path.clone()).collect::<Vec<_>>()
        );
        for b in &one {
            assert_eq!(b.images.len(), b.n * 3 * (b.size * b.size) as usize);
        }
    }
}

#[test]
fn loader_output_is_the_transform_of_each_image() {
    let ds = Dataset::scan(&images_dir(), &DatasetOptions::default()).unwrap();
    let t = eval(32, Interpolation::Bilinear);
    let opts = LoaderOptions {
        batch_size: 6,
        ..LoaderOptions::default()
    };
    let mut loader = Loader::new(&ds, Transform::Eval(t), &opts, &quiet()).unwrap();
    let first = loader.next().unwrap().unwrap();
    for (k, path) in first.paths.iter().enumerate() {
        let img = decode_file(path, &DecodeOptions::default()).unwrap();
        let want = t.apply(&img).unwrap();
        let len = want.len();
        assert_eq!(&first.images[k * len..(k + 1) * len], &want[..], "{path:?}");
    }
    let rest: Vec<_> = loader.by_ref().map(|b| b.unwrap()).collect();
    assert_eq!(rest.len(), 2);
    assert_eq!(loader.summary().images, 15);
    assert!(loader.summary().skipped.is_empty());
}

#[test]
fn sweep_loader_gives_every_size_of_the_same_images() {
    let ds = Dataset::scan(&images_dir(), &DatasetOptions::default()).unwrap();
    let ts = [
        eval(24, Interpolation::Bilinear),
        eval(40, Interpolation::Bilinear),
    ];
    let opts = LoaderOptions {
        batch_size: 8,
        ..LoaderOptions::default()
    };
    let steps: Vec<Vec<data::Batch>> = data::sweep_loader(&ds, &ts, &opts, &quiet())
        .unwrap()
        .map(|s| s.unwrap())
        .collect();
    assert_eq!(steps.len(), 2);
    for step in &steps {
        assert_eq!(step.len(), 2);
        assert_eq!((step[0].size, step[1].size), (24, 40));
        assert_eq!(step[0].paths, step[1].paths);
    }
}

#[test]
fn train_transform_is_seeded_per_image() {
    let t = TrainTransform {
        size: 32,
        seed: 3,
        ..TrainTransform::default()
    };
    let a = t.params(500, 375, 17);
    assert_eq!(a, t.params(500, 375, 17));
    assert!(a.top + a.height <= 375 && a.left + a.width <= 500);
    let distinct: std::collections::HashSet<_> = (0..50).map(|i| t.params(500, 375, i)).collect();
    assert!(distinct.len() > 45);
    let flips = (0..400).filter(|&i| t.params(500, 375, i).flip).count();
    assert!((150..250).contains(&flips), "{flips} flips of 400");
    let other = TrainTransform { seed: 4, ..t };
    assert_ne!(other.params(500, 375, 17), a);
    // Every box keeps 8% to 100% of the area (up to rounding).
    for i in 0..500 {
        let p = t.params(300, 200, i);
        let frac = (p.width * p.height) as f64 / 60000.0;
        assert!((0.07..=1.0).contains(&frac), "{p:?}");
    }
}

#[test]
fn max_images_takes_a_seeded_subset_in_folder_order_and_shards_split_it() {
    let all = Dataset::scan(&images_dir(), &DatasetOptions::default()).unwrap();
    let opts = |n, seed, shard| DatasetOptions {
        max_images: n,
        seed,
        shard,
    };
    let a = Dataset::scan(&images_dir(), &opts(Some(6), 1, None)).unwrap();
    let b = Dataset::scan(&images_dir(), &opts(Some(6), 1, None)).unwrap();
    let c = Dataset::scan(&images_dir(), &opts(Some(6), 2, None)).unwrap();
    assert_eq!(a.items, b.items);
    assert_ne!(a.items, c.items);
    assert_eq!(a.len(), 6);
    assert_eq!(a.total, 15);
    assert!(a.items.windows(2).all(|w| w[0].index < w[1].index));
    let more = Dataset::scan(&images_dir(), &opts(Some(100), 1, None)).unwrap();
    assert_eq!(
        more.items, all.items,
        "N above the folder size keeps the folder"
    );

    let shards: Vec<Dataset> = (0..4)
        .map(|i| {
            let s = Shard { index: i, count: 4 };
            Dataset::scan(&images_dir(), &opts(Some(10), 5, Some(s))).unwrap()
        })
        .collect();
    let subset = Dataset::scan(&images_dir(), &opts(Some(10), 5, None)).unwrap();
    assert_eq!(shards[0].items[0], subset.items[0]);
    assert_eq!(shards[1].items[1], subset.items[5]);
    let mut union: Vec<_> = shards.iter().flat_map(|s| s.items.clone()).collect();
    union.sort_by_key(|it| it.index);
    assert_eq!(union, subset.items);
    assert_eq!(
        "2/4".parse::<Shard>().unwrap(),
        Shard { index: 2, count: 4 }
    );
    assert!("4/4".parse::<Shard>().is_err());
    assert!("1".parse::<Shard>().is_err());
    let shuffled = all.clone().shuffled(9);
    assert_ne!(shuffled.items, all.items);
    let mut back = shuffled.items.clone();
    back.sort_by_key(|it| it.index);
    assert_eq!(back, all.items);
}

/// A folder of copies of fixture images in `layout` (relative paths), plus extra files.
fn folder(layout: &[(&str, &str)]) -> TestDir {
    let dir = TestDir::new();
    for (rel, src) in layout {
        let to = dir.path(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if src.starts_with("bytes:") {
            std::fs::write(&to, &src.as_bytes()["bytes:".len()..]).unwrap();
        } else {
            std::fs::copy(image_path(src), &to).unwrap();
        }
    }
    dir
}

fn scan(dir: &Path) -> anyhow::Result<Dataset> {
    Dataset::scan(dir, &DatasetOptions::default())
}

fn load_all(dir: &Path, skip_bad: bool) -> anyhow::Result<(Vec<data::Batch>, data::LoadSummary)> {
    load_batches(dir, skip_bad, 2)
}

fn load_batches(
    dir: &Path,
    skip_bad: bool,
    batch_size: usize,
) -> anyhow::Result<(Vec<data::Batch>, data::LoadSummary)> {
    let cfg = DataConfig {
        dir: dir.to_path_buf(),
        dataset: DatasetOptions::default(),
        transform: Transform::Eval(eval(16, Interpolation::Bilinear)),
        loader: LoaderOptions {
            batch_size,
            skip_bad,
            ..LoaderOptions::default()
        },
    };
    let (_, mut loader) = cfg.open(&quiet())?;
    let batches = loader.by_ref().collect::<anyhow::Result<Vec<_>>>()?;
    Ok((batches, loader.summary().clone()))
}

fn err_line(e: anyhow::Error) -> String {
    let line = ckpt::report::one_line(&e);
    assert!(!line.contains('\n'));
    line
}

#[test]
fn flat_folder_is_unlabelled_and_skips_hidden_and_other_files() {
    let dir = folder(&[
        ("b.PNG", "coffee"),
        ("a.jpg", "camera"),
        (".hidden.jpg", "camera"),
        ("notes.txt", "bytes:hello"),
        ("c.jpeg.bak", "camera"),
    ]);
    let ds = scan(dir.dir.path()).unwrap();
    assert!(!ds.is_labelled());
    let names: Vec<String> = ds
        .items
        .iter()
        .map(|i| i.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.jpg", "b.PNG"]);
    assert_eq!((ds.skipped.hidden, ds.skipped.other), (1, 2));
    let (batches, summary) = load_all(dir.dir.path(), false).unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].labels, None);
    assert_eq!(summary.images, 2);
}

#[test]
fn corrupt_image_is_an_error_naming_it_unless_skip_bad() {
    let dir = folder(&[
        ("cls/a.jpg", "camera"),
        ("cls/b.jpg", "bytes:this is not a jpeg at all"),
        ("cls/c.png", "coffee"),
    ]);
    // A JPEG cut in its header, and one cut in its image data (which libjpeg alone would
    // complete with grey, and PIL refuses as truncated).
    let jpeg = std::fs::read(image_path("astronaut")).unwrap();
    std::fs::write(dir.path("cls/d.jpg"), &jpeg[..100]).unwrap();
    std::fs::write(dir.path("cls/e.jpg"), &jpeg[..jpeg.len() * 6 / 10]).unwrap();

    let e = err_line(load_all(dir.dir.path(), false).unwrap_err());
    assert!(e.contains("b.jpg: cannot decode"), "{e}");
    let (batches, summary) = load_all(dir.dir.path(), true).unwrap();
    assert_eq!(summary.images, 2);
    let skipped: Vec<String> = summary
        .skipped
        .iter()
        .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(skipped, ["b.jpg", "d.jpg", "e.jpg"]);
    assert!(summary.skipped[1].error.contains("d.jpg: cannot decode"));
    let e = &summary.skipped[2].error;
    assert!(
        e.contains("e.jpg: cannot decode: image file is truncated"),
        "{e}"
    );
    // Batches keep the data set's boundaries: [a, b] -> [a], [c, d] -> [c], [e] -> nothing.
    assert_eq!(batches.iter().map(|b| b.n).collect::<Vec<_>>(), [1, 1]);
    // In one batch [a, b, c, d, e] -> [a, c]: c's tensor moves into b's place.
    let (batches, _) = load_batches(dir.dir.path(), true, 8).unwrap();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!((b.n, b.indices.clone()), (2, vec![0, 2]));
    let t = eval(16, Interpolation::Bilinear);
    for (k, path) in b.paths.iter().enumerate() {
        let want = t
            .apply(&decode_file(path, &DecodeOptions::default()).unwrap())
            .unwrap();
        assert_eq!(&b.images[k * want.len()..(k + 1) * want.len()], &want[..]);
    }
    assert_eq!(b.images.len(), 2 * 3 * 16 * 16);
}

#[test]
fn unreadable_image_is_an_error_naming_it() {
    let dir = folder(&[("a.png", "coffee")]);
    // A link to nothing: listed as an image (as by torchvision), unreadable when opened.
    std::os::unix::fs::symlink(dir.path("gone.png"), dir.path("b.jpg")).unwrap();
    let e = err_line(load_all(dir.dir.path(), false).unwrap_err());
    assert!(e.contains("b.jpg: cannot read"), "{e}");
    let (_, summary) = load_all(dir.dir.path(), true).unwrap();
    assert_eq!((summary.images, summary.skipped.len()), (1, 1));
}

#[test]
fn empty_folder_is_an_error() {
    let dir = TestDir::new();
    let e = err_line(scan(dir.dir.path()).unwrap_err());
    assert!(
        e.contains("no images") && e.contains(&dir.dir.path().display().to_string()),
        "{e}"
    );
    let e = err_line(scan(&dir.path("missing")).unwrap_err());
    assert!(e.contains("missing: cannot read"), "{e}");
    let e = err_line(scan(&image_path("coffee")).unwrap_err());
    assert!(e.contains("coffee.png: not a folder"), "{e}");
}

#[test]
fn folder_of_unknown_extensions_only_is_an_error() {
    let dir = folder(&[
        ("a.gif", "bytes:GIF89a"),
        ("b.tiff", "bytes:II*"),
        (".DS_Store", "bytes:x"),
    ]);
    let e = err_line(scan(dir.dir.path()).unwrap_err());
    assert!(e.contains("no images (jpg, jpeg, png, webp, bmp)"), "{e}");
    assert!(e.contains("1 hidden and 2 other files skipped"), "{e}");
}

#[test]
fn class_folder_without_images_is_an_error_naming_it() {
    let dir = folder(&[("cat/a.jpg", "camera"), ("dog/readme.txt", "bytes:x")]);
    let e = err_line(scan(dir.dir.path()).unwrap_err());
    assert!(e.contains("dog: class folder has no images"), "{e}");
}

#[test]
fn imagefolder_walks_nested_folders_in_os_walk_order_and_skips_hidden_ones() {
    // sorted(os.walk(...)) orders folders by path string: "x" < "x y" < "x/z" (' ' < '/').
    let dir = folder(&[
        ("b/x/z/1.png", "coffee"),
        ("b/x y/2.png", "coffee"),
        ("b/x/3.png", "coffee"),
        ("b/4.png", "coffee"),
        ("a/5.png", "coffee"),
        (".ipynb_checkpoints/6.png", "coffee"),
        ("a/.cache/7.png", "coffee"),
        ("stray.png", "coffee"),
    ]);
    let ds = scan(dir.dir.path()).unwrap();
    assert_eq!(ds.classes, ["a", "b"]);
    let rel: Vec<String> = ds
        .items
        .iter()
        .map(|i| {
            let r = i.path.strip_prefix(dir.dir.path()).unwrap();
            format!("{}:{}", r.display(), i.label.unwrap())
        })
        .collect();
    assert_eq!(
        rel,
        [
            "a/5.png:0",
            "b/4.png:1",
            "b/x/3.png:1",
            "b/x y/2.png:1",
            "b/x/z/1.png:1"
        ]
    );
    assert_eq!((ds.skipped.hidden, ds.skipped.other), (2, 1));
}

#[test]
fn data_args_build_the_engine_config() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        data: ckpt::cli::DataArgs,
    }
    let parse = |args: &[&str]| {
        Cmd::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.data)
    };
    let cfg = parse(&["--data", "d"]).unwrap().config(None).unwrap();
    assert_eq!(cfg.transform, Transform::Eval(EvalTransform::default()));
    assert_eq!(cfg.dataset, DatasetOptions::default());
    assert_eq!(cfg.loader.batch_size, 32);
    let cfg = parse(&[
        "--data",
        "d",
        "--size",
        "160",
        "--crop-pct",
        "0.95",
        "--interpolation",
        "bicubic",
        "--crop-mode",
        "squash",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5",
        "--max-images",
        "100",
        "--seed",
        "3",
        "--shard",
        "1/4",
        "--batch-size",
        "8",
        "--skip-bad",
        "--exif-transpose",
    ])
    .unwrap()
    .config(Some(2))
    .unwrap();
    let Transform::Eval(t) = cfg.transform else {
        panic!("eval expected")
    };
    assert_eq!(
        (t.size, t.crop_pct, t.interpolation, t.crop_mode),
        (160, 0.95, Interpolation::Bicubic, CropMode::Squash)
    );
    assert_eq!(t.normalize.mean, [0.5; 3]);
    assert_eq!(t.normalize.std, [0.5; 3]);
    assert_eq!(cfg.dataset.max_images, Some(100));
    assert_eq!(cfg.dataset.shard, Some(Shard { index: 1, count: 4 }));
    assert!(cfg.loader.skip_bad && cfg.loader.decode.exif_transpose);
    assert_eq!((cfg.loader.batch_size, cfg.loader.threads), (8, Some(2)));
    let cfg = parse(&["--data", "d", "--transform", "train", "--seed", "5"])
        .unwrap()
        .config(None)
        .unwrap();
    assert!(matches!(cfg.transform, Transform::Train(t) if t.seed == 5 && t.size == 224));
    assert!(parse(&["--data", "d", "--max-images", "0"]).is_err());
    assert!(parse(&["--data", "d", "--shard", "3/3"]).is_err());
    assert!(parse(&["--data", "d", "--mean", "1,2"]).is_err());
    let e = parse(&["--data", "d", "--crop-pct", "0"])
        .unwrap()
        .config(None)
        .unwrap_err();
    assert!(e.to_string().contains("crop_pct"), "{e}");
}
