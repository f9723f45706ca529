//! Sizes as users type them for qemu-img, virsh and our own flags: a byte count (`4096`), a
//! binary suffix with or without `B`/`iB` (`512K`, `512M`, `512MiB`, `2G`, `2T`), and a decimal
//! fraction before a suffix (`1.5G`). Units are always powers of 1024, as in qemu-img.

/// Parses a size in bytes; the error names the text and gives examples.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("{text:?} is not a size (examples: 4096, 512M, 512MiB, 1.5G, 2T)");
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let unit = unit.to_ascii_uppercase();
    let shift = match unit.strip_suffix("IB").or_else(|| unit.strip_suffix('B')).unwrap_or(&unit) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(format!("{text:?} is not a size: unknown suffix {:?} (use K, M, G, T or P, with or without B/iB)", &t[split..])),
    };
    // "B" alone is bytes; "IB" without a prefix letter is not a unit.
    if unit == "IB" {
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
    fn accepts_what_qemu_img_and_virsh_users_type() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        assert_eq!(parse_size("0.5K"), Ok(512));
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        for bad in ["", "M", "lots", "12Q", "-1G", "1.5", "1.G", "1..5G", "iB", "1iB", "1.0000000001G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
        assert!(parse_size("lots").unwrap_err().contains("\"lots\""), "the error names the text");
        assert!(parse_size("12Q").unwrap_err().contains("unknown suffix \"Q\""), "the error names the suffix");
    }

    #[test]
    fn formats_short() {
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(256 << 20), "256 MiB");
    }
}
