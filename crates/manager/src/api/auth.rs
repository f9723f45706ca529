//! Who may do what through the API. Every request passes [`check`] before its handler:
//! - on the unix socket, the caller is an admin (the socket's mode and group decide who may
//!   connect) and its credentials go into the request's log line;
//! - on a TCP listener, the caller shows a token (`Authorization: Bearer TOKEN`) or the session
//!   cookie made by `POST /v1/session`, else 401; a loopback `--insecure` listener started with
//!   `--no-auth` lets everyone in as an admin;
//! - a readonly caller may only read: any other method, or an upgrade (the console), is 403;
//! - cross-site request forgery: an `Origin` that is not this listener's own is refused, and a
//!   change signed in by cookie must carry either `Origin` or the `X-Ferro-CSRF` header (a header
//!   no other site can make a browser send without our consent).
//!
//! The web UI's own files (`/`, `/assets/...`) are read without sign-in: the page then signs in.
//!
//! Also the `/v1/session` endpoints (sign in, who am I, sign out). docs/remote.md tells the story.

use super::{ApiError, ApiResult, json, read_body};
use crate::access::sessions::SESSION_TTL;
use crate::access::{Access, Peer, Role};
use axum::Extension;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::Arc;
use tracing::Instrument;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "ferro_session";
/// The header a browser page sets on changes when it cannot rely on `Origin`.
pub const CSRF_HEADER: &str = "x-ferro-csrf";
const SESSION_PATH: &str = "/v1/session";

/// Who is calling, as [`check`] established it; handlers find it in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub role: Role,
    pub via: Via,
}

#[derive(Debug, Clone, Copy)]
pub enum Via {
    Unix,
    Token,
    Session { expires_ms: u64 },
    /// A `--no-auth` listener.
    Open,
}

/// The middleware: authenticates, authorizes and logs every request.
pub async fn check(Extension(access): Extension<Arc<Access>>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0);
    let span = match peer {
        Some(Peer::Unix(Some(c))) => tracing::info_span!("request", pid = c.pid, uid = c.uid, gid = c.gid),
        Some(Peer::Unix(None)) => tracing::info_span!("request", peer = "unix"),
        Some(Peer::Tcp { addr, .. }) => tracing::info_span!("request", peer = %addr),
        None => tracing::info_span!("request", peer = "unknown"),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let changes = is_change(&req);
    async move {
        let (response, role) = match authorize(&access, peer, &req) {
            Ok(caller) => {
                let role = caller.map(|c| c.role.name());
                if let Some(caller) = caller {
                    req.extensions_mut().insert(caller);
                }
                (next.run(req).await, role)
            }
            Err(refusal) => (refusal.into_response(), None),
        };
        let status = response.status().as_u16();
        // Changes and refusals are worth a line each; reads only when debugging.
        if changes || status == 401 || status == 403 {
            tracing::info!(%method, %path, status, role, "request");
        } else {
            tracing::debug!(%method, %path, status, role, "request");
        }
        response
    }
    .instrument(span)
    .await
}

/// Anything but a plain read: other methods, and upgrades (the console) even on GET.
fn is_change(req: &Request) -> bool {
    !matches!(*req.method(), Method::GET | Method::HEAD) || req.headers().contains_key(header::UPGRADE)
}

/// Who the caller is, or the refusal. `Ok(None)`: the request needs no caller (signing in and
/// out, which authenticate themselves, and the web UI's files, which hold no data).
fn authorize(access: &Access, peer: Option<Peer>, req: &Request) -> Result<Option<Caller>, ApiError> {
    let tls = match peer {
        Some(Peer::Unix(_)) => return Ok(Some(Caller { role: Role::Admin, via: Via::Unix })),
        Some(Peer::Tcp { tls, .. }) => tls,
        None => return Err(unauthorized("the connection is of no known kind")),
    };
    let headers = req.headers();
    check_origin(headers, tls)?;
    if req.uri().path() == SESSION_PATH && matches!(*req.method(), Method::POST | Method::DELETE) {
        return Ok(None);
    }
    if super::ui::is_ui_path(req.uri().path()) && !is_change(req) {
        return Ok(None);
    }
    let caller = if access.open {
        Caller { role: Role::Admin, via: Via::Open }
    } else if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| unauthorized("the Authorization header must be: Bearer TOKEN"))?;
        let role = access.tokens.role_of(token).ok_or_else(|| unauthorized("wrong token"))?;
        Caller { role, via: Via::Token }
    } else if let Some(id) = cookie(headers, SESSION_COOKIE) {
        let (role, expires_ms) = access
            .sessions
            .lookup(id)
            .ok_or_else(|| unauthorized("the session has expired or was signed out; sign in again"))?;
        if is_change(req) && !headers.contains_key(header::ORIGIN) && !headers.contains_key(CSRF_HEADER) {
            return Err(csrf(format!(
                "a change signed in by cookie must carry an Origin header or {CSRF_HEADER}: 1"
            )));
        }
        Caller { role, via: Via::Session { expires_ms } }
    } else {
        return Err(unauthorized(
            "sign in first: send Authorization: Bearer TOKEN, or the session cookie from POST /v1/session",
        ));
    };
    if caller.role == Role::Readonly && is_change(req) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token is readonly: only GET and HEAD requests, and no console",
        ));
    }
    Ok(Some(caller))
}

/// A browser sends `Origin` with every change (and with any cross-site request); it must be this
/// listener's own scheme and host.
fn check_origin(headers: &HeaderMap, tls: bool) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let scheme = if tls { "https" } else { "http" };
    let own = host.map(|h| format!("{scheme}://{h}"));
    let shown = String::from_utf8_lossy(origin.as_bytes());
    match own {
        Some(own) if origin.to_str().is_ok_and(|o| o.eq_ignore_ascii_case(&own)) => Ok(()),
        Some(own) => Err(csrf(format!("cross-origin request refused: Origin {shown} is not {own}"))),
        None => Err(csrf(format!("cross-origin request refused: Origin {shown} without a Host header"))),
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn csrf(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "csrf", message)
}

/// The value of cookie `name` in the request's Cookie headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// The session cookie: HttpOnly, SameSite=Strict, Secure on TLS; an empty one with Max-Age=0
/// clears it.
fn session_cookie(id: &str, max_age: u64, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    let text = format!("{SESSION_COOKIE}={id}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}");
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("ferro_session=; Max-Age=0"))
}

fn session_json(caller: Caller) -> Value {
    let (via, expires_ms) = match caller.via {
        Via::Unix => ("unix", None),
        Via::Token => ("token", None),
        Via::Session { expires_ms } => ("session", Some(expires_ms)),
        Via::Open => ("open", None),
    };
    serde_json::json!({ "role": caller.role.name(), "via": via, "expires_ms": expires_ms })
}

fn tcp_peer(req: &Request) -> ApiResult<bool> {
    match req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0) {
        Some(Peer::Tcp { tls, .. }) => Ok(tls),
        _ => Err(ApiError::invalid("sessions are for browsers on a TCP listener (ferrod --listen)")),
    }
}

/// `POST /v1/session`: signs in with a token given as JSON `{"token": ...}` or as the form field
/// `token`, and sets the session cookie.
pub(super) async fn sign_in(Extension(access): Extension<Arc<Access>>, req: Request) -> ApiResult<Response> {
    let tls = tcp_peer(&req)?;
    if access.open {
        return Err(ApiError::invalid("this listener needs no sign-in (ferrod --no-auth)"));
    }
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let bytes = read_body(req.into_body()).await?;
    let token = if form {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .map_err(|e| ApiError::invalid(format!("body is not a valid form: {e}")))?
            .into_iter()
            .find_map(|(k, v)| (k == "token").then_some(v))
    } else {
        let body: Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("body is not valid JSON: {e}")))?;
        body.get("token").and_then(Value::as_str).map(str::to_string)
    };
    let token = token.ok_or_else(|| ApiError::invalid("token: missing (JSON {\"token\": ...} or a form field token)"))?;
    let role = access.tokens.role_of(token.trim()).ok_or_else(|| unauthorized("wrong token"))?;
    let session = access.sessions.create(role).map_err(|e| ApiError::from(crate::error::Error::internal(e)))?;
    tracing::info!(role = role.name(), "signed in");
    let caller = Caller { role, via: Via::Session { expires_ms: session.expires_ms } };
    let mut response = json(StatusCode::OK, &session_json(caller));
    response.headers_mut().insert(header::SET_COOKIE, session_cookie(&session.id, SESSION_TTL.as_secs(), tls));
    Ok(response)
}

/// `GET /v1/session`: who the caller is.
pub(super) async fn whoami(Extension(caller): Extension<Caller>) -> ApiResult<Response> {
    Ok(json(StatusCode::OK, &session_json(caller)))
}

/// `DELETE /v1/session`: ends the session in the cookie (if any) and clears the cookie.
pub(super) async fn sign_out(Extension(access): Extension<Arc<Access>>, req: Request) -> ApiResult<Response> {
    let tls = tcp_peer(&req)?;
    if let Some(id) = cookie(req.headers(), SESSION_COOKIE)
        && access.sessions.remove(id)
    {
        tracing::info!("signed out");
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, session_cookie("", 0, tls));
    Ok(response)
}
