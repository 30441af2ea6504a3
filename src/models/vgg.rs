//! torchvision's VGG-11/13/16/19, with and without BatchNorm (`vgg11` ... `vgg19_bn`), and any
//! other widths, stage lengths or class counts built by `vgg.make_layers`.
//!
//! `features` is a flat `nn.Sequential`: per convolution `Conv2d(3x3, bias)`, `[BatchNorm2d]`,
//! `ReLU` (two or three children), and a `MaxPool2d(2, 2)` (one child, no tensors) after each
//! stage. Detection reads the convolutions' indices: a gap of one extra child between two
//! convolutions is a max pool, so the stages come out of the key names; every torchvision
//! configuration ends with a pool, which is assumed after the last convolution. Then
//! `AdaptiveAvgPool2d((7, 7))`, and `classifier.0`, `.3`, `.6` (Linear, ReLU, Dropout twice,
//! then the last Linear); the hidden widths are read from the shapes.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{adaptive_avg_pool, Act, BnRegistry, Conv2d, ConvBn, ConvSpec, Ctx, Linear};
use super::{
    torchvision_naming, Architecture, Family, HeadInput, HeadPaths, Miss, Network, Probe, Shapes,
};

const EPS: f64 = 1e-5;
/// torchvision's configurations A, B, D, E: convolution widths per stage (a pool after each).
const STANDARD: [(&str, &[&[usize]]); 4] = [
    (
        "vgg11",
        &[&[64], &[128], &[256, 256], &[512, 512], &[512, 512]],
    ),
    (
        "vgg13",
        &[
            &[64, 64],
            &[128, 128],
            &[256, 256],
            &[512, 512],
            &[512, 512],
        ],
    ),
    (
        "vgg16",
        &[
            &[64, 64],
            &[128, 128],
            &[256, 256, 256],
            &[512, 512, 512],
            &[512, 512, 512],
        ],
    ),
    (
        "vgg19",
        &[
            &[64, 64],
            &[128, 128],
            &[256, 256, 256, 256],
            &[512, 512, 512, 512],
            &[512, 512, 512, 512],
        ],
    ),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Convolution widths per stage; a 2x2 max pool ends each stage.
    pub stages: Vec<Vec<usize>>,
    pub batch_norm: bool,
    /// Output widths of `classifier.0` and `classifier.3`.
    pub hidden: [usize; 2],
    pub num_classes: usize,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "vgg",
    detect,
    accepts,
    namings: torchvision_naming,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("vgg")
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        // The builder's indices: conv, BN, ReLU per layer and a pool after each stage.
        let mut i = 0;
        let mut last_bn = None;
        for widths in &self.stages {
            for _ in widths {
                if self.batch_norm {
                    last_bn = Some(format!("features.{}", i + 1));
                }
                i += if self.batch_norm { 3 } else { 2 };
            }
            i += 1;
        }
        HeadPaths {
            classifier: "classifier.6".into(),
            last_bn,
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(Vgg::new(self, vb, reg)?))
    }

    fn name(&self) -> String {
        let bn = if self.batch_norm { "_bn" } else { "" };
        for (name, stages) in STANDARD {
            if self.hidden == [4096, 4096] && stages.iter().copied().eq(self.stages.iter()) {
                return format!("{name}{bn}");
            }
        }
        format!(
            "vgg{bn} (stages {:?}, classifier widths {:?})",
            self.stages, self.hidden
        )
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    p.stem_channels("features.0.weight", 3)?;
    let batch_norm = p.has("features.1.running_mean");
    let per_conv = if batch_norm { 3 } else { 2 };
    let mut convs: Vec<usize> = shapes
        .iter()
        .filter_map(|(k, s)| {
            let i = k.strip_prefix("features.")?.strip_suffix(".weight")?;
            (s.len() == 4).then(|| i.parse::<usize>().ok())?
        })
        .collect();
    convs.sort_unstable();
    let mut stages = vec![Vec::new()];
    let mut cin = 3;
    for (n, &i) in convs.iter().enumerate() {
        let w = p.shape(&format!("features.{i}.weight"), 4)?;
        if w[1..] != [cin, 3, 3] {
            return Err(p.miss(format!(
                "tensor features.{i}.weight has shape {w:?}, expected [C, {cin}, 3, 3]"
            )));
        }
        if batch_norm {
            p.expect(&format!("features.{}.running_mean", i + 1), &[w[0]])?;
        }
        stages.last_mut().expect("a stage").push(w[0]);
        cin = w[0];
        if let Some(&next) = convs.get(n + 1) {
            match next - i {
                g if g == per_conv => {}
                g if g == per_conv + 1 => stages.push(Vec::new()),
                _ => {
                    return Err(p.miss(format!(
                        "features.{next} follows features.{i}: not a VGG layer sequence"
                    )))
                }
            }
        }
    }
    let c0 = p.shape("classifier.0.weight", 2)?;
    if c0[1] != cin * 49 {
        return Err(p.miss(format!(
            "tensor classifier.0.weight has shape {c0:?}, expected [hidden, {}]",
            cin * 49
        )));
    }
    let c3 = p.shape("classifier.3.weight", 2)?;
    let c6 = p.shape("classifier.6.weight", 2)?;
    Ok(Box::new(Config {
        stages,
        batch_norm,
        hidden: [c0[0], c3[0]],
        num_classes: c6[0],
    }))
}

enum Layer {
    Plain(Conv2d),
    Bn(Box<ConvBn>),
}

pub struct Vgg {
    stages: Vec<Vec<Layer>>,
    classifier: [Linear; 3],
}

impl Vgg {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Vgg> {
        let f = vb.pp("features");
        let per_conv = if c.batch_norm { 3 } else { 2 };
        let (mut i, mut cin) = (0, 3);
        let mut stages = Vec::new();
        for widths in &c.stages {
            let mut layers = Vec::new();
            for &w in widths {
                let spec = ConvSpec::new(cin, w, 3).bias();
                layers.push(if c.batch_norm {
                    Layer::Bn(Box::new(ConvBn::new(f.pp(i), f.pp(i + 1), spec, EPS, reg)?))
                } else {
                    Layer::Plain(Conv2d::new(f.pp(i), spec)?)
                });
                i += per_conv;
                cin = w;
            }
            i += 1;
            stages.push(layers);
        }
        let cl = vb.pp("classifier");
        let classifier = [
            Linear::new(cl.pp(0), cin * 49, c.hidden[0])?,
            Linear::new(cl.pp(3), c.hidden[0], c.hidden[1])?,
            Linear::new(cl.pp(6), c.hidden[1], c.num_classes)?,
        ];
        Ok(Vgg { stages, classifier })
    }
}

impl Network for Vgg {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = x.clone();
        for stage in &self.stages {
            for l in stage {
                x = match l {
                    Layer::Plain(c) => c.forward_act(&x, ctx, Act::Relu)?,
                    Layer::Bn(c) => c.forward_relu(&x, ctx)?,
                };
            }
            x = x.max_pool2d(2)?;
        }
        self.classify(&x)
    }

    /// Everything before the last convolution's BN (a VGG with BN).
    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let Some(Layer::Bn(last)) = self.stages.last().and_then(|s| s.last()) else {
            candle_core::bail!("this network has no BatchNorm layer before its pooling");
        };
        let n = self.stages.len();
        let mut x = x.clone();
        for (s, stage) in self.stages.iter().enumerate() {
            for (i, l) in stage.iter().enumerate() {
                if s + 1 == n && i + 1 == stage.len() {
                    break;
                }
                x = match l {
                    Layer::Plain(c) => c.forward_act(&x, ctx, Act::Relu)?,
                    Layer::Bn(c) => c.forward_relu(&x, ctx)?,
                };
            }
            if s + 1 < n {
                x = x.max_pool2d(2)?;
            }
        }
        Ok(HeadInput {
            x: last.conv.forward(&x, ctx)?,
            residual: None,
        })
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let Some(Layer::Bn(last)) = self.stages.last().and_then(|s| s.last()) else {
            candle_core::bail!("this network has no BatchNorm layer before its pooling");
        };
        let x = last.bn.forward_add_act(&input.x, None, ctx, Act::Relu)?;
        self.classify(&x.max_pool2d(2)?)
    }
}

impl Vgg {
    /// The pools and the three linear layers after the last stage's pool.
    fn classify(&self, x: &Tensor) -> Result<Tensor> {
        let x = adaptive_avg_pool(x, 7, 7)?.flatten_from(1)?;
        let [a, b, c] = &self.classifier;
        let x = a.forward(&x)?.relu()?;
        let x = b.forward(&x)?.relu()?;
        c.forward(&x)
    }
}
