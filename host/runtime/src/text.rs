//! Guest-supplied text on its way into the host's log lines and error messages: cut to a length
//! and with control characters escaped, so that a task can never end a log line early, start a
//! line that looks like the host's own, move the cursor or reorder what a terminal shows.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The longest task message the host repeats (in a log line, an error, a dead-letter envelope):
/// a task's message is a guest string of any length.
pub const MAX_MESSAGE_BYTES: usize = 8 << 10;

/// Whether `c` must not reach a log line as is: C0 and C1 control characters and DEL (line
/// breaks, escape sequences), and the Unicode characters that break lines or change the order
/// or visibility of text (line and paragraph separators, bidirectional overrides and isolates,
/// zero-width characters, the byte-order mark).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
        )
}

/// `text` with every character that could forge or disguise a log line escaped: `\n`, `\r` and
/// `\t` as those two characters, any other as `\u{…}` (Rust's notation). Everything else,
/// backslashes included, is kept, so ordinary text reads as it was written.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `message` cut to at most `max` bytes (at a character boundary), marked as cut with the
/// length it had.
pub fn cut_message(message: &str, max: usize) -> Cow<'_, str> {
    if message.len() <= max {
        return Cow::Borrowed(message);
    }
    Cow::Owned(format!("{}… (cut: {} bytes in all)", truncate(message, max), message.len()))
}

/// A guest's message made safe to repeat: control characters escaped, then cut to `max` bytes
/// (marked with the original length when cut). Only the first `max` bytes are ever escaped, so a
/// huge message costs no more than a short one.
pub fn clean_message(message: &str, max: usize) -> String {
    let head = escape_control(truncate(message, max));
    if head.len() <= max && message.len() <= max {
        return head.into_owned();
    }
    format!("{}… (cut: {} bytes in all)", truncate(&head, max), message.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape_control("plain text, ünïcode \\ ok"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("a\nb\r\tc\u{1b}[31md\u{7f}\u{85}"),
            "a\\nb\\r\\tc\\u{1b}[31md\\u{7f}\\u{85}"
        );
        // Line separators, bidirectional overrides, zero-width and BOM characters.
        assert_eq!(
            escape_control("x\u{2028}y\u{202e}z\u{2066}\u{200b}\u{feff}"),
            "x\\u{2028}y\\u{202e}z\\u{2066}\\u{200b}\\u{feff}"
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("hello", 10), "hello");
    }

    #[test]
    fn messages_are_cut_at_a_character_boundary() {
        assert_eq!(cut_message("short", 5), "short");
        // "é" is 2 bytes: 3 bytes of "aéé" end inside the second one.
        assert_eq!(cut_message("aéé", 4), "aé… (cut: 5 bytes in all)");
        assert_eq!(cut_message("aéé", 3), "aé… (cut: 5 bytes in all)");
        assert_eq!(cut_message("aéé", 2), "a… (cut: 5 bytes in all)");
    }

    #[test]
    fn clean_messages_are_escaped_then_cut() {
        assert_eq!(clean_message("ok", 10), "ok");
        assert_eq!(clean_message("a\nb", 10), "a\\nb");
        // The escape makes it longer than the limit: cut, with the original length.
        assert_eq!(clean_message("\n\n\n", 4), "\\n\\n… (cut: 3 bytes in all)");
        let long = format!("x\n{}", "y".repeat(1 << 20));
        let clean = clean_message(&long, 16);
        assert_eq!(clean, format!("x\\n{}… (cut: {} bytes in all)", "y".repeat(13), long.len()));
    }
}
