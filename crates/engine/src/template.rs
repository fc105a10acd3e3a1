//! Mapping templates: `"{userName}"`, `"waad|{id}"`, `"{mail|lower}"`, `"{userName|localpart}"`,
//! `"{displayName|slug}"`. A small, closed language on purpose: variables, four filters, and
//! `{{` / `}}` for literal braces. Parsed and checked once, when the config is validated, so a
//! typo is a config error and not a failed run.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var { name: String, filter: Filter },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    None,
    Lower,
    Upper,
    /// The part before the last `@` (a UPN's or mail's local part), in lower case: names for
    /// targets that hold no `@` in a name (Kanidm).
    LocalPart,
    /// Lower case ASCII letters, digits, `.`, `_` and `-`: accents folded (`é` → `e`), every
    /// other run of characters one `-`, none at either end. `Data (Eng) Équipe` →
    /// `data-eng-equipe`: names for targets with a narrow name syntax (Kanidm).
    Slug,
}

/// `Filter::Slug`.
fn slug(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut dash = false;
    for c in v.chars() {
        let folded: &str = match c {
            'a'..='z' | '0'..='9' | '.' | '_' => {
                out.push(c);
                dash = false;
                continue;
            }
            'A'..='Z' => {
                out.push(c.to_ascii_lowercase());
                dash = false;
                continue;
            }
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'À' | 'Á' | 'Â' | 'Ã' | 'Ä' | 'Å' => {
                "a"
            }
            'ç' | 'Ç' => "c",
            'è' | 'é' | 'ê' | 'ë' | 'È' | 'É' | 'Ê' | 'Ë' => "e",
            'ì' | 'í' | 'î' | 'ï' | 'Ì' | 'Í' | 'Î' | 'Ï' => "i",
            'ñ' | 'Ñ' => "n",
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'Ò' | 'Ó' | 'Ô' | 'Õ' | 'Ö' | 'Ø' => {
                "o"
            }
            'ù' | 'ú' | 'û' | 'ü' | 'Ù' | 'Ú' | 'Û' | 'Ü' => "u",
            'ý' | 'ÿ' | 'Ý' => "y",
            'ß' => "ss",
            'æ' | 'Æ' => "ae",
            'œ' | 'Œ' => "oe",
            _ => {
                if !dash && !out.is_empty() {
                    out.push('-');
                }
                dash = true;
                continue;
            }
        };
        out.push_str(folded);
        dash = false;
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// A template that does not parse, or names a variable that does not exist.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("template {template:?}: {message}")]
pub struct TemplateError {
    /// The template text.
    pub template: String,
    /// What is wrong.
    pub message: String,
}

/// A value a template needed was missing for one principal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{{{variable}}} is empty")]
pub struct RenderError {
    /// The variable without a value.
    pub variable: String,
}

impl Template {
    /// Parses a template; `allowed` decides which variable names exist (it gets the name as typed).
    pub fn parse(text: &str, allowed: impl Fn(&str) -> bool) -> Result<Template, TemplateError> {
        let err = |message: String| TemplateError {
            template: text.to_owned(),
            message,
        };
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err(err("a lone '}' (write '}}' for a literal brace)".into())),
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(err(
                                    "a '{' without its '}' (write '{{' for a literal brace)".into(),
                                ));
                            }
                            Some(c) => inner.push(c),
                        }
                    }
                    let (name, filter) = match inner.split_once('|') {
                        None => (inner.trim().to_owned(), Filter::None),
                        Some((n, f)) => {
                            let filter = match f.trim() {
                                "lower" => Filter::Lower,
                                "upper" => Filter::Upper,
                                "localpart" => Filter::LocalPart,
                                "slug" => Filter::Slug,
                                other => {
                                    return Err(err(format!(
                                        "unknown filter {other:?} (there are: lower, upper, localpart, slug)"
                                    )));
                                }
                            };
                            (n.trim().to_owned(), filter)
                        }
                    };
                    if name.is_empty() {
                        return Err(err("an empty '{}'".into()));
                    }
                    if !allowed(&name) {
                        return Err(err(format!("unknown variable {{{name}}}")));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Var { name, filter });
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template {
            source: text.to_owned(),
            parts,
        })
    }

    /// Renders the template; `lookup` gives a variable's value, `None` or empty when it has none.
    pub fn render<'a>(
        &self,
        lookup: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Var { name, filter } => {
                    let v = lookup(name)
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| RenderError {
                            variable: name.clone(),
                        })?;
                    match filter {
                        Filter::None => out.push_str(v),
                        Filter::Lower => out.push_str(&v.to_lowercase()),
                        Filter::Upper => out.push_str(&v.to_uppercase()),
                        Filter::LocalPart => {
                            let local = v.rsplit_once('@').map_or(v, |(l, _)| l);
                            if local.is_empty() {
                                return Err(RenderError {
                                    variable: name.clone(),
                                });
                            }
                            out.push_str(&local.to_lowercase());
                        }
                        Filter::Slug => {
                            let s = slug(v);
                            if s.is_empty() {
                                return Err(RenderError {
                                    variable: name.clone(),
                                });
                            }
                            out.push_str(&s);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s, |_| true).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<&'static str> {
        match name {
            "id" => Some("0f1e"),
            "userName" => Some("Jane.Doe@corp.example"),
            "mail" => Some(""),
            _ => None,
        }
    }

    #[test]
    fn renders_variables_filters_and_escapes() {
        let ok = |t: &str| Template::parse(t, |_| true).unwrap().render(vars).unwrap();
        assert_eq!(ok("waad|{id}"), "waad|0f1e");
        assert_eq!(ok("{userName|lower}"), "jane.doe@corp.example");
        assert_eq!(ok("{userName|localpart}"), "jane.doe");
        assert_eq!(ok("{id|localpart}"), "0f1e");
        assert_eq!(ok("{userName|slug}"), "jane.doe-corp.example");
        assert_eq!(slug("Data (Eng) Équipe"), "data-eng-equipe");
        assert_eq!(slug("  __x__ "), "__x__");
        assert_eq!(slug("Straße & Œuvre!"), "strasse-oeuvre");
        assert_eq!(slug("日本"), "");
        assert_eq!(ok("{{literal}} {id}"), "{literal} 0f1e");
        assert_eq!(ok("plain"), "plain");
    }

    #[test]
    fn empty_value_is_an_error_not_an_empty_key() {
        let t = Template::parse("{mail}", |_| true).unwrap();
        assert_eq!(
            t.render(vars),
            Err(RenderError {
                variable: "mail".into()
            })
        );
        let t = Template::parse("x-{nope}", |_| true).unwrap();
        assert!(t.render(vars).is_err());
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let only_id = |n: &str| n == "id";
        for (t, needle) in [
            ("{id", "without its '}'"),
            ("id}", "lone '}'"),
            ("{}", "empty"),
            ("{mail}", "unknown variable {mail}"),
            ("{id|title}", "unknown filter"),
        ] {
            let e = Template::parse(t, only_id).unwrap_err();
            assert!(e.to_string().contains(needle), "{t}: {e}");
        }
    }
}
