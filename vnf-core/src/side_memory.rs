//! Which interface (by MAC) served each side, kept in the state directory.
//!
//! Sides without a selector go by order of appearance, but the kernel does not promise the
//! same order after a restart: `docker restart` re-creates a container's interfaces in
//! parallel, so the right network's interface can get the lower ifindex. With the MACs
//! remembered, such a side takes its interface again (Docker keeps a container's MAC
//! addresses across restarts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::side::{format_mac, Side, SideSelector};

const FILE: &str = "sides.json";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RememberedSides([Option<[u8; 6]>; 3]);

impl RememberedSides {
    pub fn get(&self, side: Side) -> Option<[u8; 6]> {
        self.0[position(side)]
    }

    pub fn set(&mut self, side: Side, mac: [u8; 6]) {
        self.0[position(side)] = Some(mac);
    }

    /// What `dir` holds; nothing when there is no file yet. A file that cannot be read is
    /// logged and ignored: it only ever holds what the next assignment rewrites.
    pub fn load(dir: &Path) -> RememberedSides {
        let path = path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(error) => {
                warn!(path = %path.display(), %error, "remembered sides not read; sides go by order of appearance");
                return Self::default();
            }
        };
        match Self::parse(&text) {
            Ok(remembered) => remembered,
            Err(reason) => {
                warn!(path = %path.display(), %reason, "remembered sides ignored; sides go by order of appearance");
                Self::default()
            }
        }
    }

    fn parse(text: &str) -> Result<RememberedSides, String> {
        let map: BTreeMap<Side, String> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut remembered = Self::default();
        for (side, mac) in map {
            match mac.parse::<SideSelector>() {
                Ok(SideSelector::Mac(mac)) => remembered.set(side, mac),
                _ => return Err(format!("{side}: {mac:?} is not a MAC address")),
            }
        }
        Ok(remembered)
    }

    pub fn store(&self, dir: &Path) -> std::io::Result<()> {
        let map: BTreeMap<Side, String> = Side::ALL
            .into_iter()
            .filter_map(|side| Some((side, format_mac(&self.get(side)?))))
            .collect();
        crate::fs::write_json(&path(dir), &map, true)
    }
}

fn position(side: Side) -> usize {
    Side::ALL.iter().position(|&s| s == side).unwrap_or(0)
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("side-memory-{}", std::process::id()));
        assert_eq!(RememberedSides::load(&dir), RememberedSides::default());
        let mut remembered = RememberedSides::default();
        remembered.set(Side::Left, [2, 0x42, 10, 0, 1, 2]);
        remembered.set(Side::Right, [2, 0x42, 10, 0, 2, 2]);
        remembered.store(&dir).unwrap();
        assert_eq!(RememberedSides::load(&dir), remembered);
        let text = std::fs::read_to_string(dir.join(FILE)).unwrap();
        assert!(text.contains("\"left\": \"02:42:0a:00:01:02\""), "{text}");

        for bad in [
            "{",
            "{\"left\": \"eth0\"}",
            "{\"middle\": \"02:42:0a:00:01:02\"}",
        ] {
            std::fs::write(dir.join(FILE), bad).unwrap();
            assert_eq!(
                RememberedSides::load(&dir),
                RememberedSides::default(),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
