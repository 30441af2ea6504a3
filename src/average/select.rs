//! Which snapshots to average and in what order: globs, natural sort by the number in the file
//! name, `--every`, `--last`.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The name a snapshot is ordered by: the file name, or for an index inside a folder given as
/// the path, the path as given.
fn sort_name(p: &Path) -> String {
    let name = p
        .file_name()
        .unwrap_or(p.as_os_str())
        .to_string_lossy()
        .to_string();
    for ext in [
        ".safetensors.index.json",
        ".safetensors",
        ".pth.tar",
        ".pth",
        ".pt",
        ".bin",
        ".ckpt",
    ] {
        if let Some(stem) = name.strip_suffix(ext) {
            return stem.to_string();
        }
    }
    name
}

/// The step or epoch number of a snapshot: the last run of digits in its name
/// (`epoch_010.safetensors` -> 10, `checkpoint-1500/` -> 1500).
pub fn step_number(p: &Path) -> Option<u64> {
    let name = sort_name(p);
    let bytes = name.as_bytes();
    let end = bytes.iter().rposition(u8::is_ascii_digit)? + 1;
    let start = bytes[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    name[start..end].parse().ok()
}

/// Natural order: digit runs compare as numbers (`epoch_9` < `epoch_10`), the rest as text.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let nx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (&x[..nx], &y[..ny]);
                let tx = trim_zeros(dx);
                let ty = trim_zeros(dy);
                let ord = tx.len().cmp(&ty.len()).then_with(|| tx.cmp(ty));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[nx..];
                y = &y[ny..];
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

/// Expands arguments that are glob patterns the shell left alone (quoted, or no match there).
pub fn expand(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        let is_pattern = a.contains(['*', '?', '[']);
        if is_pattern && !Path::new(a).exists() {
            let mut hits: Vec<PathBuf> = glob::glob(a)
                .with_context(|| format!("{a}: not a valid glob pattern"))?
                .filter_map(|r| r.ok())
                .collect();
            if hits.is_empty() {
                bail!("{a}: no file matches");
            }
            hits.sort();
            out.extend(hits);
        } else {
            out.push(PathBuf::from(a));
        }
    }
    Ok(out)
}

#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Keep the order given instead of sorting by name.
    pub no_sort: bool,
    /// Keep every K-th snapshot, counted back from the newest (so the newest is always kept).
    pub every: Option<usize>,
    /// Keep the N newest (after `every`).
    pub last: Option<usize>,
}

/// Orders and filters snapshot paths; the result is oldest first.
///
/// The order is by the step number in each name when every name has one, else the natural
/// order of the names.
pub fn select(mut paths: Vec<PathBuf>, sel: &Selection) -> Result<Vec<PathBuf>> {
    if paths.is_empty() {
        bail!("no snapshots given");
    }
    if !sel.no_sort {
        // By step number when every name has one (`sharded_epoch_5/` before `epoch_10.pth`),
        // then by natural order of the names.
        let by_step = paths.iter().all(|p| step_number(p).is_some());
        paths.sort_by(|a, b| {
            let steps = if by_step {
                step_number(a).cmp(&step_number(b))
            } else {
                Ordering::Equal
            };
            steps
                .then_with(|| natural_cmp(&sort_name(a), &sort_name(b)))
                .then_with(|| a.cmp(b))
        });
    }
    let mut seen = std::collections::HashSet::new();
    for p in &paths {
        let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if !seen.insert(key) {
            bail!("{}: given twice", p.display());
        }
    }
    if let Some(k) = sel.every {
        if k == 0 {
            bail!("--every must be at least 1");
        }
        let n = paths.len();
        paths = paths
            .into_iter()
            .enumerate()
            .filter(|(i, _)| (n - 1 - i) % k == 0)
            .map(|(_, p)| p)
            .collect();
    }
    if let Some(n) = sel.last {
        if n == 0 {
            bail!("--last must be at least 1");
        }
        let skip = paths.len().saturating_sub(n);
        paths.drain(..skip);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["epoch_10", "epoch_9", "epoch_100", "epoch_009b", "epoch_1"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            ["epoch_1", "epoch_9", "epoch_009b", "epoch_10", "epoch_100"]
        );
    }

    #[test]
    fn step_numbers() {
        assert_eq!(
            step_number(Path::new("run/epoch_010.safetensors")),
            Some(10)
        );
        assert_eq!(step_number(Path::new("checkpoint-1500")), Some(1500));
        assert_eq!(step_number(Path::new("ckpt_e3_s2000.pth.tar")), Some(2000));
        assert_eq!(step_number(Path::new("final.safetensors")), None);
    }

    #[test]
    fn step_numbers_order_mixed_names() {
        let paths = vec![
            PathBuf::from("/x/epoch_10.pth"),
            PathBuf::from("/x/sharded_epoch_5"),
        ];
        let got = select(paths, &Selection::default()).unwrap();
        assert_eq!(got[0], PathBuf::from("/x/sharded_epoch_5"));
    }

    #[test]
    fn every_counts_back_from_the_newest() {
        let paths: Vec<PathBuf> = (1..=10)
            .map(|i| PathBuf::from(format!("/nonexistent/e{i}")))
            .collect();
        let sel = Selection {
            every: Some(3),
            last: Some(2),
            ..Default::default()
        };
        let got = select(paths, &sel).unwrap();
        assert_eq!(
            got,
            [
                PathBuf::from("/nonexistent/e7"),
                PathBuf::from("/nonexistent/e10")
            ]
        );
    }
}
