//! Parses `/proc/self/mountinfo` (see proc(5)) into typed mount entries.
//!
//! A line looks like:
//! `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
//! with zero or more optional fields between the per-mount options and the
//! lone `-` separator.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Where the kernel publishes this process's view of the mount table.
const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique id of this mount.
    pub mount_id: u32,
    /// Id of the mount this one sits on (itself for the namespace root).
    pub parent_id: u32,
    /// The directory of the filesystem that forms this mount's root.
    pub root: PathBuf,
    /// Where the mount is attached, relative to the process's root.
    pub mount_point: PathBuf,
    /// Per-mount options such as `rw,nosuid`.
    pub options: String,
    /// Filesystem type such as `ext4`.
    pub fs_type: String,
    /// Filesystem-specific source such as `/dev/sda1`.
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl MountEntry {
    /// True when the per-mount options include `ro`.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Parses mountinfo bytes; a malformed line is an `InvalidData` error.
///
/// The table is bytes, not text: a mount point may be any byte string (a
/// path that is not UTF-8 anywhere in the namespace must not stop Loam from
/// reading the rest), so paths are decoded to bytes and never to `str`.
pub fn parse(text: impl AsRef<[u8]>) -> io::Result<Vec<MountEntry>> {
    text.as_ref()
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.trim_ascii().is_empty())
        .map(|(index, line)| {
            parse_line(line).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed mountinfo line {}: {:?}", index + 1, String::from_utf8_lossy(line)),
                )
            })
        })
        .collect()
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read() -> io::Result<Vec<MountEntry>> {
    parse(std::fs::read(MOUNTINFO_PATH)?)
}

/// The topmost (last listed) mount whose mount point is exactly `path`.
pub fn find_mount_point<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    // Fields are separated by single spaces; spaces inside paths are escaped
    // as \040, so a plain split is exact.
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let separator = fields.iter().position(|f| *f == b"-")?;
    // Six mandatory fields precede the optional ones; three follow the `-`.
    if separator < 6 || fields.len() != separator + 4 {
        return None;
    }
    if !fields[2].contains(&b':') {
        return None;
    }
    Some(MountEntry {
        mount_id: number(fields[0])?,
        parent_id: number(fields[1])?,
        root: decode_path(fields[3]),
        mount_point: decode_path(fields[4]),
        options: decode_string(fields[5]),
        fs_type: decode_string(fields[separator + 1]),
        source: decode_string(fields[separator + 2]),
        super_options: decode_string(fields[separator + 3]),
    })
}

fn number(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn decode_path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(decode(field)))
}

/// Options, types and sources are matched as text; a stray byte that is not
/// UTF-8 there only becomes U+FFFD.
fn decode_string(field: &[u8]) -> String {
    String::from_utf8_lossy(&decode(field)).into_owned()
}

/// Undoes the kernel's `\ooo` octal escaping of space, tab, newline and backslash.
fn decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(byte) = octal_byte(bytes.get(i + 1..i + 4))
        {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn octal_byte(digits: Option<&[u8]>) -> Option<u8> {
    let digits = digits?;
    if !digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
        return None;
    }
    let value = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
    u8::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
36 22 98:0 /mnt1 /mnt2 rw,noatime master:1 propagate_from:2 unbindable - ext3 /dev/root rw,errors=continue
40 22 0:50 /with\\040space/tab\\011nl\\012bs\\134 /var/lib/my\\040vol ro,nosuid - tmpfs tmp\\040fs rw,size=1024k
41 22 0:51 / /var/lib/my\\040vol rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_fields_optional_fields_and_escapes() {
        let entries = parse(SAMPLE).expect("sample parses");
        assert_eq!(entries.len(), 4);

        let root = &entries[0];
        assert_eq!((root.mount_id, root.parent_id), (22, 1));
        assert_eq!(root.mount_point, Path::new("/"));
        assert_eq!(root.fs_type, "ext4");
        assert_eq!(root.source, "/dev/sda1");
        assert_eq!(root.super_options, "rw,errors=remount-ro");
        assert!(!root.read_only());

        let many_optional = &entries[1];
        assert_eq!(many_optional.root, Path::new("/mnt1"));
        assert_eq!(many_optional.mount_point, Path::new("/mnt2"));
        assert_eq!(many_optional.options, "rw,noatime");
        assert_eq!(many_optional.fs_type, "ext3");

        let escaped = &entries[2];
        assert_eq!(escaped.root, Path::new("/with space/tab\tnl\nbs\\"));
        assert_eq!(escaped.mount_point, Path::new("/var/lib/my vol"));
        assert_eq!(escaped.source, "tmp fs");
        assert!(escaped.read_only());
    }

    #[test]
    fn find_mount_point_returns_topmost() {
        let entries = parse(SAMPLE).expect("sample parses");
        let found = find_mount_point(&entries, Path::new("/var/lib/my vol")).expect("found");
        assert_eq!(found.mount_id, 41);
        assert!(find_mount_point(&entries, Path::new("/var/lib")).is_none());
    }

    #[test]
    fn malformed_lines_are_invalid_data() {
        for bad in [
            "22 1 8:1 / / rw,relatime shared:1 ext4 /dev/sda1 rw",
            "22 1 8:1 / / - ext4 /dev/sda1 rw",
            "x 1 8:1 / / rw - ext4 /dev/sda1 rw",
            "22 1 8:1 / / rw - ext4 /dev/sda1",
            "22 1 81 / / rw - ext4 /dev/sda1 rw",
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad}");
        }
    }

    #[test]
    fn lone_backslash_is_kept() {
        assert_eq!(decode(b"a\\b\\04"), b"a\\b\\04".to_vec());
    }

    #[test]
    fn mount_points_that_are_not_utf8_are_kept_as_bytes() {
        // A raw 0xff byte (the kernel escapes only space, tab, newline and
        // backslash) in one line must not spoil the others.
        let mut table =
            b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n50 22 0:60 / /mnt/caf\xe9\\040x rw - tmpfs t\xff rw\n".to_vec();
        table.extend_from_slice(b"51 22 0:61 / /var/lib/loam rw - tmpfs tmpfs rw\n");
        let entries = parse(&table).expect("a table with a non-UTF-8 mount point parses");
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].mount_point.as_os_str().as_bytes(), b"/mnt/caf\xe9 x");
        assert_eq!(entries[1].source, "t\u{fffd}");
        assert!(find_mount_point(&entries, Path::new("/var/lib/loam")).is_some());
    }

    #[test]
    fn reads_own_mount_table() {
        let entries = read().expect("read mountinfo");
        assert!(find_mount_point(&entries, Path::new("/")).is_some());
    }
}
