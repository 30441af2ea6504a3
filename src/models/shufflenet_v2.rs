//! torchvision's ShuffleNetV2 x0.5, x1.0, x1.5 and x2.0, and any other stage widths, unit
//! counts or class count.
//!
//! `conv1` (3x3 stride 2, BN, ReLU) and a 3x3 stride-2 max pool; three stages `stage2` to
//! `stage4` of units; `conv5` (1x1, BN, ReLU), global pooling and `fc`. A unit with `branch1`
//! (torchvision builds one exactly when the stride is 2, so the stride is read off the names) runs
//! both branches on its whole input: `branch1` is a depthwise 3x3 with BN and no activation
//! (`.0`, `.1`) then a 1x1 with BN and ReLU (`.2`, `.3`). A unit without it splits its input's
//! channels in halves, keeps the first and runs `branch2` on the second. `branch2` is a 1x1 with
//! BN and ReLU (`.0`, `.1`), a depthwise 3x3 with BN (`.3`, `.4`, stride 2 in a stride-2 unit) and
//! a 1x1 with BN and ReLU (`.5`, `.6`). The two halves are concatenated and shuffled in groups of
//! two, which interleaves them: output channel 2j is the first half's channel j, 2j + 1 the
//! second's. That is one stack along a new axis after the channels (one copy), instead of a
//! concatenation and a transposed copy.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{
    global_avg_pool, max_pool_3x3_s2_p1, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Linear,
};
use super::{
    torchvision_naming, Architecture, Family, HeadInput, HeadPaths, Miss, Network, Probe, Shapes,
};

const EPS: f64 = 1e-5;
/// torchvision's units per stage.
const REPEATS: [usize; 3] = [4, 8, 4];
/// torchvision's sizes: (name, widths of conv1, the three stages and conv5).
const STANDARD: [(&str, [usize; 5]); 4] = [
    ("shufflenet_v2_x0_5", [24, 48, 96, 192, 1024]),
    ("shufflenet_v2_x1_0", [24, 116, 232, 464, 1024]),
    ("shufflenet_v2_x1_5", [24, 176, 352, 704, 1024]),
    ("shufflenet_v2_x2_0", [24, 244, 488, 976, 2048]),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    pub cin: usize,
    /// Output channels (twice each branch's).
    pub cout: usize,
    /// 2 with `branch1`, else 1.
    pub stride: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub stem: usize,
    /// The units of `stage2`, `stage3`, `stage4`.
    pub stages: Vec<Vec<UnitConfig>>,
    /// `conv5`'s output width.
    pub last: usize,
    pub num_classes: usize,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "shufflenet_v2",
    detect,
    accepts,
    namings: torchvision_naming,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("shufflenet_v2")
}

impl Config {
    fn repeats(&self) -> Vec<usize> {
        self.stages.iter().map(Vec::len).collect()
    }
    fn widths(&self) -> Vec<usize> {
        let mut w = vec![self.stem];
        w.extend(self.stages.iter().filter_map(|s| s.last().map(|u| u.cout)));
        w.push(self.last);
        w
    }
    /// torchvision's strides: the first unit of each stage, and only it, has stride 2.
    fn standard_strides(&self) -> bool {
        self.stages.iter().all(|s| {
            s.iter()
                .enumerate()
                .all(|(i, u)| u.stride == 1 + usize::from(i == 0))
        })
    }
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "fc".into(),
            last_bn: Some("conv5.1".into()),
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(ShuffleNetV2::new(self, vb, reg)?))
    }

    fn name(&self) -> String {
        let (repeats, widths) = (self.repeats(), self.widths());
        if repeats == REPEATS && self.standard_strides() {
            if let Some((name, _)) = STANDARD.iter().find(|(_, w)| widths == w) {
                return name.to_string();
            }
        }
        format!("shufflenet_v2 (repeats {repeats:?}, widths {widths:?})")
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("conv1.0.weight", 3)?;
    p.expect("conv1.1.running_mean", &[stem])?;
    let mut cin = stem;
    let mut stages = Vec::new();
    for s in 2..=4 {
        let mut units = Vec::new();
        while p.has(&format!("stage{s}.{}.branch2.0.weight", units.len())) {
            let u = format!("stage{s}.{}", units.len());
            let stride = if p.has(&format!("{u}.branch1.0.weight")) {
                p.expect(&format!("{u}.branch1.0.weight"), &[cin, 1, 3, 3])?;
                2
            } else {
                1
            };
            let first = p.shape(&format!("{u}.branch2.0.weight"), 4)?;
            let half = first[0];
            let branch_in = if stride == 2 { cin } else { half };
            if first[1..] != [branch_in, 1, 1] || (stride == 1 && cin != 2 * half) {
                return Err(p.miss(format!(
                    "tensor {u}.branch2.0.weight has shape {first:?}, expected [C, {branch_in}, 1, 1] with {} = 2C",
                    if stride == 2 { 2 * half } else { cin },
                )));
            }
            if stride == 2 {
                p.expect(&format!("{u}.branch1.2.weight"), &[half, cin, 1, 1])?;
            }
            p.expect(&format!("{u}.branch2.3.weight"), &[half, 1, 3, 3])?;
            p.expect(&format!("{u}.branch2.5.weight"), &[half, half, 1, 1])?;
            units.push(UnitConfig {
                cin,
                cout: 2 * half,
                stride,
            });
            cin = 2 * half;
        }
        if units.is_empty() {
            return Err(p.miss(format!("no tensor stage{s}.0.branch2.0.weight")));
        }
        stages.push(units);
    }
    if p.has("stage5.0.branch2.0.weight") {
        return Err(p.miss("more than torchvision's three stages (stage2 to stage4)"));
    }
    let c5 = p.shape("conv5.0.weight", 4)?;
    if c5[1..] != [cin, 1, 1] {
        return Err(p.miss(format!(
            "tensor conv5.0.weight has shape {c5:?}, expected [C, {cin}, 1, 1]"
        )));
    }
    let fc = p.shape("fc.weight", 2)?;
    Ok(Box::new(Config {
        stem,
        stages,
        last: c5[0],
        num_classes: fc[0],
    }))
}

struct Unit {
    /// Depthwise 3x3 + BN, then 1x1 + BN + ReLU: stride-2 units only.
    branch1: Option<[ConvBn; 2]>,
    /// 1x1 + BN + ReLU, depthwise 3x3 + BN, 1x1 + BN + ReLU.
    branch2: [ConvBn; 3],
}

impl Unit {
    fn new(u: &UnitConfig, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Unit> {
        let half = u.cout / 2;
        let cb = |v: &VarBuilder, i: usize, spec: ConvSpec, reg: &mut BnRegistry| {
            ConvBn::new(v.pp(i), v.pp(i + 1), spec, EPS, reg)
        };
        let dw = |c: usize| ConvSpec::new(c, c, 3).stride(u.stride).groups(c);
        let branch1 = if u.stride == 2 {
            let b = vb.pp("branch1");
            Some([
                cb(&b, 0, dw(u.cin), reg)?,
                cb(&b, 2, ConvSpec::new(u.cin, half, 1), reg)?,
            ])
        } else {
            None
        };
        let b = vb.pp("branch2");
        let branch_in = if u.stride == 2 { u.cin } else { half };
        let branch2 = [
            cb(&b, 0, ConvSpec::new(branch_in, half, 1), reg)?,
            cb(&b, 3, dw(half), reg)?,
            cb(&b, 5, ConvSpec::new(half, half, 1), reg)?,
        ];
        Ok(Unit { branch1, branch2 })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let (kept, rest) = match &self.branch1 {
            Some([dw, pw]) => {
                let y = dw.forward(x, ctx)?;
                (pw.forward_relu(&y, ctx)?, x.clone())
            }
            None => (x.narrow(1, 0, c / 2)?, x.narrow(1, c / 2, c - c / 2)?),
        };
        let [a, dw, b] = &self.branch2;
        let y = a.forward_relu(&rest, ctx)?;
        let y = dw.forward(&y, ctx)?;
        let y = b.forward_relu(&y, ctx)?;
        let (_, half, h, w) = y.dims4()?;
        // cat((kept, y), 1) then channel_shuffle(2): [N, half, 2, H, W] is that, interleaved.
        Tensor::stack(&[&kept, &y], 2)?.reshape((n, 2 * half, h, w))
    }
}

pub struct ShuffleNetV2 {
    conv1: ConvBn,
    units: Vec<Unit>,
    conv5: ConvBn,
    fc: Linear,
}

impl ShuffleNetV2 {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<ShuffleNetV2> {
        let conv1 = ConvBn::new(
            vb.pp("conv1").pp(0),
            vb.pp("conv1").pp(1),
            ConvSpec::new(3, c.stem, 3).stride(2),
            EPS,
            reg,
        )?;
        let mut units = Vec::new();
        for (s, stage) in c.stages.iter().enumerate() {
            for (i, u) in stage.iter().enumerate() {
                units.push(Unit::new(u, vb.pp(format!("stage{}", s + 2)).pp(i), reg)?);
            }
        }
        let cin = c
            .stages
            .last()
            .and_then(|s| s.last())
            .map_or(c.stem, |u| u.cout);
        let conv5 = ConvBn::new(
            vb.pp("conv5").pp(0),
            vb.pp("conv5").pp(1),
            ConvSpec::new(cin, c.last, 1),
            EPS,
            reg,
        )?;
        let fc = Linear::new(vb.pp("fc"), c.last, c.num_classes)?;
        Ok(ShuffleNetV2 {
            conv1,
            units,
            conv5,
            fc,
        })
    }
}

impl Network for ShuffleNetV2 {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.conv5.forward_relu(&self.body(x, ctx)?, ctx)?;
        self.fc.forward(&global_avg_pool(&x)?)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        self.conv5.trunk(&self.body(x, ctx)?, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.conv5.head(input, ctx, Act::Relu)?;
        self.fc.forward(&global_avg_pool(&x)?)
    }
}

impl ShuffleNetV2 {
    /// conv1, the pool and the units, up to conv5.
    fn body(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.conv1.forward_act(x, ctx, Act::Relu)?;
        let mut x = max_pool_3x3_s2_p1(&x, ctx)?;
        for u in &self.units {
            x = u.forward(&x, ctx)?;
        }
        Ok(x)
    }
}
