//! Values in LDAP filters and distinguished names.
//!
//! - [`filter_value`]: RFC 4515 section 3 — in an assertion value, `*`, `(`, `)`, `\` and NUL
//!   must be written as `\` and two hex digits. We also escape every other control byte and every
//!   byte outside ASCII (allowed, and safer with servers and proxies that mangle UTF-8), so a name
//!   from the directory can never change a filter's meaning.
//! - [`normalize_dn`]: RFC 4514 — DNs are compared after parsing: attribute types case-folded,
//!   values unescaped (`\,`, `\2C`, ...), insignificant spaces around `,` `+` `=` dropped, values
//!   case-folded (the directory's naming attributes — cn, uid, ou, dc, o — match case-insensitively),
//!   the AVAs of a multi-valued RDN sorted.

/// `value` escaped for an LDAP filter's assertion value (RFC 4515).
pub fn filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'*' | b'(' | b')' | b'\\' | 0..=0x1f | 0x7f..=0xff => {
                out.push_str(&format!("\\{b:02x}"));
            }
            _ => out.push(b as char),
        }
    }
    out
}

/// `(attr=value)`, with `value` escaped.
pub fn equals(attr: &str, value: &str) -> String {
    format!("({attr}={})", filter_value(value))
}

/// `(|(attr=v1)(attr=v2)...)` (just the one when there is one), every value escaped.
pub fn any_of(attr: &str, values: &[String]) -> String {
    match values {
        [one] => equals(attr, one),
        many => {
            let parts: String = many.iter().map(|v| equals(attr, v)).collect();
            format!("(|{parts})")
        }
    }
}

/// Why a DN could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadDn(pub String);

/// One attribute-value pair of an RDN, as compared: the type lower-cased, the value unescaped and
/// lower-cased.
fn parse_rdns(dn: &str) -> Result<Vec<Vec<(String, String)>>, BadDn> {
    let bad = |why: &str| BadDn(format!("{dn:?} is not a distinguished name: {why}"));
    let bytes = dn.as_bytes();
    let mut rdns: Vec<Vec<(String, String)>> = Vec::new();
    let mut avas: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    if dn.trim().is_empty() {
        return Ok(rdns);
    }
    loop {
        // The attribute type, up to '='.
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' {
            if matches!(bytes[i], b',' | b'+' | b';') {
                return Err(bad("an attribute without '='"));
            }
            i += 1;
        }
        if i >= bytes.len() {
            return Err(bad("an attribute without '='"));
        }
        let ty = dn[start..i].trim().to_ascii_lowercase();
        if ty.is_empty() {
            return Err(bad("an empty attribute type"));
        }
        i += 1;
        // Leading spaces of the value are not significant.
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let mut value: Vec<u8> = Vec::new();
        // Trailing unescaped spaces are dropped: remember where the escaped part ends.
        let mut kept = 0;
        if i < bytes.len() && bytes[i] == b'#' {
            // A BER-encoded value in hex: kept as written, folded.
            while i < bytes.len() && !matches!(bytes[i], b',' | b'+' | b';') {
                value.push(bytes[i].to_ascii_lowercase());
                i += 1;
            }
            while value.last() == Some(&b' ') {
                value.pop();
            }
        } else {
            while i < bytes.len() && !matches!(bytes[i], b',' | b'+' | b';') {
                if bytes[i] == b'\\' {
                    i += 1;
                    let Some(&c) = bytes.get(i) else {
                        return Err(bad("a '\\' at the end"));
                    };
                    let hex = |c: u8| (c as char).to_digit(16);
                    match (hex(c), bytes.get(i + 1).and_then(|&d| hex(d))) {
                        (Some(h), Some(l)) => {
                            value.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => {
                            value.push(c);
                            i += 1;
                        }
                    }
                    kept = value.len();
                } else {
                    value.push(bytes[i]);
                    if bytes[i] != b' ' {
                        kept = value.len();
                    }
                    i += 1;
                }
            }
            value.truncate(kept);
        }
        let value = String::from_utf8(value).map_err(|_| bad("a value that is not UTF-8"))?;
        avas.push((ty, value.to_lowercase()));
        match bytes.get(i) {
            None => {
                rdns.push(std::mem::take(&mut avas));
                break;
            }
            Some(b'+') => i += 1,
            Some(_) => {
                rdns.push(std::mem::take(&mut avas));
                i += 1;
            }
        }
    }
    Ok(rdns)
}

/// Writes a value back with RFC 4514's escapes.
fn escape_value(v: &str, out: &mut String) {
    let n = v.chars().count();
    for (k, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' | '\0')
            || (k == 0 && (c == '#' || c == ' '))
            || (k + 1 == n && c == ' ');
        if c == '\0' {
            out.push_str("\\00");
        } else if special {
            out.push('\\');
            out.push(c);
        } else {
            out.push(c);
        }
    }
}

/// `v` written as an attribute value in a DN (RFC 4514 section 2.4).
pub fn dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    escape_value(v, &mut out);
    out
}

/// The form two DNs are compared in (RFC 4514); an error for text that is not a DN.
pub fn normalize_dn(dn: &str) -> Result<String, BadDn> {
    let rdns = parse_rdns(dn)?;
    let mut out = String::with_capacity(dn.len());
    for (n, mut avas) in rdns.into_iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        avas.sort();
        for (k, (ty, v)) in avas.iter().enumerate() {
            if k > 0 {
                out.push('+');
            }
            out.push_str(ty);
            out.push('=');
            escape_value(v, &mut out);
        }
    }
    Ok(out)
}

/// The DN's normal form, or the DN lower-cased when it cannot be parsed (a server's odd value
/// still matches itself).
pub fn dn_key(dn: &str) -> String {
    normalize_dn(dn).unwrap_or_else(|_| dn.trim().to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_escape_what_rfc_4515_names_and_more() {
        assert_eq!(filter_value("a*b(c)d\\e\0"), "a\\2ab\\28c\\29d\\5ce\\00");
        assert_eq!(filter_value("O'Brien"), "O'Brien");
        assert_eq!(filter_value("Zoë"), "Zo\\c3\\ab");
        assert_eq!(filter_value("x\ny"), "x\\0ay");
        assert_eq!(
            any_of("uid", &["a".into(), "b*".into()]),
            "(|(uid=a)(uid=b\\2a))"
        );
        assert_eq!(any_of("uid", &["a)(x=*".into()]), "(uid=a\\29\\28x=\\2a)");
    }

    #[test]
    fn dns_compare_as_rfc_4514_says() {
        let a = normalize_dn("CN=Lee\\, Ann , OU=People,dc=Example,dc=COM").unwrap();
        let b = normalize_dn("cn=lee\\2C ann,ou=people, dc=example,dc=com").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, "cn=lee\\, ann,ou=people,dc=example,dc=com");
        // Multi-valued RDNs in any order.
        assert_eq!(
            normalize_dn("uid=a+cn=B,dc=x").unwrap(),
            normalize_dn("CN=b + UID=a,dc=x").unwrap()
        );
        // An escaped trailing space is kept, an unescaped one is not.
        assert_ne!(
            normalize_dn("cn=a\\ ,dc=x").unwrap(),
            normalize_dn("cn=a,dc=x").unwrap()
        );
        assert_eq!(
            normalize_dn("cn=a ,dc=x").unwrap(),
            normalize_dn("cn=a,dc=x").unwrap()
        );
        // UTF-8 in hex.
        assert_eq!(
            normalize_dn("cn=Zo\\C3\\AB,dc=x").unwrap(),
            normalize_dn("cn=zoë,dc=x").unwrap()
        );
        assert!(normalize_dn("not a dn").is_err());
        assert!(normalize_dn("cn=a,dc").is_err());
        assert!(normalize_dn("cn=a\\").is_err());
        assert_eq!(normalize_dn("").unwrap(), "");
    }

    proptest::proptest! {
        /// Whatever a name holds, its escaped form has no unescaped filter metacharacter and
        /// decodes back to it.
        #[test]
        fn any_value_survives_a_filter(s in "\\PC*") {
            let e = filter_value(&s);
            proptest::prop_assert!(!e.contains(['*', '(', ')', '\0']));
            let mut back = Vec::new();
            let b = e.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' {
                    back.push(u8::from_str_radix(&e[i + 1..i + 3], 16).unwrap());
                    i += 3;
                } else {
                    back.push(b[i]);
                    i += 1;
                }
            }
            proptest::prop_assert_eq!(String::from_utf8(back).unwrap(), s);
        }

        /// A DN made of any values normalises without panicking, and a value escaped into a DN
        /// reads back folded.
        #[test]
        fn any_text_normalises_without_panic(s in "\\PC*") {
            let _ = normalize_dn(&s);
            let mut dn = String::from("cn=");
            escape_value(&s, &mut dn);
            dn.push_str(",dc=x");
            let n = normalize_dn(&dn).unwrap();
            let mut want = String::from("cn=");
            escape_value(&s.to_lowercase(), &mut want);
            want.push_str(",dc=x");
            proptest::prop_assert_eq!(n, want);
        }
    }
}
