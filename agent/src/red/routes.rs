//! A route from a request path, when no framework says what it is: the
//! query is cut, and path segments that look like identifiers (numbers,
//! UUIDs, hex or long mixed tokens) become `{id}`, so `/users/42/orders/7`
//! and `/users/43/orders/8` are one route.

/// Segments kept; the rest of a longer path becomes `/...`.
const MAX_SEGMENTS: usize = 8;
/// Longest segment kept as it is.
const MAX_SEGMENT_LEN: usize = 40;

/// Writes the route of `path` into `out` (cleared first).
pub fn derive_route(path: &str, out: &mut String) {
    out.clear();
    let path = path.split(['?', '#']).next().unwrap_or("");
    for (i, segment) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
        if i == MAX_SEGMENTS {
            out.push_str("/...");
            break;
        }
        out.push('/');
        if looks_like_id(segment) {
            out.push_str("{id}");
        } else {
            out.push_str(segment);
        }
    }
    if out.is_empty() {
        out.push('/');
    } else if path.ends_with('/') && !out.ends_with("...") {
        out.push('/');
    }
}

fn looks_like_id(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
    if digits == bytes.len() {
        return true;
    }
    if segment.len() > MAX_SEGMENT_LEN {
        return true;
    }
    let hexish = bytes.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-');
    if hexish && digits > 0 && bytes.len() >= 8 {
        return true;
    }
    // Tokens: long, mostly alphanumeric, mixing letters and digits.
    let alnum = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='));
    alnum && bytes.len() >= 16 && digits > 0 && digits < bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> String {
        let mut s = String::new();
        derive_route(path, &mut s);
        s
    }

    #[test]
    fn identifiers_become_placeholders() {
        assert_eq!(route("/users/42/orders/7?x=1"), "/users/{id}/orders/{id}");
        assert_eq!(
            route("/items/550e8400-e29b-41d4-a716-446655440000"),
            "/items/{id}"
        );
        assert_eq!(route("/blob/deadbeef12"), "/blob/{id}");
        assert_eq!(route("/s/aB3dE5gH7jK9mN1pQ"), "/s/{id}");
        assert_eq!(route("/api/v2/health"), "/api/v2/health");
        assert_eq!(route("/index.html"), "/index.html");
        assert_eq!(route("/static/"), "/static/");
        assert_eq!(route(""), "/");
        assert_eq!(route("/?q=1"), "/");
        assert_eq!(route("/a/b/c/d/e/f/g/h/i/j"), "/a/b/c/d/e/f/g/h/...");
        assert_eq!(route(&format!("/{}", "x".repeat(50))), "/{id}");
    }

    #[test]
    fn words_stay() {
        assert_eq!(
            route("/cafe/beef"),
            "/cafe/beef",
            "short hex-looking words are not ids"
        );
        assert_eq!(route("/v1/metrics"), "/v1/metrics");
    }
}
