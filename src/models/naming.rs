//! Between a checkpoint's tensor names and the module paths a family is built with.
//!
//! A family declares its structure once, under torchvision's module paths (`layer1.0.conv1`,
//! `features.3.0.block.1.0`): the builder asks for `vb.pp("layer1").pp(0).pp("conv1")` and every
//! BN layer is registered under its path. A [`Naming`] maps those paths to the keys of one
//! checkpoint and back: torchvision's own naming is the identity; another library's naming of
//! the same network (timm's `conv_stem` for `features.0.0`) is a list of renamed path prefixes;
//! a wrapper's prefix (`model.` from a LightningModule) is a prefix on every key. Detection reads
//! shapes through the inverse map, building reads tensors through the forward map, and
//! recalibrated statistics are written back under the checkpoint's own keys, so one structure
//! serves every naming.
//!
//! Renames work on whole dot-separated components: a rule `("features.0.0", "conv_stem")` maps
//! `features.0.0.weight` to `conv_stem.weight` but leaves `features.0.01` alone. The longest
//! matching rule wins in each direction, and a naming must be one-to-one over the keys it maps
//! (checked by [`Naming::check`] in the tests of each naming).

use std::fmt;

use super::Shapes;

/// One naming of a family's module paths.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Naming {
    /// What the naming is called in messages (`torchvision`, `timm`).
    pub name: &'static str,
    /// (module path prefix, checkpoint key prefix), matched on whole components.
    pub renames: Vec<(String, String)>,
    /// Carried by every key before the renamed name (`model.`), with its dot; empty for none.
    pub prefix: String,
}

/// Whether `name` is `prefix` or starts with `prefix` followed by a dot.
fn under<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('.')).then_some(rest)
}

impl Naming {
    /// Module paths are the checkpoint's keys (torchvision's naming of its own models).
    pub fn identity(name: &'static str) -> Naming {
        Naming {
            name,
            ..Naming::default()
        }
    }

    /// The same naming under a wrapper prefix every key carries (`model.`, with the dot).
    pub fn with_prefix(&self, prefix: &str) -> Naming {
        Naming {
            prefix: prefix.to_string(),
            ..self.clone()
        }
    }

    pub fn is_identity(&self) -> bool {
        self.renames.is_empty() && self.prefix.is_empty()
    }

    /// The checkpoint key of module path (or tensor path) `path`.
    pub fn key(&self, path: &str) -> String {
        let renamed = Self::rename(path, self.renames.iter().map(|(p, k)| (p, k)));
        format!("{}{renamed}", self.prefix)
    }

    /// The module path of checkpoint key `key`, or `None` when the key is outside the naming
    /// (it lacks the prefix).
    pub fn path(&self, key: &str) -> Option<String> {
        let key = key.strip_prefix(self.prefix.as_str())?;
        Some(Self::rename(key, self.renames.iter().map(|(p, k)| (k, p))))
    }

    fn rename<'a>(name: &str, rules: impl Iterator<Item = (&'a String, &'a String)>) -> String {
        let best = rules
            .filter_map(|(from, to)| under(name, from).map(|rest| (from.len(), to, rest)))
            .max_by_key(|(len, _, _)| *len);
        match best {
            Some((_, to, rest)) => format!("{to}{rest}"),
            None => name.to_string(),
        }
    }

    /// Checks that mapping `keys` to paths and back gives the keys again and that no two keys
    /// share a path; returns the first offending key.
    pub fn check<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
        let mut seen = std::collections::HashMap::new();
        for k in keys {
            let Some(p) = self.path(k) else { continue };
            if self.key(&p) != k {
                return Err(format!("{k} -> {p} -> {}", self.key(&p)));
            }
            if let Some(other) = seen.insert(p.clone(), k) {
                return Err(format!("{other} and {k} both map to {p}"));
            }
        }
        Ok(())
    }
}

/// Whether some name in `shapes` lies under module `prefix`.
pub fn has_module(shapes: &Shapes, prefix: &str) -> bool {
    let dotted = format!("{prefix}.");
    shapes
        .range(dotted.clone()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(&dotted))
}

/// Blocks per stage of a checkpoint that nests them by stage: `block(s, j)` is the module path
/// of stage `s`'s block `j` (both from 0), counted while the checkpoint has names under it.
pub fn stage_depths(shapes: &Shapes, block: impl Fn(usize, usize) -> String) -> Vec<usize> {
    let mut depths = Vec::new();
    loop {
        let s = depths.len();
        let n = (0..)
            .take_while(|&j| has_module(shapes, &block(s, j)))
            .count();
        if n == 0 {
            return depths;
        }
        depths.push(n);
    }
}

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if !self.prefix.is_empty() {
            write!(f, " under '{}'", self.prefix)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timm_like() -> Naming {
        Naming {
            name: "timm",
            renames: vec![
                ("features.0.0".into(), "conv_stem".into()),
                ("features.0.1".into(), "bn1".into()),
                ("features.1".into(), "blocks.0".into()),
                ("classifier.1".into(), "classifier".into()),
            ],
            prefix: String::new(),
        }
    }

    #[test]
    fn renames_whole_components_both_ways() {
        let n = timm_like();
        assert_eq!(n.key("features.0.0.weight"), "conv_stem.weight");
        assert_eq!(
            n.key("features.1.0.block.0.weight"),
            "blocks.0.0.block.0.weight"
        );
        assert_eq!(n.key("features.10.weight"), "features.10.weight");
        assert_eq!(n.path("conv_stem.weight").unwrap(), "features.0.0.weight");
        assert_eq!(n.path("blocks.0.3.x").unwrap(), "features.1.3.x");
        assert_eq!(n.path("classifier.bias").unwrap(), "classifier.1.bias");
        n.check(["conv_stem.weight", "blocks.0.1.x", "classifier.weight"])
            .unwrap();
    }

    #[test]
    fn prefix_is_outside_the_renames() {
        let n = Naming::identity("torchvision").with_prefix("model.");
        assert_eq!(
            n.key("layer1.0.conv1.weight"),
            "model.layer1.0.conv1.weight"
        );
        assert_eq!(n.path("model.fc.bias").unwrap(), "fc.bias");
        assert_eq!(n.path("fc.bias"), None);
        assert_eq!(n.to_string(), "torchvision under 'model.'");
    }

    #[test]
    fn stage_depths_count_blocks_by_whole_components() {
        let shapes: Shapes = [
            "blocks.0.0.conv.weight",
            "blocks.1.0.conv.weight",
            "blocks.1.1.bn1.running_var",
            "blocks.10.0.conv.weight",
            "blocks.2.0x.weight",
        ]
        .iter()
        .map(|k| (k.to_string(), vec![1]))
        .collect();
        assert!(has_module(&shapes, "blocks.1.1"));
        assert!(!has_module(&shapes, "blocks.1.1.bn"));
        assert!(!has_module(&shapes, "blocks.2.0"));
        assert_eq!(
            stage_depths(&shapes, |s, j| format!("blocks.{s}.{j}")),
            [1, 2]
        );
        assert_eq!(
            stage_depths(&shapes, |s, j| format!("s{}.b{}", s + 1, j + 1)),
            [0usize; 0]
        );
    }

    #[test]
    fn check_finds_collisions() {
        let n = Naming {
            name: "bad",
            renames: vec![("a".into(), "b".into())],
            prefix: String::new(),
        };
        assert!(n.check(["b.weight", "a.weight"]).is_err());
    }
}
