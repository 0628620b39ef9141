//! Parsing of operator-given core lists in taskset syntax: `2-5,8`, `0`, `1, 3-4`.
//!
//! The result is sorted and free of duplicates, so `0,0-1` and `1,0` both give `[0, 1]`.
//! Whitespace around numbers, dashes and commas is ignored. Every error names the part of
//! the list that is wrong.

use std::fmt;

/// The highest core number accepted (taskset's default CPU set size is 1024 cores; we allow
/// a little more for big machines).
pub const MAX_CORE: usize = 4095;

/// Why a core list could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreListError {
    /// The list is empty or only whitespace.
    Empty,
    /// A comma-separated part is empty (`1,,2` or a trailing comma).
    EmptyPart {
        /// The position (0-based) of the empty part in the list.
        position: usize,
    },
    /// A part is not a number or a `first-last` range of numbers.
    BadNumber {
        /// The offending part as written.
        part: String,
    },
    /// A range whose first core is above its last (`5-2`).
    ReversedRange {
        /// The offending part as written.
        part: String,
    },
    /// A core number above [`MAX_CORE`].
    TooLarge {
        /// The offending part as written.
        part: String,
        /// The number that is too large.
        core: usize,
    },
}

impl fmt::Display for CoreListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreListError::Empty => write!(f, "empty core list"),
            CoreListError::EmptyPart { position } => write!(
                f,
                "empty entry at position {} of the core list (stray comma?)",
                position + 1
            ),
            CoreListError::BadNumber { part } => write!(
                f,
                "bad core list entry {part:?}: expected a core number or a range like 2-5"
            ),
            CoreListError::ReversedRange { part } => write!(
                f,
                "reversed core range {part:?}: the first core must not be above the last"
            ),
            CoreListError::TooLarge { part, core } => write!(
                f,
                "core {core} in {part:?} is too large (at most {MAX_CORE})"
            ),
        }
    }
}

impl std::error::Error for CoreListError {}

/// Parses a taskset-style core list (`2-5,8`) into a sorted, deduplicated list of cores.
pub fn parse_core_list(list: &str) -> Result<Vec<usize>, CoreListError> {
    if list.trim().is_empty() {
        return Err(CoreListError::Empty);
    }
    let mut cores = Vec::new();
    for (position, raw) in list.split(',').enumerate() {
        let part = raw.trim();
        if part.is_empty() {
            return Err(CoreListError::EmptyPart { position });
        }
        let number = |s: &str| -> Result<usize, CoreListError> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CoreListError::BadNumber { part: part.into() });
            }
            // All digits: the only possible parse failure is overflow, which is "too large".
            let core = s.parse::<usize>().unwrap_or(usize::MAX);
            if core > MAX_CORE {
                return Err(CoreListError::TooLarge {
                    part: part.into(),
                    core,
                });
            }
            Ok(core)
        };
        match part.split_once('-') {
            None => cores.push(number(part)?),
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(CoreListError::ReversedRange { part: part.into() });
                }
                cores.extend(first..=last);
            }
        }
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_cores_and_ranges() {
        assert_eq!(parse_core_list("0").unwrap(), vec![0]);
        assert_eq!(parse_core_list("2-5,8").unwrap(), vec![2, 3, 4, 5, 8]);
        assert_eq!(parse_core_list("1,3-4").unwrap(), vec![1, 3, 4]);
        assert_eq!(parse_core_list("7-7").unwrap(), vec![7]);
    }

    #[test]
    fn tolerates_whitespace_sorts_and_dedups() {
        assert_eq!(
            parse_core_list(" 8 , 2 - 4,3,\t0 ").unwrap(),
            vec![0, 2, 3, 4, 8]
        );
        assert_eq!(parse_core_list("1,0,0-1").unwrap(), vec![0, 1]);
    }

    #[test]
    fn empty_lists_and_parts_are_errors() {
        assert_eq!(parse_core_list(""), Err(CoreListError::Empty));
        assert_eq!(parse_core_list("  "), Err(CoreListError::Empty));
        assert_eq!(
            parse_core_list("1,,2"),
            Err(CoreListError::EmptyPart { position: 1 })
        );
        assert_eq!(
            parse_core_list("1,"),
            Err(CoreListError::EmptyPart { position: 1 })
        );
    }

    #[test]
    fn bad_numbers_name_the_part() {
        for bad in ["a", "1-", "-3", "1-2-3", "+1", "1.5", "0x2", "3 4"] {
            let err = parse_core_list(&format!("0,{bad}")).unwrap_err();
            assert_eq!(
                err,
                CoreListError::BadNumber {
                    part: bad.trim().into()
                },
                "{bad}"
            );
            assert!(err.to_string().contains(bad.trim()), "{err}");
        }
    }

    #[test]
    fn reversed_ranges_are_errors() {
        let err = parse_core_list("1,5-2").unwrap_err();
        assert_eq!(err, CoreListError::ReversedRange { part: "5-2".into() });
        assert!(err.to_string().contains("5-2"));
    }

    #[test]
    fn too_large_cores_are_errors() {
        let err = parse_core_list("0-4096").unwrap_err();
        assert_eq!(
            err,
            CoreListError::TooLarge {
                part: "0-4096".into(),
                core: 4096
            }
        );
        assert!(err.to_string().contains("4096"));
        assert!(matches!(
            parse_core_list("99999999999999999999999"),
            Err(CoreListError::TooLarge { .. })
        ));
        assert_eq!(parse_core_list("4095").unwrap(), vec![4095]);
    }
}
