//! Property tests over what Loam reads from outside: sizes, mount flags,
//! mountinfo lines, ids, pagination tokens and its own records. Parsers never
//! panic on any input, and what Loam writes reads back as itself.
//!
//! CI runs proptest's default 256 cases per property (well under a second);
//! for a longer run set `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=100000 cargo test --locked -p loam --test properties`.
//! The mkfsOptions properties live beside their parser
//! (`src/kernel/mkfs_options.rs`), since they use its private types.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use loam::ids::{Key, Kind, MAX_NODE_ID_LEN, ObjectId};
use loam::kernel::blockfs::FsType;
use loam::kernel::mount::MountFlags;
use loam::kernel::mountinfo::{self, MountEntry};
use loam::records::{
    AccessMode, Attachment, Capability, ContentSource, Enforcement, Formatting, InlineOrigin, Layout, LoopSpec,
    Provisioning, Publication, Schema, Stage, VolumeRecord,
};
use loam::routing::listing::Cursor;
use loam::rpc::validate::{MAX_INLINE_SIZE, inline_size as quantity};
use loam::store::Table;
use proptest::prelude::*;

const SUFFIXES: [(&str, u128); 13] = [
    ("", 1),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
];

const FLAG_WORDS: [&str; 18] = [
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
    "relatime",
    "norelatime",
    "strictatime",
    "bind",
    "rbind",
    "defaults",
];

/// The kernel's escaping of a mountinfo field: space, tab, newline and
/// backslash as `\ooo`.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{b:03o}")),
            _ => out.push(b as char),
        }
    }
    out
}

fn path_bytes() -> impl Strategy<Value = Vec<u8>> {
    // Any bytes but NUL (paths cannot hold it), from printable ASCII and the
    // escaped characters; non-UTF-8 bytes are another item of the issue.
    prop::collection::vec(prop_oneof![Just(b' '), Just(b'\t'), Just(b'\n'), Just(b'\\'), 0x21u8..0x7f], 0..40).prop_map(
        |mut bytes| {
            bytes.insert(0, b'/');
            bytes
        },
    )
}

fn word() -> impl Strategy<Value = String> {
    "[a-z0-9_=,.:/-]{1,30}"
}

fn capability() -> impl Strategy<Value = Capability> {
    (
        prop_oneof![
            Just(AccessMode::SingleNodeWriter),
            Just(AccessMode::SingleNodeReaderOnly),
            Just(AccessMode::SingleNodeSingleWriter),
            Just(AccessMode::SingleNodeMultiWriter),
        ],
        any::<bool>(),
        "[a-z0-9]{0,8}",
        prop::collection::vec(prop::sample::select(FLAG_WORDS.to_vec()).prop_map(String::from), 0..4),
    )
        .prop_map(|(access_mode, block, fs_type, mount_flags)| Capability {
            access_mode,
            block,
            fs_type,
            mount_flags,
        })
}

fn volume_record() -> impl Strategy<Value = VolumeRecord> {
    let strings = || prop::collection::btree_map("[a-zA-Z./_-]{1,20}", ".{0,20}", 0..4);
    (
        (".{1,40}", ".{1,40}", any::<u64>(), any::<bool>(), any::<bool>(), prop::collection::vec(word(), 0..4)),
        (strings(), strings()),
        prop::option::of(prop_oneof![
            ".{1,20}".prop_map(ContentSource::Snapshot),
            ".{1,20}".prop_map(ContentSource::Volume)
        ]),
        prop::option::of((".{1,20}", any::<bool>(), capability())),
        prop::option::of((path_bytes(), capability())),
        prop::collection::vec((path_bytes(), any::<bool>(), capability()), 0..3),
        prop::option::of(prop_oneof![
            any::<u64>().prop_map(Enforcement::BtrfsQgroup),
            any::<u32>().prop_map(Enforcement::Project),
            ".{0,30}".prop_map(Enforcement::Unenforced),
        ]),
        prop::option::of((".{1,20}", ".{0,10}", ".{0,10}", ".{0,10}")),
    )
        .prop_map(
            |(
                (id, name, capacity_bytes, is_loop, thick, mkfs_options),
                (parameters, mutable_parameters),
                source,
                attachment,
                stage,
                publications,
                enforcement,
                inline,
            )| {
                let path = |bytes: Vec<u8>| PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
                let provisioning = if thick { Provisioning::Thick } else { Provisioning::Thin };
                let fs = if mkfs_options.is_empty() { FsType::Xfs } else { FsType::Ext4 };
                VolumeRecord {
                    schema: Schema,
                    id,
                    name,
                    capacity_bytes,
                    // Present or not, tied to another drawn value.
                    requested_bytes: thick.then_some(capacity_bytes / 2),
                    layout: if is_loop {
                        Layout::Loop(LoopSpec { fs, provisioning, mkfs_options })
                    } else {
                        Layout::Dir
                    },
                    parameters,
                    mutable_parameters,
                    source,
                    attachment: attachment.map(|(node_id, read_only, capability)| Attachment {
                        node_id,
                        read_only,
                        capability,
                    }),
                    stage: stage.map(|(p, capability)| Stage { path: path(p), capability }),
                    publications: publications
                        .into_iter()
                        .map(|(p, read_only, capability)| (path(p), Publication { read_only, capability }))
                        .collect::<BTreeMap<_, _>>(),
                    enforcement,
                    // Both states, tied to another drawn value to keep the tuple small.
                    formatting: is_loop.then_some(if thick { Formatting::Done } else { Formatting::Started }),
                    inline: inline.map(|(volume_id, pod_namespace, pod_name, pod_uid)| InlineOrigin {
                        volume_id,
                        pod_namespace,
                        pod_name,
                        pod_uid,
                    }),
                }
            },
        )
}

proptest! {
    #[test]
    fn sizes_never_panic_and_accept_only_digits_with_a_suffix(text in ".{0,40}") {
        if let Ok(bytes) = quantity(&text) {
            prop_assert!(bytes > 0 && bytes <= MAX_INLINE_SIZE);
            let number = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            prop_assert!(number.bytes().all(|c| c.is_ascii_digit() || c == b'.'), "{text:?}");
        }
    }

    #[test]
    fn sizes_read_back_what_they_say(mantissa in 1u64..100_000, suffix in 0usize..13) {
        let (name, multiplier) = SUFFIXES[suffix];
        let want = u128::from(mantissa) * multiplier;
        let got = quantity(&format!("{mantissa}{name}"));
        if want <= u128::from(MAX_INLINE_SIZE) {
            prop_assert_eq!(got, Ok(u64::try_from(want).expect("within 1Pi")));
        } else {
            prop_assert!(got.is_err());
        }
    }

    #[test]
    fn fractions_round_up_to_whole_bytes(whole in 0u64..1000, fraction in 1u64..1000, suffix in 0usize..8) {
        let (name, multiplier) = SUFFIXES[suffix];
        let text = format!("{whole}.{fraction:03}{name}");
        let bytes = ((u128::from(whole) * 1000 + u128::from(fraction)) * multiplier).div_ceil(1000);
        if bytes <= u128::from(MAX_INLINE_SIZE) {
            prop_assert_eq!(quantity(&text), Ok(u64::try_from(bytes).expect("within 1Pi")));
        } else {
            prop_assert!(quantity(&text).is_err(), "{text} is more than 1Pi");
        }
    }

    #[test]
    fn mount_flags_never_panic_and_accept_only_known_words(words in prop::collection::vec(".{0,20}", 0..6)) {
        if MountFlags::parse(&words).is_ok() {
            prop_assert!(words.iter().all(|w| FLAG_WORDS.contains(&w.as_str())), "{words:?}");
        }
    }

    #[test]
    fn mount_flags_render_what_they_parse(words in prop::collection::vec(prop::sample::select(FLAG_WORDS.to_vec()), 0..8)) {
        let words: Vec<String> = words.into_iter().map(String::from).collect();
        let flags = MountFlags::parse(&words).unwrap();
        let rendered: Vec<String> = flags.to_string().split(',').map(String::from).collect();
        prop_assert_eq!(MountFlags::parse(&rendered).unwrap(), flags);
    }

    #[test]
    fn mountinfo_never_panics(text in ".{0,300}") {
        let _ = mountinfo::parse(&text);
    }

    #[test]
    fn mountinfo_lines_round_trip(
        ids in (0u32..100_000, 0u32..100_000),
        root in path_bytes(),
        mount_point in path_bytes(),
        options in "(ro|rw)(,[a-z]{1,8}){0,3}",
        optional in prop::collection::vec("(shared|master):[0-9]{1,3}", 0..3),
        fs_type in "[a-z0-9]{1,10}",
        source in "[ -~]{1,20}",
        super_options in "[a-z=,0-9]{1,20}",
    ) {
        let mut fields = vec![
            ids.0.to_string(),
            ids.1.to_string(),
            "8:1".to_owned(),
            escape(&root),
            escape(&mount_point),
            options.clone(),
        ];
        fields.extend(optional);
        fields.extend(["-".to_owned(), fs_type.clone(), escape(source.as_bytes()), super_options.clone()]);
        let line = fields.join(" ");
        let parsed = mountinfo::parse(&line).unwrap();
        let path = |bytes: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(bytes));
        prop_assert_eq!(parsed, vec![MountEntry {
            mount_id: ids.0,
            parent_id: ids.1,
            root: path(&root),
            mount_point: path(&mount_point),
            options,
            fs_type,
            source,
            super_options,
        }]);
    }

    #[test]
    fn keys_and_ids_round_trip_and_never_reach_outside_a_directory(
        name in ".{0,200}",
        kind in prop_oneof![Just(Kind::Volume), Just(Kind::Snapshot), Just(Kind::GroupSnapshot)],
        node in "[A-Za-z0-9._-]{1,95}",
    ) {
        let key = Key::for_name(kind, &name);
        let text = key.to_string();
        prop_assert!(!text.contains('/') && !text.contains(".."), "{text}");
        prop_assert_eq!(Key::parse(&text), Some(key));
        let id = ObjectId { key, node: node.clone() };
        prop_assert!(node.len() <= MAX_NODE_ID_LEN);
        prop_assert_eq!(ObjectId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn any_text_parsed_as_a_key_or_id_prints_back_as_itself(text in ".{0,150}") {
        if let Some(key) = Key::parse(&text) {
            prop_assert_eq!(key.to_string(), text.clone());
        }
        if let Some(id) = ObjectId::parse(&text) {
            prop_assert_eq!(id.to_string(), text.clone());
            prop_assert!(!id.key.to_string().contains('/'));
        }
    }

    #[test]
    fn listing_tokens_round_trip_and_garbage_is_aborted(
        node in "[A-Za-z0-9._-]{1,95}",
        key in any::<[u8; 16]>(),
        first in any::<bool>(),
        garbage in ".{0,200}",
    ) {
        let inner = if first { String::new() } else { key.iter().map(|b| format!("{b:02x}")).collect() };
        let cursor = Cursor { node, inner };
        prop_assert_eq!(Cursor::parse(&cursor.to_string()).unwrap(), Some(cursor));
        match Cursor::parse(&garbage) {
            Ok(Some(parsed)) => prop_assert_eq!(parsed.to_string(), garbage),
            Ok(None) => prop_assert!(garbage.is_empty()),
            Err(e) => {
                prop_assert_eq!(e.code(), tonic::Code::Aborted);
                prop_assert!(e.to_string().len() < 400, "{}", e);
            }
        }
    }
}

proptest! {
    // Each case writes to a fresh directory; fewer cases keep CI brief.
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.min(64), ..ProptestConfig::default() })]

    #[test]
    fn records_stored_then_loaded_are_themselves(record in volume_record(), name in ".{1,30}") {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::for_name(Kind::Volume, &name);
        let table = Table::<VolumeRecord>::open(dir.path()).unwrap();
        table.put(key, record.clone()).unwrap();
        drop(table);
        let table = Table::<VolumeRecord>::open(dir.path()).unwrap();
        let loaded = table.get(&key);
        prop_assert_eq!(loaded.as_deref(), Some(&record));
        prop_assert_eq!(table.damaged(&key), None);
    }

    #[test]
    fn any_bytes_in_a_record_file_load_or_are_set_aside(bytes in prop::collection::vec(any::<u8>(), 0..400), json in ".{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::for_name(Kind::Volume, "v");
        let other = Key::for_name(Kind::Volume, "w");
        std::fs::write(dir.path().join(format!("{key}.json")), &bytes).unwrap();
        std::fs::write(dir.path().join(format!("{other}.json")), json.as_bytes()).unwrap();
        let table = Table::<VolumeRecord>::open(dir.path()).unwrap();
        for key in [key, other] {
            prop_assert!(table.get(&key).is_some() != table.damaged(&key).is_some());
        }
    }
}
