//! Bearer tokens as auth files list them: each either in plain text
//! (`token`) or as the hex SHA-256 of its text (`token_sha256`), and kept
//! only as that hash.

/// The hex SHA-256 of a token's text: what a presented token is looked up by.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an auth file entry's token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenEntryError {
    #[error("token_sha256: not 64 hex digits")]
    BadHash,
    #[error("give exactly one of `token` or `token_sha256`")]
    NotOne,
}

/// The hash an auth file entry stands for, from its `token` or its
/// `token_sha256`.
pub fn entry_hash(
    token: Option<&str>,
    token_sha256: Option<&str>,
) -> Result<String, TokenEntryError> {
    match (token, token_sha256) {
        (Some(plain), None) if !plain.is_empty() => Ok(token_hash(plain)),
        (None, Some(hash)) if hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(hash.to_ascii_lowercase())
        }
        (None, Some(_)) => Err(TokenEntryError::BadHash),
        _ => Err(TokenEntryError::NotOne),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_give_one_hash_either_way() {
        let hash = token_hash("test");
        assert_eq!(
            hash,
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(entry_hash(Some("test"), None), Ok(hash.clone()));
        assert_eq!(entry_hash(None, Some(&hash.to_uppercase())), Ok(hash));
        assert_eq!(entry_hash(None, Some("abc")), Err(TokenEntryError::BadHash));
        assert_eq!(entry_hash(Some(""), None), Err(TokenEntryError::NotOne));
        assert_eq!(
            entry_hash(Some("a"), Some("b")),
            Err(TokenEntryError::NotOne)
        );
        assert_eq!(entry_hash(None, None), Err(TokenEntryError::NotOne));
    }
}
