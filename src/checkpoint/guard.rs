//! Inputs that change while ckpt reads them, and the cleanup of pending outputs when the process
//! has to stop.
//!
//! Checkpoints are memory-mapped, and a map is only as stable as its file. Users point ckpt at the
//! folder of a training run that is still going, whose trainer rewrites `last.pth` in place every
//! epoch (`torch.save` truncates the file it writes). Reading a mapped page past the new end of
//! the file raises SIGBUS, whose default action kills the process ("Bus error") and leaves the
//! outputs' temporary files behind; a rewrite that keeps the size raises nothing, and an average
//! would silently mix old and new weights. This module turns both into a one-line error naming
//! the file, with no output left:
//!
//! - Every map is a [`MappedInput`], whose address range is in a fixed-size, lock-free table while
//!   it lives. A SIGBUS handler, installed with the first map, looks the faulting address up in
//!   that table; inside a mapped input it writes `ckpt: FILE: changed while being read: another
//!   process is writing it?`, unlinks every pending output and exits with status 1. The handler
//!   does only async-signal-safe work: atomic loads, write(2), unlink(2) and _exit(2), on strings
//!   formatted when the map and the outputs were made. A fault anywhere else (a bug, not a file
//!   that changed) removes the pending outputs too, then goes on to the handler that was there
//!   before (Rust's stack-overflow report, or the default action). When the kernel itself reads
//!   the vanished page (a tensor copied from the map straight into an output with pwrite(2)),
//!   there is no signal: the call fails with EFAULT, and the writer reports it as the same error
//!   ([`input_holding`] names the file).
//! - Each input's identity (device, inode, size, modification time in ns) is recorded from the
//!   open descriptor when it is mapped, and [`check_inputs`] compares it again before any output
//!   is committed (the writer calls it): a rewrite in place, even one that keeps the size, changes
//!   the modification time, and the output is discarded. The descriptor is checked, not the path:
//!   a trainer that saves to a new file and renames it over the old name does not disturb a
//!   reader, which keeps reading the file it opened, so that is not an error.
//! - Pending outputs ([`PendingFile`]: temporary files, intermediate files) are kept in a second
//!   lock-free table, as C strings made in advance, and removed by the SIGBUS handler above and by
//!   the SIGINT/SIGTERM/SIGHUP cleanup of [`super::write`] alike.
//!
//! Entries that leave a table are leaked, not freed: a handler running on another thread may be
//! reading one at that moment. Each is a path and a few words, and a process maps and writes few
//! files.
//!
//! A modification time has the kernel's timestamp granularity (a clock tick on older kernels): a
//! same-size rewrite that lands in the same tick as the write before the file was opened keeps
//! the recorded time. Trainers write a checkpoint per epoch, not per millisecond.

use std::ffi::CString;
use std::fs::File;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

use anyhow::{bail, Context, Result};

/// What the errors say of a file that changed while it was read.
pub const CHANGED: &str = "changed while being read: another process is writing it?";

/// Most inputs mapped at once (a sharded checkpoint maps each shard).
const MAX_MAPS: usize = 4096;
/// Most pending outputs at once.
const MAX_PENDING: usize = 1024;

/// A mapped input's address range and the line the SIGBUS handler writes for it.
struct MappedRange {
    start: usize,
    end: usize,
    message: Box<[u8]>,
}

static MAPS: [AtomicPtr<MappedRange>; MAX_MAPS] = [const { AtomicPtr::new(null_mut()) }; MAX_MAPS];
static PENDING: [AtomicPtr<c_char>; MAX_PENDING] =
    [const { AtomicPtr::new(null_mut()) }; MAX_PENDING];

/// Puts `entry` in the first free slot of `table`.
fn claim<T>(table: &[AtomicPtr<T>], entry: *mut T) -> Option<usize> {
    table.iter().position(|slot| {
        slot.compare_exchange(null_mut(), entry, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

/// A file to remove if the process stops before it is committed or cleaned up.
pub struct PendingFile {
    slot: usize,
}

impl PendingFile {
    pub fn new(path: &Path) -> Result<PendingFile> {
        let c = CString::new(path.as_os_str().as_bytes())
            .with_context(|| format!("{}: the path holds a NUL byte", path.display()))?;
        let entry = c.into_raw();
        match claim(&PENDING, entry) {
            Some(slot) => Ok(PendingFile { slot }),
            None => {
                // SAFETY: `entry` came from `into_raw` just above and was published nowhere.
                drop(unsafe { CString::from_raw(entry) });
                bail!(
                    "{}: more than {MAX_PENDING} outputs pending at once",
                    path.display()
                )
            }
        }
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        // The string is leaked: a signal handler may be reading it (see the module doc).
        PENDING[self.slot].store(null_mut(), Ordering::Release);
    }
}

/// Removes every pending file. Async-signal-safe: atomic loads and unlink(2).
pub fn remove_pending() {
    for slot in &PENDING {
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: a published entry is a NUL-terminated string that is never freed.
            unsafe { libc::unlink(p) };
        }
    }
}

/// What identifies a file's content without reading it: device, inode, size and modification
/// time (as git and DVC use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl Identity {
    pub fn of(m: &std::fs::Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }

    /// What differs from `earlier`, in words.
    fn change_since(&self, earlier: &Identity) -> String {
        if self.size != earlier.size {
            format!("its size went from {} to {} bytes", earlier.size, self.size)
        } else if self.mtime_ns != earlier.mtime_ns {
            "it was modified, keeping its size".to_string()
        } else {
            "it was replaced".to_string()
        }
    }
}

/// An input file, memory-mapped and guarded (see the module doc).
pub struct MappedInput {
    map: memmap2::Mmap,
    identity: Identity,
    file: Arc<File>,
    slot: usize,
    id: u64,
}

/// A mapped input as [`check_inputs`] sees it.
struct OpenInput {
    id: u64,
    /// Where the file is mapped.
    range: std::ops::Range<usize>,
    path: PathBuf,
    file: Arc<File>,
    identity: Identity,
}

static OPEN: Mutex<Vec<OpenInput>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl MappedInput {
    /// Maps `file` (opened from `path`, whose metadata `meta` is, not empty) read-only.
    pub fn new(file: File, meta: &std::fs::Metadata, path: &Path) -> Result<MappedInput> {
        install_sigbus_handler();
        let identity = Identity::of(meta);
        // SAFETY: the map is read-only. Another process changing the file underneath is the
        // hazard of every mmap-based reader; here it is caught: a fault in the map is reported by
        // the SIGBUS handler, any other change by `check_inputs` before an output is committed.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let start = map.as_ptr() as usize;
        let page = page_size();
        let end = start + map.len().div_ceil(page) * page;
        let range = Box::new(MappedRange {
            start,
            end,
            message: format!("ckpt: {}: {CHANGED}\n", path.display())
                .into_bytes()
                .into_boxed_slice(),
        });
        let entry = Box::into_raw(range);
        let Some(slot) = claim(&MAPS, entry) else {
            // SAFETY: `entry` came from `into_raw` just above and was published nowhere.
            drop(unsafe { Box::from_raw(entry) });
            bail!(
                "{}: more than {MAX_MAPS} files mapped at once",
                path.display()
            );
        };
        let file = Arc::new(file);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        OPEN.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(OpenInput {
                id,
                range: start..end,
                path: path.to_path_buf(),
                file: file.clone(),
                identity,
            });
        Ok(MappedInput {
            map,
            identity,
            file,
            slot,
            id,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Drops the map's pages from this process's resident memory. The file's pages stay in the
    /// page cache, and a later read faults them back in with the same bytes: the map is a
    /// read-only view of the file, never written.
    pub fn release_pages(&self) {
        // SAFETY: DONTNEED on a read-only file mapping discards no data (it only unmaps the
        // pages); slices into the map stay valid and read the file's bytes again. Failure
        // (an old kernel) leaves the pages resident, which is only what happens without it.
        #[cfg(unix)]
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// [`MappedInput::release_pages`] for the whole pages inside `bytes` (a range of the map).
    pub fn release_range(&self, bytes: std::ops::Range<usize>) {
        #[cfg(unix)]
        {
            let page = page_size();
            let start = bytes.start.next_multiple_of(page);
            let end = bytes.end.min(self.map.len()) / page * page;
            if end > start {
                // SAFETY: as in release_pages, on a page-aligned part of the map.
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = bytes;
    }

    /// The identity recorded when the file was opened.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Whether the file still has the identity it was opened with.
    pub fn unchanged(&self) -> bool {
        self.file
            .metadata()
            .is_ok_and(|m| Identity::of(&m) == self.identity)
    }
}

impl Drop for MappedInput {
    fn drop(&mut self) {
        // Out of the table before the map goes (the range is leaked, see the module doc).
        MAPS[self.slot].store(null_mut(), Ordering::Release);
        OPEN.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|o| o.id != self.id);
    }
}

/// Checks that every input mapped now still has the identity it was opened with; called before
/// an output is committed, so that an output is never made of a file that changed under it.
pub fn check_inputs() -> Result<()> {
    let open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    for input in open.iter() {
        let now = input
            .file
            .metadata()
            .with_context(|| format!("{}: cannot stat", input.path.display()))?;
        let now = Identity::of(&now);
        if now != input.identity {
            bail!(
                "{}: {CHANGED} ({}; the output was discarded)",
                input.path.display(),
                now.change_since(&input.identity)
            );
        }
    }
    Ok(())
}

/// The mapped input that `bytes` lie in, if any.
pub fn input_holding(bytes: &[u8]) -> Option<PathBuf> {
    let addr = bytes.as_ptr() as usize;
    OPEN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|o| o.range.contains(&addr))
        .map(|o| o.path.clone())
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| {
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
    })
}

/// The SIGBUS disposition before ours, to hand other faults on to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Whether stderr is a terminal (a progress bar may be on its last line).
static STDERR_TTY: AtomicBool = AtomicBool::new(false);
/// Set by the first thread that reports a changed input from the SIGBUS handler.
static EXITING: AtomicBool = AtomicBool::new(false);

fn install_sigbus_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: plain sigaction(2) calls on zero-initialised (valid) structs; the handler does
        // only async-signal-safe work (see `on_sigbus`).
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return;
            }
            let _ = PREVIOUS.set(previous);
            STDERR_TTY.store(libc::isatty(2) == 1, Ordering::Relaxed);
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = on_sigbus;
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, null_mut());
        }
    });
}

/// write(2) of all of `bytes` to stderr, giving up on an error. Async-signal-safe.
fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// The SIGBUS handler. Async-signal-safe: atomic loads, reads of entries that are never freed,
/// write(2), unlink(2), _exit(2), sigaction(2).
extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; si_addr is meaningful
    // for faults (si_code > 0), not for a SIGBUS sent with kill(2).
    let addr = unsafe {
        match info.as_ref() {
            Some(i) if i.si_code > 0 => Some(i.si_addr() as usize),
            _ => None,
        }
    };
    if let Some(addr) = addr {
        for slot in &MAPS {
            let p = slot.load(Ordering::Acquire);
            // SAFETY: a published entry is never freed.
            if let Some(range) = unsafe { p.as_ref() } {
                if (range.start..range.end).contains(&addr) {
                    if EXITING.swap(true, Ordering::AcqRel) {
                        // Another thread faulted too and is reporting it: one line, one exit.
                        loop {
                            // SAFETY: pause(2) only waits; that thread's _exit ends this one.
                            unsafe { libc::pause() };
                        }
                    }
                    if STDERR_TTY.load(Ordering::Relaxed) {
                        write_stderr(b"\r\x1b[K");
                    }
                    write_stderr(&range.message);
                    remove_pending();
                    // SAFETY: _exit ends the process without running anything else.
                    unsafe { libc::_exit(1) };
                }
            }
        }
    }
    remove_pending();
    if addr.is_none() {
        // Sent, not a fault: end the process as the default action would, now that the pending
        // outputs are gone (a handler that returns would let the process go on without them).
        // SAFETY: sigaction and raise are async-signal-safe; SIGBUS is blocked until we return.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &action, null_mut());
            libc::raise(sig);
        }
        return;
    }
    // SAFETY: calls the previous handler as it was registered, or restores the default action,
    // after which returning repeats the fault and the default action ends the process.
    unsafe {
        match PREVIOUS.get() {
            Some(prev) if prev.sa_flags & libc::SA_SIGINFO != 0 => {
                let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                    std::mem::transmute(prev.sa_sigaction);
                f(sig, info, context);
            }
            Some(prev)
                if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN =>
            {
                let f: extern "C" fn(c_int) = std::mem::transmute(prev.sa_sigaction);
                f(sig);
            }
            _ => {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &action, null_mut());
            }
        }
    }
}
