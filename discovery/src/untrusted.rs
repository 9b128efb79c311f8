//! Text that came from outside (a catalog file, an xDS client, an API
//! caller), made safe to put in a log line, a status page or a terminal.
//!
//! [`Escaped`] writes control characters (newline, carriage return, ESC,
//! NUL, …) and Unicode line and direction overrides as visible escapes, so
//! such text can never start a forged log line or drive a terminal.
//! [`clip`] bounds how much of it is copied into an error message.
//!
//! ```
//! use ferry_discovery::untrusted::{Escaped, clip};
//! assert_eq!(Escaped("a\nINFO forged").to_string(), "a\\nINFO forged");
//! assert_eq!(clip("abcdef", 3), "abc…(6 bytes)");
//! ```

use std::borrow::Cow;
use std::fmt::{self, Write};

/// Displays a string with control characters escaped (`\n`, `\r`, `\t`,
/// `\0`, `\u{1b}`) and backslashes doubled, so the output is one line and
/// reads back unambiguously.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        // Line and paragraph separators, and bidirectional overrides that
        // reorder what a terminal shows.
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\0' => f.write_str("\\0")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `text` with control characters escaped; borrowed when there are none.
pub fn escape(text: &str) -> Cow<'_, str> {
    if text.chars().any(needs_escape) {
        Cow::Owned(Escaped(text).to_string())
    } else {
        Cow::Borrowed(text)
    }
}

/// At most `max` bytes of `text` (cut at a character boundary), with the
/// full length noted when it was cut.
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…({} bytes)", &text[..end], text.len()))
}

/// [`clip`] then [`escape`]: untrusted text ready for an error message.
pub fn quote(text: &str, max: usize) -> String {
    escape(&clip(text, max)).into_owned()
}

/// Whether `text` holds a control character or a line/direction override.
pub fn has_control(text: &str) -> bool {
    text.chars().any(|c| c != '\\' && needs_escape(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_output() {
        let hostile = "id\n2026-01-01T00:00:00Z INFO forged\r\x1b[2J\0\u{2028}\\n";
        let shown = Escaped(hostile).to_string();
        assert!(!shown.chars().any(needs_escape_but_backslash), "{shown}");
        assert_eq!(
            shown,
            "id\\n2026-01-01T00:00:00Z INFO forged\\r\\u{1b}[2J\\0\\u{2028}\\\\n"
        );
        assert!(matches!(escape("plain text"), Cow::Borrowed(_)));
        assert!(has_control(hostile) && !has_control("a\\b"));
    }

    fn needs_escape_but_backslash(c: char) -> bool {
        c != '\\' && needs_escape(c)
    }

    #[test]
    fn clipping_keeps_characters_whole() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 3), "é…(6 bytes)");
        assert_eq!(quote("a\nb", 10), "a\\nb");
    }
}
