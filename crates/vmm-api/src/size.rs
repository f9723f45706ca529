//! Sizes as users type them for qemu-img, virsh and our own flags: a byte count (`4096`), a
//! binary suffix with or without `B`/`iB` (`512K`, `512M`, `512MiB`, `2G`, `2T`, up to `E`), and
//! a decimal fraction before a suffix (`1.5G`). Units are always powers of 1024, as in qemu-img.

/// Parses a size in bytes; the error names the text and what is wrong with it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let examples = "examples: 4096, 512M, 512MiB, 1.5G, 2T";
    let bad = || format!("{text:?} is not a size ({examples})");
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_upper = unit.to_ascii_uppercase();
    let shift = match unit_upper.strip_suffix("IB").or_else(|| unit_upper.strip_suffix('B')).unwrap_or(&unit_upper) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        "E" => 60,
        _ => return Err(format!("{text:?} is not a size: unknown suffix {unit:?} (K, M, G, T, P or E; {examples})")),
    };
    // "B" alone is bytes; "IB" without a prefix letter is not a unit. Only digits and one point
    // (str::parse would take a sign).
    if unit_upper == "IB" || number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let scale = 1u64 << shift;
    match number.split_once('.') {
        None => {
            let n: u64 = number.parse().map_err(|_| bad())?;
            n.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))
        }
        Some((whole, frac)) => {
            if shift == 0 || frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
            let frac_value: u128 = frac.parse().map_err(|_| bad())?;
            let frac_bytes = frac_value * u128::from(scale) / 10u128.pow(frac.len() as u32);
            whole
                .checked_mul(scale)
                .and_then(|w| w.checked_add(frac_bytes as u64))
                .ok_or_else(|| format!("{text:?} is too large"))
        }
    }
}

/// Formats a byte count the short way qemu-img prints it (`512 MiB`, `1.5 GiB`, `4 KiB`, `100 B`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        let text = format!("{value:.2}");
        format!("{} {}", text.trim_end_matches('0').trim_end_matches('.'), UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses_the_shared_table() {
        for &(text, bytes) in ferro_test_support::grammar::SIZES {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
        for &text in ferro_test_support::grammar::NOT_SIZES {
            let e = parse_size(text).unwrap_err();
            assert!(e.contains(&format!("{text:?}")), "the error names the text: {e}");
        }
    }

    #[test]
    fn says_what_is_wrong() {
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
        assert!(parse_size("1E").is_ok() && parse_size("16E").unwrap_err().contains("too large"));
        assert!(parse_size("12Q").unwrap_err().contains("unknown suffix \"Q\""));
        assert!(parse_size("lots").unwrap_err().contains("is not a size"));
    }

    #[test]
    fn formats_short() {
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(256 << 20), "256 MiB");
    }
}
