//! Listings merged across agents, with tokens that survive agents coming and
//! going.
//!
//! Entries come node by node in node-id order, and in each node's own order
//! (by key) inside, so the whole listing has one stable order. A token is
//! `<node-id>/<that node's token>`: the node to resume on, and where on it
//! (empty for its start). When that node has since vanished, the listing
//! resumes on the next node in order, skipping nothing still present.

use std::fmt;
use std::future::Future;

use crate::error::{Error, Result, quote};
use crate::ids::{Key, validate_node_id};

/// Where a merged listing resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The node to resume on.
    pub node: String,
    /// That node's own token; empty for its first entry.
    pub inner: String,
}

impl Cursor {
    /// Reads a starting token; ABORTED when it is not one this listing made.
    pub fn parse(token: &str) -> Result<Option<Cursor>> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || Error::Aborted(format!("starting token {} is not valid; restart the listing", quote(token)));
        let (node, inner) = token.split_once('/').ok_or_else(bad)?;
        validate_node_id(node).map_err(|_| bad())?;
        if !inner.is_empty() && Key::parse(inner).is_none() {
            return Err(bad());
        }
        Ok(Some(Cursor { node: node.to_owned(), inner: inner.to_owned() }))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.inner)
    }
}

/// One node's page of a listing.
#[derive(Debug)]
pub struct Page<E> {
    /// The entries, in the node's order.
    pub entries: Vec<E>,
    /// The node's token for its next page; empty when it has no more.
    pub next: String,
}

/// Lists across `nodes` (in node-id order) from `token`, at most
/// `max_entries` (0: no limit); `fetch(node, inner_token, max)` lists one
/// node. Returns the entries and the token of the next page.
pub async fn merge<E, F, Fut>(nodes: &[String], token: &str, max_entries: i32, fetch: F) -> Result<(Vec<E>, String)>
where
    F: Fn(String, String, i32) -> Fut,
    Fut: Future<Output = Result<Page<E>>>,
{
    let max =
        usize::try_from(max_entries).map_err(|_| Error::InvalidArgument("max_entries must not be negative".into()))?;
    let start = Cursor::parse(token)?;
    let from = start.as_ref().map_or(0, |c| nodes.partition_point(|n| *n < c.node));
    let mut entries = Vec::new();
    for (i, node) in nodes.iter().enumerate().skip(from) {
        let inner = match &start {
            Some(c) if c.node == *node => c.inner.clone(),
            _ => String::new(),
        };
        let room = if max == 0 { 0 } else { max - entries.len() };
        let page = fetch(node.clone(), inner, i32::try_from(room).unwrap_or(i32::MAX)).await?;
        entries.extend(page.entries);
        if !page.next.is_empty() {
            return Ok((entries, Cursor { node: node.clone(), inner: page.next }.to_string()));
        }
        if max > 0 && entries.len() >= max {
            let next = nodes.get(i + 1).map(|n| Cursor { node: n.clone(), inner: String::new() }.to_string());
            return Ok((entries, next.unwrap_or_default()));
        }
    }
    Ok((entries, String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_round_trip_and_garbage_is_aborted() {
        let cursor = Cursor { node: "node-a".into(), inner: KEY.into() };
        assert_eq!(Cursor::parse(&cursor.to_string()).unwrap(), Some(cursor));
        assert_eq!(Cursor::parse("").unwrap(), None);
        assert_eq!(Cursor::parse("node-b/").unwrap().unwrap().inner, "");
        for bad in ["node-a", "/x", "node-a/xyz", "no de/", KEY] {
            assert_eq!(Cursor::parse(bad).unwrap_err().code(), tonic::Code::Aborted, "{bad}");
        }
    }

    /// Three nodes holding 3, 0 and 2 entries, paged two at a time per node.
    async fn fetch(node: String, inner: String, max: i32) -> Result<Page<String>> {
        let all: Vec<String> = match node.as_str() {
            "a" => (0..3).map(|i| format!("a{i}")).collect(),
            "c" => (0..2).map(|i| format!("c{i}")).collect(),
            _ => Vec::new(),
        };
        let from = if inner.is_empty() { 0 } else { all.iter().position(|e| e.ends_with(&inner[31..])).unwrap() };
        let take = if max == 0 { 2 } else { usize::try_from(max).unwrap().min(2) };
        let entries: Vec<String> = all.iter().skip(from).take(take).cloned().collect();
        let next = all.get(from + entries.len()).map(|e| format!("{}{}", &KEY[..31], &e[1..])).unwrap_or_default();
        Ok(Page { entries, next })
    }

    #[tokio::test]
    async fn pages_cover_every_node_once_in_order() {
        let nodes: Vec<String> = ["a", "b", "c"].map(String::from).into();
        for max in [0, 1, 2, 3, 10] {
            let (mut seen, mut token) = (Vec::new(), String::new());
            loop {
                let (entries, next) = merge(&nodes, &token, max, fetch).await.unwrap();
                assert!(max == 0 || entries.len() <= usize::try_from(max).unwrap());
                seen.extend(entries);
                if next.is_empty() {
                    break;
                }
                token = next;
            }
            assert_eq!(seen, ["a0", "a1", "a2", "c0", "c1"], "max {max}");
        }
    }

    #[tokio::test]
    async fn a_vanished_node_resumes_on_the_next_one() {
        let nodes: Vec<String> = ["a", "c"].map(String::from).into();
        let (entries, _) = merge(&nodes, "b/", 0, fetch).await.unwrap();
        assert_eq!(entries, ["c0", "c1"]);
        assert_eq!(merge(&nodes, "", -1, fetch).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
