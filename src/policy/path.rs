//! One canonical form of the request path, used both to match rules and to forward upstream,
//! so the upstream acts on exactly the bytes the gate judged. Anything whose meaning could
//! differ between two readers (encoded separators, dot segments, empty segments, `;`
//! parameters, backslashes) is refused rather than guessed at.

use std::borrow::Cow;
use std::fmt;

/// Why a path was refused. The client's fault: 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOriginForm,
    BadPercentEncoding,
    EncodedSeparator,
    DotSegment,
    EmptySegment,
    PathParameter,
    Backslash,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotOriginForm => "the request target must be a path starting with /",
            PathError::BadPercentEncoding => "the path has a malformed percent-encoding",
            PathError::EncodedSeparator => "the path encodes a separator or NUL (%2F, %5C, %00)",
            PathError::DotSegment => "the path has a . or .. segment",
            PathError::EmptySegment => "the path has an empty segment (//)",
            PathError::PathParameter => "the path has a ; parameter",
            PathError::Backslash => "the path has a backslash",
        })
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Returns the canonical form of `raw` (the path part of an origin-form request target):
/// percent-encoded unreserved characters decoded, other escapes upper-cased. Borrowed when
/// `raw` is already canonical, which is the common case, so the pass-through path does not
/// allocate.
pub fn canonical_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let needs_rewrite = bytes.contains(&b'%');
    let canonical: Cow<'_, str> = if needs_rewrite {
        // Built as bytes: raw UTF-8 passes through unchanged, escapes stay ASCII.
        let mut out: Vec<u8> = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'%' {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadPercentEncoding);
                };
                let decoded = hi * 16 + lo;
                if matches!(decoded, b'/' | b'\\' | 0) {
                    return Err(PathError::EncodedSeparator);
                }
                // An encoded `;` becomes a path parameter in servers that decode first
                // (Tomcat's `%3B` reading): refused like a raw one.
                if decoded == b';' {
                    return Err(PathError::PathParameter);
                }
                if is_unreserved(decoded) {
                    out.push(decoded);
                } else {
                    out.push(b'%');
                    out.push(b"0123456789ABCDEF"[usize::from(hi)]);
                    out.push(b"0123456789ABCDEF"[usize::from(lo)]);
                }
                i += 3;
            } else {
                out.push(b);
                i += 1;
            }
        }
        // The input was UTF-8 and every change is ASCII-for-ASCII, so this cannot fail.
        Cow::Owned(String::from_utf8(out).map_err(|_| PathError::BadPercentEncoding)?)
    } else {
        Cow::Borrowed(raw)
    };
    check_segments(&canonical)?;
    Ok(canonical)
}

fn check_segments(path: &str) -> Result<(), PathError> {
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    if path.contains(';') {
        return Err(PathError::PathParameter);
    }
    let body = &path[1..];
    if body.is_empty() {
        return Ok(());
    }
    // A single trailing slash is allowed ("/a/b/"); rule matching treats it like "/a/b".
    let body = body.strip_suffix('/').unwrap_or(body);
    for segment in body.split('/') {
        match segment {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

/// A rule's path: literal segments and `{name}` placeholders that match one segment.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    segments: Vec<TemplateSegment>,
}

#[derive(Debug, Clone)]
enum TemplateSegment {
    Literal(String),
    Param(String),
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let canonical = canonical_path(template)
            .map_err(|e| format!("path `{template}` is not canonical: {e}"))?;
        if canonical != template {
            return Err(format!(
                "path `{template}` must be written in canonical form: `{canonical}`"
            ));
        }
        let trimmed = template.strip_suffix('/').unwrap_or(template);
        let mut segments = Vec::new();
        let mut names = Vec::new();
        for segment in trimmed.split('/').skip(1) {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!(
                        "`{segment}`: placeholder names are letters, digits and _"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("placeholder `{name}` appears twice"));
                }
                names.push(name);
                segments.push(TemplateSegment::Param(name.to_string()));
            } else if segment.contains('{') || segment.contains('}') {
                return Err(format!(
                    "`{segment}`: a placeholder must be a whole segment"
                ));
            } else {
                segments.push(TemplateSegment::Literal(segment.to_string()));
            }
        }
        Ok(Self { segments })
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            TemplateSegment::Param(name) => Some(name.as_str()),
            TemplateSegment::Literal(_) => None,
        })
    }

    /// Whether every path `other` matches (with `other_case_insensitive`) is also matched by
    /// this template (with `case_insensitive`): placeholders cover anything but an empty
    /// segment, literals only the same literal (any case, if this one ignores case).
    pub fn covers(
        &self,
        case_insensitive: bool,
        other: &PathTemplate,
        other_case_insensitive: bool,
    ) -> bool {
        self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(mine, theirs)| match (mine, theirs) {
                    (TemplateSegment::Param(_), _) => true,
                    (TemplateSegment::Literal(_), TemplateSegment::Param(_)) => false,
                    (TemplateSegment::Literal(a), TemplateSegment::Literal(b)) => {
                        if case_insensitive {
                            a.eq_ignore_ascii_case(b)
                        } else {
                            // A case-insensitive later rule also matches other spellings.
                            a == b && !other_case_insensitive
                        }
                    }
                })
    }

    /// Matches a canonical path; returns the placeholder values (still percent-encoded).
    /// Does not allocate unless it matches.
    pub fn matches<'p>(
        &self,
        path: &'p str,
        case_insensitive: bool,
    ) -> Option<Vec<(&str, &'p str)>> {
        let trimmed = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        let mut parts = trimmed.split('/').skip(1);
        for segment in &self.segments {
            let part = parts.next()?;
            if let TemplateSegment::Literal(literal) = segment {
                let same = if case_insensitive {
                    literal.eq_ignore_ascii_case(part)
                } else {
                    literal == part
                };
                if !same {
                    return None;
                }
            } else if part.is_empty() {
                return None;
            }
        }
        if parts.next().is_some() {
            return None;
        }
        let mut params = Vec::new();
        let mut parts = trimmed.split('/').skip(1);
        for segment in &self.segments {
            let part = parts.next()?;
            if let TemplateSegment::Param(name) = segment {
                params.push((name.as_str(), part));
            }
        }
        Some(params)
    }
}

/// Percent-decodes a path segment for display (never for matching); invalid UTF-8 becomes U+FFFD.
pub fn decode_for_display(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                out.push(hi * 16 + lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_semicolons_and_raw_utf8_after_escapes() {
        assert_eq!(
            canonical_path("/a%3Bx/b").unwrap_err(),
            PathError::PathParameter
        );
        assert_eq!(
            canonical_path("/a%3bx/b").unwrap_err(),
            PathError::PathParameter
        );
        assert_eq!(
            canonical_path("/api/v1/%61ccount/é").unwrap(),
            "/api/v1/account/é"
        );
    }

    #[test]
    fn canonical_paths_borrow() {
        assert!(matches!(canonical_path("/api/v1/x"), Ok(Cow::Borrowed(_))));
        assert_eq!(canonical_path("/").unwrap(), "/");
        assert_eq!(canonical_path("/a/b/").unwrap(), "/a/b/");
    }

    #[test]
    fn unreserved_escapes_decode_and_others_uppercase() {
        assert_eq!(canonical_path("/api/%61pi-keys").unwrap(), "/api/api-keys");
        assert_eq!(canonical_path("/a%2a").unwrap(), "/a%2A");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (path, error) in [
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%5Cb", PathError::EncodedSeparator),
            ("/a%00", PathError::EncodedSeparator),
            ("/a/../b", PathError::DotSegment),
            ("/a/%2E%2E/b", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a//b", PathError::EmptySegment),
            ("//a", PathError::EmptySegment),
            ("/a/..;/b", PathError::PathParameter),
            ("/a\\b", PathError::Backslash),
            ("/a%zz", PathError::BadPercentEncoding),
            ("/a%4", PathError::BadPercentEncoding),
            ("a", PathError::NotOriginForm),
        ] {
            assert_eq!(canonical_path(path).unwrap_err(), error, "{path}");
        }
    }

    #[test]
    fn template_matches_one_segment_per_placeholder() {
        let t = PathTemplate::parse("/api/v1/api-keys/{key_id}").unwrap();
        assert_eq!(
            t.matches("/api/v1/api-keys/k1", false).unwrap(),
            vec![("key_id", "k1")]
        );
        assert_eq!(
            t.matches("/api/v1/api-keys/k1/", false).unwrap(),
            vec![("key_id", "k1")]
        );
        assert!(t.matches("/api/v1/api-keys", false).is_none());
        assert!(t.matches("/api/v1/api-keys/k1/x", false).is_none());
        assert!(t.matches("/API/v1/api-keys/k1", false).is_none());
        assert_eq!(
            t.matches("/API/v1/API-KEYS/K1", true).unwrap(),
            vec![("key_id", "K1")]
        );
    }

    #[test]
    fn templates_must_be_canonical() {
        assert!(PathTemplate::parse("/a/../b").is_err());
        assert!(PathTemplate::parse("/a/%61").is_err());
        assert!(PathTemplate::parse("/a/x{id}").is_err());
    }
}
