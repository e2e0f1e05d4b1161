//! C2SP `tlog-tiles` paths: `tile/<L>/<N>[.p/<W>]` and `tile/entries/<N>[.p/<W>]`, tiles of
//! height 8 (256 hashes), `N` written in 3-digit groups, all but the last prefixed with `x`.

/// Hashes (or entries) in a full tile.
pub const WIDTH: u64 = 256;
/// Levels of the tree in one tile level.
pub const HEIGHT: u8 = 8;

/// A tile: level `L` (`None` for an entry bundle), index `N`, width `W` (256 when full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// Tile level; `None` for an entry bundle.
    pub level: Option<u8>,
    /// Index at that level.
    pub index: u64,
    /// How many hashes (or entries) it holds, 1 to 256.
    pub width: u64,
}

/// `1234067` → `x001/x234/067`.
pub fn index_path(n: u64) -> String {
    let mut groups = vec![format!("{:03}", n % 1000)];
    let mut rest = n / 1000;
    while rest > 0 {
        groups.push(format!("x{:03}", rest % 1000));
        rest /= 1000;
    }
    groups.reverse();
    groups.join("/")
}

impl Tile {
    /// The path under the log's prefix, `tile/…`.
    pub fn path(&self) -> String {
        let level = match self.level {
            Some(l) => l.to_string(),
            None => "entries".into(),
        };
        let mut p = format!("tile/{level}/{}", index_path(self.index));
        if self.width < WIDTH {
            p.push_str(&format!(".p/{}", self.width));
        }
        p
    }

    /// Parses the part of a path after `tile/`; `None` when it is not a tile path.
    pub fn parse(path: &str) -> Option<Tile> {
        let (level, rest) = path.split_once('/')?;
        let level = match level {
            "entries" => None,
            l if l.len() == 1 || !l.starts_with('0') => Some(l.parse::<u8>().ok()?),
            _ => return None,
        };
        let (index, width) = match rest.split_once(".p/") {
            Some((i, w)) => {
                if w.starts_with('0') {
                    return None;
                }
                let w: u64 = w.parse().ok()?;
                if !(1..WIDTH).contains(&w) {
                    return None;
                }
                (i, w)
            }
            None => (rest, WIDTH),
        };
        let groups: Vec<&str> = index.split('/').collect();
        let mut n: u64 = 0;
        for (i, g) in groups.iter().enumerate() {
            let digits = if i + 1 < groups.len() {
                g.strip_prefix('x')?
            } else {
                g
            };
            if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            n = n
                .checked_mul(1000)?
                .checked_add(digits.parse::<u64>().ok()?)?;
        }
        let tile = Tile {
            level,
            index: n,
            width,
        };
        // one spelling per tile
        (tile.path() == format!("tile/{path}")).then_some(tile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_group_digits_as_c2sp_writes_them() {
        assert_eq!(index_path(1234067), "x001/x234/067");
        assert_eq!(index_path(0), "000");
        let t = Tile {
            level: Some(0),
            index: 1234067,
            width: 5,
        };
        assert_eq!(t.path(), "tile/0/x001/x234/067.p/5");
        assert_eq!(Tile::parse("0/x001/x234/067.p/5"), Some(t));
        let e = Tile {
            level: None,
            index: 3,
            width: 256,
        };
        assert_eq!(e.path(), "tile/entries/003");
        assert_eq!(Tile::parse("entries/003"), Some(e));
        for bad in [
            "0/3",
            "0/x000/003",
            "0/003.p/0",
            "0/003.p/256",
            "00/003",
            "0/003.p/07",
        ] {
            assert_eq!(Tile::parse(bad), None, "{bad}");
        }
    }
}
