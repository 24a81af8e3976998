//! Object sizes as users write them: plain bytes or with a `k`/`m` suffix
//! (`0`, `512`, `1k`, `64K`, `1m`; binary units, 1k = 1024), and the seed's
//! size lists (`0,1k,2k,...` or `all`).

use std::fmt;

/// The object sizes of the seed benchmark, in bytes.
pub const SEED_SIZES: [u64; 9] = [
    0,
    1024,
    2 * 1024,
    4 * 1024,
    8 * 1024,
    16 * 1024,
    32 * 1024,
    48 * 1024,
    64 * 1024,
];

/// Largest object the origin serves and a sweep accepts (1 GiB).
pub const MAX_SIZE: u64 = 1 << 30;

/// Why a size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size (use a number of bytes with an optional k or m suffix, e.g. 64k)")]
    Empty,
    #[error(
        "invalid size '{0}': unknown suffix '{1}' (use a number of bytes with an optional k or m suffix, e.g. 64k)"
    )]
    UnknownSuffix(String, String),
    #[error(
        "invalid size '{0}': not a number (use a number of bytes with an optional k or m suffix, e.g. 64k)"
    )]
    NotANumber(String),
    #[error("invalid size '{0}': larger than the 1g limit")]
    TooLarge(String),
}

/// Parses one size: digits, then optionally `k`/`K` (×1024) or `m`/`M`
/// (×1024²). A `b`/`B` after the suffix is accepted (`64kb`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NotANumber(t.to_string()));
    }
    let mult: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(SizeError::UnknownSuffix(t.to_string(), suffix.to_string())),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::TooLarge(t.to_string()))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(t.to_string()))?;
    if bytes > MAX_SIZE {
        return Err(SizeError::TooLarge(t.to_string()));
    }
    Ok(bytes)
}

/// Parses a comma-separated list of sizes, or `all` for the seed's nine.
/// Duplicates are kept in the order given.
pub fn parse_size_list(text: &str) -> Result<Vec<u64>, SizeError> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("all") || t.eq_ignore_ascii_case("seed") {
        return Ok(SEED_SIZES.to_vec());
    }
    t.split(',').map(parse_size).collect()
}

/// A size for people: `0`, `512`, `1K`, `64K`, `1M`, `1536` (exact only).
pub fn format_size(bytes: u64) -> String {
    SizeLabel(bytes).to_string()
}

/// Display adapter for [`format_size`].
pub struct SizeLabel(pub u64);

impl fmt::Display for SizeLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1024 * 1024 && b.is_multiple_of(1024 * 1024) {
            write!(f, "{}M", b / (1024 * 1024))
        } else if b >= 1024 && b.is_multiple_of(1024) {
            write!(f, "{}K", b / 1024)
        } else {
            write!(f, "{b}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1"), Ok(1));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert!(matches!(
            parse_size("10q"),
            Err(SizeError::UnknownSuffix(..))
        ));
        assert!(matches!(parse_size("k"), Err(SizeError::NotANumber(..))));
        assert!(matches!(parse_size("-1"), Err(SizeError::NotANumber(..))));
        assert!(matches!(
            parse_size("2g"),
            Err(SizeError::UnknownSuffix(..))
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::TooLarge(..))
        ));
        assert!(matches!(parse_size(""), Err(SizeError::Empty)));
    }

    #[test]
    fn parses_lists() {
        assert_eq!(parse_size_list("all").unwrap(), SEED_SIZES.to_vec());
        assert_eq!(parse_size_list("0,1k,64k").unwrap(), vec![0, 1024, 65536]);
        assert!(parse_size_list("0,,1k").is_err());
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1024), "1K");
        assert_eq!(format_size(48 * 1024), "48K");
        assert_eq!(format_size(1 << 20), "1M");
        assert_eq!(format_size(1500), "1500");
    }
}
