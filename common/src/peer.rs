//! What a peer is called, and how what it says reaches a log: [`ClientId`] with its one rule
//! ([`check_client_id`]), and [`escape`], which every string a peer controls goes through
//! before a log line or an error. A leaf: the messages (`wire`) and the secure-aggregation
//! state machines (`secagg`) both use it, and it uses nothing.

/// A client's identity: the subject of its certificate ([`check_client_id`] is its rule).
pub type ClientId = String;

/// Characters that change how a line reads without being seen: line and paragraph separators,
/// bidirectional overrides and isolates (which can reorder a log line), zero-width characters
/// and the byte-order mark.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
}

/// A string a peer controls, made safe for a log line or an error: control characters and
/// invisible formatting characters escaped (no forged lines, no terminal escapes, no reordered
/// text) and at most `max` characters kept.
pub fn escape(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 3);
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() || is_invisible_format(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The longest client id.
pub const MAX_CLIENT_ID: usize = 64;

/// The rule for client ids, which are certificate subjects, file names, database keys and log
/// fields: 1 to [`MAX_CLIENT_ID`] ASCII letters, digits, '-', '_' or '.'. Checked where an id is
/// made (enrolment, keygen) and wherever a peer presents one (every connection).
pub fn check_client_id(id: &str) -> Result<(), String> {
    if !id.is_empty() && id.len() <= MAX_CLIENT_ID && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Ok(());
    }
    Err(format!(
        "client id `{}` ({} bytes) must be 1-{MAX_CLIENT_ID} ASCII letters, digits, '-', '_' or '.'",
        escape(id, MAX_CLIENT_ID),
        id.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_follow_one_rule() {
        for good in ["a", "hospital-1", "bank_2.eu", &"x".repeat(64)] {
            assert_eq!(check_client_id(good), Ok(()), "{good}");
        }
        for bad in ["", &"x".repeat(65), &"y".repeat(10_000), "a b", "a\nround complete", "é", "a/b", "../x"] {
            let err = check_client_id(bad).unwrap_err();
            assert!(err.len() < 200 && !err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn peer_strings_are_escaped_and_capped() {
        assert_eq!(escape("ok\nround complete round=999\u{1b}[2J", 100), "ok\\nround complete round=999\\u{1b}[2J");
        assert_eq!(escape(&"x".repeat(10_000), 8), "xxxxxxxx…");
        assert_eq!(escape("héllo", 8), "héllo");
        assert_eq!(escape("a\u{2028}b\u{202e}c\u{2066}d\u{200b}", 20), "a\\u{2028}b\\u{202e}c\\u{2066}d\\u{200b}");
    }
}
