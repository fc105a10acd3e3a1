//! Calendar dates from Unix times, for messages and the emulators' HTTP dates, and Unix times from
//! the RFC 3339 timestamps credential services send.

/// (year, month, day, hour, minute, second, weekday 0 = Sunday) of a unix time (UTC).
pub fn civil(t: u64) -> (i64, u32, u32, u32, u32, u32, usize) {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 4).rem_euclid(7) as usize;
    (
        y,
        m,
        d,
        (secs / 3600) as u32,
        (secs % 3600 / 60) as u32,
        (secs % 60) as u32,
        weekday,
    )
}

/// The unix time of a civil date and time (UTC); `None` before 1970.
pub fn unix_of(y: i64, m: u32, d: u32, hh: u32, mm: u32, ss: u32) -> Option<u64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Howard Hinnant's days-from-civil.
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + i64::from(hh) * 3600 + i64::from(mm) * 60 + i64::from(ss);
    u64::try_from(t).ok()
}

/// The unix time of an RFC 3339 timestamp in UTC or with an offset (`2026-12-05T23:59:59Z`,
/// `2026-12-05T23:59:59.123+01:00`); `None` when it is not one.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())
            .flatten()
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && matches!(&o[..1], "+" | "-") && &o[3..4] == ":" => {
            let oh: i64 = o[1..3].parse().ok()?;
            let om: i64 = o[4..6].parse().ok()?;
            let v = oh * 3600 + om * 60;
            if &o[..1] == "+" { v } else { -v }
        }
        _ => return None,
    };
    let t = unix_of(i64::from(y), m, d, hh, mm, ss)?;
    u64::try_from(i64::try_from(t).ok()? - offset).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_bad_ones_are_refused() {
        for t in [0, 951_782_400, 1_764_979_199, 4_102_444_800] {
            let (y, m, d, hh, mm, ss, _) = civil(t);
            assert_eq!(unix_of(y, m, d, hh, mm, ss), Some(t));
        }
        assert_eq!(parse_rfc3339("2026-12-05T23:59:59Z"), Some(1_796_515_199));
        assert_eq!(
            parse_rfc3339("2026-12-05T23:59:59.123456Z"),
            Some(1_796_515_199)
        );
        assert_eq!(
            parse_rfc3339("2026-12-06T00:59:59+01:00"),
            Some(1_796_515_199)
        );
        assert_eq!(
            parse_rfc3339("2026-12-05T22:59:59-01:00"),
            Some(1_796_515_199)
        );
        for bad in [
            "",
            "2026-12-05",
            "2026-13-05T00:00:00Z",
            "2026-12-05T24:00:00Z",
            "2026-12-05T23:59:59",
            "2026-12-05T23:59:59.Z",
            "२०२६-12-05T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
