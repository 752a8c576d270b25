//! The layering lib.rs states, held: each module of `src/` may name only the
//! modules of the layers below it and the cross-cutting ones. A `crate::`
//! path outside a comment that names any other module fails this test, with
//! the file and line, so a shortcut across layers is seen when it is made.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Modules every layer may use: one error type, ids, configuration, the
/// generated CSI messages and Loam's own API, one size grammar, the crash
/// harness's fault points, the process's metrics registry, the heap's
/// trimming after bursts of calls, the group snapshots' write-order rule.
const CROSS_CUTTING: &[&str] =
    &["error", "ids", "config", "csi", "api", "quantity", "failpoint", "metrics", "memory", "write_order"];

/// What each module may name besides itself and [`CROSS_CUTTING`].
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("error", &[][..]),
        ("ids", &[][..]),
        ("config", &[][..]),
        ("quantity", &[][..]),
        ("failpoint", &[][..]),
        ("metrics", &[][..]),
        ("memory", &[][..]),
        ("write_order", &[][..]),
        // The kernel seam knows nothing of Loam's volumes; it makes its own
        // intent files durable as every layer does.
        ("kernel", &["durable"][..]),
        ("durable", &[][..]),
        ("store", &["durable"][..]),
        // Records hold typed kernel values (a filesystem type).
        ("records", &["store", "kernel"][..]),
        ("guard", &[][..]),
        // Storage engines: the kernel and their records, never the driver.
        ("backend", &["kernel", "records", "durable"][..]),
        // The node's volume manager: records, guards and the backends.
        ("driver", &["backend", "kernel", "records", "store", "guard", "durable"][..]),
        // The controller's view of the agents: no driver, no storage.
        ("routing", &["auth", "tls"][..]),
        // The CSI surface: the driver or the router, never a backend or the
        // kernel; on the agent endpoint, who may call what (auth, tls).
        ("rpc", &["driver", "routing", "records", "guard", "auth", "tls"][..]),
        ("auth", &["tls"][..]),
        ("tls", &["auth"][..]),
        ("endpoint", &[][..]),
        ("server", &["rpc", "driver", "routing", "auth", "tls"][..]),
    ])
}

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/driver/node.rs` is
/// `driver`, `src/store.rs` is `store`); `None` for lib.rs and main.rs.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next()?.as_os_str().to_str()?.trim_end_matches(".rs").to_owned();
    (first != "lib" && first != "main" && first != "ctl").then_some(first)
}

/// Every module named as `crate::<module>` in `line`, outside a comment.
fn named_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or_default();
    code.match_indices("crate::")
        .map(|(at, _)| {
            code[at + "crate::".len()..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
        })
        .collect()
}

#[test]
fn every_module_names_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let allowed = allowed();
    let mut crossings = Vec::new();
    let mut seen = 0;
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        let may = allowed
            .get(module.as_str())
            .unwrap_or_else(|| panic!("{}: module {module} has no place in the layering; add it", file.display()));
        let text = std::fs::read_to_string(file).expect("read source");
        for (number, line) in text.lines().enumerate() {
            for named in named_modules(line) {
                seen += 1;
                if named != module && !CROSS_CUTTING.contains(&named.as_str()) && !may.contains(&named.as_str()) {
                    crossings.push(format!("{}:{}: {module} names crate::{named}", file.display(), number + 1));
                }
            }
        }
    }
    assert!(seen > 100, "only {seen} crate:: paths found; is the scan reading the sources?");
    assert!(crossings.is_empty(), "imports across layers:\n{}", crossings.join("\n"));
}

#[test]
fn the_scan_sees_paths_in_code_and_ignores_comments() {
    assert_eq!(named_modules("use crate::backend::dir::DirBackend;"), ["backend"]);
    assert_eq!(named_modules("    let x = crate::kernel::mount::bind(a, b); // crate::rpc"), ["kernel"]);
    assert!(named_modules("/// See [`crate::driver`].").is_empty());
}
