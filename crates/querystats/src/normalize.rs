//! Normalised query text: every literal (strings, numbers, dollar-quoted and prefixed strings,
//! negative numbers) becomes `$n`, numbered after the highest parameter already in the text, as
//! pg_stat_statements shows queries. Comments, identifiers, keywords and layout are kept.
//!
//! A small hand-written lexer, not PostgreSQL's: it errs on the side of keeping text (an
//! unterminated string is kept as is).

/// Returns the normalised text and how many literals were replaced.
pub fn normalize(sql: &str) -> (String, usize) {
    let mut out = String::with_capacity(sql.len());
    let replaced = normalize_into(sql, &mut out);
    (out, replaced)
}

/// [`normalize`] into `out` (emptied first, its memory reused); returns how many literals were
/// replaced.
pub fn normalize_into(sql: &str, out: &mut String) -> usize {
    out.clear();
    out.reserve(sql.len());
    let b = sql.as_bytes();
    let first_param = highest_param(b) + 1;
    let mut replaced = 0usize;
    // Everything but literals is kept as it is, so the text is copied in runs: up to a literal
    // when it is replaced, and the rest at the end (the router classifies every statement
    // through this: no per-token copying).
    let mut copied = 0usize;
    let mut literal = |out: &mut String, start: usize, end: usize| {
        out.push_str(&sql[copied..start]);
        out.push('$');
        push_decimal(out, first_param + replaced);
        replaced += 1;
        copied = end;
    };
    let mut i = 0;
    // Whether the previous significant token ends an operand (identifier, number, `)`...):
    // then a following `-` is a binary minus, not the sign of a literal.
    let mut after_operand = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = block_comment_end(b, i),
            b'\'' => {
                let end = quoted_end(b, i, b'\'', false);
                literal(out, i, end);
                i = end;
                after_operand = true;
            }
            b'"' => {
                i = quoted_end(b, i, b'"', false);
                after_operand = true;
            }
            b'$' => {
                if let Some(end) = dollar_param_end(b, i) {
                    i = end;
                } else if let Some(end) = dollar_quote_end(b, i) {
                    literal(out, i, end);
                    i = end;
                } else {
                    i += 1;
                }
                after_operand = true;
            }
            b'0'..=b'9' => {
                let end = number_end(b, i);
                literal(out, i, end);
                i = end;
                after_operand = true;
            }
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) && !after_operand => {
                let end = number_end(b, i);
                literal(out, i, end);
                i = end;
                after_operand = true;
            }
            b'-' if !after_operand && starts_number(b, i + 1) => {
                // The sign belongs to the literal.
                let end = number_end(b, i + 1);
                literal(out, i, end);
                i = end;
                after_operand = true;
            }
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                // A run of whitespace at once: it is neither an operand nor an operator.
                i += 1;
                while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r' | b'\x0c') {
                    i += 1;
                }
            }
            _ if is_ident_start(c) => {
                let end = ident_end(b, i);
                // Prefixed strings: E'…', B'…', X'…', N'…', U&'…'.
                let word = &b[i..end];
                let prefixed = matches!(
                    word,
                    [b'E' | b'B' | b'X' | b'N' | b'e' | b'b' | b'x' | b'n']
                ) && b.get(end) == Some(&b'\'');
                let unicode = word.eq_ignore_ascii_case(b"U")
                    && b.get(end) == Some(&b'&')
                    && b.get(end + 1) == Some(&b'\'');
                if prefixed || unicode {
                    let quote = if unicode { end + 1 } else { end };
                    let escapes = word.eq_ignore_ascii_case(b"E");
                    let string_end = quoted_end(b, quote, b'\'', escapes);
                    literal(out, i, string_end);
                    i = string_end;
                } else {
                    i = end;
                }
                after_operand = true;
            }
            _ => {
                // Any other byte (operators, punctuation, whitespace, UTF-8 continuation bytes):
                // the whole UTF-8 character.
                if !c.is_ascii_whitespace() {
                    after_operand = c == b')' || c == b']';
                }
                i = (i + utf8_len(c)).min(b.len());
            }
        }
    }
    out.push_str(&sql[copied..]);
    replaced
}

/// Appends `n` in decimal (no `String` made per placeholder).
fn push_decimal(out: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

fn is_ident_start(c: u8) -> bool {
    IDENT_START[usize::from(c)]
}

/// Bytes that start an identifier or keyword: letters, `_` and every non-ASCII byte.
const IDENT_START: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
        c += 1;
    }
    t
};

/// Bytes that continue an identifier: letters, digits, `_`, `$` and every non-ASCII byte. A
/// table lookup per byte (identifiers are most of a statement's text).
const IDENT_CONTINUE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        c += 1;
    }
    t
};

fn ident_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| !IDENT_CONTINUE[usize::from(c)])
        .map_or(b.len(), |p| i + p)
}

fn block_comment_end(b: &[u8], start: usize) -> usize {
    let (mut depth, mut i) = (0usize, start);
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// End (exclusive) of a quoted token starting at `start` (the quote). Doubled quotes escape;
/// with `backslash`, so does `\`.
fn quoted_end(b: &[u8], start: usize, quote: u8, backslash: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// `$1`, `$23`: a parameter reference.
fn dollar_param_end(b: &[u8], start: usize) -> Option<usize> {
    let digits = b[start + 1..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count();
    (digits > 0).then_some(start + 1 + digits)
}

/// `$tag$ … $tag$` (tag may be empty): end of the whole dollar-quoted string.
fn dollar_quote_end(b: &[u8], start: usize) -> Option<usize> {
    let tag_len = b[start + 1..]
        .iter()
        .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
        .count();
    let open_end = start + 1 + tag_len;
    if b.get(open_end) != Some(&b'$') || b.get(start + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let delim = &b[start..=open_end];
    let body = &b[open_end + 1..];
    let close = body.windows(delim.len()).position(|w| w == delim)?;
    Some(open_end + 1 + close + delim.len())
}

fn starts_number(b: &[u8], i: usize) -> bool {
    match b.get(i) {
        Some(c) if c.is_ascii_digit() => true,
        Some(b'.') => b.get(i + 1).is_some_and(u8::is_ascii_digit),
        _ => false,
    }
}

/// End of a numeric literal: digits, `.`, exponent, `0x…` hex, `_` separators.
fn number_end(b: &[u8], mut i: usize) -> usize {
    if b[i] == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')) {
        i += 2;
        while i < b.len() && (b[i].is_ascii_hexdigit() || b[i] == b'_') {
            i += 1;
        }
        return i;
    }
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            i = j;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

/// The highest `$n` parameter in a statement (outside strings and comments), 0 if none.
pub fn highest_parameter(sql: &str) -> usize {
    highest_param(sql.as_bytes())
}

fn highest_param(b: &[u8]) -> usize {
    // No `$` anywhere, no parameter: one memchr instead of lexing (texts with literals rarely
    // have parameters too).
    if memchr::memchr(b'$', b).is_none() {
        return 0;
    }
    let mut i = 0;
    let mut max = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => i = quoted_end(b, i, b'\'', false),
            b'"' => i = quoted_end(b, i, b'"', false),
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = block_comment_end(b, i),
            b'$' => {
                if let Some(end) = dollar_param_end(b, i) {
                    let n = std::str::from_utf8(&b[i + 1..end])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    max = max.max(n);
                    i = end;
                } else if let Some(end) = dollar_quote_end(b, i) {
                    i = end;
                } else {
                    i += 1;
                }
            }
            c if is_ident_start(c) => i = ident_end(b, i),
            _ => i += 1,
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first implementation (copying token by token), kept as the reference the run-copying
    /// one must match.
    fn token_by_token(sql: &str) -> (String, usize) {
        let b = sql.as_bytes();
        let first_param = highest_param(b) + 1;
        let mut out = String::with_capacity(sql.len());
        let mut replaced = 0usize;
        let mut i = 0;
        // Whether the previous significant token ends an operand (identifier, number, `)`...):
        // then a following `-` is a binary minus, not the sign of a literal.
        let mut after_operand = false;
        let placeholder = |out: &mut String, replaced: &mut usize| {
            out.push('$');
            out.push_str(&(first_param + *replaced).to_string());
            *replaced += 1;
        };
        while i < b.len() {
            let c = b[i];
            match c {
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    let end = b[i..]
                        .iter()
                        .position(|&x| x == b'\n')
                        .map_or(b.len(), |p| i + p);
                    out.push_str(&sql[i..end]);
                    i = end;
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    let end = block_comment_end(b, i);
                    out.push_str(&sql[i..end]);
                    i = end;
                }
                b'\'' => {
                    let end = quoted_end(b, i, b'\'', false);
                    placeholder(&mut out, &mut replaced);
                    i = end;
                    after_operand = true;
                }
                b'"' => {
                    let end = quoted_end(b, i, b'"', false);
                    out.push_str(&sql[i..end]);
                    i = end;
                    after_operand = true;
                }
                b'$' => {
                    if let Some(end) = dollar_param_end(b, i) {
                        out.push_str(&sql[i..end]);
                        i = end;
                    } else if let Some(end) = dollar_quote_end(b, i) {
                        placeholder(&mut out, &mut replaced);
                        i = end;
                    } else {
                        out.push('$');
                        i += 1;
                    }
                    after_operand = true;
                }
                b'0'..=b'9' => {
                    i = number_end(b, i);
                    placeholder(&mut out, &mut replaced);
                    after_operand = true;
                }
                b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) && !after_operand => {
                    i = number_end(b, i);
                    placeholder(&mut out, &mut replaced);
                    after_operand = true;
                }
                b'-' if !after_operand && starts_number(b, i + 1) => {
                    i = number_end(b, i + 1);
                    placeholder(&mut out, &mut replaced);
                    after_operand = true;
                }
                _ if is_ident_start(c) => {
                    let end = ident_end(b, i);
                    // Prefixed strings: E'…', B'…', X'…', N'…', U&'…'.
                    let word = &sql[i..end];
                    let prefixed =
                        matches!(word.to_ascii_uppercase().as_str(), "E" | "B" | "X" | "N")
                            && b.get(end) == Some(&b'\'');
                    let unicode = word.eq_ignore_ascii_case("U")
                        && b.get(end) == Some(&b'&')
                        && b.get(end + 1) == Some(&b'\'');
                    if prefixed || unicode {
                        let quote = if unicode { end + 1 } else { end };
                        let escapes = word.eq_ignore_ascii_case("E");
                        i = quoted_end(b, quote, b'\'', escapes);
                        placeholder(&mut out, &mut replaced);
                    } else {
                        out.push_str(word);
                        i = end;
                    }
                    after_operand = true;
                }
                _ => {
                    // Any other byte (operators, punctuation, whitespace, UTF-8 continuation bytes):
                    // copy the whole UTF-8 character.
                    let len = utf8_len(c);
                    let end = (i + len).min(b.len());
                    out.push_str(&sql[i..end]);
                    if !c.is_ascii_whitespace() {
                        after_operand = c == b')' || c == b']';
                    }
                    i = end;
                }
            }
        }
        (out, replaced)
    }

    #[test]
    fn run_copying_matches_token_by_token_on_random_text() {
        const PIECES: [&str; 28] = [
            "select",
            " ",
            "'a''b'",
            "E'x\\'y'",
            "e'z'",
            "$1",
            "$12",
            "$$q$$",
            "$t$x$t$",
            "12",
            "1.5e3",
            ".5",
            "-",
            "--c\n",
            "/* c /* d */ */",
            "\"Id\"",
            "x",
            "(",
            ")",
            "é",
            "U&'d'",
            "0x1F",
            ",",
            "\n",
            "'",
            "$",
            "1..2",
            "ü'",
        ];
        let mut rng = crate::test_rng::XorShift::new(0x1234_5678_9abc_def1);
        for _ in 0..20_000 {
            let mut sql = String::new();
            for _ in 0..1 + rng.below(12) {
                sql.push_str(PIECES[rng.below(PIECES.len() as u64) as usize]);
            }
            assert_eq!(normalize(&sql), token_by_token(&sql), "{sql:?}");
        }
    }

    #[test]
    fn table() {
        let cases = [
            ("SELECT 1", "SELECT $1", 1),
            (
                "select * from t where id = 42",
                "select * from t where id = $1",
                1,
            ),
            (
                "SELECT 'a''b', E'x\\'y', 1.5e-3, .5, 0x1F",
                "SELECT $1, $2, $3, $4, $5",
                5,
            ),
            (
                "SELECT x - 1, -2, (-3), a-4",
                "SELECT x - $1, $2, ($3), a-$4",
                4,
            ),
            ("SELECT t1.c2 FROM t1", "SELECT t1.c2 FROM t1", 0),
            (
                "SELECT \"col 1\" FROM \"T\" WHERE a = 'x'",
                "SELECT \"col 1\" FROM \"T\" WHERE a = $1",
                1,
            ),
            ("SELECT $1, 5 WHERE b = $3", "SELECT $1, $4 WHERE b = $3", 1),
            ("SELECT $$a 'quoted' b$$, $tag$x$tag$", "SELECT $1, $2", 2),
            (
                "SELECT 1 -- the answer 42\n, 2",
                "SELECT $1 -- the answer 42\n, $2",
                2,
            ),
            (
                "/* dbopt:critical */ SELECT 3",
                "/* dbopt:critical */ SELECT $1",
                1,
            ),
            (
                "SELECT /* a /* nested */ 7 */ 8",
                "SELECT /* a /* nested */ 7 */ $1",
                1,
            ),
            (
                "SELECT B'101', X'ff', N'n', U&'d\\0061'",
                "SELECT $1, $2, $3, $4",
                4,
            ),
            ("SELECT arr[1:2] FROM t", "SELECT arr[$1:$2] FROM t", 2),
            ("SELECT 'ünïcödé', 'x' || ñ", "SELECT $1, $2 || ñ", 2),
            (
                "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
                "INSERT INTO t VALUES ($1, $2), ($3, $4)",
                4,
            ),
            ("SELECT 1::int, '2'::text", "SELECT $1::int, $2::text", 2),
            ("SELECT 'unterminated", "SELECT $1", 1),
            ("", "", 0),
        ];
        for (input, want, n) in cases {
            assert_eq!(normalize(input), (want.to_string(), n), "{input}");
        }
        // One buffer through all of them, longest first: nothing of an earlier text is left.
        let mut out = String::new();
        for (input, want, n) in cases.iter().rev() {
            assert_eq!(normalize_into(input, &mut out), *n, "{input}");
            assert_eq!(out, *want, "{input}");
        }
    }

    #[test]
    fn many_literals_and_lowercase_prefixes() {
        let sql = format!(
            "select {} from t where a = e'x\\'y' and b = x'ff' and c = n'z'",
            (1..=11)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (text, n) = normalize(&sql);
        assert_eq!(n, 14);
        assert_eq!(
            text,
            "select $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 from t where a = $12 and b = $13 and c = $14"
        );
        assert_eq!(normalize("select $100, 7").0, "select $100, $101");
        assert_eq!(normalize("select e, x from t").0, "select e, x from t");
    }

    #[test]
    fn parameters_inside_strings_and_comments_do_not_count() {
        assert_eq!(
            super::highest_parameter("SELECT $2, '$9' /* $8 */ FROM t WHERE a = $1"),
            2
        );
        assert_eq!(super::highest_parameter("SELECT 1"), 0);
    }

    #[test]
    fn never_panics_on_arbitrary_text() {
        // Every prefix of tricky inputs, and some byte soup.
        let inputs = [
            "SELECT $a$ 'x $a",
            "E'\\",
            "/* /* */",
            "U&",
            "0x",
            "1e",
            "$$",
            "'''",
            "- -1",
            "é'",
        ];
        for s in inputs {
            for end in (0..=s.len()).filter(|e| s.is_char_boundary(*e)) {
                let _ = normalize(&s[..end]);
            }
        }
    }
}
