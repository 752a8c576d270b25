//! The mkfs options a StorageClass (or a pod's inline volume) may ask for: a
//! closed set per filesystem, each option a typed value checked when the
//! volume is created and rendered into mkfs's argv when it is formatted.
//!
//! Pod authors reach mkfsOptions through inline volumes, so nothing here may
//! name a file or a device (mke2fs `-d`, `-l`, `-J device=`, mkfs.xfs
//! `-l logdev=`, `-r rtdev=` would read or overwrite host files), change where
//! the filesystem starts (`-E offset=`), stop mkfs from formatting (dry runs),
//! or be a value mkfs or the kernel refuses at stage time: every accepted set
//! formats an image of [`MkfsOptions::min_bytes`] and mounts.

use std::fmt;

use super::blockfs::FsType;

/// Smallest ext4 filesystem Loam makes: mke2fs needs a few hundred KiB for
/// its metadata and journal, so smaller volumes are rounded up to this.
pub const EXT4_MIN_BYTES: u64 = 4 << 20;

/// The fewest inodes mke2fs formats with (the reserved ones and the root's).
const EXT4_LEAST_INODES: u64 = 16;

/// Smallest filesystem mkfs.xfs accepts; xfs volumes are rounded up to it.
pub const XFS_MIN_BYTES: u64 = 300 << 20;

/// Longest mkfsOptions text read; anything longer is refused unread.
const MAX_TEXT: usize = 1024;
/// Inode size ext4 uses when `-I` does not say.
const EXT4_DEFAULT_INODE_SIZE: u64 = 256;

/// Validated extra mkfs options for one filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MkfsOptions {
    /// Options of mkfs.ext4, at most one of each flag.
    Ext4(Vec<Ext4Option>),
    /// Options of mkfs.xfs, at most one of each flag.
    Xfs(Vec<XfsOption>),
}

/// A filesystem block size both mkfs tools and the kernel accept on any
/// page size Loam runs on (larger blocks do not mount on 4 KiB pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BlockSize {
    /// 1024 bytes.
    K1,
    /// 2048 bytes.
    K2,
    /// 4096 bytes.
    K4,
}

impl BlockSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            BlockSize::K1 => 1024,
            BlockSize::K2 => 2048,
            BlockSize::K4 => 4096,
        }
    }

    fn parse(text: &str, what: &str) -> Result<BlockSize, String> {
        match text {
            "1024" => Ok(BlockSize::K1),
            "2048" => Ok(BlockSize::K2),
            "4096" => Ok(BlockSize::K4),
            _ => Err(format!("{what} {} must be 1024, 2048 or 4096", quote(text))),
        }
    }
}

/// One mkfs.ext4 option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ext4Option {
    /// `-b`: block size.
    BlockSize(BlockSize),
    /// `-i`: bytes per inode, 1024 to 64 MiB and at least twice the inode size.
    BytesPerInode(u32),
    /// `-I`: inode size, a power of two from 128 to 1024, at most the block size.
    InodeSize(u32),
    /// `-N`: number of inodes (the volume is made large enough to hold their tables).
    Inodes(u32),
    /// `-m`: percentage of blocks reserved for root, 0 to 50.
    ReservedPercent(u8),
    /// `-O`: features turned on or (with `^`) off.
    Features(Vec<(Ext4Feature, bool)>),
    /// `-E`: extended options.
    Extended(Vec<Ext4Extended>),
    /// `-L`: volume label.
    Label(Label),
    /// `-U`: filesystem UUID.
    Uuid(Uuid),
}

/// An ext4 feature a volume may turn on or off with `-O`: each combination
/// of these formats and mounts (features that need more are left out: turning
/// `extent` off; `casefold`, `quota` and `project`, which mount only on
/// kernels built with unicode or quota support).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext4Feature {
    /// `has_journal`.
    HasJournal,
    /// `metadata_csum`.
    MetadataCsum,
    /// `metadata_csum_seed`.
    MetadataCsumSeed,
    /// `64bit` (turning it on only: off caps the filesystem at 16 TiB).
    SixtyFourBit,
    /// `flex_bg`.
    FlexBg,
    /// `huge_file`.
    HugeFile,
    /// `dir_nlink`.
    DirNlink,
    /// `extra_isize`.
    ExtraIsize,
    /// `dir_index`.
    DirIndex,
    /// `large_dir`.
    LargeDir,
    /// `encrypt`.
    Encrypt,
}

impl Ext4Feature {
    const ALL: [Ext4Feature; 11] = [
        Ext4Feature::HasJournal,
        Ext4Feature::MetadataCsum,
        Ext4Feature::MetadataCsumSeed,
        Ext4Feature::SixtyFourBit,
        Ext4Feature::FlexBg,
        Ext4Feature::HugeFile,
        Ext4Feature::DirNlink,
        Ext4Feature::ExtraIsize,
        Ext4Feature::DirIndex,
        Ext4Feature::LargeDir,
        Ext4Feature::Encrypt,
    ];

    /// mke2fs's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Ext4Feature::HasJournal => "has_journal",
            Ext4Feature::MetadataCsum => "metadata_csum",
            Ext4Feature::MetadataCsumSeed => "metadata_csum_seed",
            Ext4Feature::SixtyFourBit => "64bit",
            Ext4Feature::FlexBg => "flex_bg",
            Ext4Feature::HugeFile => "huge_file",
            Ext4Feature::DirNlink => "dir_nlink",
            Ext4Feature::ExtraIsize => "extra_isize",
            Ext4Feature::DirIndex => "dir_index",
            Ext4Feature::LargeDir => "large_dir",
            Ext4Feature::Encrypt => "encrypt",
        }
    }
}

/// An ext4 extended option (`-E`). `offset=` (the filesystem would start
/// elsewhere), `discard` (thick images would turn sparse), `nodiscard` and
/// `lazy_itable_init` of thick volumes are Loam's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext4Extended {
    /// `stride=`: RAID chunk in blocks, 1 to 4096.
    Stride(u32),
    /// `stripe_width=`: RAID stripe in blocks, 1 to 65536.
    StripeWidth(u32),
    /// `lazy_itable_init=`: leave inode tables to the kernel (thin volumes only;
    /// thick ones always zero them at mkfs).
    LazyItableInit(bool),
    /// `lazy_journal_init=`: skip zeroing the journal.
    LazyJournalInit(bool),
    /// `root_owner=uid:gid`: owner of the root directory.
    RootOwner(u32, u32),
}

/// One mkfs.xfs option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XfsOption {
    /// `-b size=`: block size.
    BlockSize(BlockSize),
    /// `-i`: inode options.
    Inode(Vec<XfsInode>),
    /// `-m`: metadata features.
    Metadata(Vec<XfsMetadata>),
    /// `-n size=`: directory block size, a power of two from 4096 to 65536, at
    /// least the block size.
    NamingSize(u32),
    /// `-L`: volume label, at most 12 bytes.
    Label(Label),
}

/// An `-i` suboption of mkfs.xfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XfsInode {
    /// `size=`: 512, 1024 or 2048, at most half the block size (512 is the
    /// least with CRCs, which Loam's filesystems always have).
    Size(u32),
    /// `maxpct=`: most percent of space for inodes, 0 to 100.
    MaxPct(u8),
    /// `sparse=`: sparse inode chunks.
    Sparse(bool),
}

/// An `-m` suboption of mkfs.xfs. `crc=0` (deprecated V4 filesystems, which
/// most other features refuse) is not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XfsMetadata {
    /// `reflink=`.
    Reflink(bool),
    /// `bigtime=`.
    Bigtime(bool),
    /// `finobt=`.
    Finobt(bool),
    /// `rmapbt=`.
    Rmapbt(bool),
    /// `inobtcount=` (needs finobt).
    Inobtcount(bool),
    /// `uuid=`.
    Uuid(Uuid),
}

/// A volume label: ASCII letters, digits, `_`, `.`, `-`, within the
/// filesystem's length limit (16 bytes for ext4, 12 for xfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label(String);

impl Label {
    fn parse(text: &str, max: usize) -> Result<Label, String> {
        let charset = text.bytes().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
        if text.is_empty() || text.len() > max || !charset || text.starts_with('-') {
            return Err(format!(
                "label {} must be 1 to {max} letters, digits, '_', '.' or '-' (not first)",
                quote(text)
            ));
        }
        Ok(Label(text.to_owned()))
    }
}

/// A filesystem UUID in its canonical form, lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uuid([u8; 16]);

impl Uuid {
    fn parse(text: &str) -> Result<Uuid, String> {
        let bad = || format!("UUID {} must be 8-4-4-4-12 hexadecimal digits", quote(text));
        let groups: Vec<&str> = text.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lengths != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(Uuid(bytes))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl MkfsOptions {
    /// No extra options.
    pub fn none(fs: FsType) -> MkfsOptions {
        match fs {
            FsType::Ext4 => MkfsOptions::Ext4(Vec::new()),
            FsType::Xfs => MkfsOptions::Xfs(Vec::new()),
        }
    }

    /// Reads mkfsOptions text for `fs`; the error says what is wrong and
    /// what is accepted.
    pub fn parse(fs: FsType, text: &str) -> Result<MkfsOptions, String> {
        if text.len() > MAX_TEXT {
            return Err(format!("mkfsOptions is {} bytes; at most {MAX_TEXT} are read", text.len()));
        }
        let mut words = text.split_whitespace();
        let mut seen: Vec<&str> = Vec::new();
        let mut options = MkfsOptions::none(fs);
        while let Some(flag) = words.next() {
            if !is_flag(flag) {
                return Err(format!(
                    "{} is not an option; mkfsOptions are flags each with one value, e.g. {}",
                    quote(flag),
                    example(fs)
                ));
            }
            if seen.contains(&flag) {
                return Err(format!("{flag} is given twice; give each option once"));
            }
            seen.push(flag);
            let value = words.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match &mut options {
                MkfsOptions::Ext4(list) => list.push(Ext4Option::parse(flag, value)?),
                MkfsOptions::Xfs(list) => list.push(XfsOption::parse(flag, value)?),
            }
        }
        options.check_combination()?;
        Ok(options)
    }

    /// Reads the words a volume record keeps ([`MkfsOptions::words`]).
    pub fn from_words(fs: FsType, words: &[String]) -> Result<MkfsOptions, String> {
        MkfsOptions::parse(fs, &words.join(" "))
    }

    /// The options as words, in the order given: what a volume record keeps
    /// and what goes into mkfs's argv.
    pub fn words(&self) -> Vec<String> {
        let mut words = Vec::new();
        match self {
            MkfsOptions::Ext4(list) => list.iter().for_each(|o| o.render(&mut words)),
            MkfsOptions::Xfs(list) => list.iter().for_each(|o| o.render(&mut words)),
        }
        words
    }

    /// The smallest volume these options format: the filesystem's minimum,
    /// or for ext4 with `-N`, enough room for that many inodes' tables.
    pub fn min_bytes(&self) -> u64 {
        match self {
            MkfsOptions::Ext4(list) => {
                let inode_size = self.ext4_inode_size();
                let tables = list.iter().find_map(|o| match o {
                    Ext4Option::Inodes(n) => Some(u64::from(*n) * inode_size * 2),
                    _ => None,
                });
                // mke2fs needs room for 16 inodes at `-i` bytes each (fewer
                // cannot hold the reserved ones: "Illegal inode number").
                let sixteen_inodes = list.iter().find_map(|o| match o {
                    Ext4Option::BytesPerInode(n) => Some(u64::from(*n) * EXT4_LEAST_INODES),
                    _ => None,
                });
                (EXT4_MIN_BYTES + tables.unwrap_or(0)).max(sixteen_inodes.unwrap_or(0))
            }
            MkfsOptions::Xfs(_) => XFS_MIN_BYTES,
        }
    }

    /// The filesystem block size asked for, if any.
    pub fn block_size(&self) -> Option<BlockSize> {
        match self {
            MkfsOptions::Ext4(list) => list.iter().find_map(|o| match o {
                Ext4Option::BlockSize(b) => Some(*b),
                _ => None,
            }),
            MkfsOptions::Xfs(list) => list.iter().find_map(|o| match o {
                XfsOption::BlockSize(b) => Some(*b),
                _ => None,
            }),
        }
    }

    /// ext4's `-E` values, for mkfs to merge with its own (mke2fs keeps
    /// only the last `-E`).
    pub fn ext4_extended(&self) -> Vec<String> {
        match self {
            MkfsOptions::Ext4(list) => list
                .iter()
                .filter_map(|o| match o {
                    Ext4Option::Extended(ext) => Some(ext.iter().map(Ext4Extended::render)),
                    _ => None,
                })
                .flatten()
                .collect(),
            MkfsOptions::Xfs(_) => Vec::new(),
        }
    }

    /// The words of every option but ext4's `-E` (see [`Self::ext4_extended`]).
    pub fn words_without_extended(&self) -> Vec<String> {
        let mut words = Vec::new();
        match self {
            MkfsOptions::Ext4(list) => {
                list.iter().filter(|o| !matches!(o, Ext4Option::Extended(_))).for_each(|o| o.render(&mut words))
            }
            MkfsOptions::Xfs(list) => list.iter().for_each(|o| o.render(&mut words)),
        }
        words
    }

    fn ext4_inode_size(&self) -> u64 {
        match self {
            MkfsOptions::Ext4(list) => list
                .iter()
                .find_map(|o| match o {
                    Ext4Option::InodeSize(s) => Some(u64::from(*s)),
                    _ => None,
                })
                .unwrap_or(EXT4_DEFAULT_INODE_SIZE),
            MkfsOptions::Xfs(_) => 0,
        }
    }

    /// Rules between options, as mkfs enforces them.
    fn check_combination(&self) -> Result<(), String> {
        match self {
            MkfsOptions::Ext4(list) => {
                let inode_size = self.ext4_inode_size();
                let block = self.block_size();
                if let Some(block) = block
                    && inode_size > block.bytes()
                {
                    return Err(format!("-I {inode_size} is larger than the block size -b {}", block.bytes()));
                }
                for option in list {
                    match option {
                        Ext4Option::BytesPerInode(ratio) if u64::from(*ratio) < 2 * inode_size => {
                            return Err(format!(
                                "-i {ratio} leaves no room beside inode tables of {inode_size}-byte inodes; use at \
                                 least {}",
                                2 * inode_size
                            ));
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            MkfsOptions::Xfs(list) => {
                let block = self.block_size().unwrap_or(BlockSize::K4).bytes();
                for option in list {
                    match option {
                        XfsOption::Inode(subs) => {
                            for sub in subs {
                                if let XfsInode::Size(size) = sub
                                    && u64::from(*size) > block / 2
                                {
                                    return Err(format!(
                                        "-i size={size} is more than half the block size {block}; use at most {}",
                                        block / 2
                                    ));
                                }
                            }
                        }
                        XfsOption::NamingSize(size) if u64::from(*size) < block => {
                            return Err(format!("-n size={size} is below the block size {block}"));
                        }
                        XfsOption::Metadata(subs)
                            if subs.contains(&XfsMetadata::Inobtcount(true))
                                && subs.contains(&XfsMetadata::Finobt(false)) =>
                        {
                            return Err("-m inobtcount=1 needs finobt (drop finobt=0)".into());
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }
}

impl Ext4Option {
    fn parse(flag: &str, value: &str) -> Result<Ext4Option, String> {
        Ok(match flag {
            "-b" => Ext4Option::BlockSize(BlockSize::parse(value, "-b")?),
            "-i" => Ext4Option::BytesPerInode(number(flag, value, 1024, 64 << 20)?),
            "-I" => {
                let size = number(flag, value, 128, 1024)?;
                if !size.is_power_of_two() {
                    return Err(format!("-I {size} must be 128, 256, 512 or 1024"));
                }
                Ext4Option::InodeSize(size)
            }
            "-N" => Ext4Option::Inodes(number(flag, value, 16, 1 << 24)?),
            "-m" => Ext4Option::ReservedPercent(percent(flag, value, 0, 50)?),
            "-O" => Ext4Option::Features(ext4_features(list(flag, value, parse_ext4_feature)?)?),
            "-E" => Ext4Option::Extended(list(flag, value, parse_ext4_extended)?),
            "-L" => Ext4Option::Label(Label::parse(value, 16)?),
            "-U" => Ext4Option::Uuid(Uuid::parse(value)?),
            other => return Err(refused(FsType::Ext4, other)),
        })
    }

    fn render(&self, words: &mut Vec<String>) {
        let (flag, value) = match self {
            Ext4Option::BlockSize(b) => ("-b", b.bytes().to_string()),
            Ext4Option::BytesPerInode(n) => ("-i", n.to_string()),
            Ext4Option::InodeSize(n) => ("-I", n.to_string()),
            Ext4Option::Inodes(n) => ("-N", n.to_string()),
            Ext4Option::ReservedPercent(n) => ("-m", n.to_string()),
            Ext4Option::Features(features) => (
                "-O",
                features
                    .iter()
                    .map(|(f, on)| format!("{}{}", if *on { "" } else { "^" }, f.name()))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Ext4Option::Extended(ext) => ("-E", ext.iter().map(Ext4Extended::render).collect::<Vec<_>>().join(",")),
            Ext4Option::Label(Label(label)) => ("-L", label.clone()),
            Ext4Option::Uuid(uuid) => ("-U", uuid.to_string()),
        };
        words.push(flag.to_owned());
        words.push(value);
    }
}

impl Ext4Extended {
    fn render(&self) -> String {
        match self {
            Ext4Extended::Stride(n) => format!("stride={n}"),
            Ext4Extended::StripeWidth(n) => format!("stripe_width={n}"),
            Ext4Extended::LazyItableInit(on) => format!("lazy_itable_init={}", u8::from(*on)),
            Ext4Extended::LazyJournalInit(on) => format!("lazy_journal_init={}", u8::from(*on)),
            Ext4Extended::RootOwner(uid, gid) => format!("root_owner={uid}:{gid}"),
        }
    }
}

fn parse_ext4_feature(item: &str) -> Result<(Ext4Feature, bool), String> {
    let (name, on) = match item.strip_prefix('^') {
        Some(name) => (name, false),
        None => (item, true),
    };
    let feature = Ext4Feature::ALL.into_iter().find(|f| f.name() == name).ok_or_else(|| {
        format!(
            "-O {} is not a feature Loam formats with; accepted: {} (each may be turned off with ^, 64bit only on)",
            quote(item),
            Ext4Feature::ALL.map(Ext4Feature::name).join(", ")
        )
    })?;
    if feature == Ext4Feature::SixtyFourBit && !on {
        return Err("-O ^64bit would cap the filesystem at 16 TiB; leave 64bit on".into());
    }
    Ok((feature, on))
}

/// A feature list mke2fs takes: `metadata_csum_seed` is stored in the
/// checksums that `^metadata_csum` turns off, and mke2fs refuses the pair.
fn ext4_features(features: Vec<(Ext4Feature, bool)>) -> Result<Vec<(Ext4Feature, bool)>, String> {
    let has = |feature, on| features.contains(&(feature, on));
    if has(Ext4Feature::MetadataCsumSeed, true) && has(Ext4Feature::MetadataCsum, false) {
        return Err(
            "-O metadata_csum_seed needs metadata_csum, which ^metadata_csum turns off; drop one of them".into()
        );
    }
    Ok(features)
}

fn parse_ext4_extended(item: &str) -> Result<Ext4Extended, String> {
    let (key, value) = item.split_once('=').unwrap_or((item, ""));
    Ok(match key {
        "stride" => Ext4Extended::Stride(number("-E stride", value, 1, 4096)?),
        "stripe_width" | "stripe-width" => Ext4Extended::StripeWidth(number("-E stripe_width", value, 1, 65536)?),
        "lazy_itable_init" => Ext4Extended::LazyItableInit(boolean("-E lazy_itable_init", value)?),
        "lazy_journal_init" => Ext4Extended::LazyJournalInit(boolean("-E lazy_journal_init", value)?),
        "root_owner" => {
            let (uid, gid) = value
                .split_once(':')
                .ok_or_else(|| format!("-E root_owner={} must be uid:gid, both numbers", quote(value)))?;
            Ext4Extended::RootOwner(
                number("-E root_owner uid", uid, 0, u32::MAX)?,
                number("-E root_owner gid", gid, 0, u32::MAX)?,
            )
        }
        _ => {
            return Err(format!(
                "-E {} is not an extended option Loam formats with; accepted: stride=, stripe_width=, \
                 lazy_itable_init=, lazy_journal_init=, root_owner= (Loam sets discard, offset and the rest itself)",
                quote(item)
            ));
        }
    })
}

impl XfsOption {
    fn parse(flag: &str, value: &str) -> Result<XfsOption, String> {
        Ok(match flag {
            "-b" => match value.split_once('=') {
                Some(("size", size)) => XfsOption::BlockSize(BlockSize::parse(size, "-b size=")?),
                _ => return Err(format!("-b {} must be size=1024, size=2048 or size=4096", quote(value))),
            },
            "-i" => XfsOption::Inode(list(flag, value, parse_xfs_inode)?),
            "-m" => XfsOption::Metadata(list(flag, value, parse_xfs_metadata)?),
            "-n" => match value.split_once('=') {
                Some(("size", size)) => {
                    let size = number("-n size=", size, 4096, 65536)?;
                    if !size.is_power_of_two() {
                        return Err(format!("-n size={size} must be a power of two from 4096 to 65536"));
                    }
                    XfsOption::NamingSize(size)
                }
                _ => return Err(format!("-n {} must be size=<bytes>", quote(value))),
            },
            "-L" => XfsOption::Label(Label::parse(value, 12)?),
            other => return Err(refused(FsType::Xfs, other)),
        })
    }

    fn render(&self, words: &mut Vec<String>) {
        fn join<T>(items: &[T], render: impl Fn(&T) -> String) -> String {
            items.iter().map(render).collect::<Vec<_>>().join(",")
        }
        let (flag, value) = match self {
            XfsOption::BlockSize(b) => ("-b", format!("size={}", b.bytes())),
            XfsOption::Inode(subs) => (
                "-i",
                join(subs, |s| match s {
                    XfsInode::Size(n) => format!("size={n}"),
                    XfsInode::MaxPct(n) => format!("maxpct={n}"),
                    XfsInode::Sparse(on) => format!("sparse={}", u8::from(*on)),
                }),
            ),
            XfsOption::Metadata(subs) => (
                "-m",
                join(subs, |s| match s {
                    XfsMetadata::Reflink(on) => format!("reflink={}", u8::from(*on)),
                    XfsMetadata::Bigtime(on) => format!("bigtime={}", u8::from(*on)),
                    XfsMetadata::Finobt(on) => format!("finobt={}", u8::from(*on)),
                    XfsMetadata::Rmapbt(on) => format!("rmapbt={}", u8::from(*on)),
                    XfsMetadata::Inobtcount(on) => format!("inobtcount={}", u8::from(*on)),
                    XfsMetadata::Uuid(uuid) => format!("uuid={uuid}"),
                }),
            ),
            XfsOption::NamingSize(n) => ("-n", format!("size={n}")),
            XfsOption::Label(Label(label)) => ("-L", label.clone()),
        };
        words.push(flag.to_owned());
        words.push(value);
    }
}

fn parse_xfs_inode(item: &str) -> Result<XfsInode, String> {
    let (key, value) = item.split_once('=').unwrap_or((item, ""));
    Ok(match key {
        "size" => {
            let size = number("-i size=", value, 512, 2048)?;
            if !size.is_power_of_two() {
                return Err(format!("-i size={size} must be 512, 1024 or 2048"));
            }
            XfsInode::Size(size)
        }
        "maxpct" => XfsInode::MaxPct(percent("-i maxpct=", value, 0, 100)?),
        "sparse" => XfsInode::Sparse(boolean("-i sparse=", value)?),
        _ => return Err(format!("-i {} is not accepted; accepted: size=, maxpct=, sparse=", quote(item))),
    })
}

fn parse_xfs_metadata(item: &str) -> Result<XfsMetadata, String> {
    let (key, value) = item.split_once('=').unwrap_or((item, ""));
    let on = || boolean(&format!("-m {key}="), value);
    Ok(match key {
        "reflink" => XfsMetadata::Reflink(on()?),
        "bigtime" => XfsMetadata::Bigtime(on()?),
        "finobt" => XfsMetadata::Finobt(on()?),
        "rmapbt" => XfsMetadata::Rmapbt(on()?),
        "inobtcount" => XfsMetadata::Inobtcount(on()?),
        "uuid" => XfsMetadata::Uuid(Uuid::parse(value)?),
        _ => {
            return Err(format!(
                "-m {} is not accepted; accepted: reflink=, bigtime=, finobt=, rmapbt=, inobtcount= (0 or 1), uuid= \
                 (crc is always on)",
                quote(item)
            ));
        }
    })
}

/// A `-X` flag: one dash and one ASCII letter.
fn is_flag(word: &str) -> bool {
    word.len() == 2 && word.starts_with('-') && word.as_bytes()[1].is_ascii_alphabetic()
}

/// Comma-separated items, none repeated, at least one.
fn list<T: PartialEq>(flag: &str, value: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    let mut items: Vec<T> = Vec::new();
    let mut keys: Vec<&str> = Vec::new();
    for part in value.split(',') {
        let key = part.split_once('=').map_or(part, |(k, _)| k).trim_start_matches('^');
        if keys.contains(&key) {
            return Err(format!("{flag} names {} twice", quote(key)));
        }
        keys.push(key);
        items.push(item(part)?);
    }
    Ok(items)
}

/// A percentage, digits only, within `min..=max` (at most 100).
fn percent(what: &str, text: &str, min: u8, max: u8) -> Result<u8, String> {
    let n = number(what, text, u32::from(min), u32::from(max))?;
    u8::try_from(n).map_err(|_| format!("{what} {} must be at most {max}", quote(text)))
}

/// A decimal number within `min..=max`, digits only.
fn number(what: &str, text: &str, min: u32, max: u32) -> Result<u32, String> {
    let value = (!text.is_empty() && text.len() <= 10 && text.bytes().all(|c| c.is_ascii_digit()))
        .then(|| text.parse::<u64>().ok())
        .flatten()
        .filter(|n| (u64::from(min)..=u64::from(max)).contains(n));
    value
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{what} {} must be a whole number from {min} to {max}", quote(text)))
}

fn boolean(what: &str, text: &str) -> Result<bool, String> {
    match text {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("{what}{} must be 0 or 1", quote(text))),
    }
}

fn refused(fs: FsType, flag: &str) -> String {
    let accepted = match fs {
        FsType::Ext4 => "-b, -i, -I, -N, -m, -O, -E, -L, -U",
        FsType::Xfs => "-b size=, -i, -m, -n size=, -L",
    };
    format!(
        "{flag} is not an mkfs option Loam accepts for {}; accepted: {accepted} (nothing that names a file or device)",
        fs.name()
    )
}

fn example(fs: FsType) -> &'static str {
    match fs {
        FsType::Ext4 => "\"-b 4096 -i 16384\"",
        FsType::Xfs => "\"-b size=4096 -m reflink=1\"",
    }
}

/// Quotes caller text for a message, cut to a bounded length.
fn quote(text: &str) -> String {
    crate::error::quote(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::process::Command;

    fn ext4(text: &str) -> Result<MkfsOptions, String> {
        MkfsOptions::parse(FsType::Ext4, text)
    }

    fn xfs(text: &str) -> Result<MkfsOptions, String> {
        MkfsOptions::parse(FsType::Xfs, text)
    }

    #[test]
    fn accepts_the_closed_set_and_renders_it_canonically() {
        assert_eq!(ext4("").unwrap(), MkfsOptions::Ext4(vec![]));
        assert_eq!(xfs("  ").unwrap().words(), Vec::<String>::new());
        let options = ext4(
            " -b 4096\t-i 16384 -I 512 -N 5000 -m 1 -O ^has_journal,metadata_csum,large_dir \
             -E stride=16,stripe-width=64,root_owner=1000:100 -L data_01 -U 0123ABCD-0000-1111-2222-333344445555",
        )
        .unwrap();
        assert_eq!(
            options.words().join(" "),
            "-b 4096 -i 16384 -I 512 -N 5000 -m 1 -O ^has_journal,metadata_csum,large_dir \
             -E stride=16,stripe_width=64,root_owner=1000:100 -L data_01 -U 0123abcd-0000-1111-2222-333344445555"
        );
        assert_eq!(options.block_size(), Some(BlockSize::K4));
        assert_eq!(options.ext4_extended(), ["stride=16", "stripe_width=64", "root_owner=1000:100"]);
        assert!(!options.words_without_extended().contains(&"-E".to_owned()));
        let options =
            xfs("-b size=2048 -i size=1024,maxpct=5,sparse=1 -m reflink=1,bigtime=1,rmapbt=0 -n size=8192 -L scratch")
                .unwrap();
        assert_eq!(options.words().len(), 10);
        assert_eq!(MkfsOptions::from_words(FsType::Xfs, &options.words()).unwrap(), options);
    }

    #[test]
    fn refuses_files_devices_dry_runs_and_values_mkfs_would_refuse_later() {
        for (fs, text, why) in [
            // Options naming host files or devices (the issue's cases first).
            (FsType::Ext4, "-d /etc", "not an mkfs option"),
            (FsType::Ext4, "-d etc", "not an mkfs option"),
            (FsType::Ext4, "-l /etc/passwd", "not an mkfs option"),
            (FsType::Ext4, "-J device=/dev/sda", "not an mkfs option"),
            (FsType::Ext4, "-z /tmp/undo", "not an mkfs option"),
            (FsType::Ext4, "-E offset=4096", "not an extended option"),
            (FsType::Ext4, "-E discard", "not an extended option"),
            (FsType::Ext4, "-E nodiscard", "not an extended option"),
            (FsType::Xfs, "-l logdev=/etc/shadow", "not an mkfs option"),
            (FsType::Xfs, "-r rtdev=/etc/shadow", "not an mkfs option"),
            (FsType::Xfs, "-d name=/etc/shadow", "not an mkfs option"),
            (FsType::Xfs, "-p /etc/protofile", "not an mkfs option"),
            (FsType::Xfs, "-c options=/etc/x.conf", "not an mkfs option"),
            // Not formatting, forcing, or another filesystem.
            (FsType::Ext4, "-n", "needs a value"),
            (FsType::Ext4, "-F", "needs a value"),
            (FsType::Xfs, "-f 1", "not an mkfs option"),
            (FsType::Xfs, "-N 1", "not an mkfs option"),
            (FsType::Ext4, "-t ext2", "not an mkfs option"),
            (FsType::Ext4, "-S 1", "not an mkfs option"),
            (FsType::Ext4, "/dev/sda", "is not an option"),
            (FsType::Ext4, "--force", "is not an option"),
            (FsType::Ext4, "-b 4096 1000", "is not an option"),
            (FsType::Ext4, "-b", "needs a value"),
            // Values mkfs or the kernel would refuse at stage time.
            (FsType::Ext4, "-b 65536", "1024, 2048 or 4096"),
            (FsType::Ext4, "-b 3", "1024, 2048 or 4096"),
            (FsType::Ext4, "-b -1", "1024, 2048 or 4096"),
            (FsType::Ext4, "-I 2048", "from 128 to 1024"),
            (FsType::Ext4, "-I 384", "128, 256, 512 or 1024"),
            (FsType::Ext4, "-b 1024 -I 2048", "from 128 to 1024"),
            (FsType::Ext4, "-b 1024 -I 1024 -i 1024", "leaves no room"),
            (FsType::Ext4, "-b 2048 -I 1024 -i 1024", "leaves no room"),
            (FsType::Ext4, "-O project", "not a feature"),
            (FsType::Ext4, "-O quota", "not a feature"),
            (FsType::Ext4, "-i 512", "from 1024"),
            (FsType::Ext4, "-N 0", "from 16"),
            (FsType::Ext4, "-N 99999999999", "from 16"),
            (FsType::Ext4, "-m 51", "from 0 to 50"),
            (FsType::Ext4, "-m +1", "from 0 to 50"),
            (FsType::Ext4, "-O ^extent", "not a feature"),
            (FsType::Ext4, "-O ^64bit", "16 TiB"),
            (FsType::Ext4, "-O casefold", "not a feature"),
            (FsType::Ext4, "-O metadata_csum,^metadata_csum", "twice"),
            (FsType::Ext4, "-O ^metadata_csum,metadata_csum_seed", "needs metadata_csum"),
            (FsType::Ext4, "-O ", "needs a value"),
            (FsType::Ext4, "-E stride=0", "from 1"),
            (FsType::Ext4, "-E root_owner=0", "uid:gid"),
            (FsType::Ext4, "-E root_owner=a:b", "whole number"),
            (FsType::Ext4, "-E lazy_itable_init=yes", "0 or 1"),
            (FsType::Ext4, "-L abcdefghijklmnopq", "1 to 16"),
            (FsType::Ext4, "-L a/b", "letters"),
            (FsType::Ext4, "-L $(id)", "letters"),
            (FsType::Ext4, "-U random", "8-4-4-4-12"),
            (FsType::Ext4, "-U 0123abcd-0000-1111-2222-33334444555g", "8-4-4-4-12"),
            (FsType::Ext4, "-b 4096 -b 4096", "twice"),
            (FsType::Xfs, "-b 4096", "size=1024"),
            (FsType::Xfs, "-b size=65536", "1024, 2048 or 4096"),
            (FsType::Xfs, "-b log=12", "size=1024"),
            (FsType::Xfs, "-i size=256", "from 512"),
            (FsType::Xfs, "-b size=1024 -i size=1024", "half the block size"),
            (FsType::Xfs, "-i size=2048 -b size=2048", "half the block size"),
            (FsType::Xfs, "-i maxpct=101", "from 0 to 100"),
            (FsType::Xfs, "-i projid32bit=0", "not accepted"),
            (FsType::Xfs, "-m crc=0", "crc is always on"),
            (FsType::Xfs, "-m inobtcount=1,finobt=0", "needs finobt"),
            (FsType::Xfs, "-n size=2048", "from 4096"),
            (FsType::Xfs, "-n size=12288", "power of two"),
            (FsType::Xfs, "-b size=4096 -n size=4096 -n size=8192", "twice"),
            (FsType::Xfs, "-n version=ci", "size="),
            (FsType::Xfs, "-L abcdefghijklm", "1 to 12"),
            (FsType::Xfs, "-d su=64k,sw=4", "not an mkfs option"),
            (FsType::Xfs, "-s size=4096", "not an mkfs option"),
        ] {
            let err = MkfsOptions::parse(fs, text).expect_err(text);
            assert!(err.contains(why), "{fs:?} {text:?}: {err}");
        }
        let long = "-L ".to_owned() + &"a".repeat(5000);
        let err = ext4(&long).unwrap_err();
        assert!(err.len() < 300, "the error quotes a bounded part: {err}");
    }

    #[test]
    fn inode_counts_raise_the_least_capacity() {
        assert_eq!(ext4("").unwrap().min_bytes(), EXT4_MIN_BYTES);
        assert_eq!(xfs("").unwrap().min_bytes(), XFS_MIN_BYTES);
        assert_eq!(ext4("-N 100000").unwrap().min_bytes(), EXT4_MIN_BYTES + 100_000 * 256 * 2);
        assert_eq!(ext4("-N 1000 -I 1024").unwrap().min_bytes(), EXT4_MIN_BYTES + 1000 * 1024 * 2);
        // Room for 16 inodes at 1 MiB each.
        assert_eq!(ext4("-i 1048576").unwrap().min_bytes(), 16 << 20);
    }

    /// Option texts from the closed set, valid ones and near misses alike.
    fn option_text(fs: FsType) -> impl Strategy<Value = String> {
        let ext4_values = prop_oneof![
            Just("-b".to_owned()).prop_flat_map(
                |f| prop::sample::select(vec!["1024", "2048", "4096"]).prop_map(move |v| format!("{f} {v}"))
            ),
            (1024u32..300_000).prop_map(|n| format!("-i {n}")),
            prop::sample::select(vec![128u32, 256, 512, 1024]).prop_map(|n| format!("-I {n}")),
            (16u32..200_000).prop_map(|n| format!("-N {n}")),
            (0u32..=50).prop_map(|n| format!("-m {n}")),
            prop::collection::vec((prop::sample::select(Ext4Feature::ALL.to_vec()), any::<bool>()), 1..4).prop_map(
                |features| {
                    let mut seen = Vec::new();
                    let items: Vec<String> = features
                        .into_iter()
                        .filter(|(f, on)| *f != Ext4Feature::SixtyFourBit || *on)
                        .filter(|(f, _)| {
                            !seen.contains(f) && {
                                seen.push(*f);
                                true
                            }
                        })
                        .map(|(f, on)| format!("{}{}", if on { "" } else { "^" }, f.name()))
                        .collect();
                    if items.is_empty() { "-O dir_index".to_owned() } else { format!("-O {}", items.join(",")) }
                }
            ),
            (1u32..=4096, 1u32..=65536, any::<bool>(), any::<bool>(), any::<u16>()).prop_map(
                |(s, w, i, j, o)| format!(
                    "-E stride={s},stripe_width={w},lazy_itable_init={},lazy_journal_init={},root_owner={o}:{o}",
                    u8::from(i),
                    u8::from(j)
                )
            ),
            "[A-Za-z0-9_][A-Za-z0-9_.-]{0,15}".prop_map(|l| format!("-L {l}")),
            any::<[u8; 16]>().prop_map(|b| format!("-U {}", Uuid(b))),
        ];
        let xfs_values = prop_oneof![
            prop::sample::select(vec!["1024", "2048", "4096"]).prop_map(|v| format!("-b size={v}")),
            (prop::sample::select(vec![512u32, 1024, 2048]), 0u32..=100, any::<bool>())
                .prop_map(|(s, m, sp)| format!("-i size={s},maxpct={m},sparse={}", u8::from(sp))),
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(r, b, rm, i)| format!(
                "-m reflink={},bigtime={},rmapbt={},finobt=1,inobtcount={}",
                u8::from(r),
                u8::from(b),
                u8::from(rm),
                u8::from(i)
            )),
            prop::sample::select(vec![4096u32, 8192, 16384, 32768, 65536]).prop_map(|n| format!("-n size={n}")),
            "[A-Za-z0-9_][A-Za-z0-9_.-]{0,11}".prop_map(|l| format!("-L {l}")),
        ];
        let one = match fs {
            FsType::Ext4 => ext4_values.boxed(),
            FsType::Xfs => xfs_values.boxed(),
        };
        prop::collection::vec(one, 0..5).prop_map(|options| {
            // Each flag once: keep the first of a flag.
            let mut flags = Vec::new();
            options
                .into_iter()
                .filter(|o| {
                    let flag = o[..2].to_owned();
                    !flags.contains(&flag) && {
                        flags.push(flag);
                        true
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    fn fs_type() -> impl Strategy<Value = FsType> {
        prop_oneof![Just(FsType::Ext4), Just(FsType::Xfs)]
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics_and_never_accepts_a_path(fs in fs_type(), text in ".{0,200}") {
            if let Ok(options) = MkfsOptions::parse(fs, &text) {
                prop_assert!(options.words().iter().all(|w| !w.contains('/')), "{:?}", options.words());
            }
        }

        #[test]
        fn words_of_dangerous_flags_never_parse(
            fs in fs_type(),
            flag in prop::sample::select(vec!["-d", "-l", "-r", "-J", "-z", "-p", "-c", "-t", "-F", "-f", "-V", "-S", "-n", "-N"]),
            value in "[a-z/=.,0-9]{1,20}",
        ) {
            let text = format!("{flag} {value}");
            let parsed = MkfsOptions::parse(fs, &text);
            // xfs -n size= and ext4 -N count are the only flags here with a checked meaning.
            let allowed = (fs == FsType::Xfs && flag == "-n") || (fs == FsType::Ext4 && flag == "-N");
            prop_assert!(parsed.is_err() || allowed, "{text:?} was accepted");
            if let Ok(options) = parsed {
                prop_assert!(!options.words().concat().contains('/'));
            }
        }

        #[test]
        fn accepted_options_round_trip_through_their_words(fs in fs_type(), text in option_text(FsType::Ext4), xtext in option_text(FsType::Xfs)) {
            let text = if fs == FsType::Ext4 { text } else { xtext };
            if let Ok(options) = MkfsOptions::parse(fs, &text) {
                let words = options.words();
                prop_assert_eq!(MkfsOptions::from_words(fs, &words).unwrap(), options.clone());
                prop_assert_eq!(MkfsOptions::parse(fs, &words.join(" ")).unwrap().words(), words);
            }
        }
    }

    /// The promise CreateVolume makes: options it accepts format a volume
    /// of the least capacity they ask for. Runs the real mkfs on sparse files
    /// (no root needed), a bounded number of cases (PROPTEST_CASES for more).
    #[test]
    fn accepted_options_format_an_image_of_their_least_capacity() {
        let have = |p: &str| Command::new(p).arg("-V").output().is_ok();
        assert!(have("mkfs.ext4") && have("mkfs.xfs"), "mkfs.ext4 and mkfs.xfs are needed (e2fsprogs, xfsprogs)");
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24);
        let dir = tempfile::tempdir().unwrap();
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
        let strategy = (fs_type(), option_text(FsType::Ext4), option_text(FsType::Xfs), any::<bool>());
        let formatted_count = std::cell::Cell::new(0);
        runner
            .run(&strategy, |(fs, etext, xtext, thick)| {
                let text = if fs == FsType::Ext4 { etext } else { xtext };
                let Ok(options) = MkfsOptions::parse(fs, &text) else { return Ok(()) };
                formatted_count.set(formatted_count.get() + 1);
                let image = dir.path().join("fs.img");
                let file = std::fs::File::create(&image).unwrap();
                file.set_len(options.min_bytes().next_multiple_of(4096)).unwrap();
                drop(file);
                let formatted = super::super::blockfs::mkfs(&image, fs, thick, &options);
                prop_assert!(formatted.is_ok(), "{fs:?} {text:?} (thick {thick}): {formatted:?}");
                Ok(())
            })
            .unwrap();
        eprintln!("{} of {cases} generated option sets were accepted and formatted", formatted_count.get());
        assert!(formatted_count.get() * 2 >= cases, "the generator should mostly make accepted sets");
    }
}
