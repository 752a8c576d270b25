//! CSI endpoints as users write them: the one parser for `loam serve
//! --endpoint` and `loam ctl --endpoint`.

use std::path::PathBuf;

/// Where a CSI plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket: `unix:///path`, `unix:/path` or a bare absolute path.
    Unix(PathBuf),
    /// A TCP address, `host:port`: `tcp://host:port` or `http://host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Reads an endpoint; a message says which forms exist when it is none.
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let unix = text.strip_prefix("unix://").or_else(|| text.strip_prefix("unix:"));
        if let Some(path) = unix.or_else(|| text.starts_with('/').then_some(text)) {
            if !path.starts_with('/') {
                return Err(format!("invalid endpoint {text:?}: the socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        match text.strip_prefix("tcp://").or_else(|| text.strip_prefix("http://")) {
            Some(addr) if !addr.is_empty() => Ok(Endpoint::Tcp(addr.to_owned())),
            _ => Err(format!("invalid endpoint {text:?}: expected unix:///path, /path or tcp://host:port")),
        }
    }

    /// The socket path of an endpoint that must be a Unix socket, as the
    /// kubelet reaches CSI plugins.
    pub fn unix_socket(text: &str) -> Result<PathBuf, String> {
        match Endpoint::parse(text)? {
            Endpoint::Unix(path) => Ok(path),
            Endpoint::Tcp(_) => Err(format!("endpoint {text:?} must be a Unix socket: unix:///absolute/path")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_written_form_is_read_the_same_way() {
        let unix = |p: &str| Ok(Endpoint::Unix(PathBuf::from(p)));
        assert_eq!(Endpoint::parse("unix:///var/lib/loam/csi.sock"), unix("/var/lib/loam/csi.sock"));
        assert_eq!(Endpoint::parse("unix:/tmp/csi.sock"), unix("/tmp/csi.sock"));
        assert_eq!(Endpoint::parse("/tmp/csi.sock"), unix("/tmp/csi.sock"));
        let tcp = |s: &str| Ok(Endpoint::Tcp(s.to_owned()));
        assert_eq!(Endpoint::parse("tcp://127.0.0.1:10000"), tcp("127.0.0.1:10000"));
        assert_eq!(Endpoint::parse("http://localhost:9000"), tcp("localhost:9000"));
        for bad in ["unix://relative.sock", "unix:relative", "csi.sock", "tcp://", "https://x:1", ""] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_server_takes_unix_sockets_only() {
        assert_eq!(Endpoint::unix_socket("unix:///csi/csi.sock"), Ok(PathBuf::from("/csi/csi.sock")));
        assert!(Endpoint::unix_socket("tcp://0.0.0.0:1").unwrap_err().contains("Unix socket"));
        assert!(Endpoint::unix_socket("unix://relative").is_err());
    }
}
