//! keel-logger: takes a container's stdout and stderr from containerd's shim and keeps
//! them in a size-bounded log file, `<dir>/console.log`, rotated once to
//! `console.log.1`.
//!
//! containerd's runc shim starts it for a task whose stdio is
//! `binary:///path/keel-logger?dir=<log dir>`: the query arrives as the arguments
//! `dir <log dir>`, the task's stdout and stderr as fds 3 and 4, and fd 5 is closed
//! once the logger is ready. The logger outlives keeld (it is the shim's child), so
//! output is kept while keeld restarts. It exits when the container's last writer
//! closes both streams.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Size at which `console.log` is rotated; at most twice this is kept per container.
const MAX_LOG_BYTES: u64 = 1 << 20;

struct Log {
    dir: PathBuf,
    file: File,
    size: u64,
}

impl Log {
    fn open(dir: &Path) -> std::io::Result<Log> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(dir.join("console.log"))?;
        let size = file.metadata()?.len();
        Ok(Log {
            dir: dir.to_path_buf(),
            file,
            size,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + bytes.len() as u64 > MAX_LOG_BYTES {
            std::fs::rename(self.dir.join("console.log"), self.dir.join("console.log.1"))?;
            *self = Log::open(&self.dir)?;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

/// Takes ownership of inherited descriptor `fd`, if it is open.
fn inherited(fd: i32) -> Option<File> {
    // SAFETY: F_GETFD only reads descriptor flags; it fails with EBADF for a closed fd.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    // SAFETY: the shim hands these descriptors to this process alone, and each is
    // wrapped exactly once, so nothing else closes or uses them.
    open.then(|| unsafe { File::from_raw_fd(fd) })
}

fn pump(mut input: File, log: Arc<Mutex<Log>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                // A full or failing disk drops output rather than blocking the
                // container on a pipe nobody drains.
                let _ = log.write(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .windows(2)
        .find(|pair| pair[0] == "dir")
        .map(|pair| PathBuf::from(&pair[1]));
    let Some(dir) = dir else {
        eprintln!("keel-logger: expected the arguments `dir <log directory>` (from the binary:// stdio URI)");
        std::process::exit(2);
    };
    let log = match std::fs::create_dir_all(&dir).and_then(|()| Log::open(&dir)) {
        Ok(log) => Arc::new(Mutex::new(log)),
        Err(e) => {
            eprintln!(
                "keel-logger: cannot open {}/console.log: {e}",
                dir.display()
            );
            std::process::exit(1);
        }
    };
    let streams: Vec<File> = [3, 4].into_iter().filter_map(inherited).collect();
    // Closing fd 5 tells the shim the logger is ready to read.
    drop(inherited(5));
    let threads: Vec<_> = streams
        .into_iter()
        .map(|input| {
            let log = log.clone();
            std::thread::spawn(move || pump(input, log))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
