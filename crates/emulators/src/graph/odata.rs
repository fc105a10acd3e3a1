//! The OData query options Graph clients use: `$filter` (`eq`, `ne`, `in`, `startswith`, `and`,
//! `or`, parentheses, `''` escapes), `$select`, `$top`, opaque skip tokens.

use serde_json::Value;

/// A parsed `$filter`.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// `prop eq 'v'`.
    Eq(String, Value),
    /// `prop ne 'v'` (an advanced query).
    Ne(String, Value),
    /// `prop in ('a', 'b')`.
    In(String, Vec<Value>),
    /// `startswith(prop, 'v')`.
    StartsWith(String, String),
    /// Both.
    And(Box<Filter>, Box<Filter>),
    /// Either.
    Or(Box<Filter>, Box<Filter>),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Lit(Value),
    Open,
    Close,
    Comma,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        match c {
            ' ' | '\t' => i += 1,
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '\'' => {
                let mut v = String::new();
                i += 1;
                loop {
                    match cs.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\'') if cs.get(i + 1) == Some(&'\'') => {
                            v.push('\'');
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(c) => {
                            v.push(*c);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(v));
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' || c == '/' => {
                let start = i;
                while i < cs.len()
                    && (cs[i].is_alphanumeric() || matches!(cs[i], '_' | '-' | '.' | '/'))
                {
                    i += 1;
                }
                let w: String = cs[start..i].iter().collect();
                out.push(match w.as_str() {
                    "true" => Tok::Lit(Value::Bool(true)),
                    "false" => Tok::Lit(Value::Bool(false)),
                    "null" => Tok::Lit(Value::Null),
                    _ => match w.parse::<i64>() {
                        Ok(n) => Tok::Lit(Value::from(n)),
                        Err(_) => Tok::Ident(w),
                    },
                });
            }
            other => {
                return Err(format!(
                    "syntax error: character '{other}' is not valid at position {i}"
                ));
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(k))
    }

    fn expect(&mut self, t: Tok) -> Result<(), String> {
        match self.next() {
            Some(x) if x == t => Ok(()),
            other => Err(format!("syntax error: expected {t:?}, found {other:?}")),
        }
    }

    fn literal(&mut self) -> Result<Value, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Value::String(s)),
            Some(Tok::Lit(v)) => Ok(v),
            other => Err(format!("syntax error: expected a literal, found {other:?}")),
        }
    }

    fn expr(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.at += 1;
            let right = self.and()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.primary()?;
        while self.keyword("and") {
            self.at += 1;
            let right = self.primary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn primary(&mut self) -> Result<Filter, String> {
        match self.next() {
            Some(Tok::Open) => {
                let e = self.expr()?;
                self.expect(Tok::Close)?;
                Ok(e)
            }
            Some(Tok::Ident(f)) if f.eq_ignore_ascii_case("startswith") => {
                self.expect(Tok::Open)?;
                let Some(Tok::Ident(prop)) = self.next() else {
                    return Err("syntax error: startswith needs a property".into());
                };
                self.expect(Tok::Comma)?;
                let Some(Tok::Str(v)) = self.next() else {
                    return Err("syntax error: startswith needs a string".into());
                };
                self.expect(Tok::Close)?;
                Ok(Filter::StartsWith(prop, v))
            }
            Some(Tok::Ident(prop)) => match self.next() {
                Some(Tok::Ident(op)) if op.eq_ignore_ascii_case("eq") => {
                    Ok(Filter::Eq(prop, self.literal()?))
                }
                Some(Tok::Ident(op)) if op.eq_ignore_ascii_case("ne") => {
                    Ok(Filter::Ne(prop, self.literal()?))
                }
                Some(Tok::Ident(op)) if op.eq_ignore_ascii_case("in") => {
                    self.expect(Tok::Open)?;
                    let mut vs = vec![self.literal()?];
                    while self.peek() == Some(&Tok::Comma) {
                        self.at += 1;
                        vs.push(self.literal()?);
                    }
                    self.expect(Tok::Close)?;
                    Ok(Filter::In(prop, vs))
                }
                other => Err(format!(
                    "syntax error: unsupported operator {other:?} after '{prop}'"
                )),
            },
            other => Err(format!("syntax error at {other:?}")),
        }
    }
}

/// Deepest nesting of parentheses a filter may have.
const MAX_DEPTH: usize = 32;
/// Most tokens a filter may have.
const MAX_TOKENS: usize = 400;

/// Parses a `$filter` expression.
pub fn parse_filter(s: &str) -> Result<Filter, String> {
    let toks = tokenize(s)?;
    // The parser recurses once per parenthesis: bound it, so a hostile filter is a 400 and not a
    // stack overflow.
    let mut depth = 0usize;
    for t in &toks {
        match t {
            Tok::Open => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("the filter nests deeper than {MAX_DEPTH} levels"));
                }
            }
            Tok::Close => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if toks.len() > MAX_TOKENS {
        return Err("the filter is too complex".into());
    }
    let mut p = Parser { toks, at: 0 };
    let f = p.expr()?;
    if p.at < p.toks.len() {
        return Err(format!("syntax error: unexpected {:?}", p.toks[p.at]));
    }
    Ok(f)
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // Directory string comparisons are case-insensitive.
        (Value::String(x), Value::String(y)) => x.to_lowercase() == y.to_lowercase(),
        _ => a == b,
    }
}

impl Filter {
    /// The properties the filter reads.
    pub fn properties(&self) -> Vec<&str> {
        match self {
            Filter::Eq(p, _) | Filter::Ne(p, _) | Filter::In(p, _) | Filter::StartsWith(p, _) => {
                vec![p.as_str()]
            }
            Filter::And(a, b) | Filter::Or(a, b) => {
                let mut v = a.properties();
                v.extend(b.properties());
                v
            }
        }
    }

    /// Whether the filter uses an operator that needs an advanced query (`ne`).
    pub fn advanced(&self) -> bool {
        match self {
            Filter::Ne(..) => true,
            Filter::Eq(..) | Filter::In(..) | Filter::StartsWith(..) => false,
            Filter::And(a, b) | Filter::Or(a, b) => a.advanced() || b.advanced(),
        }
    }

    /// Evaluates the filter on an object's full JSON.
    pub fn matches(&self, obj: &Value) -> bool {
        let get = |p: &str| obj.get(p).cloned().unwrap_or(Value::Null);
        match self {
            Filter::Eq(p, v) => same(&get(p), v),
            Filter::Ne(p, v) => !same(&get(p), v),
            Filter::In(p, vs) => {
                let x = get(p);
                vs.iter().any(|v| same(&x, v))
            }
            Filter::StartsWith(p, v) => get(p)
                .as_str()
                .is_some_and(|s| s.to_lowercase().starts_with(&v.to_lowercase())),
            Filter::And(a, b) => a.matches(obj) && b.matches(obj),
            Filter::Or(a, b) => a.matches(obj) || b.matches(obj),
        }
    }
}

/// Encodes an opaque token (hex, so it survives any URL handling).
pub fn encode_token(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Decodes [`encode_token`]; `None` for anything else.
pub fn decode_token(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_parse_and_match() {
        let o = json!({"displayName": "O'Brien Équipe", "id": "a", "accountEnabled": true});
        for (f, want) in [
            ("displayName eq 'o''brien équipe'", true),
            ("displayName eq 'O''Brien'", false),
            ("startswith(displayName,'o''bri')", true),
            ("id in ('x', 'a')", true),
            ("id eq 'x' or id eq 'a'", true),
            ("(id eq 'a') and accountEnabled eq true", true),
            ("id ne 'a'", false),
        ] {
            assert_eq!(parse_filter(f).unwrap().matches(&o), want, "{f}");
        }
        let deep = format!("{}id eq 'a'{}", "(".repeat(10_000), ")".repeat(10_000));
        for bad in [
            deep.as_str(),
            "displayName eq 'unterminated",
            "displayName gt 'x'",
            "id eq",
            "startswith(id)",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_round_trip() {
        let t = encode_token("users|é|42");
        assert_eq!(decode_token(&t).as_deref(), Some("users|é|42"));
        assert_eq!(decode_token("zz"), None);
    }
}
