//! Where each migration stands (pure): files against the history's applied versions.

use crate::files::{Migration, Version};

/// One applied migration as the history records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedVersion {
    pub version: String,
    pub name: String,
    pub checksum: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Applied,
    Pending,
    /// Applied, but the file changed since (checksums differ).
    Changed,
    /// Applied, and no file has this version any more.
    Missing,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Applied => "applied",
            State::Pending => "pending",
            State::Changed => "CHANGED since applied",
            State::Missing => "applied, file MISSING",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub version: String,
    pub name: String,
    pub state: State,
}

/// The status of every file and every applied version, in version order.
pub fn status(files: &[Migration], applied: &[AppliedVersion]) -> Vec<Row> {
    let mut rows: Vec<(Version, Row)> = Vec::new();
    for m in files {
        let a = applied
            .iter()
            .find(|a| Version::parse(&a.version).is_ok_and(|v| v == m.version));
        let state = match a {
            None => State::Pending,
            Some(a) if a.checksum != m.checksum => State::Changed,
            Some(_) => State::Applied,
        };
        rows.push((
            m.version.clone(),
            Row {
                version: m.version.text.clone(),
                name: m.name.clone(),
                state,
            },
        ));
    }
    for a in applied {
        let Ok(v) = Version::parse(&a.version) else {
            continue;
        };
        if !files.iter().any(|m| m.version == v) {
            rows.push((
                v,
                Row {
                    version: a.version.clone(),
                    name: a.name.clone(),
                    state: State::Missing,
                },
            ));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.into_iter().map(|(_, r)| r).collect()
}

/// The migrations to apply, or why none may be: a changed applied file, or a pending version
/// older than one already applied (out of order).
pub fn pending<'a>(
    files: &'a [Migration],
    applied: &[AppliedVersion],
) -> Result<Vec<&'a Migration>, String> {
    let rows = status(files, applied);
    if let Some(r) = rows.iter().find(|r| r.state == State::Changed) {
        return Err(format!(
            "V{} ({}) changed since it was applied (checksum differs): restore the file, or roll back to before it first",
            r.version, r.name
        ));
    }
    let highest = applied
        .iter()
        .filter_map(|a| Version::parse(&a.version).ok())
        .max();
    let pending: Vec<&Migration> = files
        .iter()
        .filter(|m| {
            rows.iter().any(|r| {
                r.state == State::Pending
                    && Version::parse(&r.version).is_ok_and(|v| v == m.version)
            })
        })
        .collect();
    if let (Some(h), Some(first)) = (&highest, pending.first()) {
        if first.version < *h {
            return Err(format!(
                "V{} ({}) is pending but V{} is already applied: versions must be applied in order \
                 (give it a version after V{})",
                first.version, first.name, h, h
            ));
        }
    }
    Ok(pending)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::files::parse;

    fn applied(v: &str, m: &Migration) -> AppliedVersion {
        AppliedVersion {
            version: v.into(),
            name: m.name.clone(),
            checksum: m.checksum.clone(),
        }
    }

    #[test]
    fn applied_pending_changed_and_missing() {
        let a = parse("V1__a.sql", "SELECT 1").unwrap();
        let b = parse("V2__b.sql", "SELECT 2").unwrap();
        let c = parse("V3__c.sql", "SELECT 3").unwrap();
        let files = vec![a.clone(), b.clone(), c.clone()];
        let done = vec![applied("1", &a), applied("2", &b)];
        let s = status(&files, &done);
        assert_eq!(
            s.iter().map(|r| r.state.clone()).collect::<Vec<_>>(),
            [State::Applied, State::Applied, State::Pending]
        );
        assert_eq!(pending(&files, &done).unwrap(), vec![&c]);

        let edited = parse("V2__b.sql", "SELECT 22").unwrap();
        let files2 = vec![a.clone(), edited, c.clone()];
        assert_eq!(status(&files2, &done)[1].state, State::Changed);
        assert!(pending(&files2, &done)
            .unwrap_err()
            .contains("V2 (b) changed"));

        let s = status(&[a.clone(), c.clone()], &done);
        assert_eq!(s[1].state, State::Missing);

        // Out of order: V1.5 appears after V2 was applied.
        let late = parse("V1.5__late.sql", "SELECT 15").unwrap();
        let e = pending(&[a, late, b, c], &done).unwrap_err();
        assert!(
            e.contains("V1.5 (late) is pending but V2 is already applied"),
            "{e}"
        );
    }
}
