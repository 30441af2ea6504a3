//! How engine enums and values are spelled on the command line. The engines define the types
//! (and never depend on clap); their flag spellings and help lines live here.

use clap::builder::PossibleValue;
use clap::ValueEnum;

use crate::average::IntPolicy;
use crate::bn::Estimator;
use crate::data::{CropMode, Interpolation};
use crate::models::Kernels;
use crate::soup::{Method, Metric};
use crate::train::ScheduleKind;

/// Implements `ValueEnum` for an engine enum: each variant with its spelling and help line.
macro_rules! value_enum {
    ($ty:ty { $($variant:expr => $name:literal: $help:literal,)* }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($variant),*]
            }
            fn to_possible_value(&self) -> Option<PossibleValue> {
                let table: &[($ty, &'static str, &'static str)] = &[$(($variant, $name, $help)),*];
                table
                    .iter()
                    .find(|(v, _, _)| v == self)
                    .map(|(_, name, help)| PossibleValue::new(*name).help(*help))
            }
        }
    };
}

value_enum!(IntPolicy {
    IntPolicy::First => "first": "Take the oldest snapshot's value",
    IntPolicy::Last => "last": "Take the newest snapshot's value",
    IntPolicy::Max => "max": "Element-wise maximum",
    IntPolicy::Sum => "sum": "Element-wise sum (an error if it overflows the dtype)",
    IntPolicy::Error => "error": "Refuse integer tensors",
});

value_enum!(Estimator {
    Estimator::Population => "population": "fvcore's precise BN: statistics of all elements seen, weighted by count",
    Estimator::Torch => "torch": "torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances",
});

value_enum!(Interpolation {
    Interpolation::Bilinear => "bilinear": "PIL's BILINEAR (triangle filter, antialiased): torchvision's default",
    Interpolation::Bicubic => "bicubic": "PIL's BICUBIC (Keys cubic, a = -0.5, antialiased): timm's usual choice",
});

value_enum!(CropMode {
    CropMode::Center => "center": "Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre",
    CropMode::Squash => "squash": "Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre",
});

value_enum!(ScheduleKind {
    ScheduleKind::Constant => "constant": "The same learning rate every step",
    ScheduleKind::Cosine => "cosine": "Half a cosine from --lr to 0 over the steps (after any warm-up)",
});

/// `--opt`: which optimiser a fine-tune uses (its hyper-parameters come from other flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    AdamW,
}

value_enum!(OptimizerKind {
    OptimizerKind::Sgd => "sgd": "torch.optim.SGD: --momentum, --nesterov, --weight-decay",
    OptimizerKind::AdamW => "adamw": "torch.optim.AdamW: betas (0.9, 0.999), eps 1e-8, decoupled --weight-decay",
});

/// `--kernels` / `CKPT_CPU_CONV`: `candle` selects candle's ops; anything else (as before the
/// flag existed, when only the variable did) ckpt's fast kernels.
pub fn parse_kernels(s: &str) -> Result<Kernels, String> {
    Ok(if s == "candle" {
        Kernels::Candle
    } else {
        Kernels::Fast
    })
}

/// The shells `ckpt completions` writes scripts for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "lower")]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl Shell {
    pub const ALL: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

    pub fn generator(self) -> clap_complete::Shell {
        match self {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }

    /// The file name the shell looks for.
    pub fn file_name(self) -> &'static str {
        match self {
            Shell::Bash => "ckpt.bash",
            Shell::Zsh => "_ckpt",
            Shell::Fish => "ckpt.fish",
        }
    }
}

value_enum!(Method {
    Method::Greedy => "greedy": "Greedy soup: add candidates in rank order while the soup does not get worse",
    Method::Uniform => "uniform": "The uniform average of every candidate",
    Method::Best => "best": "The single best candidate",
});

value_enum!(Metric {
    Metric::Top1 => "top1": "Top-1 accuracy (ties: lower loss)",
    Metric::Loss => "loss": "Mean cross-entropy",
});
