//! The tamper-evident audit log: every security-relevant event is a row that carries the hash
//! of the row before it. Editing, deleting or reordering a row breaks the chain at that row,
//! and `stepgate audit verify` names it. This module is the pure part (hashing and checking);
//! the store appends rows in the same transaction as the change they record.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The hash the chain starts from.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One stored audit row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub occurred_at: i64,
    pub user_id: String,
    pub kind: String,
    pub change_id: Option<String>,
    /// JSON text.
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// SHA-256 over the previous hash and every field, each length-prefixed so no two different
/// rows hash the same input.
pub fn row_hash(
    prev_hash: &str,
    seq: i64,
    occurred_at: i64,
    user_id: &str,
    kind: &str,
    change_id: Option<&str>,
    detail: &str,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"stepgate-audit-v1");
    for part in [
        prev_hash.as_bytes(),
        &seq.to_be_bytes(),
        &occurred_at.to_be_bytes(),
        user_id.as_bytes(),
        kind.as_bytes(),
        change_id.unwrap_or("").as_bytes(),
        detail.as_bytes(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the chain breaks, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub seq: i64,
    pub why: String,
}

/// Walks rows in `seq` order and checks each links to the one before and hashes to what it
/// says; the head (last seq and hash, kept separately) catches rows removed from the end.
/// Returns how many rows verified.
pub fn verify_chain(
    rows: impl IntoIterator<Item = AuditRow>,
    head: (i64, &str),
) -> Result<u64, ChainBreak> {
    let mut expected_seq = 1;
    let mut prev_hash = GENESIS.to_string();
    let mut count = 0;
    for row in rows {
        if row.seq != expected_seq {
            return Err(ChainBreak {
                seq: expected_seq,
                why: format!(
                    "row {expected_seq} is missing or out of order (found row {} next)",
                    row.seq
                ),
            });
        }
        if row.prev_hash != prev_hash {
            return Err(ChainBreak {
                seq: row.seq,
                why: "it does not link to the row before it (a row was removed, swapped or edited)"
                    .into(),
            });
        }
        let recomputed = row_hash(
            &row.prev_hash,
            row.seq,
            row.occurred_at,
            &row.user_id,
            &row.kind,
            row.change_id.as_deref(),
            &row.detail,
        );
        if recomputed != row.hash {
            return Err(ChainBreak {
                seq: row.seq,
                why: "its content does not match its hash (the row was edited)".into(),
            });
        }
        prev_hash = row.hash;
        expected_seq += 1;
        count += 1;
    }
    let (head_seq, head_hash) = head;
    if head_seq != expected_seq - 1 || head_hash != prev_hash {
        return Err(ChainBreak {
            seq: expected_seq,
            why: format!(
                "the log ends at row {} but {head_seq} rows were written (rows were removed from the end)",
                expected_seq - 1
            ),
        });
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRow> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let detail = format!("{{\"n\":{seq}}}");
                let hash = row_hash(
                    &prev,
                    seq,
                    1000 + seq,
                    "alice",
                    "change.held",
                    None,
                    &detail,
                );
                let row = AuditRow {
                    seq,
                    occurred_at: 1000 + seq,
                    user_id: "alice".into(),
                    kind: "change.held".into(),
                    change_id: None,
                    detail,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                row
            })
            .collect()
    }

    fn head(rows: &[AuditRow]) -> (i64, String) {
        rows.last()
            .map(|r| (r.seq, r.hash.clone()))
            .unwrap_or((0, GENESIS.into()))
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let rows = chain(5);
        let (seq, hash) = head(&rows);
        assert_eq!(verify_chain(rows, (seq, &hash)), Ok(5));
        assert_eq!(verify_chain(Vec::new(), (0, GENESIS)), Ok(0));
    }

    #[test]
    fn edits_removals_swaps_and_truncation_name_the_row() {
        let rows = chain(5);
        let (seq, hash) = head(&rows);

        let mut edited = rows.clone();
        edited[2].detail = "{\"n\":99}".into();
        assert_eq!(verify_chain(edited, (seq, &hash)).unwrap_err().seq, 3);

        let mut removed = rows.clone();
        removed.remove(1);
        assert_eq!(verify_chain(removed, (seq, &hash)).unwrap_err().seq, 2);

        let mut swapped = rows.clone();
        swapped.swap(1, 2);
        assert_eq!(verify_chain(swapped, (seq, &hash)).unwrap_err().seq, 2);

        let mut truncated = rows.clone();
        truncated.pop();
        assert_eq!(verify_chain(truncated, (seq, &hash)).unwrap_err().seq, 5);
    }
}
