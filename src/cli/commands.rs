//! Each subcommand's arguments, with the text of its `--help` and man page. The command that
//! runs them is the file of the same name in `src/commands/`.

use std::path::PathBuf;

use clap::Args;

use super::args::*;
use super::values::Shell;

/// Show a checkpoint's format, tensors, parameter count, BatchNorm layers and provenance
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint: .safetensors, sharded index or its folder, or a torch.save file
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    #[command(flatten)]
    pub open: OpenArgs,
    /// List every tensor with its dtype and shape
    #[arg(long)]
    pub tensors: bool,
    #[command(flatten)]
    pub json: JsonArg,
    /// Replace an existing --json=FILE
    #[arg(long)]
    pub force: bool,
}

/// Average snapshots (stochastic weight averaging), streaming, in f64
///
/// The uniform average of the chosen snapshots, or a weighted one with --weights. Floating
/// tensors are accumulated in f64 and rounded once into their stored dtype (or --dtype);
/// integer tensors follow --int. BatchNorm running statistics are averaged like the weights and
/// do not fit the averaged weights: --recal-bn DIR recomputes them before writing.
#[derive(Args, Debug)]
#[command(mut_arg("max_images", |a| a.default_value("8192")), mut_arg("batch_size", |a| a.default_value("64")))]
pub struct SwaArgs {
    #[command(flatten)]
    pub snapshots: SnapshotArgs,
    /// Weights, one per chosen snapshot (oldest first), normalised to sum 1: 1,1,2 gives
    /// 0.25,0.25,0.5
    #[arg(long, value_delimiter = ',', value_name = "W1,W2,...")]
    pub weights: Option<Vec<f64>>,
    #[command(flatten)]
    pub average: AverageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub recal: RecalArgs,
}

/// Exponential moving average over saved snapshots, several decays in one pass
///
/// v_1 = x_1, v_t = B * v_{t-1} + (1 - B) * x_t over the snapshots, oldest first. This is a
/// weighted average with weights w_t = (1 - d_t) * prod_{s>t} d_s, so every decay asked for is
/// written from one pass over the inputs.
#[derive(Args, Debug)]
#[command(mut_arg("max_images", |a| a.default_value("8192")), mut_arg("batch_size", |a| a.default_value("64")))]
pub struct EmaArgs {
    #[command(flatten)]
    pub snapshots: SnapshotArgs,
    /// Decay(s) B in [0, 1); several give several outputs (name them with {decay} in -o)
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "B[,B2,...]"
    )]
    pub decay: Vec<String>,
    /// Use the step numbers in the file names: a gap of g steps decays by B^g, as if the
    /// snapshot's weights had been seen at each of those g steps
    #[arg(long)]
    pub per_step: bool,
    /// timm ModelEmaV3's warmup: the decay at step s is min(B, 1 - (1 + (s - 1) / gamma)^-power)
    /// with gamma 1 and power 2/3 (s: the file's step number with --per-step, else its position)
    #[arg(long)]
    pub warmup: bool,
    #[command(flatten)]
    pub average: AverageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub recal: RecalArgs,
}

/// Compute a model's logits for a batch of images
///
/// With --input, a safetensors (or torch.save) file whose tensor `input` is an N x 3 x H x W
/// batch, already normalised; with --data, a folder of images. Writes `logits` (N x classes,
/// f32), or with --top-k the `topk_values` and `topk_indices` (offline distillation targets).
/// The model is recognised from the checkpoint's tensor names and shapes.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// File holding the input batch as tensor `input` (see --input-key)
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "data",
        conflicts_with = "data"
    )]
    pub input: Option<PathBuf>,
    /// Folder of images instead (eval transform, see the data options); also writes `labels`
    /// for an ImageFolder (the model's classes: see --class-map) and records the image paths
    /// and the transform in the metadata (what `ckpt distill --targets` reads)
    #[arg(long = "data", value_name = "DIR")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub data_opts: DataOptions,
    #[command(flatten)]
    pub labels: LabelArgs,
    /// Name of the input tensor
    #[arg(long, default_value = "input", value_name = "NAME")]
    pub input_key: String,
    #[command(flatten)]
    pub out: OutFile,
    /// Store only the K largest logits per image and their class indices
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
}

/// Evaluate a checkpoint on an ImageFolder: top-1, top-5, loss
///
/// Images go through the eval transform as torchvision's Resize + CenterCrop + ToTensor +
/// Normalize would make them; the model is recognised from the checkpoint.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// A teacher to compare with (repeat for an ensemble: logits averaged): adds the KD loss
    /// (KLSoftLoss, as distill's) and the top-1 agreement between the model and the teacher
    #[arg(long = "teacher", value_name = "T")]
    pub teachers: Vec<std::path::PathBuf>,
    /// Softening temperature T of the KD loss (with --teacher)
    #[arg(long, default_value_t = 5.0, value_name = "T")]
    pub temperature: f64,
    #[command(flatten)]
    pub json: JsonArg,
    /// Replace an existing --json=FILE
    #[arg(long)]
    pub force: bool,
}

/// Recompute BatchNorm running statistics over images (precise BN)
///
/// Freezes the weights, runs the images forward with every BN layer normalising with its batch
/// statistics (as in train mode; everything else as in eval), and replaces each layer's
/// running_mean and running_var. Estimators: population (default; fvcore's precise BN: the
/// mean and population variance of every element seen, weighted by count) or torch
/// (torch.optim.swa_utils.update_bn: the mean of batch means and of unbiased batch variances,
/// every batch weighing the same, the short last batch included). num_batches_tracked becomes
/// the number of batches, as update_bn leaves it; every other tensor is copied byte for byte.
///
/// Several machines: run each with --shard i/n --stats-out PART.safetensors, then
/// `ckpt recal-bn MODEL --merge PART... -o OUT`; the result equals one pass over all images.
/// Each part records the pass it is a slice of (the weights' digest, the data folder and
/// options, the estimator, its shard); the merge refuses parts that are not every shard of one
/// pass over MODEL's weights, naming the part and the field.
#[derive(Args, Debug)]
#[command(
    mut_arg("max_images", |a| a.default_value("8192")),
    mut_arg("batch_size", |a| a.default_value("64")),
    mut_arg("shard", |a| a.help("Read only every n-th batch of the pass, starting at the i-th (0-based): n machines with shards 0/n .. n-1/n and --stats-out split one pass, and --merge equals it"))
)]
pub struct RecalBnArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder of (training) images; see the data options
    #[arg(long = "data", value_name = "DIR", required_unless_present = "merge")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub data_opts: DataOptions,
    /// How running statistics are estimated from the batches (default: population). A stats
    /// part records it; with --merge the parts' is used, and a different one is refused
    #[arg(long, value_enum, value_name = "ESTIMATOR")]
    pub estimator: Option<crate::bn::Estimator>,
    /// Write the mergeable per-layer sums (f64) to this file instead of a checkpoint
    #[arg(long, value_name = "PART", conflicts_with = "merge")]
    pub stats_out: Option<PathBuf>,
    /// Combine --stats-out files of shards instead of reading images
    #[arg(long, value_name = "PART", num_args = 1.., conflicts_with = "data")]
    pub merge: Vec<PathBuf>,
    /// Output checkpoint (or, with --stats-out, the statistics file); DIR/ writes a model folder:
    /// model.safetensors and the model folder's config.json
    #[arg(short, long, value_name = "OUT", required_unless_present = "stats_out")]
    pub output: Option<PathBuf>,
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

/// Accuracy at several test sizes (and crop fractions) in one pass over the images
///
/// Each image is decoded once and resized to every size (resize = floor(size / crop_pct), centre
/// crop). Several checkpoints are compared in the same pass. With --recal-bn DIR, the BN
/// statistics are re-estimated at each size over DIR first (FixRes-lite), so that each size is
/// measured with statistics that fit it. With --fixres TRAIN, each model is fine-tuned at each
/// size first (FixRes, as `ckpt fixres`; after the recalibration when both are given).
/// --save-best writes the checkpoint of the best size. The recalibration and fine-tune passes
/// use the same data options as the evaluation (batch size 64 by default, as recal-bn's), over
/// their own folders.
#[derive(Args, Debug)]
#[command(
    mut_arg("size", |a| a.long("train-size").help("Training image size: the default sizes are multiples of 32 from 0.75x to 1.5x of it (and a model folder's test_input_size), and deltas are against it (default: 224, or a model folder's input_size)")),
    mut_arg("batch_size", |a| a.default_value("64")),
    mut_arg("shard", |a| a.help("Evaluate only every n-th image of --data starting at the i-th (0-based), after --max-images; the --recal-bn passes read all of DIR"))
)]
pub struct SweepResArgs {
    /// Checkpoints to compare (last epoch, SWA, EMA, ...)
    #[arg(value_name = "MODEL", required = true)]
    pub models: Vec<PathBuf>,
    /// Folder of labelled images (ImageFolder)
    #[arg(long = "data", value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub data_opts: DataOptions,
    #[command(flatten)]
    pub labels: LabelArgs,
    /// Test sizes (default: multiples of 32 from 0.75x to 1.5x of --train-size)
    #[arg(long, value_delimiter = ',', value_name = "S1,S2,...")]
    pub sizes: Option<Vec<u32>>,
    /// Re-estimate BN statistics at each size over the images in DIR before evaluating it
    #[arg(long = "recal-bn", value_name = "DIR")]
    pub recal_bn: Option<PathBuf>,
    /// Estimator for --recal-bn (see `ckpt recal-bn --help`)
    #[arg(long, value_enum, default_value = "population")]
    pub estimator: crate::bn::Estimator,
    /// Fine-tune each model at each size over the labelled images in TRAIN before evaluating it
    /// (FixRes, as `ckpt fixres`; after --recal-bn when both are given), with the training
    /// options below
    #[arg(long, value_name = "TRAIN")]
    pub fixres: Option<PathBuf>,
    #[command(flatten)]
    pub train: FineTuneArgs,
    /// Write the checkpoint of the best size: recalibrated (--recal-bn) and fine-tuned
    /// (--fixres) there; needs one of them and one MODEL
    #[arg(long, value_name = "OUT")]
    pub save_best: Option<PathBuf>,
    /// Write the results as CSV in the column layout of timm's results-imagenet.csv
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    #[command(flatten)]
    pub json: JsonArg,
    /// Plot top-1 against test size, one line per model and crop_pct (.png or .svg)
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Replace existing output files
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub arch: ArchArg,
    #[command(flatten)]
    pub open: OpenArgs,
}

/// Fine-tune the classifier at the test resolution (FixRes)
///
/// A CNN trained at one size sees objects at another apparent size when tested larger; FixRes
/// (Touvron et al., 2019) fine-tunes briefly at the test size. Every parameter is frozen except
/// the classifier; the last BatchNorm before global pooling runs in train mode (batch
/// statistics; running statistics updated with the family's momentum, or --bn-momentum), the
/// rest in eval mode, as `model.eval(); bn.train()`. Images go through the eval transform at
/// --size (resize to floor(S / crop_pct), centre crop), in folder order with --no-shuffle, else
/// shuffled per epoch by --seed. SGD (or AdamW) on cross-entropy. The frozen part's output is
/// kept in memory after the first epoch when it fits --cache-mb. The output holds the new classifier,
/// that BN's statistics (and affine, with --train-bn-affine); every other tensor is copied byte
/// for byte. With --recal-bn DIR every BN layer's statistics are first re-estimated at --size
/// (as recal-bn) and the fine-tune starts from them.
#[derive(Args, Debug)]
#[command(mut_arg("output", |a| a.help(MODEL_OUT_HELP)))]
#[command(
    mut_arg("size", |a| a.help("Test size to fine-tune at (side of the square images)")),
    mut_arg("batch_size", |a| a.default_value("64")),
    mut_arg("max_images", |a| a.help("Fine-tune on at most N images of --data: a random subset (seeded by --seed) when the folder has more, kept in folder order"))
)]
pub struct FixresArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub out: OutFile,
    #[command(flatten)]
    pub train: FineTuneArgs,
    /// Re-estimate every BN layer's statistics at --size over DIR before fine-tuning (usually
    /// the training folder; the data options apply)
    #[arg(long = "recal-bn", value_name = "DIR")]
    pub recal_bn: Option<PathBuf>,
    /// Estimator for --recal-bn (see `ckpt recal-bn --help`)
    #[arg(long, value_enum, default_value = "population")]
    pub estimator: crate::bn::Estimator,
    /// Labelled folder to report top-1/top-5 at --size before, after --recal-bn, and after the
    /// fine-tune
    #[arg(long, value_name = "DIR")]
    pub val: Option<PathBuf>,
    #[command(flatten)]
    pub json: JsonArg,
}

/// Greedy model soups and best-of selection on a validation folder, BN-aware
///
/// Judges the candidate checkpoints (snapshots, EMA outputs, fine-tunes from one
/// initialisation; ordered as swa orders them) and averages of them on the labelled images of
/// --data, and writes the chosen average. greedy (the default; Wortsman et al., 2022, Algorithm
/// 1): rank the candidates by their own top-1 (ties: lower loss), start from the best, and add
/// each next one when the soup's top-1 with it does not drop; --metric loss ranks and keeps by
/// mean cross-entropy. uniform: the average of all; best: the single best candidate. Soups are
/// averaged in memory in f64 as swa does and only the result is written. For a model with
/// BatchNorm, give --recal-bn DIR (training images): averaged running statistics do not fit
/// averaged weights, so every candidate and every soup gets precise BN statistics from DIR
/// before it is judged, and the result is written with them. The images of --data and DIR are
/// decoded once for the whole command when they fit in --cache-mb.
#[derive(Args, Debug)]
#[command(mut_arg("batch_size", |a| a.default_value("64")))]
pub struct SoupArgs {
    #[command(flatten)]
    pub candidates: SnapshotArgs,
    /// Labelled folder (ImageFolder) the candidates and soups are judged on: held-out images
    #[arg(long = "data", value_name = "VAL")]
    pub data: PathBuf,
    #[command(flatten)]
    pub data_opts: DataOptions,
    #[command(flatten)]
    pub labels: LabelArgs,
    /// How the ingredients are chosen
    #[arg(long, value_enum, default_value = "greedy", value_name = "METHOD")]
    pub method: crate::soup::Method,
    /// What ranks the candidates and decides whether a soup got worse
    #[arg(long, value_enum, default_value = "top1", value_name = "METRIC")]
    pub metric: crate::soup::Metric,
    /// Recompute the BatchNorm statistics of every candidate and soup over the images in DIR
    /// (precise BN, as recal-bn; usually the training folder) before judging it; strongly
    /// suggested for BN models. The data options apply, but --max-images (see
    /// --recal-max-images)
    #[arg(
        long = "recal-bn",
        value_name = "DIR",
        help_heading = "BN recalibration"
    )]
    pub recal_bn: Option<PathBuf>,
    /// Estimator for --recal-bn (see `ckpt recal-bn --help`)
    #[arg(
        long,
        value_enum,
        default_value = "population",
        help_heading = "BN recalibration"
    )]
    pub estimator: crate::bn::Estimator,
    /// Recalibrate over at most N images of DIR: a random subset (seeded by --seed) when it has
    /// more, kept in folder order
    #[arg(long, default_value = "8192", value_name = "N|all", value_parser = parse_max_images, help_heading = "BN recalibration")]
    pub recal_max_images: MaxImages,
    /// Memory for decoded images kept between evaluations, in MiB (default: a quarter of RAM);
    /// folders that do not fit are decoded again for every evaluation
    #[arg(long, value_name = "MB")]
    pub cache_mb: Option<u64>,
    #[command(flatten)]
    pub average: AverageArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub arch: ArchArg,
}

/// Distil one or more teachers into a student checkpoint (knowledge distillation)
///
/// Fine-tunes every parameter of STUDENT on CE(s, y) + KD(s, t), or (1 - A) CE + A KD with
/// --alpha A, where KD is the seed's KLSoftLoss: KL(softmax(t / T) || softmax(s / T)) averaged
/// over the batch, times T^2. The student trains in train mode (BN batch statistics, running
/// statistics moved with the family's momentum); the teachers run in eval mode, forward only,
/// on the same batch, and several teachers' logits are averaged. Teacher and student may be of
/// different families and sizes but must have the same classes. SGD or AdamW as torch's, weight
/// decay on weights only (not biases and one-dimensional parameters) unless --decay-all. The
/// output holds every student tensor after the run, in its stored dtype.
///
/// Offline teacher: --targets FILE (from `ckpt logits TEACHER --data` over the same folder)
/// instead of --teacher; the teacher never runs. Every training image needs a row in FILE,
/// found by its path under the folder; the transform must be deterministic (--transform eval,
/// the default with --targets) and the one FILE was made with. Top-k files give the teacher's
/// softmax at T renormalised over the stored classes, zero elsewhere.
#[derive(Args, Debug)]
#[command(
    mut_arg("output", |a| a.help(MODEL_OUT_HELP)),
    mut_arg("transform", |a| a.default_value("train").default_value_if("targets", clap::builder::ArgPredicate::IsPresent, "eval")),
    mut_arg("batch_size", |a| a.default_value("64")),
    mut_arg("max_images", |a| a.help("Train on at most N images of --data: a random subset (seeded by --seed) when the folder has more, kept in folder order"))
)]
pub struct DistillArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Teacher checkpoint, run on every batch; repeat for an ensemble (logits averaged). One of
    /// --teacher and --targets is needed
    #[arg(long = "teacher", value_name = "T")]
    pub teachers: Vec<PathBuf>,
    /// Offline teacher: the logits `ckpt logits TEACHER --data TRAIN` stored (dense or
    /// --top-k), looked up by image path; no teacher runs. Needs a deterministic transform (the
    /// default --transform becomes eval) and the data options FILE was made with
    #[arg(long, value_name = "FILE")]
    pub targets: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub out: OutFile,
    /// Weight of the distillation loss: (1 - A) CE + A KD (default: CE + KD, the seed's sum);
    /// 1 needs no labels
    #[arg(long, value_name = "A")]
    pub alpha: Option<f64>,
    /// Softening temperature T of both softmaxes
    #[arg(long, default_value_t = 5.0, value_name = "T")]
    pub temperature: f64,
    /// Passes over the training images
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub epochs: usize,
    /// Optimiser: torch.optim.SGD, or torch.optim.AdamW (betas 0.9, 0.999, eps 1e-8; its
    /// decoupled weight decay is --weight-decay)
    #[arg(long = "opt", value_enum, default_value = "sgd", value_name = "OPT")]
    pub optimizer: super::values::OptimizerKind,
    /// Learning rate
    #[arg(long, default_value_t = 0.01, value_name = "LR")]
    pub lr: f64,
    /// SGD momentum
    #[arg(long, default_value_t = 0.9, value_name = "M")]
    pub momentum: f64,
    /// Nesterov momentum (SGD)
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay of the weights (SGD: added to the gradient, as torch.optim.SGD; AdamW:
    /// decoupled, as torch.optim.AdamW)
    #[arg(long, default_value_t = 1e-4, value_name = "WD")]
    pub weight_decay: f64,
    /// Also decay biases and one-dimensional parameters (BN's weight and bias)
    #[arg(long)]
    pub decay_all: bool,
    /// Learning-rate schedule over the steps
    #[arg(long, value_enum, default_value = "cosine", value_name = "KIND")]
    pub schedule: crate::train::ScheduleKind,
    /// Epochs of linear warm-up to --lr before the schedule
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub warmup_epochs: usize,
    /// Keep the folder's order every epoch instead of a shuffle seeded by --seed
    #[arg(long)]
    pub no_shuffle: bool,
    /// Save the run's state (student, optimiser buffers, steps) to OUT.resume every N epochs,
    /// atomically, so that --resume can continue it; removed once OUT is written
    #[arg(long, value_name = "N")]
    pub save_every: Option<usize>,
    /// Continue the run saved in OUT.resume (by --save-every) with the same settings: the
    /// result equals an uninterrupted run's
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

/// Print a shell completion script (bash, zsh or fish) to standard output
///
/// Generated from the same definitions as --help and the man pages. bash: `ckpt completions
/// bash > ~/.local/share/bash-completion/completions/ckpt`; zsh: into a folder on $fpath as
/// `_ckpt`; fish: `~/.config/fish/completions/ckpt.fish`. The scripts are also in
/// `completions/` of the source tree.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

/// `-o` of the commands that write one fine-tuned model.
const MODEL_OUT_HELP: &str = "Output file (safetensors); DIR/ writes a model folder: model.safetensors and the model's config.json when it is a model folder";
