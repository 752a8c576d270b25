//! `loam serve --metrics-listen`: what an operator's Prometheus scrapes
//! follows what the driver did (calls by method and code, volumes, the root's
//! space), and per-volume series can be turned off for very large nodes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `loam serve --mode all` process on a temporary root, killed on drop.
struct Served {
    child: Child,
    socket: String,
    metrics: SocketAddr,
}

impl Served {
    fn start(root: &Path, extra: &[&str]) -> Served {
        // A port that was free a moment ago: bound, read, released.
        let metrics = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let socket = format!("unix://{}", root.join("csi.sock").display());
        let child = Command::new(env!("CARGO_BIN_EXE_loam"))
            .args(["serve", "--mode", "all", "--node-id", "metrics-node", "--quota", "off"])
            .arg("--root")
            .arg(root.join("root"))
            .args(["--endpoint", &socket, "--metrics-listen", &metrics.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start loam serve");
        let served = Served { child, socket, metrics };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(root.join("csi.sock").exists() && TcpStream::connect(metrics).is_ok()) {
            assert!(Instant::now() < deadline, "loam serve did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_loam"))
            .args(["ctl", "--endpoint", &self.socket])
            .args(args)
            .output()
            .expect("run loam ctl")
    }

    fn scrape(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics).expect("connect to the metrics endpoint");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics).expect("request");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            reply.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{reply}"
        );
        reply
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the series `name{labels}`: the line must be there.
fn value(scrape: &str, series: &str) -> f64 {
    let line = scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{scrape}"));
    line[series.len()..].trim().parse().expect("a number")
}

#[test]
fn a_scrape_follows_what_the_driver_did() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(dir.path(), &[]);
    let created = served.ctl(&["create-volume", "metrics-pvc", "--size", "64Mi"]);
    assert!(created.status.success(), "{created:?}");
    let missing = served.ctl(&["get-volume", "00000000000000000000000000000000@metrics-node"]);
    assert!(!missing.status.success());

    let scrape = served.scrape();
    assert_eq!(value(&scrape, r#"loam_rpc_duration_seconds_count{method="CreateVolume",code="Ok"}"#), 1.0);
    assert_eq!(value(&scrape, r#"loam_rpc_duration_seconds_count{method="ControllerGetVolume",code="NotFound"}"#), 1.0);
    let version = env!("CARGO_PKG_VERSION");
    assert!(scrape.contains(&format!(r#"loam_build_info{{version="{version}",revision=""#)), "{scrape}");
    assert_eq!(value(&scrape, r#"loam_volumes{backend="dir",enforcement="none"}"#), 1.0);
    let volume = scrape
        .lines()
        .find(|l| l.starts_with(r#"loam_volume_capacity_bytes{volume="metrics-pvc",volume_id=""#))
        .unwrap_or_else(|| panic!("no per-volume capacity in:\n{scrape}"));
    assert!(volume.ends_with(&format!(" {}", 64 << 20)), "{volume}");
    assert!(value(&scrape, "loam_root_size_bytes") > 0.0);
    assert!(value(&scrape, "loam_root_available_bytes") > 0.0);
    // The volume is empty: all of its capacity is still promised.
    assert!(value(&scrape, "loam_root_promised_bytes") >= f64::from(64u32 << 20));
    assert_eq!(value(&scrape, "loam_loop_devices_without_direct_io"), 0.0);

    let deleted = served.ctl(&[
        "delete-volume",
        String::from_utf8_lossy(&created.stdout)
            .split_whitespace()
            .find(|w| w.contains('@'))
            .expect("the new volume's id"),
    ]);
    assert!(deleted.status.success(), "{deleted:?}");
    let scrape = served.scrape();
    assert!(!scrape.contains("loam_volumes{"), "no volume left to count:\n{scrape}");
    assert!(!scrape.contains(r#"volume="metrics-pvc""#), "{scrape}");
}

#[test]
fn per_volume_series_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(dir.path(), &["--metrics-per-volume=false"]);
    let created = served.ctl(&["create-volume", "quiet-pvc", "--size", "1Mi"]);
    assert!(created.status.success(), "{created:?}");
    let scrape = served.scrape();
    assert_eq!(value(&scrape, r#"loam_volumes{backend="dir",enforcement="none"}"#), 1.0);
    assert!(!scrape.contains("loam_volume_capacity_bytes{"), "{scrape}");
    assert!(!scrape.contains("loam_volume_used_bytes{"), "{scrape}");
}

#[test]
fn every_metric_the_docs_document_for_a_node_is_served() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).expect("docs/metrics.md");
    let table = doc.split("# Metrics").nth(1).expect("a Metrics section");
    let documented: Vec<&str> = table
        .lines()
        .take_while(|l| !l.starts_with('#'))
        .filter(|row| row.starts_with("| `loam_") && (row.contains("`all`") || row.contains("every process")))
        .flat_map(|row| row.split('|').nth(1).unwrap_or_default().split('`').filter(|w| w.starts_with("loam_")))
        .collect();
    assert!(documented.len() >= 8, "the table lists the node's metrics: {documented:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(dir.path(), &[]);
    let created = served.ctl(&["create-volume", "documented-pvc", "--size", "1Mi"]);
    assert!(created.status.success(), "{created:?}");
    let scrape = served.scrape();
    for name in documented {
        assert!(
            scrape.lines().any(|l| l.starts_with(&format!("# TYPE {name} "))
                // OpenMetrics names an info or counter family without its suffix.
                || l.starts_with(&format!("# TYPE {} ", name.trim_end_matches("_info")))
                || l.starts_with(&format!("# TYPE {} counter", name.trim_end_matches("_total")))),
            "docs/metrics.md documents {name}, which a scrape does not serve:\n{scrape}"
        );
    }
}
