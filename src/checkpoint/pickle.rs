//! A restricted pickle reader for what `torch.save` writes: plain containers, numbers, strings,
//! and tensors rebuilt from storages. It never runs code and never imports anything.
//!
//! Why our own rather than candle's `pickle` module: candle's accepts a one-level key only,
//! returns an empty list (no error) for a wrapper dict, prints warnings for integer storages, and
//! has no notion of which globals are safe. Here every `GLOBAL` is one of three kinds:
//!
//! - names whose meaning we implement ourselves (tensor rebuilds, storage types, `OrderedDict`,
//!   `set`), and a few data-only classes that training scripts put beside the weights
//!   (`argparse.Namespace`, numpy scalars, `torch.Size`), which become inert placeholders;
//! - names whose only use in a pickle is to run a command or code when it is loaded (`os.system`,
//!   `subprocess`, `eval`, `getattr`, ...: the payloads of pickle exploits). A file that refers
//!   to one is refused whole, wherever the reference sits: it is an attack, not a checkpoint;
//! - any other class or function (an OmegaConf `DictConfig`, a `pathlib.PosixPath`, a training
//!   script's own class): an inert placeholder that keeps only its name (listed by
//!   [`Pickle::placeholders`]). It is never imported, constructed or called; a "call" of it
//!   yields another placeholder, and the state it would be given is dropped. So a config object
//!   beside the weights does not block reading them, where `torch.load(weights_only=True)`
//!   refuses the whole file and `weights_only=False` runs whatever the file names. Whether a
//!   placeholder is acceptable is the caller's decision: inside a state dict it is not (see
//!   `pth`).
//!
//! The second list is a signal, not the safety: nothing is run whichever list a name is on.
//!
//! Containers live in an arena and values refer to them by index. Nothing is recursive: a
//! maliciously deep nesting neither overflows the stack while reading nor when dropped, and every
//! length a pickle claims is checked against the bytes that remain before anything is allocated.
//!
//! Short opcodes can copy whole containers (`set(x)` or `OrderedDict(x)` on a memoised list, a
//! call that reads a long argument tuple), so a small pickle could make us copy values without
//! end. Every value copied into or out of a container counts against a budget proportional to
//! the pickle's length (`COPIES_PER_BYTE`), which keeps time and memory linear in the input.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use anyhow::{bail, Context, Result};

use super::dtype::DType;

/// Deepest container nesting we accept; real checkpoints nest a handful of levels.
const MAX_DEPTH: u32 = 1000;

/// Values a pickle may copy into or out of containers per byte of pickle (plus a small constant).
/// What torch.save writes stays below 3: every value it stores is pushed by an opcode of its own.
const COPIES_PER_BYTE: usize = 8;

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (never needed for tensors).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// An object in the arena.
    Obj(usize),
}

#[derive(Clone, Debug)]
pub enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(DType),
    Set,
    FrozenSet,
    CodecsEncode,
    /// A data-only class whose instances we keep as opaque placeholders.
    Inert(String),
    /// Any other class or function, by name: never imported or called (see the module doc).
    Placeholder(String),
}

#[derive(Clone, Debug)]
pub struct StorageRef {
    pub dtype: DType,
    pub key: String,
    /// Elements in the storage, as the pickle claims.
    pub numel: usize,
}

#[derive(Clone, Debug)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// Offset into the storage, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Debug)]
pub enum Obj {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// An instance of a known data-only class ([`Global::Inert`]).
    Opaque(String),
    /// What a "call" of a [`Global::Placeholder`] stands for: the class or function name only.
    Placeholder(String),
}

/// The object graph of one pickle.
pub struct Pickle {
    pub objs: Vec<Obj>,
    depth: Vec<u32>,
    pub root: Value,
    /// The names left as placeholders, each once, in order of first appearance.
    pub placeholders: Vec<String>,
}

impl Pickle {
    pub fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => Some(&self.objs[*i]),
            _ => None,
        }
    }

    pub fn dict(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match self.obj(v)? {
            Obj::Dict(items) => Some(items),
            _ => None,
        }
    }

    pub fn tensor(&self, v: &Value) -> Option<&TensorRef> {
        match self.obj(v)? {
            Obj::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// A short description of a value's kind, for error messages.
    pub fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) | Value::BigInt => "an integer".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Obj(i) => match &self.objs[*i] {
                Obj::List(_) => "a list".into(),
                Obj::Tuple(_) => "a tuple".into(),
                Obj::Dict(_) => "a dict".into(),
                Obj::Set(_) => "a set".into(),
                Obj::Global(Global::Placeholder(c)) => format!(
                    "a reference to {c} (a class or function ckpt does not read; never imported)"
                ),
                Obj::Global(g) => format!("a reference to {g:?}"),
                Obj::Storage(_) => "a bare storage".into(),
                Obj::Tensor(_) => "a tensor".into(),
                Obj::Opaque(c) => format!("a {c} object"),
                Obj::Placeholder(c) => {
                    format!("a {c} object (a class ckpt does not read; never constructed)")
                }
            },
        }
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let storage = |d| Ok(Global::Storage(d));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            Ok(Global::RebuildParameter)
        }
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::I32),
        ("torch", "ShortStorage") => storage(DType::I16),
        ("torch", "CharStorage") => storage(DType::I8),
        ("torch", "ByteStorage") | ("torch", "UntypedStorage") => storage(DType::U8),
        ("torch", "BoolStorage") => storage(DType::Bool),
        ("builtins" | "__builtin__", "set") => Ok(Global::Set),
        ("builtins" | "__builtin__", "frozenset") => Ok(Global::FrozenSet),
        ("_codecs", "encode") => Ok(Global::CodecsEncode),
        ("argparse", "Namespace")
        | ("numpy" | "numpy.core.multiarray" | "numpy._core.multiarray", "scalar")
        | ("numpy", "dtype")
        | ("numpy" | "numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct")
        | ("numpy", "ndarray")
        | ("torch", "device")
        | ("torch", "Size") => Ok(Global::Inert(format!("{module}.{name}"))),
        _ if runs_code(module, name) => bail!(
            "pickle refers to {module}.{name}, which runs a command or code when the file is loaded; ckpt never runs code from a pickle and refuses files that would"
        ),
        _ => Ok(Global::Placeholder(format!("{module}.{name}"))),
    }
}

/// Modules whose every name runs code, touches files or processes, or loads more pickles.
const CODE_MODULES: [&str; 23] = [
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "runpy",
    "importlib",
    "shutil",
    "socket",
    "pty",
    "code",
    "codeop",
    "ctypes",
    "pickle",
    "_pickle",
    "marshal",
    "multiprocessing",
    "webbrowser",
    "pdb",
    "timeit",
    "operator",
    "io",
    "_io",
];

/// Builtins that run code or reach objects' attributes (the rest, such as `dict` or `int`, are
/// types a pickle may name as data).
const CODE_BUILTINS: [&str; 18] = [
    "eval",
    "exec",
    "execfile",
    "compile",
    "open",
    "file",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "globals",
    "locals",
    "vars",
    "input",
    "raw_input",
    "breakpoint",
    "apply",
    "reload",
];

/// Whether `module.name` is there to run something when the pickle is loaded (`types` makes
/// functions and code objects; its `SimpleNamespace` is a plain record).
fn runs_code(module: &str, name: &str) -> bool {
    let top = module.split('.').next().unwrap_or(module);
    CODE_MODULES.contains(&top)
        || (matches!(module, "builtins" | "__builtin__") && CODE_BUILTINS.contains(&name))
        || (module == "types" && name != "SimpleNamespace")
        || (module == "torch" && name == "load")
        || ["torch.hub", "torch.jit", "torch.serialization"]
            .iter()
            .any(|m| module == *m || module.strip_prefix(m).is_some_and(|r| r.starts_with('.')))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objs: Vec<Obj>,
    depth: Vec<u32>,
    /// For each dict in the arena, where each string key sits in it, so that a repeated key is
    /// found without a scan (a scan per key is quadratic in a dict's size).
    dict_keys: HashMap<usize, HashMap<Rc<str>, usize>>,
    /// Values copied so far, and the most the pickle's length allows.
    copies: usize,
    max_copies: usize,
    /// Names left as placeholders, in order, and the same as a set.
    placeholders: Vec<String>,
    placeholder_set: HashSet<String>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            bail!(
                "pickle is truncated: {n} bytes wanted at offset {}, {} left",
                self.pos,
                self.data.len() - self.pos
            );
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len(&mut self, n: u64) -> Result<usize> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.pos);
        n.with_context(|| format!("pickle claims a length past its end at offset {}", self.pos))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("pickle is truncated: unterminated text argument")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).context("pickle text argument is not UTF-8")
    }
    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            bail!("pickle pops from an empty stack at offset {}", self.pos);
        }
        Ok(self.stack.pop().unwrap())
    }
    fn top(&self) -> Result<&Value> {
        self.stack.last().context("pickle reads an empty stack")
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().context("pickle has no mark to pop to")?;
        if m > self.stack.len() {
            bail!("pickle mark is above the stack");
        }
        Ok(self.stack.split_off(m))
    }
    fn count_copies(&mut self, n: usize) -> Result<()> {
        self.copies = self.copies.saturating_add(n);
        if self.copies > self.max_copies {
            bail!(
                "pickle copies more than {} values, too many for its {} bytes (a pickle bomb?)",
                self.max_copies,
                self.data.len()
            );
        }
        Ok(())
    }
    fn new_obj(&mut self, o: Obj, children: &[Value]) -> Result<Value> {
        self.count_copies(children.len())?;
        let d = children
            .iter()
            .map(|c| match c {
                Value::Obj(i) => self.depth[*i] + 1,
                _ => 1,
            })
            .max()
            .unwrap_or(1);
        self.check_depth(d)?;
        self.objs.push(o);
        self.depth.push(d);
        Ok(Value::Obj(self.objs.len() - 1))
    }
    fn check_depth(&self, d: u32) -> Result<()> {
        if d > MAX_DEPTH {
            bail!("pickle nests containers more than {MAX_DEPTH} deep (a pickle bomb?)");
        }
        Ok(())
    }
    fn deepen(&mut self, target: usize, children: &[Value]) -> Result<()> {
        for c in children {
            if let Value::Obj(i) = c {
                let d = self.depth[*i] + 1;
                if d > self.depth[target] {
                    self.check_depth(d)?;
                    self.depth[target] = d;
                }
            }
        }
        Ok(())
    }
    fn container(&self, v: &Value) -> Result<usize> {
        match v {
            Value::Obj(i) => Ok(*i),
            _ => bail!("pickle adds items to a value that is not a container"),
        }
    }
    fn push_items(&mut self, target: &Value, items: Vec<Value>) -> Result<()> {
        self.count_copies(items.len())?;
        let i = self.container(target)?;
        self.deepen(i, &items)?;
        match &mut self.objs[i] {
            Obj::List(v) | Obj::Set(v) => v.extend(items),
            Obj::Opaque(_) | Obj::Placeholder(_) => {}
            _ => bail!("pickle appends to something that is not a list"),
        }
        Ok(())
    }
    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<()> {
        self.count_copies(items.len())?;
        if items.len() % 2 != 0 {
            bail!("pickle sets a dict item without a value");
        }
        let i = self.container(target)?;
        self.deepen(i, &items)?;
        match &mut self.objs[i] {
            Obj::Dict(d) => {
                let index = self.dict_keys.entry(i).or_default();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    // A repeated key replaces the earlier value, as in Python.
                    if let Value::Str(ks) = &k {
                        if let Some(&slot) = index.get(ks) {
                            d[slot].1 = v;
                            continue;
                        }
                        index.insert(ks.clone(), d.len());
                    }
                    d.push((k, v));
                }
            }
            Obj::Opaque(_) | Obj::Placeholder(_) => {}
            _ => bail!("pickle sets items on something that is not a dict"),
        }
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str) -> Result<Value> {
        let g = resolve_global(module, name)?;
        if let Global::Placeholder(n) = &g {
            if self.placeholder_set.insert(n.clone()) {
                self.placeholders.push(n.clone());
            }
        }
        self.new_obj(Obj::Global(g), &[])
    }
    fn as_global(&self, v: &Value) -> Result<Global> {
        match v {
            Value::Obj(i) => match &self.objs[*i] {
                Obj::Global(g) => Ok(g.clone()),
                // Calling what a placeholder stood for gives another placeholder.
                Obj::Placeholder(n) => Ok(Global::Placeholder(n.clone())),
                _ => bail!("pickle calls something that is not a known function"),
            },
            _ => bail!("pickle calls something that is not a known function"),
        }
    }
    fn tuple_items(&mut self, v: &Value) -> Result<Vec<Value>> {
        let n = match v {
            Value::Obj(i) => match &self.objs[*i] {
                Obj::Tuple(t) | Obj::List(t) => t.len(),
                _ => 0,
            },
            _ => 0,
        };
        self.count_copies(n)?;
        match v {
            Value::Obj(i) => match &self.objs[*i] {
                Obj::Tuple(t) | Obj::List(t) => Ok(t.clone()),
                _ => bail!("pickle passes arguments that are not a tuple"),
            },
            _ => bail!("pickle passes arguments that are not a tuple"),
        }
    }
    fn usize_list(&mut self, v: &Value, what: &str) -> Result<Vec<usize>> {
        self.tuple_items(v)?
            .iter()
            .map(|x| match x {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => bail!("tensor {what} holds something that is not a non-negative integer"),
            })
            .collect()
    }

    fn call(&mut self, callable: &Value, args: &Value) -> Result<Value> {
        let g = self.as_global(callable)?;
        let a = self.tuple_items(args)?;
        match g {
            Global::OrderedDict => {
                let d = self.new_obj(Obj::Dict(Vec::new()), &[])?;
                if let Some(items) = a.first() {
                    // OrderedDict([(k, v), ...])
                    let mut flat = Vec::new();
                    for pair in self.tuple_items(items)? {
                        flat.extend(self.tuple_items(&pair)?);
                    }
                    self.set_items(&d, flat)?;
                }
                Ok(d)
            }
            Global::Set | Global::FrozenSet => {
                let items = match a.first() {
                    Some(v) => self.tuple_items(v)?,
                    None => Vec::new(),
                };
                self.new_obj(Obj::Set(items.clone()), &items)
            }
            Global::CodecsEncode => match a.first() {
                // Protocol 2 writes bytes as _codecs.encode(text, "latin1").
                Some(Value::Str(s)) => {
                    self.count_copies(s.len())?;
                    Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()))
                }
                _ => bail!("pickle calls _codecs.encode with unexpected arguments"),
            },
            Global::RebuildTensor => {
                if a.len() < 4 {
                    bail!(
                        "pickle rebuilds a tensor with {} arguments, expected at least 4",
                        a.len()
                    );
                }
                let storage = match &a[0] {
                    Value::Obj(i) => match &self.objs[*i] {
                        Obj::Storage(s) => s.clone(),
                        _ => bail!("pickle rebuilds a tensor from something that is not a storage"),
                    },
                    _ => bail!("pickle rebuilds a tensor from something that is not a storage"),
                };
                let offset = match a[1] {
                    Value::Int(n) if n >= 0 => n as usize,
                    _ => bail!("pickle rebuilds a tensor with a bad storage offset"),
                };
                let shape = self.usize_list(&a[2], "size")?;
                let stride = self.usize_list(&a[3], "stride")?;
                if shape.len() != stride.len() {
                    bail!("pickle rebuilds a tensor whose size and stride differ in length");
                }
                self.new_obj(
                    Obj::Tensor(TensorRef {
                        storage,
                        offset,
                        shape,
                        stride,
                    }),
                    &[],
                )
            }
            Global::RebuildParameter => match a.first() {
                Some(v @ Value::Obj(i)) if matches!(self.objs[*i], Obj::Tensor(_)) => Ok(v.clone()),
                _ => bail!("pickle rebuilds a parameter from something that is not a tensor"),
            },
            Global::Storage(_) => bail!("pickle calls a storage type directly"),
            Global::Inert(name) => self.new_obj(Obj::Opaque(name), &[]),
            Global::Placeholder(name) => self.new_obj(Obj::Placeholder(name), &[]),
        }
    }

    fn persistent_load(&mut self, pid: &Value) -> Result<Value> {
        let t = self.tuple_items(pid)?;
        match t.as_slice() {
            [Value::Str(kind), ty, Value::Str(key), _location, Value::Int(numel)]
                if &**kind == "storage" =>
            {
                let dtype = match self.as_global(ty)? {
                    Global::Storage(d) => d,
                    _ => bail!("pickle names a storage of an unknown type"),
                };
                if *numel < 0 {
                    bail!("pickle names a storage with a negative size");
                }
                self.new_obj(
                    Obj::Storage(StorageRef {
                        dtype,
                        key: key.to_string(),
                        numel: *numel as usize,
                    }),
                    &[],
                )
            }
            _ => bail!("pickle has a persistent id that is not a torch storage"),
        }
    }

    fn int_from_le(bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        if bytes.len() > 8 {
            let neg = bytes[bytes.len() - 1] & 0x80 != 0;
            let ext = if neg { 0xff } else { 0 };
            if bytes[8..].iter().any(|&b| b != ext) {
                return Value::BigInt;
            }
        }
        let mut buf = if bytes[bytes.len() - 1] & 0x80 != 0 {
            [0xffu8; 8]
        } else {
            [0u8; 8]
        };
        let n = bytes.len().min(8);
        buf[..n].copy_from_slice(&bytes[..n]);
        Value::Int(i64::from_le_bytes(buf))
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => {
                    let v = self.new_obj(Obj::Dict(Vec::new()), &[])?;
                    self.stack.push(v)
                }
                b']' => {
                    let v = self.new_obj(Obj::List(Vec::new()), &[])?;
                    self.stack.push(v)
                }
                b')' => {
                    let v = self.new_obj(Obj::Tuple(Vec::new()), &[])?;
                    self.stack.push(v)
                }
                0x8f => {
                    let v = self.new_obj(Obj::Set(Vec::new()), &[])?;
                    self.stack.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Tuple(items.clone()), &items)?;
                    self.stack.push(v)
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.new_obj(Obj::Tuple(items.clone()), &items)?;
                    self.stack.push(v)
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::List(items.clone()), &items)?;
                    self.stack.push(v)
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Dict(Vec::new()), &[])?;
                    self.set_items(&v, items)?;
                    self.stack.push(v)
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Set(items.clone()), &items)?;
                    self.stack.push(v)
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'p' => {
                    let k: u32 = self
                        .line()?
                        .trim()
                        .parse()
                        .context("pickle PUT index is not a number")?;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' | b'j' | b'g' => {
                    let k = match op {
                        b'h' => self.u8()? as u32,
                        b'j' => self.u32()?,
                        _ => self
                            .line()?
                            .trim()
                            .parse()
                            .context("pickle GET index is not a number")?,
                    };
                    let v = self.memo.get(&k).cloned().with_context(|| {
                        format!("pickle reads memo entry {k}, which was never stored")
                    })?;
                    self.stack.push(v)
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?.clone();
                    self.set_items(&d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?.clone();
                    self.set_items(&d, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?.clone();
                    self.push_items(&l, vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let l = self.top()?.clone();
                    self.push_items(&l, items)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64))
                }
                b'I' | b'L' => {
                    let s = self.line()?.trim().trim_end_matches('L');
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => s.parse::<i64>().map(Value::Int).unwrap_or(Value::BigInt),
                    };
                    self.stack.push(v)
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Self::int_from_le(b))
                }
                0x8b => {
                    let n = self.u32()? as u64;
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    self.stack.push(Self::int_from_le(b))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'F' => {
                    let v = self
                        .line()?
                        .trim()
                        .parse()
                        .context("pickle float is not a number")?;
                    self.stack.push(Value::Float(v))
                }
                b'X' | 0x8c | 0x8d | b'T' | b'U' => {
                    let n = match op {
                        b'X' | b'T' => self.u32()? as u64,
                        0x8d => self.u64()?,
                        _ => self.u8()? as u64,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let s: Rc<str> = if matches!(op, b'T' | b'U') {
                        b.iter().map(|&c| c as char).collect::<String>().into()
                    } else {
                        std::str::from_utf8(b)
                            .context("pickle string is not UTF-8")?
                            .into()
                    };
                    self.stack.push(Value::Str(s))
                }
                b'V' | b'S' => {
                    let s = self.line()?;
                    let s = s.trim_matches(|c| c == '\'' || c == '"');
                    self.stack.push(Value::Str(s.into()))
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(b.into()))
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(module, name)?;
                    self.stack.push(v)
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let v = self.global(&m, &n)?;
                            self.stack.push(v)
                        }
                        _ => bail!("pickle STACK_GLOBAL without module and name strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(&f, &args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(&cls, &args)?;
                    self.stack.push(v)
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(&cls, &args)?;
                    self.stack.push(v)
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        bail!("pickle OBJ without a class");
                    }
                    let cls = items.remove(0);
                    let args = self.new_obj(Obj::Tuple(items.clone()), &items)?;
                    let v = self.call(&cls, &args)?;
                    self.stack.push(v)
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let cls = self.global(module, name)?;
                    let items = self.pop_mark()?;
                    let args = self.new_obj(Obj::Tuple(items.clone()), &items)?;
                    let v = self.call(&cls, &args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    // Object state (an OrderedDict's _metadata, a Namespace's fields): not needed.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.stack.push(v)
                }
                b'P' => bail!("pickle uses a text persistent id, which torch.save never writes"),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                _ => bail!("pickle opcode 0x{op:02x} at offset {at} is not supported"),
            }
        }
    }
}

/// Reads one pickle.
pub fn parse(data: &[u8]) -> Result<Pickle> {
    parse_with_budget(
        data,
        data.len()
            .saturating_mul(COPIES_PER_BYTE)
            .saturating_add(4096),
    )
}

fn parse_with_budget(data: &[u8], max_copies: usize) -> Result<Pickle> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objs: Vec::new(),
        depth: Vec::new(),
        dict_keys: HashMap::new(),
        copies: 0,
        max_copies,
        placeholders: Vec::new(),
        placeholder_set: HashSet::new(),
    };
    let root = m.run()?;
    Ok(Pickle {
        objs: m.objs,
        depth: m.depth,
        root,
        placeholders: m.placeholders,
    })
}

impl Pickle {
    /// Nesting depth of an object (1 for a flat container).
    pub fn depth_of(&self, v: &Value) -> u32 {
        match v {
            Value::Obj(i) => self.depth[*i],
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system() {
        // pickle.dumps of a __reduce__ that returns (os.system, ("echo hi",)), protocol 2
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let err = parse(p).err().unwrap().to_string();
        assert!(err.contains("posix.system"), "{err}");
    }

    /// `module.name()` as a protocol 2 pickle: GLOBAL, an empty argument tuple, REDUCE.
    fn call_of(module: &str, name: &str) -> Vec<u8> {
        let mut p = b"\x80\x02c".to_vec();
        p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        p.extend_from_slice(b")R.");
        p
    }

    #[test]
    fn names_that_run_code_are_refused_wherever_they_are() {
        for (m, n) in [
            ("builtins", "eval"),
            ("__builtin__", "getattr"),
            ("subprocess", "Popen"),
            ("os.path", "join"),
            ("nt", "system"),
            ("torch", "load"),
            ("torch.hub", "load"),
            ("torch.jit._serialization", "load"),
        ] {
            let err = parse(&call_of(m, n)).err().unwrap().to_string();
            assert!(err.contains(&format!("{m}.{n}")), "{err}");
            assert!(err.contains("never runs code"), "{err}");
        }
    }

    #[test]
    fn other_classes_are_placeholders_that_are_never_called() {
        for (m, n) in [
            ("pathlib", "PosixPath"),
            ("omegaconf.dictconfig", "DictConfig"),
            ("builtins", "dict"),
            ("torchvision", "load"),
        ] {
            let pk = parse(&call_of(m, n)).unwrap();
            assert!(
                matches!(pk.obj(&pk.root), Some(Obj::Placeholder(c)) if *c == format!("{m}.{n}"))
            );
            assert_eq!(pk.placeholders, [format!("{m}.{n}")]);
            assert!(pk.describe(&pk.root).contains("never constructed"));
        }
        // {"cfg": mod.Cls.__new__(mod.Cls) with state {"a": 1}, "again": mod.Cls()}: NEWOBJ, then
        // BUILD, whose state is dropped; the name is listed once.
        let p = b"\x80\x02}(X\x03\x00\x00\x00cfgcmod\nCls\nq\x00)\x81}X\x01\x00\x00\x00aK\x01sbX\x05\x00\x00\x00againh\x00)Ru.";
        let pk = parse(p).unwrap();
        let d = pk.dict(&pk.root).unwrap();
        assert_eq!(d.len(), 2);
        assert!(matches!(pk.obj(&d[0].1), Some(Obj::Placeholder(c)) if c == "mod.Cls"));
        assert_eq!(pk.placeholders, ["mod.Cls"]);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 5000));
        p.extend(std::iter::repeat_n(b'a', 4999));
        p.push(b'.');
        let err = parse(&p).err().unwrap().to_string();
        assert!(err.contains("deep"), "{err}");
    }

    /// The pickles of real torch.save files copy fewer than 3 values per byte, well inside
    /// [`COPIES_PER_BYTE`].
    #[test]
    fn real_checkpoints_are_within_the_copy_budget() {
        for f in ["tiny/epoch_10.pth", "tiny/train_epoch_10.pth.tar"] {
            let path = format!("{}/fixtures/{f}", env!("CARGO_MANIFEST_DIR"));
            let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
            let name = z
                .file_names()
                .map(|n| n.unwrap())
                .find(|n| n.ends_with("data.pkl"))
                .unwrap()
                .to_string();
            let mut pkl = Vec::new();
            std::io::Read::read_to_end(&mut z.by_name(&name).unwrap(), &mut pkl).unwrap();
            parse_with_budget(&pkl, 3 * pkl.len()).unwrap();
        }
    }

    /// `set(x)` called again and again on one memoised list of 10,000 items: a 20 KB pickle that
    /// would otherwise copy 16 million values.
    #[test]
    fn repeated_copies_of_a_memoised_list_are_refused() {
        let mut p = b"\x80\x02c__builtin__\nset\nq\x00](".to_vec();
        p.extend(std::iter::repeat_n(b'N', 10_000));
        p.extend_from_slice(b"eq\x01");
        for _ in 0..1600 {
            p.extend_from_slice(b"h\x00h\x01\x85R0");
        }
        p.push(b'.');
        let err = parse(&p).err().unwrap().to_string();
        assert!(err.contains("pickle bomb"), "{err}");
    }

    /// A dict of 50,000 distinct keys is read (in linear time), and a repeated key still replaces
    /// the earlier value.
    #[test]
    fn large_dict_is_read_in_linear_time() {
        let mut p = b"\x80\x02}(".to_vec();
        for i in 0..50_000 {
            let k = format!("{i:05}");
            p.extend_from_slice(&[0x8c, k.len() as u8]);
            p.extend_from_slice(k.as_bytes());
            p.push(b'N');
        }
        p.extend_from_slice(b"\x8c\x0500007K\x07u.");
        // No assertion on time (tests never make one); the quadratic version took minutes here.
        let pk = parse(&p).unwrap();
        let d = pk.dict(&pk.root).unwrap();
        assert_eq!(d.len(), 50_000);
        assert!(matches!(d[7].1, Value::Int(7)));
    }

    #[test]
    fn plain_dict() {
        // pickle.dumps({"a": 1, "b": [1.5]}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03G?\xf8\x00\x00\x00\x00\x00\x00au.";
        let pk = parse(p).unwrap();
        let d = pk.dict(&pk.root).unwrap();
        assert_eq!(d.len(), 2);
        assert!(matches!(d[0].1, Value::Int(1)));
    }
}
