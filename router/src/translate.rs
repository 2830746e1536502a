//! Message translation between a client and the server connection it holds for a while (pure: no
//! I/O; the session feeds it messages and sends what it writes).
//!
//! Named prepared statements are kept per client and prepared on each server connection under a
//! name derived from their text (`dbopt_<hash>`), once per connection: a client's Parse is answered
//! by the router when the connection already has the statement, and a Bind or Describe on a
//! connection that lacks it is preceded by a Parse whose reply is swallowed. [`Link::pending`]
//! lists the replies owed to the client, in order, so that synthetic and swallowed replies stay in
//! place; an error makes the server skip to the next Sync, and the bookkeeping follows.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock};

use crate::classify::Class;
use crate::protocol::{self as p, body};

/// A reply owed to the client, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Parse forwarded; on error the hash is forgotten for this connection.
    Parse(Option<u64>),
    /// Parse the router added before a Bind/Describe; its ParseComplete is swallowed.
    HiddenParse(u64),
    /// Parse answered by the router (already prepared on this connection).
    SyntheticParse,
    Bind,
    Describe,
    Execute,
    Close,
    /// Close of a named statement, answered by the router.
    SyntheticClose,
    Sync,
    Query,
    /// A statement refused by the router, replaced by one that fails on the server: the server's
    /// error is replaced by the router's ([`Link::refusals`]).
    Refused,
}

/// What a refused statement becomes on the server: it fails at parse analysis (the literal cannot
/// be an integer), whatever the search_path, and runs nothing. The server's transaction fails
/// with it, as the client is told.
pub(crate) const REFUSED_SQL: &[u8] =
    b"SELECT 'dbopt-router refused this statement (rate limit)'::pg_catalog.int4";

/// What happens to a server message on its way to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Relay {
    Pass,
    Swallow,
    /// Sent in its place (the router's error for a refused statement).
    Replace(Vec<u8>),
}

/// A client's named prepared statement.
#[derive(Debug)]
pub(crate) struct Statement {
    pub(crate) hash: u64,
    pub(crate) server_name: Vec<u8>,
    pub(crate) query: Vec<u8>,
    pub(crate) param_types: Vec<u8>,
    pub(crate) class: Class,
}

/// The client's named statements, by the client's names (looked up on every Bind: foldhash,
/// seeded per process, since the names are the client's).
pub(crate) type Statements = foldhash::HashMap<Vec<u8>, Arc<Statement>>;

/// The statements prepared on a server connection, by [`statement_hash`] (already a keyed hash:
/// FxHash over it adds nothing to undo).
pub(crate) type Prepared = rustc_hash::FxHashSet<u64>;

/// The server-side identity of a prepared statement: its text and parameter types. Clients with
/// different search_paths may share one: PostgreSQL re-plans a cached statement, names resolved
/// anew, when it runs under another search_path than it was planned with (plancache.c).
///
/// Keyed with a random key per process: the clients of a login share a connection's prepared
/// statements by this hash, and with a fixed key a client could prepare a text whose hash it made
/// collide with another statement's, offline.
pub(crate) fn statement_hash(query: &[u8], param_types: &[u8]) -> u64 {
    static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut h = KEY
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    query.hash(&mut h);
    param_types.hash(&mut h);
    h.finish()
}

fn server_name(hash: u64) -> Vec<u8> {
    format!("dbopt_{hash:016x}").into_bytes()
}

/// Records a client's named Parse in its statements without a server (a batch the cache
/// answered: later Binds of that name must find it). Unnamed and malformed Parses are ignored.
pub(crate) fn remember_parse(statements: &mut Statements, msg: &[u8], class: Class) {
    let Ok(m) = p::parse_parse(body(msg)) else {
        return;
    };
    if m.name.is_empty() {
        return;
    }
    let hash = statement_hash(m.query, m.param_types);
    statements.insert(
        m.name.to_vec(),
        Arc::new(Statement {
            hash,
            server_name: server_name(hash),
            query: m.query.to_vec(),
            param_types: m.param_types.to_vec(),
            class,
        }),
    );
}

/// The translation state of one client on one server connection.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// Replies owed to the client, in order.
    pub(crate) pending: VecDeque<Expect>,
    /// The router's ErrorResponse for each [`Expect::Refused`], in order.
    pub(crate) refusals: VecDeque<Vec<u8>>,
}

impl Link {
    /// Empties the queues, keeping their memory.
    pub(crate) fn clear(&mut self) {
        self.pending.clear();
        self.refusals.clear();
    }

    /// One client message, rewritten for the server into `out`. `prepared`: the hashes of the
    /// statements the connection has; `classify` gives a text's class. Returns the class of the
    /// statement a Query, Parse or Bind carries — for a Query or an unnamed Parse only when
    /// `note` asks for it (a named Parse is always classified: its class routes later Binds).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn client_message(
        &mut self,
        tag: u8,
        msg: &[u8],
        statements: &mut Statements,
        prepared: &mut Prepared,
        classify: &mut dyn FnMut(&[u8]) -> Class,
        note: bool,
        out: &mut Vec<u8>,
    ) -> Option<Class> {
        let b = body(msg);
        match tag {
            b'Q' => {
                out.extend_from_slice(msg);
                self.pending.push_back(Expect::Query);
                if note {
                    p::parse_query(b).ok().map(classify)
                } else {
                    None
                }
            }
            b'P' => match p::parse_parse(b) {
                Ok(m) if !m.name.is_empty() => {
                    let hash = statement_hash(m.query, m.param_types);
                    let class = classify(m.query);
                    let stmt = Statement {
                        hash,
                        server_name: server_name(hash),
                        query: m.query.to_vec(),
                        param_types: m.param_types.to_vec(),
                        class,
                    };
                    if prepared.insert(hash) {
                        p::put_parse(out, &stmt.server_name, m.query, m.param_types);
                        self.pending.push_back(Expect::Parse(Some(hash)));
                    } else {
                        self.pending.push_back(Expect::SyntheticParse);
                    }
                    statements.insert(m.name.to_vec(), Arc::new(stmt));
                    Some(class)
                }
                other => {
                    out.extend_from_slice(msg);
                    self.pending.push_back(Expect::Parse(None));
                    other.ok().filter(|_| note).map(|m| classify(m.query))
                }
            },
            b'B' => {
                let known = p::bind_names(b)
                    .ok()
                    .and_then(|m| Some((m, statements.get(m.statement)?.clone())));
                let class = match known {
                    Some((m, stmt)) => {
                        self.ensure_prepared(&stmt, prepared, out);
                        p::put_bind(out, m.portal, &stmt.server_name, m.rest);
                        Some(stmt.class)
                    }
                    // Unnamed, or unknown (the server then reports it does not exist).
                    None => {
                        out.extend_from_slice(msg);
                        None
                    }
                };
                self.pending.push_back(Expect::Bind);
                class
            }
            b'D' => {
                match p::parse_target(b, "Describe")
                    .ok()
                    .filter(|(kind, name)| *kind == b'S' && !name.is_empty())
                    .and_then(|(_, name)| statements.get(name).cloned())
                {
                    Some(stmt) => {
                        self.ensure_prepared(&stmt, prepared, out);
                        p::put_target(out, b'D', b'S', &stmt.server_name);
                    }
                    None => out.extend_from_slice(msg),
                }
                self.pending.push_back(Expect::Describe);
                None
            }
            b'C' => {
                match p::parse_target(b, "Close") {
                    Ok((b'S', name)) if !name.is_empty() => {
                        // The statement stays prepared on the server for other clients.
                        statements.remove(name);
                        self.pending.push_back(Expect::SyntheticClose);
                    }
                    _ => {
                        out.extend_from_slice(msg);
                        self.pending.push_back(Expect::Close);
                    }
                }
                None
            }
            b'E' => {
                out.extend_from_slice(msg);
                self.pending.push_back(Expect::Execute);
                None
            }
            b'S' => {
                out.extend_from_slice(msg);
                self.pending.push_back(Expect::Sync);
                None
            }
            // Flush and COPY data go through as they are.
            _ => {
                out.extend_from_slice(msg);
                None
            }
        }
    }

    /// A Query or Execute the router refuses: the server gets a statement that fails instead
    /// (a Query for a Query; a Parse under a name of the router's for an Execute, which leaves
    /// the client's unnamed statement and portals alone), and the client gets `error` in place of
    /// the server's. Then, as after any error, the server skips to the Sync.
    pub(crate) fn refuse(&mut self, tag: u8, error: Vec<u8>, out: &mut Vec<u8>) {
        if tag == b'Q' {
            p::put_msg(out, b'Q', |b| p::put_cstr(b, REFUSED_SQL));
            self.pending.push_back(Expect::Refused);
            self.pending.push_back(Expect::Query);
        } else {
            p::put_parse(out, b"dbopt_refused", REFUSED_SQL, &[]);
            self.pending.push_back(Expect::Refused);
        }
        self.refusals.push_back(error);
    }

    /// Makes sure `stmt` exists on the connection, adding a hidden Parse when it does not.
    fn ensure_prepared(&mut self, stmt: &Statement, prepared: &mut Prepared, out: &mut Vec<u8>) {
        if prepared.insert(stmt.hash) {
            p::put_parse(out, &stmt.server_name, &stmt.query, &stmt.param_types);
            self.pending.push_back(Expect::HiddenParse(stmt.hash));
        }
    }

    /// Replies the router owes at the head of the queue, written to `out`; true if any.
    #[inline]
    pub(crate) fn synthetic_replies(&mut self, out: &mut Vec<u8>) -> bool {
        // Asked around every server message; there is rarely one owed.
        if !matches!(
            self.pending.front(),
            Some(Expect::SyntheticParse | Expect::SyntheticClose)
        ) {
            return false;
        }
        self.put_synthetic_replies(out)
    }

    fn put_synthetic_replies(&mut self, out: &mut Vec<u8>) -> bool {
        let mut any = false;
        while let Some(front) = self.pending.front() {
            let tag = match front {
                Expect::SyntheticParse => b'1',
                Expect::SyntheticClose => b'3',
                _ => break,
            };
            self.pending.pop_front();
            p::put_msg(out, tag, |_| {});
            any = true;
        }
        any
    }

    /// One server message: updates the queue and the connection's prepared set; returns whether
    /// the message goes on to the client (a hidden Parse's reply does not).
    pub(crate) fn server_message(&mut self, tag: u8, msg: &[u8], prepared: &mut Prepared) -> Relay {
        let pass = |relay: bool| if relay { Relay::Pass } else { Relay::Swallow };
        match tag {
            b'1' => pass(!matches!(
                self.pending.pop_front(),
                Some(Expect::HiddenParse(_))
            )),
            b'2' | b'3' => {
                self.pending.pop_front();
                Relay::Pass
            }
            b'T' | b'n' => {
                if self.pending.front() == Some(&Expect::Describe) {
                    self.pending.pop_front();
                }
                Relay::Pass
            }
            b'C' | b'I' | b's' => {
                if self.pending.front() == Some(&Expect::Execute) {
                    self.pending.pop_front();
                }
                let b = body(msg);
                if tag == b'C'
                    && (b.starts_with(b"DISCARD ALL") || b.starts_with(b"DEALLOCATE ALL"))
                {
                    prepared.clear();
                }
                Relay::Pass
            }
            b'E' => {
                // The error of a refused statement is replaced by the router's.
                let mut relay = Relay::Pass;
                if self.pending.front() == Some(&Expect::Refused) {
                    self.pending.pop_front();
                    if let Some(e) = self.refusals.pop_front() {
                        relay = Relay::Replace(e);
                    }
                }
                // In the extended protocol the server skips to the next Sync after an error.
                while let Some(&front) = self.pending.front() {
                    match front {
                        Expect::Sync | Expect::Query => break,
                        Expect::Parse(Some(h)) | Expect::HiddenParse(h) => {
                            prepared.remove(&h);
                        }
                        Expect::Refused => {
                            self.refusals.pop_front();
                        }
                        _ => {}
                    }
                    self.pending.pop_front();
                }
                relay
            }
            b'Z' => {
                self.pending.pop_front();
                Relay::Pass
            }
            _ => Relay::Pass,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind(statement: &str) -> Vec<u8> {
        msg(b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes())
    }

    fn tags(out: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        let mut at = 0;
        while at + 5 <= out.len() {
            let len = i32::from_be_bytes([out[at + 1], out[at + 2], out[at + 3], out[at + 4]]);
            t.push(out[at]);
            at += 1 + len as usize;
        }
        t
    }

    struct Client {
        link: Link,
        statements: Statements,
        prepared: Prepared,
    }

    impl Client {
        fn new() -> Self {
            Client {
                link: Link::default(),
                statements: Statements::default(),
                prepared: Prepared::default(),
            }
        }

        /// Sends messages; returns the tags written to the server and the synthetic replies.
        fn send(&mut self, messages: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
            let mut out = Vec::new();
            let mut classify = |_: &[u8]| Class::write("test");
            for m in messages {
                self.link.client_message(
                    m[0],
                    m,
                    &mut self.statements,
                    &mut self.prepared,
                    &mut classify,
                    true,
                    &mut out,
                );
            }
            let mut synthetic = Vec::new();
            self.link.synthetic_replies(&mut synthetic);
            (tags(&out), tags(&synthetic))
        }

        /// Feeds server replies; returns the tags relayed to the client.
        fn replies(&mut self, tags_in: &[u8]) -> Vec<u8> {
            let mut relayed = Vec::new();
            for &t in tags_in {
                let m = if t == b'C' {
                    msg(t, b"SELECT 1\0")
                } else {
                    msg(t, b"")
                };
                match self.link.server_message(t, &m, &mut self.prepared) {
                    Relay::Pass => relayed.push(t),
                    // A replacement is marked with its own tag in lower case.
                    Relay::Replace(r) => relayed.push(r[0].to_ascii_lowercase()),
                    Relay::Swallow => {}
                }
                let mut s = Vec::new();
                self.link.synthetic_replies(&mut s);
                relayed.extend(tags(&s));
            }
            relayed
        }
    }

    #[test]
    fn a_statement_is_prepared_once_per_connection_and_shared() {
        let mut c = Client::new();
        let (sent, synthetic) = c.send(&[parse("s1", "select 1"), msg(b'S', b"")]);
        assert_eq!((sent, synthetic), (b"PS".to_vec(), vec![]));
        assert_eq!(c.replies(b"1Z"), b"1Z");
        // The same text under another client name: answered by the router, nothing sent.
        let (sent, synthetic) = c.send(&[parse("s2", "select 1")]);
        assert_eq!((sent, synthetic), (vec![], b"1".to_vec()));
        assert!(c.link.pending.is_empty());
        // A Bind of it goes to the server under the shared name.
        let (sent, _) = c.send(&[bind("s2"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")]);
        assert_eq!(sent, b"BES");
    }

    #[test]
    fn a_bind_on_a_connection_without_the_statement_gets_a_hidden_parse() {
        let mut c = Client::new();
        c.send(&[parse("s1", "select 1"), msg(b'S', b"")]);
        c.replies(b"1Z");
        // Another server connection: it has nothing prepared.
        c.prepared.clear();
        let (sent, _) = c.send(&[bind("s1"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")]);
        assert_eq!(sent, b"PBES", "a Parse goes first");
        // Its ParseComplete is swallowed; the rest reaches the client in order.
        assert_eq!(c.replies(b"12CZ"), b"2CZ");
        assert!(c.link.pending.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_and_forgets_what_failed_to_prepare() {
        let mut c = Client::new();
        c.send(&[
            parse("bad", "selec 1"),
            bind("bad"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
        ]);
        assert_eq!(c.prepared.len(), 1);
        assert_eq!(c.replies(b"EZ"), b"EZ");
        assert!(
            c.prepared.is_empty(),
            "the failed Parse is not on the connection"
        );
        assert!(c.link.pending.is_empty());
    }

    #[test]
    fn a_refused_statement_fails_on_the_server_with_the_routers_error() {
        let mut c = Client::new();
        // Extended protocol: Parse and Bind go through, the Execute is refused.
        let (sent, _) = c.send(&[parse("", "insert into t values (1)"), bind("")]);
        assert_eq!(sent, b"PB");
        let mut out = Vec::new();
        c.link.refuse(b'E', msg(b'E', b"refused\0"), &mut out);
        assert_eq!(tags(&out), b"P", "a failing Parse under the router's name");
        assert!(out.windows(13).any(|w| w == b"dbopt_refused"));
        let (sent, _) = c.send(&[msg(b'S', b"")]);
        assert_eq!(sent, b"S");
        // The server: ParseComplete, BindComplete, the poison's error, ReadyForQuery.
        assert_eq!(c.replies(b"12EZ"), b"12eZ");
        assert!(c.link.pending.is_empty() && c.link.refusals.is_empty());
        // Simple protocol: the Query is replaced; its error is the router's.
        let mut out = Vec::new();
        c.link.refuse(b'Q', msg(b'E', b"refused\0"), &mut out);
        assert_eq!(tags(&out), b"Q");
        assert_eq!(c.replies(b"EZ"), b"eZ");
        // Refused after an earlier failure in the same batch: the server skips it, and only the
        // first error reaches the client.
        c.send(&[bind("")]);
        c.link
            .refuse(b'E', msg(b'E', b"refused\0"), &mut Vec::new());
        c.send(&[msg(b'S', b"")]);
        assert_eq!(c.replies(b"EZ"), b"EZ");
        assert!(c.link.pending.is_empty() && c.link.refusals.is_empty());
    }

    #[test]
    fn closing_a_named_statement_is_answered_by_the_router() {
        let mut c = Client::new();
        c.send(&[parse("s1", "select 1"), msg(b'S', b"")]);
        c.replies(b"1Z");
        let (sent, synthetic) = c.send(&[msg(b'C', b"Ss1\0"), msg(b'S', b"")]);
        assert_eq!(sent, b"S", "the server keeps it for other clients");
        assert_eq!(synthetic, b"3");
        assert!(c.statements.is_empty());
        assert_eq!(c.prepared.len(), 1);
    }

    #[test]
    fn discard_all_empties_the_connections_statements() {
        let mut c = Client::new();
        c.send(&[parse("s1", "select 1"), msg(b'S', b"")]);
        c.replies(b"1Z");
        c.send(&[msg(b'Q', b"DISCARD ALL\0")]);
        let m = msg(b'C', b"DISCARD ALL\0");
        assert_eq!(
            c.link.server_message(b'C', &m, &mut c.prepared),
            Relay::Pass
        );
        assert!(c.prepared.is_empty());
        // The client's name still works: the statement is prepared again where it runs.
        let (sent, _) = c.send(&[bind("s1"), msg(b'S', b"")]);
        assert_eq!(sent, b"PBS");
    }
}
