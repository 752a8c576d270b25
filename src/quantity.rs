//! Sizes as Kubernetes writes quantities: the one grammar for every size
//! Loam reads (inline volume attributes, `loam ctl` options), so `1.5Gi` is
//! accepted or refused the same way everywhere.

use crate::error::quote;

/// A size in bytes: digits with an optional fraction and an optional suffix,
/// decimal (`k`, `M`, `G`, `T`, `P`, `E`) or binary (`Ki` ... `Ei`). A
/// fraction of a byte rounds up, as Kubernetes rounds it. Signs, exponents,
/// milli (`m`), other suffixes and sizes beyond `u64` are refused with a
/// message that says how to write it (quoting at most the start of `text`).
pub fn parse(text: &str) -> std::result::Result<u64, String> {
    let quoted = quote(text);
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "m" => return Err(format!("{quoted} is thousandths of a byte (m is milli); for mebibytes write Mi")),
        _ => {
            return Err(format!(
                "{quoted} is not a size: write bytes or a quantity such as 64Mi or 1Gi \
                 (suffixes k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei)"
            ));
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = whole.len() + fraction.len();
    if whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty()) {
        return Err(format!("{quoted} is not a size: write bytes or a quantity such as 64Mi or 1Gi"));
    }
    // 20 digits times the largest suffix stay well inside u128.
    if digits > 20 {
        return Err(format!("{quoted} has more than 20 digits"));
    }
    let mantissa: u128 = format!("{whole}{fraction}").parse().map_err(|_| format!("{quoted} is not a size"))?;
    let scale = (0..fraction.len()).fold(1u128, |scale, _| scale * 10);
    let bytes = (mantissa * multiplier).div_ceil(scale);
    u64::try_from(bytes).map_err(|_| format!("{quoted} is more bytes than any volume can have"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_as_kubernetes_quantities_and_nothing_else() {
        for (text, bytes) in [
            ("1", 1),
            ("4096", 4096),
            ("64Mi", 64 << 20),
            ("1Gi", 1 << 30),
            ("1G", 1_000_000_000),
            ("500M", 500_000_000),
            ("2k", 2000),
            ("1.5Gi", 3 << 29),
            ("0.5", 1),
            ("007Ki", 7 << 10),
            ("1Pi", 1 << 50),
            ("0", 0),
            ("15Ei", 15 << 60),
        ] {
            assert_eq!(parse(text), Ok(bytes), "{text}");
        }
        let refused: [&[&str]; 4] = [
            // Not numbers.
            &["", "abc", "Gi", "1 Gi", " 1Gi", "1Gi ", "1.", ".5Gi", "1..5", "1.2.3"],
            // Signs and exponents.
            &["-1", "+1", "1e9", "1E3"],
            // Suffixes Kubernetes does not have, and milli.
            &["64K", "64mi", "1GiB", "100m"],
            // More than 64 bits.
            &["16Ei", "18446744073709551616", "123456789012345678901"],
        ];
        for bad in refused.iter().flat_map(|group| group.iter()) {
            assert!(parse(bad).is_err(), "{bad:?} was accepted as {:?}", parse(bad));
        }
        assert!(parse("100m").unwrap_err().contains("Mi"), "milli gets a hint");
    }
}
