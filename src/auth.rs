//! The agent token: a shared secret that only the controller may present to
//! a node agent's TCP endpoint.
//!
//! Both sides read it from a file (in Kubernetes, a mounted Secret the install
//! step creates, so no token ships with Loam). The controller sends it as
//! `authorization: Bearer <token>` on every call ([`SendToken`]); the agent
//! refuses any call without it ([`RequireToken`]). The comparison runs in
//! constant time over SHA-256 digests, so neither the token's bytes nor its
//! length leak through timing.
//!
//! The token is also the root of the agent channel's TLS ([`crate::tls`]):
//! [`Token::derive_key`] turns it into keys that reveal nothing about it.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ring::hkdf;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::{Error, IoContext, Result};

/// Shortest token accepted: a guessable secret protects nothing.
pub const MIN_TOKEN_LEN: usize = 16;
const HEADER: &str = "authorization";
const SCHEME: &[u8] = b"Bearer ";

/// The shared agent token; its `Debug` never shows the secret.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Checks a token's text: at least [`MIN_TOKEN_LEN`] visible ASCII
    /// characters (it travels in an HTTP header). Surrounding whitespace,
    /// such as a file's trailing newline, is not part of it.
    pub fn parse(text: &str) -> Result<Token> {
        let text = text.trim();
        if text.len() < MIN_TOKEN_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidArgument(format!(
                "the agent token must be at least {MIN_TOKEN_LEN} visible ASCII characters \
                 (e.g. head -c 32 /dev/urandom | base64)"
            )));
        }
        Ok(Token(text.into()))
    }

    /// Reads the token from a file, such as a mounted Kubernetes Secret.
    pub fn from_file(path: &Path) -> Result<Token> {
        let text = std::fs::read_to_string(path).context(|| format!("reading the agent token {}", path.display()))?;
        Token::parse(&text)
    }

    /// A 32-byte key for `purpose`, derived from the token with HKDF-SHA256:
    /// every process holding the token derives the same key, and the key
    /// does not reveal the token.
    pub fn derive_key(&self, purpose: &'static [u8]) -> [u8; 32] {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"loam agent token").extract(self.0.as_bytes());
        let mut key = [0u8; 32];
        prk.expand(&[purpose], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut key))
            .expect("32 bytes are within HKDF-SHA256's output limit");
        key
    }

    /// Whether `presented` is this token, in time independent of both.
    fn matches(&self, presented: &[u8]) -> bool {
        let ours = Sha256::digest(self.0.as_bytes());
        let theirs = Sha256::digest(presented);
        bool::from(ours.as_slice().ct_eq(theirs.as_slice()))
    }
}

/// Agent side: lets through only calls that carry the token.
#[derive(Debug, Clone)]
pub struct RequireToken {
    token: Token,
}

impl RequireToken {
    /// Requires `token` on every call.
    pub fn new(token: Token) -> Self {
        RequireToken { token }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let presented = request.metadata().get(HEADER).and_then(|v| v.as_bytes().strip_prefix(SCHEME));
        let refusal = match presented {
            Some(token) if self.token.matches(token) => return Ok(request),
            Some(_) => "a wrong agent token",
            None => "no agent token",
        };
        let peer = crate::tls::caller_addr(&request).map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        tracing::warn!(%peer, "refused a call with {refusal}");
        Err(Error::Unauthenticated(format!(
            "{refusal}: only the Loam controller may call a node agent (check the loam-agent-token Secret)"
        ))
        .into())
    }
}

/// Agent side: lets through only calls whose certificate was minted for
/// `role`: the controller's for the node-local Controller, a peer agent's for
/// exporting a copy, so a certificate lifted from one cannot make the
/// other's calls.
#[derive(Debug, Clone, Copy)]
pub struct RequireRole(pub crate::tls::Role);

impl RequireRole {
    /// Checks `request` against the role.
    pub fn check<T>(self, request: &Request<T>) -> std::result::Result<(), Status> {
        match crate::tls::caller_role(request) {
            Some(role) if role == self.0 => Ok(()),
            other => {
                let peer = crate::tls::caller_addr(request).map_or_else(|| "unknown".to_owned(), |a| a.to_string());
                tracing::warn!(%peer, caller = ?other, wanted = ?self.0, "refused a call from a caller of another role");
                Err(Status::permission_denied(format!(
                    "this call is for the {:?} role, and the caller's certificate is {}",
                    self.0,
                    other.map_or_else(|| "of no known role".to_owned(), |r| format!("the {r:?}'s"))
                )))
            }
        }
    }
}

impl Interceptor for RequireRole {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        self.check(&request).map(|()| request)
    }
}

/// Controller side: adds the token to every call.
#[derive(Debug, Clone)]
pub struct SendToken {
    header: MetadataValue<Ascii>,
}

impl SendToken {
    /// Sends `token` on every call.
    pub fn new(token: &Token) -> Self {
        let mut header = MetadataValue::try_from(format!("Bearer {}", token.0))
            .expect("a parsed token is visible ASCII, a valid header value");
        header.set_sensitive(true);
        SendToken { header }
    }
}

impl Interceptor for SendToken {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        request.metadata_mut().insert(HEADER, self.header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::parse("0123456789abcdef-secret\n").unwrap()
    }

    #[test]
    fn tokens_must_be_long_and_printable() {
        assert!(Token::parse("short").is_err());
        assert!(Token::parse("0123456789abcdef 0123").is_err());
        assert!(Token::parse("   ").is_err());
        assert_eq!(format!("{:?}", token()), "Token(<redacted>)");
    }

    #[test]
    fn only_the_exact_token_passes() {
        let mut check = RequireToken::new(token());
        let sent = SendToken::new(&token()).call(Request::new(())).unwrap();
        assert!(check.call(sent).is_ok());

        let other = SendToken::new(&Token::parse("0123456789abcdef-secreT").unwrap()).call(Request::new(())).unwrap();
        assert_eq!(check.call(other).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(check.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);

        let mut raw = Request::new(());
        raw.metadata_mut().insert(HEADER, MetadataValue::from_static("0123456789abcdef-secret"));
        assert_eq!(check.call(raw).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn derived_keys_are_per_token_and_per_purpose() {
        let key = token().derive_key(b"ca");
        assert_eq!(key, token().derive_key(b"ca"));
        assert_ne!(key, token().derive_key(b"other"));
        assert_ne!(key, Token::parse("0123456789abcdef-secreT").unwrap().derive_key(b"ca"));
    }
}
