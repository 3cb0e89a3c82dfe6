//! Reading a container's output back: the tail of what `keel-logger` kept in
//! `<runtime dir>/logs/<id>/console.log` (and the rotated `console.log.1`).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The most `GET /containers/{name}/logs` answers in one response.
pub const MAX_TAIL: u64 = 2 << 20;

/// The last `tail` bytes of the container's output (older file first), or an empty
/// vector when it has written nothing yet.
pub fn read_tail(log_dir: &Path, tail: u64) -> std::io::Result<Vec<u8>> {
    let tail = tail.min(MAX_TAIL);
    let current = read_last(&log_dir.join("console.log"), tail)?;
    let missing = tail.saturating_sub(current.len() as u64);
    if missing == 0 {
        return Ok(current);
    }
    let mut older = read_last(&log_dir.join("console.log.1"), missing)?;
    older.extend_from_slice(&current);
    Ok(older)
}

fn read_last(path: &Path, n: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(n);
    file.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
    file.take(n).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_spans_the_rotated_file() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("console.log.1"), b"old-1\nold-2\n").expect("write");
        std::fs::write(dir.path().join("console.log"), b"new\n").expect("write");
        assert_eq!(read_tail(dir.path(), 4).expect("tail"), b"new\n");
        assert_eq!(read_tail(dir.path(), 10).expect("tail"), b"old-2\nnew\n");
        assert_eq!(
            read_tail(dir.path(), 1000).expect("tail"),
            b"old-1\nold-2\nnew\n"
        );
        let empty = tempfile::tempdir().expect("dir");
        assert!(read_tail(empty.path(), 10).expect("tail").is_empty());
    }
}
