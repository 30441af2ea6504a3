//! Argument groups that several commands share, each declared once and flattened where it is
//! used: how to open a checkpoint ([`OpenArgs`], [`ModelArgs`]), which snapshots to average
//! ([`SnapshotArgs`], [`AverageArgs`]), where outputs go ([`OutputArgs`], [`OutFile`],
//! [`JsonArg`]), the images of a data pass ([`DataArgs`], [`DataOptions`]) and BN recalibration
//! ([`RecalArgs`]); plus their conversion into the engines' configurations.

use std::path::PathBuf;

use clap::Args;

use crate::checkpoint::OpenOptions;

/// How to read checkpoints: shared by every command that opens one.
#[derive(Args, Debug, Clone, Default)]
pub struct OpenArgs {
    /// Key of the state dict inside a torch.save training checkpoint (nested keys as a.b).
    /// Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// Also remove this prefix from every key (every key must carry it), e.g. model.
    #[arg(long, value_name = "PREFIX")]
    pub strip_prefix: Vec<String>,
    /// Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose
    /// n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module's
    /// attribute) are otherwise removed when every key carries them, and commands that run the
    /// model also remove a prefix that makes the names fit an architecture
    #[arg(long)]
    pub keep_prefix: bool,
}

impl OpenArgs {
    pub fn options(&self) -> OpenOptions {
        OpenOptions {
            key: self.key.clone(),
            strip_prefix: self.strip_prefix.clone(),
            keep_prefix: self.keep_prefix,
        }
    }
}

/// The snapshots an averaging command reads, and which of them it keeps.
#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Snapshots (paths or glob patterns), in any checkpoint form ckpt opens. They are ordered by
    /// the number in their file names (natural sort: epoch_9 before epoch_10)
    #[arg(value_name = "SNAPSHOT", required = true)]
    pub snapshots: Vec<String>,
    /// Keep the order given instead of sorting by file name
    #[arg(long)]
    pub no_sort: bool,
    /// Keep only the N newest snapshots (applied after --every)
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Keep every K-th snapshot, counted back from the newest (which is always kept)
    #[arg(long, value_name = "K")]
    pub every: Option<usize>,
    #[command(flatten)]
    pub open: OpenArgs,
}

/// How an averaging command treats tensors.
#[derive(Args, Debug, Clone)]
pub struct AverageArgs {
    /// Integer tensors (num_batches_tracked) are never averaged: take the newest snapshot's
    /// value (last), the oldest's (first), the element-wise max or sum, or refuse them (error)
    #[arg(
        long = "int",
        value_enum,
        default_value = "last",
        value_name = "POLICY"
    )]
    pub int_policy: crate::average::IntPolicy,
    /// Output dtype of floating tensors: f32, f16, bf16 or f64 (default: as stored). The
    /// average is accumulated in f64 and rounded once
    #[arg(long, value_name = "DTYPE", value_parser = parse_float_dtype)]
    pub dtype: Option<crate::checkpoint::DType>,
    /// Average a tensor over the snapshots that have it (weights renormalised) instead of
    /// refusing snapshots with different tensors
    #[arg(long)]
    pub allow_missing: bool,
    /// Average NaN and infinite values instead of refusing them
    #[arg(long)]
    pub allow_nonfinite: bool,
}

fn parse_float_dtype(s: &str) -> Result<crate::checkpoint::DType, String> {
    use crate::checkpoint::DType;
    match DType::parse_user(s) {
        Some(d @ (DType::F32 | DType::F16 | DType::BF16 | DType::F64)) => Ok(d),
        _ => Err(format!("{s:?} is not one of f32, f16, bf16, f64")),
    }
}

/// Where and how a command writes a checkpoint.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Output checkpoint (safetensors). With sharding: a folder, or a name for the index. A
    /// folder (DIR/, or one that exists) is written as a model folder: model.safetensors (or
    /// shards and their index) and the first input's config.json when it is a model folder
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Replace an existing output (atomically)
    #[arg(long)]
    pub force: bool,
    /// Write shards of at most this size plus an index, e.g. 2GB or 500MB (default: shard when
    /// the input was sharded, at 5GB)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub shard_size: Option<u64>,
}

/// Parses sizes such as `5GB`, `500MB`, `1.5GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "unknown size unit in {s:?} (use B, kB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    if n <= 0.0 {
        return Err(format!("size must be positive: {s:?}"));
    }
    Ok((n * mult) as u64)
}

/// The labelled images a data pass reads, how they become tensors and which of the model's
/// classes they are: shared by every command that measures a model against a folder's labels
/// (flattened into its arguments).
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Folder of images: ImageFolder layout (one sub-folder per class, in sorted order: class
    /// indices as torchvision's, unless --class-map) or flat (unlabelled). Files ending in .jpg,
    /// .jpeg, .png, .webp or .bmp are read; hidden and other files are skipped
    #[arg(long = "data", value_name = "DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub opts: DataOptions,
    #[command(flatten)]
    pub labels: LabelArgs,
}

/// Which of the model's classes each class folder is: part of [`DataArgs`], and flattened on its
/// own into the labelled commands that name their folder otherwise (`sweep-res`, `logits`).
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Labels")]
pub struct LabelArgs {
    /// Class map in timm's format: one class folder name per line, the line number (from 0)
    /// being the model's class index; images of folders it does not name are left out (with a
    /// warning). Without it: the ImageNet-1k synset order when the model has 1000 classes and
    /// every class folder is a WordNet id (n01440764, ...), else the folders' sorted order
    #[arg(long, value_name = "FILE")]
    pub class_map: Option<PathBuf>,
    /// Refuse, instead of warning, when the class folders cannot be the model's classes (a
    /// different count without a map, or folders the map does not name)
    #[arg(long)]
    pub strict_labels: bool,
}

impl LabelArgs {
    pub fn options(&self) -> crate::data::LabelOptions {
        crate::data::LabelOptions {
            class_map: self.class_map.clone(),
            strict: self.strict_labels,
        }
    }
}

impl DataArgs {
    /// The data pass these options describe; `threads` is the global `--threads`.
    pub fn config(&self, threads: Option<usize>) -> anyhow::Result<crate::data::DataConfig> {
        self.opts.config(&self.dir, threads)
    }
}

/// How a data pass reads a folder, without the folder: for commands that name the folder
/// otherwise (`swa --recal-bn DIR`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Data")]
pub struct DataOptions {
    /// Side of the square images fed to the model (default: 224, or a model folder's
    /// input_size)
    #[arg(long, value_name = "S")]
    pub size: Option<u32>,
    /// Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res
    /// takes a list: P1,P2,...) (default: 0.875, or a model folder's crop_pct)
    #[arg(long, value_delimiter = ',', value_name = "P")]
    pub crop_pct: Vec<f64>,
    /// Resampling filter, antialiased as PIL's when downscaling (default: bilinear, or a model
    /// folder's interpolation)
    #[arg(long, value_enum, value_name = "FILTER")]
    pub interpolation: Option<crate::data::Interpolation>,
    /// Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash
    /// resizes both sides to floor(S / P); timm's crop modes (default: center, or a model
    /// folder's crop_mode)
    #[arg(long, value_enum, value_name = "MODE")]
    pub crop_mode: Option<crate::data::CropMode>,
    /// Per-channel means subtracted after scaling to [0, 1] (default: ImageNet's, or a model
    /// folder's mean)
    #[arg(long, value_name = "R,G,B", value_parser = parse_rgb)]
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviations divided by (default: ImageNet's, or a model folder's
    /// std)
    #[arg(long, value_name = "R,G,B", value_parser = parse_rgb)]
    pub std: Option<[f32; 3]>,
    /// eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale
    /// 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image
    #[arg(long, value_enum, default_value = "eval", value_name = "KIND")]
    pub transform: TransformKind,
    /// Read at most N images: a random subset (seeded by --seed) when the folder has more,
    /// kept in folder order
    #[arg(long, default_value = "all", value_name = "N|all", value_parser = parse_max_images)]
    pub max_images: MaxImages,
    /// Seed of --max-images' subset and of the train transform
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// Read only every n-th image starting at the i-th (0-based), after --max-images: n
    /// machines with shards 0/n .. n-1/n split one pass over the images
    #[arg(long, value_name = "i/n")]
    pub shard: Option<crate::data::Shard>,
    /// Images per batch
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch_size: usize,
    /// Skip images that cannot be read or decoded (counted in the summary) instead of stopping
    #[arg(long)]
    pub skip_bad: bool,
    /// Rotate and flip images by their EXIF orientation (torchvision's loader ignores it)
    #[arg(long)]
    pub exif_transpose: bool,
    /// Refuse images whose header claims more than N pixels (decompression bombs), before
    /// decoding them; the default is PIL's limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no
    /// limit
    #[arg(long, default_value_t = MaxPixels(Some(crate::data::decode::PIL_MAX_PIXELS)), value_name = "N|none", value_parser = parse_max_pixels)]
    pub max_image_pixels: MaxPixels,
}

/// `--max-image-pixels`: a count, or `none` (None).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPixels(pub Option<u64>);

impl std::fmt::Display for MaxPixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("none"),
        }
    }
}

fn parse_max_pixels(s: &str) -> Result<MaxPixels, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(MaxPixels(None));
    }
    match s.replace('_', "").parse::<u64>() {
        Ok(n) if n > 0 => Ok(MaxPixels(Some(n))),
        _ => Err(format!(
            "{s:?} is not a positive number of pixels or 'none'"
        )),
    }
}

/// `--transform`: which transform a data pass applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "lower")]
pub enum TransformKind {
    /// Resize and centre crop (deterministic)
    #[default]
    Eval,
    /// Random resized crop and flip (seeded)
    Train,
}

/// `--max-images`: a count, or `all` (None).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaxImages(pub Option<usize>);

pub(crate) fn parse_max_images(s: &str) -> Result<MaxImages, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(MaxImages(None));
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(MaxImages(Some(n))),
        _ => Err(format!("{s:?} is not a positive number of images or 'all'")),
    }
}

fn parse_rgb(s: &str) -> Result<[f32; 3], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?} is not three numbers R,G,B"))?;
    match v[..] {
        [r, g, b] => Ok([r, g, b]),
        [x] => Ok([x, x, x]),
        _ => Err(format!("{s:?} is not three numbers R,G,B")),
    }
}

/// The data options' defaults when neither a flag nor a model folder gives them.
pub const DEFAULT_SIZE: u32 = 224;
pub const DEFAULT_CROP_PCT: f64 = 0.875;

impl DataOptions {
    /// `--size`, or its default.
    pub fn size(&self) -> u32 {
        self.size.unwrap_or(DEFAULT_SIZE)
    }

    /// `--crop-pct`'s values, or the default.
    pub fn crop_pcts(&self) -> Vec<f64> {
        if self.crop_pct.is_empty() {
            vec![DEFAULT_CROP_PCT]
        } else {
            self.crop_pct.clone()
        }
    }

    /// The one `--crop-pct` of commands that are not sweeps.
    pub fn single_crop_pct(&self) -> anyhow::Result<f64> {
        match self.crop_pcts()[..] {
            [p] => Ok(p),
            _ => anyhow::bail!("--crop-pct takes one value here (a list is for sweep-res)"),
        }
    }

    fn normalize(&self) -> crate::data::Normalize {
        crate::data::Normalize {
            mean: self.mean.unwrap_or(crate::data::IMAGENET_MEAN),
            std: self.std.unwrap_or(crate::data::IMAGENET_STD),
        }
    }

    /// Fills the options no flag gave from a model folder's `pretrained_cfg` (timm's
    /// `resolve_data_config`: input_size, interpolation, mean, std, crop_pct, crop_mode), and
    /// returns the line that says where they came from (`None` when the config gives none of
    /// them). Values ckpt cannot apply are refused, naming the field and the flag that
    /// overrides it.
    pub fn take_model_defaults(
        &mut self,
        folder: &crate::checkpoint::folder::ModelFolder,
    ) -> anyhow::Result<Option<String>> {
        use crate::checkpoint::folder::rgb;
        use anyhow::bail;
        use clap::ValueEnum;
        let p = &folder.pretrained_cfg;
        let config = folder.config_path.display();
        let mut took = Vec::new();
        let mut kept = Vec::new();
        if let Some([_, h, w]) = p.input_size {
            match self.size {
                Some(_) => kept.push("--size"),
                None if h != w => {
                    bail!("{config}: pretrained_cfg.input_size is {h}x{w}, not square; give --size")
                }
                None => {
                    self.size = Some(h);
                    took.push(format!("size {h} (input_size)"));
                }
            }
        }
        if let Some(c) = p.crop_pct {
            if self.crop_pct.is_empty() {
                self.crop_pct = vec![c];
                took.push(format!("crop_pct {c}"));
            } else {
                kept.push("--crop-pct");
            }
        }
        if let Some(name) = &p.interpolation {
            if self.interpolation.is_some() {
                kept.push("--interpolation");
            } else {
                let Ok(i) = crate::data::Interpolation::from_str(name, true) else {
                    bail!("{config}: pretrained_cfg.interpolation {name:?} is not one ckpt has (bilinear, bicubic); give --interpolation");
                };
                self.interpolation = Some(i);
                took.push(format!("interpolation {name}"));
            }
        }
        if let Some(name) = &p.crop_mode {
            if self.crop_mode.is_some() {
                kept.push("--crop-mode");
            } else {
                let Ok(m) = crate::data::CropMode::from_str(name, true) else {
                    bail!("{config}: pretrained_cfg.crop_mode {name:?} is not one ckpt has (center, squash); give --crop-mode");
                };
                self.crop_mode = Some(m);
                took.push(format!("crop_mode {name}"));
            }
        }
        for (name, value, flag, field) in [
            ("mean", p.mean, "--mean", &mut self.mean),
            ("std", p.std, "--std", &mut self.std),
        ] {
            if let Some(v) = value {
                if field.is_some() {
                    kept.push(flag);
                } else {
                    *field = Some(v);
                    took.push(format!("{name} {}", rgb(v)));
                }
            }
        }
        if took.is_empty() && kept.is_empty() {
            return Ok(None);
        }
        let mut line = format!("{config}: data options from pretrained_cfg: ");
        line += &if took.is_empty() {
            "none".to_string()
        } else {
            took.join(", ")
        };
        if !kept.is_empty() {
            line += &format!(" (the flags given win: {})", kept.join(", "));
        }
        Ok(Some(line))
    }

    /// The eval transform at `size` and `crop_pct` with these options' filter, crop mode and
    /// normalisation.
    pub fn eval_transform(&self, size: u32, crop_pct: f64) -> crate::data::EvalTransform {
        crate::data::EvalTransform {
            size,
            crop_pct,
            interpolation: self.interpolation.unwrap_or_default(),
            crop_mode: self.crop_mode.unwrap_or_default(),
            normalize: self.normalize(),
        }
    }

    /// The data pass over `dir` these options describe; `threads` is the global `--threads`.
    pub fn config(
        &self,
        dir: &std::path::Path,
        threads: Option<usize>,
    ) -> anyhow::Result<crate::data::DataConfig> {
        self.config_at(dir, threads, self.single_crop_pct()?)
    }

    /// As [`DataOptions::config`], with the eval transform's crop fraction given (for sweeps,
    /// whose `--crop-pct` is a list).
    pub fn config_at(
        &self,
        dir: &std::path::Path,
        threads: Option<usize>,
        crop_pct: f64,
    ) -> anyhow::Result<crate::data::DataConfig> {
        use crate::data::{
            DataConfig, DatasetOptions, DecodeOptions, LoaderOptions, TrainTransform, Transform,
        };
        let normalize = self.normalize();
        let transform = match self.transform {
            TransformKind::Eval => Transform::Eval(self.eval_transform(self.size(), crop_pct)),
            TransformKind::Train => Transform::Train(TrainTransform {
                size: self.size(),
                interpolation: self.interpolation.unwrap_or_default(),
                normalize,
                seed: self.seed,
                ..TrainTransform::default()
            }),
        };
        transform.check()?;
        if self.batch_size == 0 {
            anyhow::bail!("--batch-size must be at least 1");
        }
        Ok(DataConfig {
            dir: dir.to_path_buf(),
            dataset: DatasetOptions {
                max_images: self.max_images.0,
                seed: self.seed,
                shard: self.shard,
            },
            transform,
            loader: LoaderOptions {
                batch_size: self.batch_size,
                threads,
                skip_bad: self.skip_bad,
                decode: DecodeOptions {
                    exif_transpose: self.exif_transpose,
                    max_pixels: self.max_image_pixels.0,
                },
                ..LoaderOptions::default()
            },
        })
    }
}

/// The model a command runs: its checkpoint, how to open it, and its architecture.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model checkpoint
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub arch: ArchArg,
    #[command(flatten)]
    pub open: OpenArgs,
}

/// `--arch`: for every command that builds a model.
#[derive(Args, Debug, Clone, Default)]
pub struct ArchArg {
    /// Architecture, instead of recognising it from the tensors: a family (resnet,
    /// mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a
    /// timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port's padding
    /// and BN eps come only from its name)
    #[arg(long = "arch", value_name = "NAME")]
    pub name: Option<String>,
}

impl ArchArg {
    pub fn get(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// A single output file: `-o` and `--force`.
#[derive(Args, Debug, Clone)]
pub struct OutFile {
    /// Output file (safetensors)
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Replace an existing output (atomically)
    #[arg(long)]
    pub force: bool,
}

/// `--json[=FILE]`, one convention for every command: the result as JSON on standard output
/// instead of text, or written to FILE (the text still printed).
#[derive(Args, Debug, Clone, Default)]
pub struct JsonArg {
    /// Print the result as JSON instead of text; --json=FILE writes it to FILE instead
    #[arg(
        long = "json",
        value_name = "FILE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "-"
    )]
    pub json: Option<PathBuf>,
}

impl JsonArg {
    /// JSON on standard output, in place of the text.
    pub fn to_stdout(&self) -> bool {
        self.json.as_deref() == Some(std::path::Path::new("-"))
    }
    /// The file JSON goes to, if any.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.json
            .as_deref()
            .filter(|p| *p != std::path::Path::new("-"))
    }
}

/// `--recal-bn DIR`: recompute the BN statistics of a result before writing it.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "BN recalibration")]
#[command(mut_arg("shard", |a| a.help("Recalibrate over only every n-th batch of DIR, starting at the i-th (0-based): the batches one of n machines would see")))]
pub struct RecalArgs {
    /// Recompute the BatchNorm statistics of the averaged weights over the images in DIR
    /// (precise BN, as `ckpt recal-bn`) before writing; the data options below apply
    #[arg(long = "recal-bn", value_name = "DIR")]
    pub recal_bn: Option<PathBuf>,
    /// Estimator for --recal-bn (see `ckpt recal-bn --help`)
    #[arg(long, value_enum, default_value = "population")]
    pub estimator: crate::bn::Estimator,
    #[command(flatten)]
    pub arch: ArchArg,
    #[command(flatten)]
    pub data: DataOptions,
}

/// The training options of a head fine-tune (FixRes): `fixres`, and `sweep-res --fixres`.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Fine-tune")]
pub struct FineTuneArgs {
    /// Passes over the training images
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub epochs: usize,
    /// Optimiser: torch.optim.SGD, or torch.optim.AdamW (betas 0.9, 0.999, eps 1e-8; its
    /// decoupled weight decay is --weight-decay)
    #[arg(long = "opt", value_enum, default_value = "sgd", value_name = "OPT")]
    pub optimizer: super::values::OptimizerKind,
    /// Learning rate (the seed's 1e-3)
    #[arg(long, default_value_t = 1e-3, value_name = "LR")]
    pub lr: f64,
    /// SGD momentum
    #[arg(long, default_value_t = 0.9, value_name = "M")]
    pub momentum: f64,
    /// Weight decay of the trained parameters (SGD: added to the gradient, as torch.optim.SGD;
    /// AdamW: decoupled, as torch.optim.AdamW)
    #[arg(long, default_value_t = 0.0, value_name = "WD")]
    pub weight_decay: f64,
    /// Nesterov momentum (SGD)
    #[arg(long)]
    pub nesterov: bool,
    /// Learning-rate schedule over the steps
    #[arg(long, value_enum, default_value = "constant", value_name = "KIND")]
    pub lr_schedule: crate::train::ScheduleKind,
    /// Steps of linear warm-up to --lr before the schedule
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub warmup_steps: usize,
    /// Keep the folder's order every epoch instead of a shuffle seeded by --seed
    #[arg(long)]
    pub no_shuffle: bool,
    /// Momentum of the trained BN's running statistics (default: the family's, PyTorch's 0.1)
    #[arg(long, value_name = "M")]
    pub bn_momentum: Option<f64>,
    /// Also train the last BN's weight and bias (the FixRes paper's variant)
    #[arg(long)]
    pub train_bn_affine: bool,
    /// Keep the frozen backbone's output in memory after the first epoch when all of it fits
    /// in this many MiB, so that later epochs neither decode images nor rerun the backbone
    /// (default: a quarter of the machine's memory); otherwise it is recomputed every epoch
    #[arg(long, value_name = "MB")]
    pub cache_mb: Option<u64>,
}
