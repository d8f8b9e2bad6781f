//! The operator's console at `GET /ui/` on the admin port: one HTML page, its stylesheet, its
//! script and its icon, embedded in the binary (nothing is fetched from elsewhere, nothing is
//! built). The page asks for the admin token in a form, keeps it in the tab's `sessionStorage`
//! only (never a cookie, never the URL), and reads everything it shows from the admin API with
//! the token as a bearer header — the assets themselves hold no data, so they are served
//! without it.
//!
//! Every answer carries a `Content-Security-Policy` that allows only these assets and requests
//! to this origin (no inline script or style, no form submission, no framing), `no-store`,
//! `nosniff` and `no-referrer`.
//!
//! Edge cases: `/ui` redirects to `/ui/` (the page's asset links are relative); with the admin
//! API off (no `server.admin_token_env`) the console is off too, with the API's 404.

use http::{header, HeaderValue, Response, StatusCode};

use crate::http::body::{full, GatewayBody};
use crate::http::error::GatewayError;

const INDEX: &str = include_str!("assets/index.html");
const STYLE: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/icon.svg");

/// Only the page's own assets, and requests back to the admin API.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The answer to `GET path`, for a path under `/ui`.
pub fn asset(path: &str) -> Response<GatewayBody> {
    let (body, content_type) = match path {
        "/ui" => return redirect_to_index(),
        "/ui/" | "/ui/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/ui/console.css" => (STYLE, "text/css; charset=utf-8"),
        "/ui/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/ui/icon.svg" => (ICON, "image/svg+xml"),
        _ => {
            return GatewayError::NotFound {
                path: path.to_owned(),
            }
            .into_response()
        }
    };
    let mut response = Response::new(full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn redirect_to_index() -> Response<GatewayBody> {
    let mut response = Response::new(crate::http::body::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
    response
}

/// The headers every console and admin API answer carries.
pub fn protect(response: &mut Response<GatewayBody>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assets_are_small_and_self_contained() {
        let total = INDEX.len() + STYLE.len() + SCRIPT.len() + ICON.len();
        assert!(total < 200 * 1024, "under 200 KB in all: {total} bytes");
        for (name, text) in [("index.html", INDEX), ("console.css", STYLE)] {
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{name} names no other origin"
            );
        }
        // The one absolute URL in the script is SVG's namespace name, which is never fetched.
        let script = SCRIPT.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(
            !script.contains("http://") && !script.contains("https://"),
            "console.js fetches from this origin only"
        );
        assert!(
            !INDEX.contains("<script>") && !INDEX.contains("style="),
            "no inline script or style: the CSP would refuse them"
        );
    }
}
