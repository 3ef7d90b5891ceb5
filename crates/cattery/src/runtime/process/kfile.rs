//! Reads of the small files the kernel makes up on each read: `/proc/<pid>/stat`, a cgroup's
//! `cgroup.procs` and `cgroup.events`, `memory.events`. `fs::read_to_string` first asks for
//! the file's size (`statx`: 0 or 4096 here, which says nothing) and then reads in probes of
//! 32, 32, 64, 128, 256... bytes: nine system calls for a `/proc/<pid>/stat` that four do
//! (`openat`, one `read` of the whole file, the `read` that finds its end, `close`). The
//! stop's checks and the resource samples read these on every cycle.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The first read's size: more than any of these files holds in the common case
/// (`/proc/<pid>/stat` is under 400 bytes); a larger file (`cgroup.procs` of a big tree) is
/// read on in doubled chunks.
const FIRST: usize = 4096;

/// The whole of a kernel-generated file, read to its end (a short read is not taken for the
/// end: `seq_file` answers a page at a time).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; FIRST];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// [`read`] as text (invalid UTF-8 is an `InvalidData` error, as with `fs::read_to_string`).
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_fs_reads_small_and_large() {
        let stat = format!("/proc/{}/stat", std::process::id());
        let a = read_to_string(Path::new(&stat)).unwrap();
        assert!(a.starts_with(&format!("{} (", std::process::id())), "{a}");
        assert!(a.ends_with('\n'));
        // A file over the first read's size, read in several chunks, and an empty one.
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3 * FIRST + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("big"), &big).unwrap();
        assert_eq!(read(&dir.path().join("big")).unwrap(), big);
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        assert!(read(&dir.path().join("empty")).unwrap().is_empty());
        std::fs::write(dir.path().join("bad"), [0xff, 0xfe]).unwrap();
        let e = read_to_string(&dir.path().join("bad")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = read(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
