//! Architecture detection on the key/shape lists of real-size torchvision models (made with
//! PyTorch on the meta device by fixtures/make_fixtures.py; no weights stored), and on damaged
//! ones.

use std::collections::BTreeMap;

use ckpt::models::{detect, resnet, Model, ShapeOnlyBackend, Shapes};

use crate::util::fixture;

fn real_size() -> BTreeMap<String, Shapes> {
    crate::util::real_size_shapes("zoo_shapes.json.gz")
}

#[test]
fn every_real_size_configuration_is_detected_by_name() {
    let all = real_size();
    assert_eq!(all.len(), 19);
    for (name, shapes) in &all {
        let c = detect(shapes, None).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(&c.name(), name);
        assert_eq!(c.num_classes(), 1000, "{name}");
        // --arch with the family or the exact name agrees.
        assert_eq!(detect(shapes, Some(c.family())).unwrap().name(), *name);
        assert_eq!(detect(shapes, Some(name)).unwrap().name(), *name);
    }
}

#[test]
fn real_size_models_build_against_their_shapes() {
    // Building asks for every tensor with the shape the architecture implies; zeros stand in
    // for the weights. Also lists BN layers in forward order.
    let all = real_size();
    for name in [
        "resnet50",
        "resnext101_64x4d",
        "wide_resnet50_2",
        "mobilenet_v2",
        "efficientnet_b3",
    ] {
        let shapes = &all[name];
        let c = detect(shapes, None).unwrap();
        let m = Model::build(
            c,
            Box::new(ShapeOnlyBackend {
                shapes: shapes.clone(),
            }),
            &candle_core::Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let want: Vec<&String> = shapes
            .keys()
            .filter(|k| k.ends_with(".running_mean"))
            .collect();
        assert_eq!(m.bn_layers.len(), want.len(), "{name}");
        let first = &m.bn_layers[0];
        assert!(first == "bn1" || first == "features.0.1", "{name}: {first}");
        // The head a FixRes fine-tune trains, named by the family (issue 18).
        let (head, i) = m.head().unwrap();
        let want = match name {
            "mobilenet_v2" => ("classifier.1", "features.18.1"),
            "efficientnet_b3" => ("classifier.1", "features.8.1"),
            _ => ("fc", "layer4.2.bn3"),
        };
        assert_eq!(
            (head.classifier.as_str(), head.last_bn.as_str()),
            want,
            "{name}"
        );
        assert_eq!(m.bn_layers[i], want.1);
        assert!(shapes.contains_key(&format!("{}.weight", want.0)));
    }
    let r50 = Model::build(
        detect(&all["resnet50"], None).unwrap(),
        Box::new(ShapeOnlyBackend {
            shapes: all["resnet50"].clone(),
        }),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // Forward order: a block's own BNs, then its downsample's.
    let pos = |p: &str| r50.bn_layers.iter().position(|x| x == p).unwrap();
    assert!(pos("layer1.0.bn3") < pos("layer1.0.downsample.1"));
    assert!(pos("layer1.0.downsample.1") < pos("layer1.1.bn1"));
}

#[test]
fn other_class_counts_and_depths_are_read_from_shapes() {
    let mut s = real_size()["resnet18"].clone();
    s.insert("fc.weight".into(), vec![37, 512]);
    s.insert("fc.bias".into(), vec![37]);
    let detected = detect(&s, None).unwrap();
    match detected.downcast::<resnet::Config>() {
        Some(c) => assert_eq!((c.num_classes, c.blocks), (37, [2, 2, 2, 2])),
        None => panic!("{detected:?}"),
    }
}

#[test]
fn damaged_checkpoint_names_the_nearest_family_and_key() {
    let mut s = real_size()["resnet50"].clone();
    s.remove("layer2.0.conv2.weight");
    let err = format!("{:#}", detect(&s, None).unwrap_err());
    assert!(
        err.contains("tried resnet, mobilenet_v2, efficientnet"),
        "{err}"
    );
    assert!(
        err.contains("nearest is resnet: no tensor layer2.0.conv2.weight"),
        "{err}"
    );

    let mut s = real_size()["efficientnet_b0"].clone();
    s.insert("features.3.0.block.1.0.weight".into(), vec![144, 1, 4, 4]);
    let err = format!("{:#}", detect(&s, None).unwrap_err());
    assert!(
        err.contains("nearest is efficientnet") && err.contains("depthwise"),
        "{err}"
    );

    let err = format!(
        "{:#}",
        detect(&real_size()["resnet18"], Some("mobilenet_v2")).unwrap_err()
    );
    assert!(err.contains("mobilenet_v2"), "{err}");
    let err = format!(
        "{:#}",
        detect(&real_size()["resnet18"], Some("resnet50")).unwrap_err()
    );
    assert!(err.contains("is a resnet18, not a resnet50"), "{err}");
    let err = format!(
        "{:#}",
        detect(&real_size()["resnet18"], Some("vit_b_16")).unwrap_err()
    );
    assert!(err.contains("unknown architecture"), "{err}");
}

/// Calibrate mode: BN layers normalise with batch statistics (as PyTorch's train mode) and
/// report them; checked against torchvision with BN in train mode and everything else in eval.
#[test]
fn calibrate_mode_matches_pytorch_train_mode_bn() {
    use ckpt::checkpoint::Checkpoint;
    use ckpt::models::{BatchStats, BnObserver, Ctx};

    struct Record(Vec<(usize, BatchStats)>);
    impl BnObserver for Record {
        fn observe(&mut self, layer: usize, stats: BatchStats) -> candle_core::Result<()> {
            self.0.push((layer, stats));
            Ok(())
        }
    }
    for (model, io) in [
        (
            "tiny/epoch_10.safetensors",
            "zoo/tiny_resnet_io.safetensors",
        ),
        (
            "zoo/efficientnet_tiny.safetensors",
            "zoo/efficientnet_tiny_io.safetensors",
        ),
    ] {
        let ck = Checkpoint::open(fixture(model), &Default::default()).unwrap();
        let m = Model::load(&ck, None, &candle_core::Device::Cpu).unwrap();
        let io_ck = Checkpoint::open(fixture(io), &Default::default()).unwrap();
        let x = ckpt::eval::read_input_batch(&io_ck, "input", &m).unwrap();
        let reference = crate::util::read_st(&fixture(io));
        let mut rec = Record(Vec::new());
        let logits = m.forward(&x, &mut Ctx::calibrate(&mut rec)).unwrap();
        let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let want = crate::util::as_f64(&reference["logits_calibrate"]);
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4 * scale, "{model}: {g} vs {w}");
        }
        assert_eq!(
            rec.0.len(),
            m.bn_layers.len(),
            "every BN layer reports once"
        );
        for (i, (layer, stats)) in rec.0.iter().enumerate() {
            assert_eq!(*layer, i, "reports come in forward order");
            let prefix = &m.bn_layers[i];
            let mean = crate::util::as_f64(&reference[&format!("bn.{prefix}.mean")]);
            let var = crate::util::as_f64(&reference[&format!("bn.{prefix}.var")]);
            for c in 0..mean.len() {
                assert!(
                    (stats.mean[c] as f64 - mean[c]).abs() <= 1e-4 * mean[c].abs().max(1e-2),
                    "{prefix} mean[{c}]"
                );
                assert!(
                    (stats.var[c] as f64 - var[c]).abs() <= 1e-4 * var[c].abs().max(1e-3),
                    "{prefix} var[{c}]"
                );
            }
            let n = x.dims4().unwrap().0;
            assert!(stats.count % n == 0);
        }
    }
}

/// `got` is `want` within 1e-5 of `want`'s largest magnitude: two paths that sum the same
/// products in a different order.
fn assert_within_1e5_of_scale(what: &str, want: &candle_core::Tensor, got: &candle_core::Tensor) {
    assert_eq!(want.dims(), got.dims(), "{what}");
    let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let diff: f32 = (want - got)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        diff <= 1e-5 * scale.max(1e-6),
        "{what}: max diff {diff:e}, scale {scale}"
    );
}

/// Issue 9: the CPU convolution path (im2col + gemm, direct depthwise, fused epilogue) against
/// candle's conv2d followed by candle's shift, add and activation, on random inputs, for every
/// shape class the supported families use, at odd and tiny spatial sizes (edges, inputs smaller
/// than the kernel), with one thread, and with two threads at batch 1 (gemm's own threads) and
/// batch 3 (one image per thread). Tolerance 1e-5 of the output's largest magnitude: the two
/// paths sum the same products in a different order.
#[test]
fn cpu_conv_equals_candle_for_every_shape_class_issue_9() {
    use candle_core::{Device, Tensor};
    use ckpt::models::cpu_conv::{candle_conv2d, conv2d, Act, Geometry, Kernels};

    // (what uses it, cin, cout, k, stride, groups)
    let classes: &[(&str, usize, usize, usize, usize, usize)] = &[
        ("resnet stem 7x7 s2", 3, 8, 7, 2, 1),
        ("mobilenet/efficientnet stem 3x3 s2", 3, 8, 3, 2, 1),
        ("basic block 3x3", 8, 8, 3, 1, 1),
        ("stage entry 3x3 s2", 8, 16, 3, 2, 1),
        ("bottleneck / expand / project 1x1", 16, 24, 1, 1, 1),
        ("downsample 1x1 s2", 8, 16, 1, 2, 1),
        ("resnext grouped 3x3", 16, 16, 3, 1, 4),
        ("resnext grouped 3x3 s2", 16, 16, 3, 2, 4),
        ("depthwise 3x3", 6, 6, 3, 1, 6),
        ("depthwise 3x3 s2", 6, 6, 3, 2, 6),
        ("efficientnet depthwise 5x5", 6, 6, 5, 1, 6),
        ("efficientnet depthwise 5x5 s2", 6, 6, 5, 2, 6),
        // Channels in whole blocks of eight on small planes: eight channels a task.
        ("depthwise 3x3, channel blocks", 16, 16, 3, 1, 16),
        ("depthwise 3x3 s2, channel blocks", 16, 16, 3, 2, 16),
        ("depthwise 5x5, channel blocks", 16, 16, 5, 1, 16),
        ("depthwise 5x5 s2, channel blocks", 16, 16, 5, 2, 16),
        ("convnext depthwise 7x7, channel blocks", 16, 16, 7, 1, 16),
        // 94 KB per unfolded output row at 15 px: several blocks per image.
        ("unfolded in blocks 7x7", 32, 8, 7, 1, 1),
        // 32 channels or more each way, 128 together: Winograd's F(2x2, 3x3).
        ("resnet / vgg / densenet 3x3, winograd", 96, 32, 3, 1, 1),
    ];
    let dev = Device::Cpu;
    let mut cases = 0;
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for &(name, cin, cout, k, stride, groups) in classes {
                let g = Geometry {
                    stride,
                    padding: (k - 1) / 2,
                    groups,
                };
                let w = Tensor::randn(0f32, 0.3, (cout, cin / groups, k, k), &dev).unwrap();
                let shift = Tensor::randn(0f32, 0.5, cout, &dev).unwrap();
                let sv = shift.to_vec1::<f32>().unwrap();
                for (n, hw) in [(1, 9), (3, 15), (3, 2), (1, 1)] {
                    let x = Tensor::randn(0f32, 1.0, (n, cin, hw, hw), &dev).unwrap();
                    let ho = (hw + 2 * g.padding - k) / stride + 1;
                    let r = Tensor::randn(0f32, 1.0, (n, cout, ho, ho), &dev).unwrap();
                    for act in [Act::None, Act::Relu, Act::Relu6, Act::Silu, Act::Hardswish] {
                        for (with_shift, res) in [(false, None), (true, None), (true, Some(&r))] {
                            let what = format!(
                                "{name}, {threads} threads, batch {n}, {hw}x{hw}, {act:?}, \
                                 shift {with_shift}, residual {}",
                                res.is_some()
                            );
                            let s = with_shift.then_some((sv.as_slice(), &shift));
                            let got = conv2d(Kernels::Fast, &x, &w, g, s, res, act).unwrap();
                            let want = candle_conv2d(&x, &w, g, s.map(|s| s.1), res, act).unwrap();
                            assert_within_1e5_of_scale(&what, &want, &got);
                            cases += 1;
                        }
                    }
                }
            }
        });
    }
    assert_eq!(cases, 2 * 19 * 4 * 5 * 3);
}

/// Issue 15: ConvNeXt's fused inverted bottleneck (`cpu_conv::mlp`: blocks of the batch's
/// pixels through both pointwise layers, the hidden block activated in cache) against the two
/// 1x1 convolutions it replaces (GELU in the first one's epilogue, bias and residual in the
/// second's), with one and two threads: planes split into blocks (blocks that cross images),
/// small planes batched across images (in one block, and in two: a 4096-wide hidden layer),
/// a 1 x 1 plane; without and with the LayerNorm over channels folded into the blocks (against
/// `channel_layer_norm` first). Tolerance 1e-5 of the output's scale, as for the convolutions.
#[test]
fn fused_mlp_is_the_two_pointwise_convolutions_issue_15() {
    use candle_core::{Device, Tensor};
    use ckpt::models::cpu_conv::mlp::{mlp_residual, ChannelNorm, SPLIT_MIN_PLANE};
    use ckpt::models::cpu_conv::{conv2d, Act, Geometry, Kernels};
    use ckpt::models::fused::channel_layer_norm;

    let dev = Device::Cpu;
    let g = Geometry {
        stride: 1,
        padding: 0,
        groups: 1,
    };
    // (batch, channels, hidden, height, width)
    let cases = [
        (3, 16, 64, 12, 11),
        (4, 8, 1024, 13, 13),
        (5, 24, 96, 7, 7),
        (21, 8, 4096, 7, 7),
        (2, 8, 32, 1, 1),
    ];
    const { assert!(12 * 11 >= SPLIT_MIN_PLANE && 7 * 7 < SPLIT_MIN_PLANE) };
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for (n, c, d, h, w) in cases {
                let z = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
                let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
                let w1 = (Tensor::randn(0f32, 1.0, (d, c, 1, 1), &dev).unwrap()
                    / (c as f64).sqrt())
                .unwrap();
                let w2 = (Tensor::randn(0f32, 1.0, (c, d, 1, 1), &dev).unwrap()
                    / (d as f64).sqrt())
                .unwrap();
                let b1 = Tensor::randn(0f32, 0.5, d, &dev).unwrap();
                let b2 = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
                let (b1v, b2v) = (b1.to_vec1::<f32>().unwrap(), b2.to_vec1::<f32>().unwrap());
                let nw = Tensor::randn(1f32, 0.3, c, &dev).unwrap();
                let nb = Tensor::randn(0f32, 0.3, c, &dev).unwrap();
                let (nwv, nbv) = (nw.to_vec1::<f32>().unwrap(), nb.to_vec1::<f32>().unwrap());
                let norm = ChannelNorm {
                    weight: &nwv,
                    bias: &nbv,
                    eps: 1e-6,
                };
                let normed =
                    channel_layer_norm(Kernels::Fast, &z, (&nwv, &nw), (&nbv, &nb), 1e-6).unwrap();
                for (with_norm, input) in [(false, &z), (true, &normed)] {
                    let got = mlp_residual(
                        &z,
                        &x,
                        with_norm.then_some(norm),
                        (&w1, &b1v),
                        (&w2, &b2v),
                        Act::GeluErf,
                    )
                    .unwrap();
                    let hidden = conv2d(
                        Kernels::Fast,
                        input,
                        &w1,
                        g,
                        Some((&b1v, &b1)),
                        None,
                        Act::GeluErf,
                    )
                    .unwrap();
                    let want = conv2d(
                        Kernels::Fast,
                        &hidden,
                        &w2,
                        g,
                        Some((&b2v, &b2)),
                        Some(&x),
                        Act::None,
                    )
                    .unwrap();
                    let what = format!(
                        "{threads} threads, [{n}, {c}, {h}, {w}], hidden {d}, norm {with_norm}"
                    );
                    assert_within_1e5_of_scale(&what, &want, &got);
                }
            }
        });
    }
}

/// Issue 9: the ResNet stem's 3x3 stride-2 max pool (CPU kernel) against candle's pool over an
/// edge-replicated copy, at even, odd and tiny sizes: exactly equal (a maximum has no rounding).
#[test]
fn cpu_max_pool_equals_candle_issue_9() {
    use candle_core::{Device, Tensor};
    for (h, w) in [(8, 8), (9, 7), (1, 1), (2, 3), (112, 112)] {
        let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
        let got =
            ckpt::models::cpu_conv::max_pool_3x3_s2_p1(ckpt::models::Kernels::Fast, &x).unwrap();
        let want = x
            .pad_with_same(2, 1, 1)
            .unwrap()
            .pad_with_same(3, 1, 1)
            .unwrap()
            .max_pool2d_with_stride(3, 2)
            .unwrap();
        assert_eq!(got.dims(), want.dims(), "{h}x{w}");
        let (g, w_) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(g, w_, "{h}x{w}");
    }
}

/// Issue 14: one process holds a frozen model on the fast kernels and a trainable copy on
/// candle's differentiable ops (as distillation will); the trainable copy runs FixRes's modes
/// (every BN in eval but the last, which trains) and gradients reach exactly the parameters
/// built as `Var`s.
#[test]
fn frozen_and_trainable_models_side_by_side_issue_14() {
    use ckpt::checkpoint::Checkpoint;
    use ckpt::models::{BnMode, BuildOptions, Ctx, Kernels};
    let ck = Checkpoint::open(fixture("tiny/epoch_10.safetensors"), &Default::default()).unwrap();
    let dev = candle_core::Device::Cpu;
    let frozen = Model::load(&ck, None, &dev).unwrap();
    let pick = |p: &str| p.starts_with("fc.");
    let trainable = Model::load_with(
        &ck,
        None,
        &dev,
        &BuildOptions {
            trainable: Some(&pick),
            ..BuildOptions::default()
        },
    )
    .unwrap()
    .with_kernels(Kernels::Candle);
    let names: Vec<&str> = trainable
        .trainable()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["fc.weight", "fc.bias"]);
    let io = Checkpoint::open(
        fixture("zoo/tiny_resnet_io.safetensors"),
        &Default::default(),
    )
    .unwrap();
    let x = ckpt::eval::read_input_batch(&io, "input", &frozen).unwrap();

    // Eval mode: the two kernels agree.
    let a = frozen.forward(&x, &mut Ctx::eval()).unwrap();
    let b = trainable.forward(&x, &mut Ctx::eval()).unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff <= 1e-5 * scale,
        "fast and candle kernels: {diff} of {scale}"
    );

    // FixRes: the last BN trains, the rest stay in eval.
    let last = trainable.bn.len() - 1;
    let mut modes = vec![BnMode::Eval; trainable.bn.len()];
    modes[last] = BnMode::Train;
    let before: Vec<Vec<f32>> = trainable
        .bn
        .iter()
        .map(|l| l.running().mean.clone())
        .collect();
    let mut ctx = Ctx {
        layer_modes: Some(&modes),
        ..Ctx::default()
    };
    let y = trainable.forward(&x, &mut ctx).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in trainable.trainable() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}");
    }
    for (i, l) in trainable.bn.iter().enumerate() {
        let r = l.running();
        assert_eq!(r.batches, u64::from(i == last), "{}", l.prefix);
        assert_eq!(r.mean != before[i], i == last, "{}", l.prefix);
    }
    // The frozen model shares nothing with the trained one.
    assert!(frozen.bn.iter().all(|l| l.running().batches == 0));
    assert!(frozen.trainable().is_empty());
}
