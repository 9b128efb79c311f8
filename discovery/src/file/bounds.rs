//! What a catalog file may be before it is parsed: at most
//! [`MAX_FILE_BYTES`], nested at most [`MAX_DEPTH`] deep, and without YAML
//! anchors or aliases.
//!
//! Aliases let a small file expand into an enormous document (a 128 KiB
//! "billion laughs" file grows to millions of endpoints), and deep nesting
//! makes the parser work quadratically; neither has a use in a catalog. A
//! streaming YAML event parser checks both in one linear pass, stopping
//! at the first offence, before serde builds anything.

use saphyr_parser::{Event, Parser, Span};

/// The largest catalog file read (16 MiB: about 400,000 endpoints).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The deepest nesting of mappings and sequences accepted. A catalog
/// needs about 8.
pub const MAX_DEPTH: usize = 64;

/// Why a catalog's text was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error(
        "line {line}: YAML anchors and aliases (&name, *name) are not accepted in a catalog; write each value out"
    )]
    Alias { line: usize },
    #[error("line {line}: nested deeper than {MAX_DEPTH} levels")]
    TooDeep { line: usize },
    #[error("line {line}: invalid YAML: {message}")]
    Syntax { line: usize, message: String },
}

fn line(span: &Span) -> usize {
    span.start.line()
}

/// Checks `text` for anchors, aliases and nesting deeper than
/// [`MAX_DEPTH`], in one pass that stops at the first offence.
pub fn check(text: &str) -> Result<(), BoundsError> {
    let mut depth = 0usize;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            // The event parser has its own, lower-level nesting limit.
            let message = e.info().to_owned();
            if message.contains("recursion limit") {
                BoundsError::TooDeep {
                    line: e.marker().line(),
                }
            } else {
                BoundsError::Syntax {
                    line: e.marker().line(),
                    message,
                }
            }
        })?;
        let anchored = match &event {
            Event::Alias(_) => return Err(BoundsError::Alias { line: line(&span) }),
            Event::Scalar(_, _, anchor, _) => *anchor != 0,
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(BoundsError::TooDeep { line: line(&span) });
                }
                *anchor != 0
            }
            Event::SequenceEnd | Event::MappingEnd => {
                depth = depth.saturating_sub(1);
                false
            }
            _ => false,
        };
        if anchored {
            return Err(BoundsError::Alias { line: line(&span) });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn anchors_and_aliases_are_refused() {
        let bomb = "a: &a [x, x]\nb: &b [*a, *a]\nservices: [*b, *b]\n";
        assert_eq!(check(bomb), Err(BoundsError::Alias { line: 1 }));
        assert!(check("services:\n  - *nothing\n").is_err());
        assert!(check("services:\n  - name: \"a&b *c\"\n").is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_fast() {
        let started = Instant::now();
        let deep = format!("services: {}", "[".repeat(100_000));
        assert!(matches!(check(&deep), Err(BoundsError::TooDeep { .. })));
        let nested = format!("services: {}{}", "[".repeat(60), "]".repeat(60));
        assert!(check(&nested).is_ok());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
