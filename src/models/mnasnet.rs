//! torchvision's MNASNet 0.5, 0.75, 1.0 and 1.3 (the B1 variant, `_version` 2), and any other
//! widths, stack lengths, expansions or class count.
//!
//! Everything is in one `nn.Sequential`, `layers`: a 3x3 stride-2 convolution (`layers.0`, BN
//! `layers.1`, ReLU), a depthwise 3x3 (`layers.3`, `.4`, ReLU), a 1x1 (`layers.6`, `.7`, no
//! activation); six stacks `layers.8` to `layers.13` of inverted residuals, each
//! `layers.S.J.layers`: 1x1 expansion (`.0`, `.1`, ReLU), depthwise k x k (`.3`, `.4`, ReLU), 1x1
//! projection (`.6`, `.7`), with a residual when the width and size are kept; then the 1x1 head
//! (`layers.14`, `.15`, ReLU), global pooling and `classifier.1`. Widths, expansions and kernel
//! sizes come from the shapes; strides do not, and are torchvision's per stack (the first unit of
//! stacks 1, 2, 3 and 5 has stride 2).
//!
//! torchvision builds every BN with momentum `1 - 0.9997` (PyTorch's 0.1 elsewhere): train mode
//! (`fixres`, `finetune`) moves the running statistics by that.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Linear};
use super::{
    torchvision_naming, Architecture, Family, HeadInput, HeadPaths, Miss, Network, Probe, Shapes,
};

const EPS: f64 = 1e-5;
/// torchvision's `_BN_MOMENTUM`, written as it is there so that it rounds the same.
const MOMENTUM: f64 = 1.0 - 0.9997;
/// Stride of the first unit of each of the six stacks.
const STRIDES: [usize; 6] = [2, 2, 2, 1, 2, 1];
/// torchvision's stacks: (kernel, expansion, units).
const STACKS: [(usize, usize, usize); 6] = [
    (3, 3, 3),
    (5, 3, 3),
    (5, 6, 3),
    (3, 6, 2),
    (5, 6, 4),
    (3, 6, 1),
];
/// torchvision's sizes: (name, `_get_depths(alpha)`: stem, `layers.6`, the six stacks).
const STANDARD: [(&str, [usize; 8]); 4] = [
    ("mnasnet0_5", [16, 8, 16, 24, 40, 48, 96, 160]),
    ("mnasnet0_75", [24, 16, 24, 32, 64, 72, 144, 240]),
    ("mnasnet1_0", [32, 16, 24, 40, 80, 96, 192, 320]),
    ("mnasnet1_3", [40, 24, 32, 56, 104, 128, 248, 416]),
];
const HEAD: usize = 1280;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    pub cin: usize,
    /// Expanded channels.
    pub mid: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub stem: usize,
    /// `layers.6`'s output width.
    pub separable: usize,
    pub stacks: Vec<Vec<UnitConfig>>,
    /// `layers.14`'s output width.
    pub head: usize,
    pub num_classes: usize,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "mnasnet",
    detect,
    accepts,
    namings: torchvision_naming,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("mnasnet")
}

impl Config {
    fn depths(&self) -> Vec<usize> {
        let mut d = vec![self.stem, self.separable];
        d.extend(self.stacks.iter().filter_map(|s| s.last().map(|u| u.cout)));
        d
    }
    fn is_standard_layout(&self) -> bool {
        self.head == HEAD
            && self.stacks.iter().zip(STACKS).all(|(s, (k, e, n))| {
                s.len() == n && s.iter().all(|u| u.kernel == k && u.mid == u.cin * e)
            })
    }
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "classifier.1".into(),
            last_bn: Some("layers.15".into()),
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(MnasNet::new(self, vb, reg)?))
    }

    fn name(&self) -> String {
        let depths = self.depths();
        if self.is_standard_layout() {
            if let Some((name, _)) = STANDARD.iter().find(|(_, d)| depths == d) {
                return name.to_string();
            }
        }
        let units: Vec<usize> = self.stacks.iter().map(Vec::len).collect();
        format!(
            "mnasnet (widths {depths:?}, units {units:?}, head {})",
            self.head
        )
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("layers.0.weight", 3)?;
    p.expect("layers.1.running_mean", &[stem])?;
    p.expect("layers.3.weight", &[stem, 1, 3, 3])?;
    let sep = p.shape("layers.6.weight", 4)?;
    if sep[1..] != [stem, 1, 1] {
        return Err(p.miss(format!(
            "tensor layers.6.weight has shape {sep:?}, expected [C, {stem}, 1, 1]"
        )));
    }
    let mut cin = sep[0];
    let mut stacks = Vec::new();
    for (s, &stride) in STRIDES.iter().enumerate() {
        let mut units = Vec::new();
        loop {
            let u = format!("layers.{}.{}.layers", s + 8, units.len());
            if !p.has(&format!("{u}.0.weight")) {
                break;
            }
            let expand = p.shape(&format!("{u}.0.weight"), 4)?;
            if expand[1..] != [cin, 1, 1] {
                return Err(p.miss(format!(
                    "tensor {u}.0.weight has shape {expand:?}, expected [C, {cin}, 1, 1]"
                )));
            }
            let mid = expand[0];
            let dw = p.shape(&format!("{u}.3.weight"), 4)?;
            if dw[0] != mid || dw[1] != 1 || dw[2] != dw[3] || dw[2] % 2 == 0 {
                return Err(p.miss(format!(
                    "tensor {u}.3.weight has shape {dw:?}, expected a depthwise [{mid}, 1, k, k]"
                )));
            }
            let proj = p.shape(&format!("{u}.6.weight"), 4)?;
            if proj[1..] != [mid, 1, 1] {
                return Err(p.miss(format!(
                    "tensor {u}.6.weight has shape {proj:?}, expected [C, {mid}, 1, 1]"
                )));
            }
            units.push(UnitConfig {
                cin,
                mid,
                cout: proj[0],
                kernel: dw[2],
                stride: if units.is_empty() { stride } else { 1 },
            });
            cin = proj[0];
        }
        if units.is_empty() {
            return Err(p.miss(format!("no tensor layers.{}.0.layers.0.weight", s + 8)));
        }
        stacks.push(units);
    }
    let head = p.shape("layers.14.weight", 4)?;
    if head[1..] != [cin, 1, 1] {
        return Err(p.miss(format!(
            "tensor layers.14.weight has shape {head:?}, expected [C, {cin}, 1, 1]"
        )));
    }
    p.expect("layers.15.running_mean", &[head[0]])?;
    let fc = p.shape("classifier.1.weight", 2)?;
    Ok(Box::new(Config {
        stem,
        separable: sep[0],
        stacks,
        head: head[0],
        num_classes: fc[0],
    }))
}

struct Unit {
    layers: [ConvBn; 3],
    residual: bool,
}

pub struct MnasNet {
    stem: [ConvBn; 3],
    units: Vec<Unit>,
    head: ConvBn,
    classifier: Linear,
}

impl MnasNet {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<MnasNet> {
        reg.momentum = MOMENTUM;
        let cb = |v: &VarBuilder, i: usize, spec: ConvSpec, reg: &mut BnRegistry| {
            ConvBn::new(v.pp(i), v.pp(i + 1), spec, EPS, reg)
        };
        let l = vb.pp("layers");
        let stem = [
            cb(&l, 0, ConvSpec::new(3, c.stem, 3).stride(2), reg)?,
            cb(&l, 3, ConvSpec::new(c.stem, c.stem, 3).groups(c.stem), reg)?,
            cb(&l, 6, ConvSpec::new(c.stem, c.separable, 1), reg)?,
        ];
        let mut units = Vec::new();
        for (s, stack) in c.stacks.iter().enumerate() {
            for (j, u) in stack.iter().enumerate() {
                let v = l.pp(s + 8).pp(j).pp("layers");
                units.push(Unit {
                    layers: [
                        cb(&v, 0, ConvSpec::new(u.cin, u.mid, 1), reg)?,
                        cb(
                            &v,
                            3,
                            ConvSpec::new(u.mid, u.mid, u.kernel)
                                .stride(u.stride)
                                .groups(u.mid),
                            reg,
                        )?,
                        cb(&v, 6, ConvSpec::new(u.mid, u.cout, 1), reg)?,
                    ],
                    residual: u.stride == 1 && u.cin == u.cout,
                });
            }
        }
        let cin = c
            .stacks
            .last()
            .and_then(|s| s.last())
            .map_or(c.separable, |u| u.cout);
        let head = cb(&l, 14, ConvSpec::new(cin, c.head, 1), reg)?;
        let classifier = Linear::new(vb.pp("classifier").pp(1), c.head, c.num_classes)?;
        Ok(MnasNet {
            stem,
            units,
            head,
            classifier,
        })
    }
}

impl Network for MnasNet {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.head.forward_relu(&self.body(x, ctx)?, ctx)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        self.head.trunk(&self.body(x, ctx)?, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.head.head(input, ctx, Act::Relu)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }
}

impl MnasNet {
    /// The stem and the stacks, up to the head convolution.
    fn body(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let [conv, dw, pw] = &self.stem;
        let x = conv.forward_relu(x, ctx)?;
        let x = dw.forward_relu(&x, ctx)?;
        let mut x = pw.forward(&x, ctx)?;
        for u in &self.units {
            let [expand, dw, project] = &u.layers;
            let y = expand.forward_relu(&x, ctx)?;
            let y = dw.forward_relu(&y, ctx)?;
            let residual = if u.residual { Some(&x) } else { None };
            x = project.forward_add_act(&y, residual, ctx, Act::None)?;
        }
        Ok(x)
    }
}
