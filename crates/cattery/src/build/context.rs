//! Unpacking an uploaded build context: a gzipped tar as the CLI makes it (regular files
//! and directories, relative paths). Anything else (links, devices, absolute or `..`
//! paths) is refused, and the unpacked size and number of entries are capped.

use std::path::{Component, Path};

/// Most entries (files and directories) a context may hold.
pub const MAX_FILES: usize = 50_000;

/// What was unpacked.
#[derive(Debug, Clone, PartialEq)]
pub struct Unpacked {
    /// Regular files.
    pub files: usize,
    /// Their total size (bytes).
    pub bytes: u64,
}

/// Whether `p` names a path inside a context: relative, without `..`, without a NUL byte.
pub fn is_inside(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && !p.contains('\0')
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Unpacks the tar.gz at `archive` into `dest` (which exists). Errors: a message for the
/// build's `errorMessage`.
pub fn unpack(archive: &Path, dest: &Path, max_bytes: u64) -> Result<Unpacked, String> {
    unpack_capped(archive, dest, max_bytes, MAX_FILES)
}

/// [`unpack`] with at most `max_entries` files and directories.
fn unpack_capped(
    archive: &Path,
    dest: &Path,
    max_bytes: u64,
    max_entries: usize,
) -> Result<Unpacked, String> {
    let f = std::fs::File::open(archive).map_err(|e| format!("cannot open the context: {e}"))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    let mut out = Unpacked { files: 0, bytes: 0 };
    let mut entries_seen = 0usize;
    let entries = tar
        .entries()
        .map_err(|e| format!("the context is not a gzipped tar: {e}"))?;
    for e in entries {
        let mut e = e.map_err(|e| format!("the context is not a valid gzipped tar: {e}"))?;
        let path = e
            .path()
            .map_err(|e| format!("bad path in the context: {e}"))?
            .into_owned();
        let shown = path.display().to_string();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(format!(
                "the context holds {shown:?}: only relative paths are allowed"
            ));
        }
        // Directories count too: each is an inode, and a tar of empty directories compresses
        // to almost nothing.
        entries_seen += 1;
        if entries_seen > max_entries {
            return Err(format!(
                "the context holds more than {max_entries} files and directories"
            ));
        }
        let kind = e.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(dest.join(&path))
                .map_err(|e| format!("cannot unpack {shown}: {e}"))?;
            continue;
        }
        if !kind.is_file() {
            return Err(format!(
                "the context holds {shown:?}, which is not a regular file or directory"
            ));
        }
        out.files += 1;
        // The size the unpacker writes: a PAX `size` record overrides the header's own field,
        // which may say 0.
        out.bytes = out.bytes.saturating_add(e.size());
        if out.bytes > max_bytes {
            return Err(format!(
                "the context unpacks to more than {} MiB",
                max_bytes / (1024 * 1024)
            ));
        }
        if !e
            .unpack_in(dest)
            .map_err(|e| format!("cannot unpack {shown}: {e}"))?
        {
            return Err(format!("the context holds {shown:?}, outside the context"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, &[u8], tar::EntryType)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        for (name, data, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            // `set_path` refuses `..`; write the raw name so the unpacker sees it.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn unpack_bytes(bytes: &[u8], max: u64) -> (tempfile::TempDir, Result<Unpacked, String>) {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("c.tar.gz");
        std::fs::write(&a, bytes).unwrap();
        let dest = d.path().join("app");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack(&a, &dest, max);
        (d, r)
    }

    #[test]
    fn unpacks_files_and_dirs() {
        let t = tarball(&[
            ("bot.py", b"print(1)\n", tarball_file()),
            ("pkg/x.py", b"x = 1\n", tarball_file()),
        ]);
        let (d, r) = unpack_bytes(&t, 1 << 20);
        assert_eq!(
            r.unwrap(),
            Unpacked {
                files: 2,
                bytes: 15
            }
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("app/pkg/x.py")).unwrap(),
            "x = 1\n"
        );
    }

    fn tarball_file() -> tar::EntryType {
        tar::EntryType::Regular
    }

    #[test]
    fn refuses_escapes_links_and_oversize() {
        let (_d, r) = unpack_bytes(&tarball(&[("../evil.py", b"x", tarball_file())]), 1 << 20);
        assert!(r.unwrap_err().contains("only relative paths"));
        let (_d, r) = unpack_bytes(&tarball(&[("/abs.py", b"x", tarball_file())]), 1 << 20);
        assert!(r.unwrap_err().contains("only relative paths"));
        let (_d, r) = unpack_bytes(&tarball(&[("link", b"", tar::EntryType::Symlink)]), 1 << 20);
        assert!(r.unwrap_err().contains("not a regular file"));
        let (_d, r) = unpack_bytes(&tarball(&[("big", &[0u8; 100], tarball_file())]), 10);
        assert!(r.unwrap_err().contains("unpacks to more than"));
        let (_d, r) = unpack_bytes(b"not a tarball", 10);
        assert!(r.is_err());
    }

    /// A file whose header says 0 bytes while a PAX `size` record says more is unpacked at
    /// the PAX size (the tar reader obeys it): the cap counts that size, not the header's.
    #[test]
    fn the_cap_counts_a_pax_size_not_the_header_size() {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        b.append_pax_extensions([("size", b"4096".as_slice())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("big").unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &[7u8; 4096][..]).unwrap();
        let t = b.into_inner().unwrap().finish().unwrap();
        let (d, r) = unpack_bytes(&t, 1024);
        let written = std::fs::metadata(d.path().join("app/big")).map_or(0, |m| m.len());
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("unpacks to more than")),
            "{r:?} ({written} bytes written under a cap of 1024)"
        );
        assert_eq!(written, 0, "nothing past the cap is written");
    }

    /// Empty directories count against the cap on entries (here 10 instead of
    /// [`MAX_FILES`]).
    #[test]
    fn directories_count_against_the_entry_cap() {
        let names: Vec<String> = (0..=10).map(|i| format!("d{i}")).collect();
        let entries: Vec<(&str, &[u8], tar::EntryType)> = names
            .iter()
            .map(|n| (n.as_str(), &b""[..], tar::EntryType::Directory))
            .collect();
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("c.tar.gz");
        std::fs::write(&a, tarball(&entries)).unwrap();
        let dest = d.path().join("app");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack_capped(&a, &dest, 1 << 20, 10);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("more than 10 files and directories")),
            "{r:?}"
        );
    }
}
