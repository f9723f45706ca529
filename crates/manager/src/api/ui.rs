//! The web UI (`ui/` in the repository, built by this crate's build.rs and embedded in the
//! binary): its page at `/` and its files under `/assets/`. These answer without sign-in, since
//! they hold no data; everything the page shows comes through the API and its checks.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));

/// The page may load only its own files and talk only to this listener (the API and the console
/// WebSocket); xterm.js adds `<style>` elements, hence the inline styles.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'";

/// Whether `path` is one of the UI's public files (`/` is the page).
pub fn is_ui_path(path: &str) -> bool {
    path == "/" || path.starts_with("/assets/")
}

pub(super) async fn file(uri: Uri) -> Response {
    let path = match uri.path() {
        "/" => "/index.html",
        other => other,
    };
    let Some((_, bytes)) = UI_FILES.iter().find(|(p, _)| *p == path) else {
        return super::ApiError::not_found(format!("the UI has no file {path}")).into_response();
    };
    let content_type = match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    };
    // The page is small and names its files by content hash, so only the page is fetched each time.
    let cache = if path == "/index.html" { "no-cache" } else { "public, max-age=31536000, immutable" };
    let mut response = (StatusCode::OK, Body::from(*bytes)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
