//! The test harness: each test gets its own temporary folder and runs the real `ckpt` binary;
//! a failed expectation dumps the command, its status, stdout and stderr.

#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// The four f32 snapshots, in natural (training) order.
pub fn snapshots() -> Vec<PathBuf> {
    [1, 2, 5, 10]
        .iter()
        .map(|e| fixture(&format!("tiny/epoch_{e}.safetensors")))
        .collect()
}

pub struct Run {
    pub cmdline: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn dump(&self) -> String {
        format!(
            "command: {}\nstatus: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }

    /// Asserts success and returns self.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "expected success\n{}", self.dump());
        self
    }

    /// Asserts a clean failure: exit 1, no panic, and (when run with -q) exactly one line of
    /// error that starts with `ckpt: ` and contains every one of `needles`.
    pub fn fails_with(self, needles: &[&str]) -> Run {
        assert_eq!(
            self.code,
            Some(1),
            "expected exit status 1\n{}",
            self.dump()
        );
        assert!(
            !self.stderr.contains("panicked"),
            "panicked\n{}",
            self.dump()
        );
        let last = self.stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("ckpt: "),
            "error line should start with 'ckpt: '\n{}",
            self.dump()
        );
        for n in needles {
            assert!(
                last.contains(n),
                "error should mention {n:?}\n{}",
                self.dump()
            );
        }
        if self.cmdline.contains(" -q") {
            assert_eq!(
                self.stderr.trim_end().lines().count(),
                1,
                "expected one line\n{}",
                self.dump()
            );
        }
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON: {e}\n{}", self.dump()))
    }
}

/// A temporary folder with helpers to run ckpt in it.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("ckpt-test-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs ckpt with `args` in this folder.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Run {
        self.run_env(args, &[])
    }

    pub fn run_env<S: AsRef<std::ffi::OsStr>>(&self, args: &[S], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckpt"));
        // Keep the digest cache inside the test's folder, away from the user's.
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("CKPT_CACHE_DIR", self.path(".cache"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("running ckpt");
        Run {
            cmdline: cmdline(args),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts ckpt with `args` in this folder, its output piped.
    fn spawn<S: AsRef<std::ffi::OsStr>>(&self, args: &[S], env: &[(&str, &Path)]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckpt"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("CKPT_CACHE_DIR", self.path(".cache"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("starting ckpt")
    }

    /// Runs ckpt with `args`, stopped once where its inputs are open and its first output file
    /// exists (ckpt's test-only `CKPT_TEST_PAUSE_AFTER_OPEN` hook, through a FIFO): `while_paused`
    /// runs then, and ckpt goes on when it returns. Panics if ckpt ends without stopping there.
    pub fn run_paused<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        while_paused: impl FnOnce(),
    ) -> Run {
        self.run_paused_at("opened", args, |_| while_paused())
    }

    /// Runs ckpt with `args`, stopped at `point` of its run (see `ckpt::report::test_pause`);
    /// `while_paused` gets the process while it is stopped there, then it goes on.
    pub fn run_paused_at<S: AsRef<std::ffi::OsStr>>(
        &self,
        point: &str,
        args: &[S],
        while_paused: impl FnOnce(&mut Child),
    ) -> Run {
        let fifo = self.path(".pause");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let spec = format!("{point}:{}", fifo.display());
        let mut child = self.spawn(args, &[("CKPT_TEST_PAUSE", Path::new(&spec))]);
        // A non-blocking open for writing succeeds once ckpt has the FIFO open for reading.
        let writer = loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => panic!("{}: {e}", fifo.display()),
            }
            if child.try_wait().unwrap().is_some() {
                let run = finish(args, child);
                panic!("ckpt ended before it paused\n{}", run.dump());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        while_paused(&mut child);
        drop(writer);
        let run = finish(args, child);
        std::fs::remove_file(&fifo).unwrap();
        run
    }

    /// Runs ckpt with `args` and returns its peak resident memory in bytes, as the binary
    /// reports it under `CKPT_REPORT_PEAK_RSS` (its own VmHWM; the report line is taken out of
    /// stderr). A parent's `wait4` would not do: `ru_maxrss` keeps the high-water mark of the
    /// process image `exec` replaced, here the test runner's. Fails, never skips, when the
    /// figure is missing.
    pub fn run_measured<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> (Run, u64) {
        let mut run = self.run_env(args, &[(ckpt::report::PEAK_RSS_ENV, "1")]);
        let mut kb = None;
        run.stderr = run
            .stderr
            .lines()
            .filter(|l| !l.starts_with("ckpt: allocator cache "))
            .filter(|l| match l.strip_prefix("ckpt: peak resident memory ") {
                Some(rest) => {
                    kb = rest.strip_suffix(" kB").and_then(|n| n.parse::<u64>().ok());
                    false
                }
                None => true,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let kb = kb.unwrap_or_else(|| panic!("no peak memory report: {}", run.dump()));
        (run, kb * 1024)
    }

    /// Names of the files in the folder (hidden ones included, the digest cache excluded).
    pub fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".cache")
            .collect();
        v.sort();
        v
    }

    /// Copies fixtures into the folder, returning the copies' paths.
    pub fn copy_in(&self, files: &[PathBuf]) -> Vec<PathBuf> {
        files
            .iter()
            .map(|f| {
                let to = self.path(&f.file_name().unwrap().to_string_lossy());
                std::fs::copy(f, &to).unwrap();
                to
            })
            .collect()
    }
}

fn cmdline<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    std::iter::once("ckpt".to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits for a spawned ckpt and collects what it printed.
fn finish<S: AsRef<std::ffi::OsStr>>(args: &[S], child: Child) -> Run {
    let out = child.wait_with_output().expect("waiting for ckpt");
    Run {
        cmdline: cmdline(args),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A tensor as read back by the `safetensors` crate (an implementation independent of ours).
#[derive(Clone, Debug, PartialEq)]
pub struct T {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn read_st(path: &Path) -> HashMap<String, T> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                T {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect()
}

pub fn read_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

pub fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn as_f64(t: &T) -> Vec<f64> {
    match t.dtype {
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => t
            .data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        Dtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        d => panic!("not a float tensor: {d:?}"),
    }
}

pub fn as_i64(t: &T) -> Vec<i64> {
    assert_eq!(t.dtype, Dtype::I64);
    t.data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Asserts that every f32 tensor of `got` is within one f32 step (ulp) of the f32-rounded
/// reference `want`, and that integer tensors are equal. Returns the largest relative error.
pub fn assert_f32_within_one_ulp(got: &HashMap<String, T>, want: &HashMap<String, T>) -> f64 {
    assert_eq!(sorted_keys(got), sorted_keys(want), "key sets differ");
    let mut worst: f64 = 0.0;
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.shape, w.shape, "{k}: shape");
        assert_eq!(g.dtype, w.dtype, "{k}: dtype");
        if w.dtype != Dtype::F32 {
            assert_eq!(g.data, w.data, "{k}: integer tensor differs");
            continue;
        }
        for (i, (a, b)) in g
            .data
            .chunks_exact(4)
            .zip(w.data.chunks_exact(4))
            .enumerate()
        {
            let a = f32::from_le_bytes(a.try_into().unwrap());
            let b = f32::from_le_bytes(b.try_into().unwrap());
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(
                ulps <= 1 || a == b,
                "{k}[{i}]: {a} vs reference {b} ({ulps} ulps apart)"
            );
            if b != 0.0 {
                worst = worst.max(((a - b) / b).abs() as f64);
            }
        }
    }
    assert!(worst <= 1e-6, "relative error {worst} over 1e-6");
    worst
}

pub fn sorted_keys<V>(m: &HashMap<String, V>) -> Vec<String> {
    let mut k: Vec<String> = m.keys().cloned().collect();
    k.sort();
    k
}

pub fn sha256(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

/// Checks generated files (man pages, completion scripts) against what the code generates now,
/// or rewrites them when `CKPT_UPDATE_MAN=1`; the failure names the stale files and the command
/// that regenerates them.
pub fn check_generated(folder: &str, files: Vec<(String, Vec<u8>)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(folder);
    let update = std::env::var_os("CKPT_UPDATE_MAN").is_some();
    let mut stale = Vec::new();
    for (name, content) in files {
        let path = dir.join(&name);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &content).unwrap();
        } else if std::fs::read(&path).ok().as_deref() != Some(content.as_slice()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "{folder}/ changed, please run `CKPT_UPDATE_MAN=1 cargo test --test tests man completions`: {}",
        stale.join(", ")
    );
}

/// The key/shape lists of real-size models that a fixture script wrote (on PyTorch's meta
/// device, no weights) to `fixtures/expected/NAME`, a gzipped JSON map of model name to list.
pub fn real_size_shapes(name: &str) -> std::collections::BTreeMap<String, ckpt::models::Shapes> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(fixture(&format!("expected/{name}"))).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let v: std::collections::BTreeMap<String, Vec<(String, Vec<usize>)>> =
        serde_json::from_str(&text).unwrap();
    v.into_iter()
        .map(|(k, list)| (k, list.into_iter().collect()))
        .collect()
}

/// Runs `ckpt logits MODEL --input IO` on the CPU (with `env`), checks that stderr names the
/// architecture with each of `words`, and returns the largest difference from the `logits` IO
/// holds (PyTorch's), relative to the largest of them.
pub fn logits_difference(model: &Path, io: &Path, env: &[(&str, &str)], words: &[&str]) -> f64 {
    logits_difference_arch(model, io, None, env, words)
}

/// [`logits_difference`] with `--arch ARCH` when given.
pub fn logits_difference_arch(
    model: &Path,
    io: &Path,
    arch: Option<&str>,
    env: &[(&str, &str)],
    words: &[&str],
) -> f64 {
    let d = TestDir::new();
    let (model_s, io_s) = (p(model), p(io));
    let mut args = vec![
        "logits",
        &model_s,
        "--input",
        &io_s,
        "-o",
        "out.safetensors",
        "--device",
        "cpu",
    ];
    if let Some(a) = arch {
        args.extend(["--arch", a]);
    }
    let r = d.run_env(&args, env).ok();
    for w in words {
        assert!(
            r.stderr.contains(w),
            "{}: architecture should be reported as {w:?}: {}",
            model.display(),
            r.stderr
        );
    }
    let got = read_st(&d.path("out.safetensors"));
    let want = read_st(io);
    assert_eq!(
        got["logits"].shape,
        want["logits"].shape,
        "{}",
        model.display()
    );
    let (g, w) = (as_f64(&got["logits"]), as_f64(&want["logits"]));
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
    g.iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Calibrate mode of the model in `model` against PyTorch's (`logits_calibrate` and each BN
/// layer's `bn.<key>.mean`/`.var` in `io`, made with BN in train mode and everything else in
/// eval), on both kernels, within `tolerance` of the largest value.
pub fn check_calibrate(model: &Path, io: &Path, tolerance: f64) {
    use ckpt::checkpoint::Checkpoint;
    use ckpt::models::{BatchStats, BnObserver, Ctx, Model};
    struct Record(Vec<(usize, BatchStats)>);
    impl BnObserver for Record {
        fn observe(&mut self, layer: usize, stats: BatchStats) -> candle_core::Result<()> {
            self.0.push((layer, stats));
            Ok(())
        }
    }
    let name = model.display();
    let ck = Checkpoint::open(model, &Default::default()).unwrap();
    let reference = read_st(io);
    for kernels in [ckpt::models::Kernels::Fast, ckpt::models::Kernels::Candle] {
        let m = Model::load(&ck, None, &candle_core::Device::Cpu)
            .unwrap()
            .with_kernels(kernels);
        let io_ck = Checkpoint::open(io, &Default::default()).unwrap();
        let x = ckpt::eval::read_input_batch(&io_ck, "input", &m).unwrap();
        let mut rec = Record(Vec::new());
        let logits = m.forward(&x, &mut Ctx::calibrate(&mut rec)).unwrap();
        let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let want = as_f64(&reference["logits_calibrate"]);
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < tolerance * scale,
                "{name} {kernels:?}: {g} vs {w}"
            );
        }
        let in_reference = reference.keys().filter(|k| k.ends_with(".mean")).count();
        assert_eq!(
            rec.0.len(),
            in_reference,
            "{name}: every BN layer reports once"
        );
        assert_eq!(rec.0.len(), m.bn_layers.len(), "{name}");
        for (i, (layer, stats)) in rec.0.iter().enumerate() {
            assert_eq!(*layer, i, "{name}: reports come in forward order");
            let prefix = &m.bn_layers[i];
            let mean = as_f64(&reference[&format!("bn.{prefix}.mean")]);
            let var = as_f64(&reference[&format!("bn.{prefix}.var")]);
            let (ms, vs) = (
                mean.iter().fold(0f64, |a, b| a.max(b.abs())),
                var.iter().fold(0f64, |a, b| a.max(b.abs())),
            );
            for c in 0..mean.len() {
                assert!(
                    (stats.mean[c] as f64 - mean[c]).abs() <= tolerance * ms.max(1e-3),
                    "{name} {kernels:?} {prefix} mean[{c}]: {} vs {}",
                    stats.mean[c],
                    mean[c]
                );
                assert!(
                    (stats.var[c] as f64 - var[c]).abs() <= tolerance * vs.max(1e-3),
                    "{name} {kernels:?} {prefix} var[{c}]: {} vs {}",
                    stats.var[c],
                    var[c]
                );
            }
        }
    }
}
