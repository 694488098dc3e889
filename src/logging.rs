//! A `log` backend that appends to the configured file (0600). Logging never fails a call:
//! when the file cannot be opened, warnings and errors still reach stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

struct FileLogger {
    file: Mutex<Option<File>>,
    prefix: Mutex<String>,
}

static LOGGER: OnceLock<FileLogger> = OnceLock::new();
static ECHO: AtomicBool = AtomicBool::new(false);

/// Also copy every line to stderr (the node agent: journald and `kubectl logs` read it there).
pub fn echo_to_stderr(on: bool) {
    ECHO.store(on, Ordering::Relaxed);
}

/// Whether `init` has run in this process.
pub fn is_initialised() -> bool {
    LOGGER.get().is_some()
}

/// Install the logger once; later calls only change the file, level and line prefix.
pub fn init(path: &Path, level: log::LevelFilter, prefix: &str) {
    let logger = LOGGER.get_or_init(|| FileLogger { file: Mutex::new(None), prefix: Mutex::new(String::new()) });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
    *logger.prefix.lock().unwrap_or_else(|e| e.into_inner()) = prefix.to_string();
    let file = open(path);
    if file.is_none() {
        eprintln!("bridge-nat: cannot open log file {}; logging to stderr only", path.display());
    }
    *logger.file.lock().unwrap_or_else(|e| e.into_inner()) = file;
}

fn open(path: &Path) -> Option<File> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(nix::libc::O_NOFOLLOW).open(path).ok()
}

impl log::Log for FileLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = self.prefix.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let line =
            format!("{} {:5} [{}] {}{}\n", timestamp(), record.level(), std::process::id(), prefix, record.args());
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if ECHO.load(Ordering::Relaxed) {
            eprint!("bridge-nat: {line}");
            if let Some(f) = guard.as_mut() {
                let _ = f.write_all(line.as_bytes());
            }
            return;
        }
        match guard.as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None if record.level() <= log::Level::Warn => eprint!("bridge-nat: {line}"),
            None => {}
        }
    }

    fn flush(&self) {
        if let Some(f) = self.file.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = f.flush();
        }
    }
}

/// RFC 3339 UTC with milliseconds, without pulling in a date crate.
fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, now.subsec_millis())
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_413), (2025, 11, 21));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
