//! Client authentication, the server side: SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL speaks it,
//! without channel binding) and md5. Pure: the session feeds it the client's messages.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const SCRAM_ITERATIONS: u32 = 4096;

/// What the router keeps per SCRAM user: derived once from the configured password.
#[derive(Clone)]
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

impl ScramVerifier {
    pub fn new(password: &str, salt: &[u8], iterations: u32) -> Self {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    pub fn with_random_salt(password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        ScramVerifier::new(password, &salt, SCRAM_ITERATIONS)
    }
}

/// One SCRAM exchange in progress.
pub struct ScramExchange {
    verifier: ScramVerifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

fn field(part: &str, key: char) -> Result<&str, String> {
    let mut chars = part.chars();
    if chars.next() == Some(key) && chars.next() == Some('=') {
        Ok(&part[2..])
    } else {
        Err(format!("SCRAM attribute '{key}' expected, found {part:?}"))
    }
}

impl ScramExchange {
    /// Handles client-first-message; returns the exchange and server-first-message.
    pub fn start(verifier: &ScramVerifier, client_first: &[u8]) -> Result<(Self, String), String> {
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| "SCRAM client-first-message is not UTF-8".to_string())?;
        // gs2-header: "n,," or "y,," (no channel binding); "p=..." needs TLS, which we do not offer.
        let mut parts = msg.splitn(3, ',');
        let cb = parts.next().unwrap_or("");
        let authzid = parts.next().ok_or("malformed SCRAM client-first-message")?;
        let bare = parts.next().ok_or("malformed SCRAM client-first-message")?;
        match cb {
            "n" | "y" => {}
            c if c.starts_with("p=") => {
                return Err("SCRAM channel binding is not supported without TLS".into())
            }
            _ => return Err("malformed SCRAM GS2 header".into()),
        }
        if !authzid.is_empty() {
            return Err("SCRAM authorization identity is not supported".into());
        }
        // client-first-message-bare: n=<user>,r=<nonce>[,extensions]
        let mut attrs = bare.split(',');
        field(attrs.next().unwrap_or(""), 'n')?;
        let client_nonce = field(attrs.next().unwrap_or(""), 'r')?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err("SCRAM client nonce is empty or not printable".into());
        }
        let ours: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(ours));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ScramExchange {
                verifier: verifier.clone(),
                gs2_header: format!("{cb},{authzid},"),
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Handles client-final-message; returns server-final-message when the proof is right.
    pub fn finish(self, client_final: &[u8]) -> Result<String, String> {
        let msg = std::str::from_utf8(client_final)
            .map_err(|_| "SCRAM client-final-message is not UTF-8".to_string())?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or("SCRAM client-final-message has no proof")?;
        let mut attrs = without_proof.split(',');
        let binding = field(attrs.next().unwrap_or(""), 'c')?;
        let nonce = field(attrs.next().unwrap_or(""), 'r')?;
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err("SCRAM channel binding does not match".into());
        }
        if nonce != self.nonce {
            return Err("SCRAM nonce does not match".into());
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| "SCRAM proof is not base64".to_string())?;
        if proof.len() != 32 {
            return Err("SCRAM proof has the wrong length".into());
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err("password authentication failed".into());
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The md5 password response PostgreSQL expects: `"md5" + md5(md5(password + user) + salt)`.
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = md5_hex(&[password.as_bytes(), user.as_bytes()]);
    format!("md5{}", md5_hex(&[inner.as_bytes(), &salt]))
}

/// Checks a client's md5 password message (without its NUL).
pub fn md5_check(user: &str, password: &str, salt: [u8; 4], response: &[u8]) -> bool {
    constant_time_eq(md5_response(user, password, salt).as_bytes(), response)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(server_pw: &str, client_pw: &str) -> Result<(), String> {
        let verifier = ScramVerifier::with_random_salt(server_pw);
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let (ex, server_first) = ScramExchange::start(&verifier, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|e| e.to_string())?;
        let server_final = ex.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|e| format!("client rejected the server: {e}"))
    }

    #[test]
    fn scram_accepts_the_right_password_against_a_real_client() {
        exchange("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn scram_rejects_a_wrong_password() {
        let e = exchange("s3cret", "guess").unwrap_err();
        assert_eq!(e, "password authentication failed");
    }

    #[test]
    fn scram_rejects_malformed_messages() {
        let v = ScramVerifier::with_random_salt("pw");
        for bad in [
            &b""[..],
            b"n,,",
            b"x,,n=,r=abc",
            b"p=tls-unique,,n=,r=abc",
            b"n,,n=,r=",
            b"\xff",
        ] {
            assert!(ScramExchange::start(&v, bad).is_err(), "{bad:?}");
        }
        let (ex, _) = ScramExchange::start(&v, b"n,,n=,r=abc").unwrap();
        assert!(ex.finish(b"c=biws,r=wrong,p=AAAA").is_err());
        let (ex, first) = ScramExchange::start(&v, b"n,,n=,r=abc").unwrap();
        let nonce = first.split(',').next().unwrap();
        assert!(ex
            .finish(format!("c=biws,{nonce},p=!!").as_bytes())
            .is_err());
    }

    #[test]
    fn md5_matches_postgres_protocol() {
        let salt = [1, 2, 3, 4];
        let ours = md5_response("app", "pw", salt);
        let theirs = postgres_protocol::authentication::md5_hash(b"app", b"pw", salt);
        assert_eq!(ours, theirs);
        assert!(md5_check("app", "pw", salt, theirs.as_bytes()));
        assert!(!md5_check("app", "px", salt, theirs.as_bytes()));
    }
}
