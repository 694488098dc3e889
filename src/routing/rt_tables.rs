//! Table names for iproute2, so `ip route show table dind_eth0` works. The names of every live
//! network are written together: a drop-in `rt_tables.d/bridge-nat.conf` where the system has
//! that directory, otherwise marked lines in `rt_tables`. Nothing is left once no table is used.

use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const MARKER: &str = "# bridge-nat";

pub struct RtTables {
    dir: PathBuf,
}

impl RtTables {
    pub fn system() -> RtTables {
        RtTables { dir: PathBuf::from("/etc/iproute2") }
    }

    #[cfg(test)]
    pub fn at(dir: &Path) -> RtTables {
        RtTables { dir: dir.to_path_buf() }
    }

    fn drop_in_dir(&self) -> PathBuf {
        self.dir.join("rt_tables.d")
    }

    fn main_file(&self) -> PathBuf {
        self.dir.join("rt_tables")
    }

    /// Make the registered names exactly `names` (id, name).
    pub fn sync(&self, names: &BTreeSet<(u32, String)>) -> Result<()> {
        let use_drop_in = self.drop_in_dir().is_dir() || !self.main_file().exists();
        if use_drop_in {
            let path = self.drop_in_dir().join("bridge-nat.conf");
            if names.is_empty() {
                return remove_if_present(&path);
            }
            fs::create_dir_all(self.drop_in_dir())
                .map_err(|e| Error::io(format!("create {}", self.drop_in_dir().display()), e))?;
            let mut text = format!("{MARKER}: routing tables of the bridge-nat CNI plugin (rewritten on every call)\n");
            for (id, name) in names {
                text.push_str(&format!("{id}\t{name}\n"));
            }
            write_replacing(&path, &text)
        } else {
            let path = self.main_file();
            let current = fs::read_to_string(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
            let mut text: String = current.lines().filter(|l| !l.ends_with(MARKER)).map(|l| format!("{l}\n")).collect();
            for (id, name) in names {
                text.push_str(&format!("{id}\t{name}\t{MARKER}\n"));
            }
            if text != current {
                write_replacing(&path, &text)?;
            }
            Ok(())
        }
    }

    /// Take every name bridge-nat registered back, in both places it may have written them.
    pub fn remove_ours(&self) -> Result<()> {
        remove_if_present(&self.drop_in_dir().join("bridge-nat.conf"))?;
        let path = self.main_file();
        let Ok(current) = fs::read_to_string(&path) else { return Ok(()) };
        let text: String = current.lines().filter(|l| !l.ends_with(MARKER)).map(|l| format!("{l}\n")).collect();
        if text != current {
            write_replacing(&path, &text)?;
        }
        Ok(())
    }

    /// The names bridge-nat registered (its drop-in and its marked lines), whoever needs them.
    pub fn ours(&self) -> BTreeSet<(u32, String)> {
        let drop_in = fs::read_to_string(self.drop_in_dir().join("bridge-nat.conf")).unwrap_or_default();
        let main = fs::read_to_string(self.main_file()).unwrap_or_default();
        drop_in
            .lines()
            .chain(main.lines().filter(|l| l.ends_with(MARKER)))
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let id = parts.next()?.parse().ok()?;
                Some((id, parts.next()?.to_string()))
            })
            .collect()
    }

    /// The names iproute2 would resolve, for CHECK.
    pub fn registered(&self) -> BTreeSet<(u32, String)> {
        let mut files = vec![self.main_file()];
        if let Ok(entries) = fs::read_dir(self.drop_in_dir()) {
            files.extend(
                entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "conf")),
            );
        }
        files
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| {
                        let mut parts = l.split_whitespace();
                        let id = parts.next()?.parse().ok()?;
                        Some((id, parts.next()?.to_string()))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

fn write_replacing(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("write {}", path.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bnat-rt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(list: &[(u32, &str)]) -> BTreeSet<(u32, String)> {
        list.iter().map(|(i, n)| (*i, n.to_string())).collect()
    }

    #[test]
    fn drop_in_is_written_and_removed_with_the_last_name() {
        let d = temp("dropin");
        fs::write(d.join("rt_tables"), "255\tlocal\n254\tmain\n").unwrap();
        fs::create_dir(d.join("rt_tables.d")).unwrap();
        let rt = RtTables::at(&d);
        rt.sync(&names(&[(101, "dind_eth0"), (100, "dind_net1")])).unwrap();
        assert!(rt.registered().contains(&(101, "dind_eth0".into())));
        assert_eq!(rt.ours(), names(&[(101, "dind_eth0"), (100, "dind_net1")]));
        assert_eq!(fs::read_to_string(d.join("rt_tables")).unwrap(), "255\tlocal\n254\tmain\n");
        rt.sync(&BTreeSet::new()).unwrap();
        assert!(!d.join("rt_tables.d/bridge-nat.conf").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn rt_tables_lines_are_marked_and_removed_without_touching_others() {
        let d = temp("main");
        let original = "255\tlocal\n254\tmain\n200\tmine\n";
        fs::write(d.join("rt_tables"), original).unwrap();
        let rt = RtTables::at(&d);
        rt.sync(&names(&[(100, "dind_net1")])).unwrap();
        assert!(fs::read_to_string(d.join("rt_tables")).unwrap().contains("100\tdind_net1\t# bridge-nat"));
        assert!(rt.registered().contains(&(200, "mine".into())));
        assert_eq!(rt.ours(), names(&[(100, "dind_net1")]));
        rt.sync(&BTreeSet::new()).unwrap();
        assert_eq!(fs::read_to_string(d.join("rt_tables")).unwrap(), original);
        rt.sync(&names(&[(100, "dind_net1")])).unwrap();
        // Written as marked lines, then the system gained a drop-in directory: both are ours.
        fs::create_dir(d.join("rt_tables.d")).unwrap();
        rt.sync(&names(&[(101, "dind_eth0")])).unwrap();
        rt.remove_ours().unwrap();
        assert_eq!(fs::read_to_string(d.join("rt_tables")).unwrap(), original);
        assert!(rt.ours().is_empty());
        fs::remove_dir_all(d).unwrap();
    }
}
