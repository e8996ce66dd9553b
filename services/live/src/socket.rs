//! The WebSocket endpoints `GET /ws/notifications` and `GET /ws/leaderboard`.
//!
//! Before upgrading, in this order (every refusal is `application/problem+json`, and no
//! upgrade happens):
//! 1. **token**: `Authorization: Bearer <JWT>` *or* the query parameter `access_token=<JWT>`
//!    (browsers cannot set headers on a WebSocket handshake), never both; verified like every
//!    command's token → 401 `unauthenticated` with `WWW-Authenticate: Bearer`;
//! 2. **live updates enabled** on this instance → else 503 `live_unavailable`;
//! 3. **query** (`board` on `/ws/leaderboard`, a board name as in the leaderboard queries) →
//!    400 `invalid_query`;
//! 4. **a WebSocket handshake** (`GET`, `Upgrade: websocket`, …) → else axum's status (400,
//!    405 or 426) as problem `websocket_required`;
//! 5. **fan-out subscription** of this instance confirmed → else 503 `live_unavailable`.
//!
//! The socket is registered in the [`Hub`](super::Hub) before the `101 Switching Protocols`
//! answer is sent: a client that got its 101 receives every message published afterwards.
//!
//! While open: server pings every [`LiveConfig::ping_interval`](super::LiveConfig), with the
//! token re-verified at each (close **1008** `token no longer valid` once it expired); close
//! **1001** `idle timeout` when nothing arrived from the client for
//! [`LiveConfig::idle_timeout`](super::LiveConfig); close **1008** `slow consumer` when its
//! queue overflowed (the close frame is attempted for 1 s, then the connection is dropped —
//! a client that does not read may never see it). Client frames larger than
//! [`LiveConfig::max_client_frame`](super::LiveConfig) end the connection.
//!
//! Client frames (text, JSON) on `/ws/leaderboard`: `{"subscribe": "<board>"}` and
//! `{"unsubscribe": "<board>"}`, answered with `{"type": "subscribed" | "unsubscribed",
//! "board", "boards": [every board followed, sorted]}`; anything else is answered with
//! `{"type": "error", "detail"}` and the socket stays open. `/ws/notifications` takes no
//! client messages (each is answered with an `error`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{
    rejection::WebSocketUpgradeRejection, CloseFrame, Message, WebSocket, WebSocketUpgrade,
};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};

use super::hub::{Endpoint, Registration};
use super::Live;
use tektree_http::auth::AuthError;
use tektree_http::board::parse_board;
use tektree_http::identity::Principal;
use tektree_http::problem::Problem;
use tektree_http::security::Security;

/// Close code for a slow consumer and for an expired token (RFC 6455 "policy violation").
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for the idle timeout (RFC 6455 "going away").
pub const CLOSE_IDLE: u16 = 1001;
/// What an unreadable client frame is told.
const FRAME_SHAPES: &str = r#"expected {"subscribe": "<board>"} or {"unsubscribe": "<board>"}"#;
/// How long a closing socket may take to write its close frame before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Query parameters of both endpoints (others are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct WsParams {
    /// The JWT, for clients that cannot send `Authorization` (browsers).
    pub access_token: Option<String>,
    /// `/ws/leaderboard` only: a first board to follow.
    pub board: Option<String>,
}

/// A text frame a client sends on `/ws/leaderboard`: exactly one of the two fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame {
    subscribe: Option<String>,
    unsubscribe: Option<String>,
}

/// `GET /ws/notifications`: the token subject's `xp.earned`, `level.up`,
/// `achievement.unlocked`, `quest.completed`, `streak.milestone`, `quota.warning` and
/// `quota.exceeded` messages (module docs for the handshake and the socket's life).
pub async fn notifications(
    State(security): State<Arc<Security>>,
    State(live): State<Option<Arc<Live>>>,
    headers: HeaderMap,
    query: Result<Query<WsParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    open(
        security,
        live,
        Endpoint::Notifications,
        headers,
        query,
        upgrade,
    )
    .await
}

/// `GET /ws/leaderboard?board=NAME`: `rank.changed` of the followed boards (module docs; the
/// `board` parameter is optional, boards can also be followed with `subscribe` frames).
pub async fn leaderboard(
    State(security): State<Arc<Security>>,
    State(live): State<Option<Arc<Live>>>,
    headers: HeaderMap,
    query: Result<Query<WsParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    open(
        security,
        live,
        Endpoint::Leaderboard,
        headers,
        query,
        upgrade,
    )
    .await
}

/// 503 `live_unavailable` with `Retry-After: 5`.
fn unavailable(detail: &str) -> Response {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "live_unavailable",
        "Service unavailable",
        detail,
    )
    .with_retry_after(5)
    .into_response()
}

/// The token of the request: from `Authorization` (checked like every command's) or from
/// `access_token`; never both.
fn token(
    security: &Security,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(String, Principal), AuthError> {
    let has_header = headers.contains_key(header::AUTHORIZATION);
    match (has_header, query_token) {
        (true, Some(_)) => Err(AuthError::Invalid(
            "send the token once: either `Authorization: Bearer` or `access_token`".into(),
        )),
        (true, None) => {
            let principal = security.auth.authenticate(headers)?;
            // `authenticate` accepted exactly one `Bearer <token>` header.
            let value = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .trim();
            let token = value
                .split_once(' ')
                .map(|(_, t)| t.trim().to_string())
                .unwrap_or_default();
            Ok((token, principal))
        }
        (false, Some(t)) => {
            let t = t.trim();
            if t.is_empty() {
                return Err(AuthError::Invalid("`access_token` is empty".into()));
            }
            let principal = security.auth.verify(t)?;
            Ok((t.to_string(), principal))
        }
        (false, None) => Err(AuthError::Missing),
    }
}

/// The handshake checks of the module docs, then the upgrade.
async fn open(
    security: Arc<Security>,
    live: Option<Arc<Live>>,
    endpoint: Endpoint,
    headers: HeaderMap,
    query: Result<Query<WsParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let params = query.as_ref().ok().map(|Query(p)| p);
    let (token, principal) = match token(
        &security,
        &headers,
        params.and_then(|p| p.access_token.as_deref()),
    ) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let Some(live) = live else {
        return unavailable("live updates are not enabled on this instance");
    };
    let params = match query {
        Ok(Query(p)) => p,
        Err(e) => return Problem::invalid_query(e.body_text()).into_response(),
    };
    let board =
        match (endpoint, params.board) {
            (_, None) => None,
            (Endpoint::Leaderboard, Some(b)) => match parse_board(&b) {
                Ok(b) => Some(b),
                Err(e) => return Problem::invalid_query(e).into_response(),
            },
            (Endpoint::Notifications, Some(_)) => return Problem::invalid_query(
                "`board` belongs to /ws/leaderboard; /ws/notifications follows the token's user",
            )
            .into_response(),
        };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            let status = e.status();
            return Problem::new(
                status,
                "websocket_required",
                "WebSocket handshake required",
                format!(
                    "this endpoint only accepts a WebSocket upgrade: {}",
                    e.body_text()
                ),
            )
            .into_response();
        }
    };
    if let Err(e) = live.ensure_subscribed().await {
        tracing::warn!(error = %e, "refusing a live socket: no fan-out subscription");
        return unavailable("live updates are temporarily unavailable; retry later");
    }
    let cfg = live.config().clone();
    let registration = live.hub().register(endpoint, principal.user, cfg.queue);
    if let Some(b) = &board {
        // A fresh socket follows no board yet, so this cannot exceed the limit.
        let _ = live
            .hub()
            .subscribe(registration.id, b, cfg.max_boards.max(1));
    }
    let socket = Socket {
        security: security.clone(),
        live,
        endpoint,
        token,
        registration,
    };
    upgrade
        .max_message_size(cfg.max_client_frame)
        .max_frame_size(cfg.max_client_frame)
        .on_upgrade(move |ws| socket.run(ws))
}

/// Why a socket's loop ended.
#[derive(Debug)]
enum End {
    /// The hub dropped it (queue full).
    Slow,
    /// Nothing arrived from the client for the idle timeout.
    Idle,
    /// The token no longer verifies.
    Token(AuthError),
    /// The client closed, or the connection failed.
    Gone,
}

/// One open socket.
struct Socket {
    security: Arc<Security>,
    live: Arc<Live>,
    endpoint: Endpoint,
    token: String,
    /// Dropped (unregistering the socket) when the socket ends.
    registration: Registration,
}

type Sink = SplitSink<WebSocket, Message>;

impl Socket {
    async fn run(mut self, ws: WebSocket) {
        let cfg = self.live.config().clone();
        let (mut sink, mut stream): (Sink, SplitStream<WebSocket>) = ws.split();
        let mut ping =
            tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut idle = Instant::now() + cfg.idle_timeout;
        let kicked = self.registration.kicked.clone();
        let end = loop {
            let out = tokio::select! {
                biased;
                () = kicked.notified() => break End::Slow,
                () = sleep_until(idle) => break End::Idle,
                _ = ping.tick() => {
                    if let Err(e) = self.security.auth.verify(&self.token) {
                        break End::Token(e);
                    }
                    Message::Ping(Bytes::new())
                }
                frame = stream.next() => match frame {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break End::Gone,
                    Some(Ok(msg)) => {
                        idle = Instant::now() + cfg.idle_timeout;
                        match self.answer(msg) {
                            Some(reply) => reply,
                            None => continue,
                        }
                    }
                },
                queued = self.registration.rx.recv() => match queued {
                    Some(text) => Message::Text(text),
                    // The hub let go of the socket: it was kicked.
                    None => break End::Slow,
                },
            };
            if let Err(end) = send(&mut sink, out, &kicked, idle).await {
                break end;
            }
        };
        let close = |code: u16, reason: &str| {
            Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }))
        };
        let farewell = match &end {
            End::Slow => Some(close(
                CLOSE_POLICY,
                &format!("slow consumer: more than {} messages queued", cfg.queue),
            )),
            End::Idle => Some(close(CLOSE_IDLE, "idle timeout")),
            End::Token(e) => {
                tracing::info!(socket = self.registration.id, reason = %e, "live socket's token no longer verifies");
                Some(close(CLOSE_POLICY, "token no longer valid"))
            }
            End::Gone => None,
        };
        tracing::debug!(socket = self.registration.id, endpoint = self.endpoint.as_str(), end = ?end, "live socket closed");
        if let Some(f) = farewell {
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                sink.send(f).await?;
                sink.close().await
            })
            .await;
        } else {
            let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
        }
    }

    /// The reply to a client frame, if any (pings and pongs need none: the library answers
    /// pings itself).
    fn answer(&self, msg: Message) -> Option<Message> {
        let error = |detail: &str| Some(reply(json!({"type": "error", "detail": detail})));
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => return error("binary frames are not accepted; send JSON text"),
            _ => return None,
        };
        if self.endpoint == Endpoint::Notifications {
            return error("/ws/notifications takes no messages");
        }
        let frame: ClientFrame = match serde_json::from_str(text.as_str()) {
            Ok(f) => f,
            Err(e) => return error(&format!("{FRAME_SHAPES}: {e}")),
        };
        let (kind, raw) = match (frame.subscribe, frame.unsubscribe) {
            (Some(b), None) => ("subscribed", b),
            (None, Some(b)) => ("unsubscribed", b),
            _ => return error("send exactly one of `subscribe` and `unsubscribe`"),
        };
        let board = match parse_board(&raw) {
            Ok(b) => b,
            Err(e) => return error(&e),
        };
        let hub = self.live.hub();
        let id = self.registration.id;
        let result = if kind == "subscribed" {
            hub.subscribe(id, &board, self.live.config().max_boards)
        } else {
            hub.unsubscribe(id, &board)
        };
        match result {
            Ok(boards) => Some(reply(
                json!({"type": kind, "board": board, "boards": boards}),
            )),
            Err(e) => error(&e.to_string()),
        }
    }
}

/// A JSON text frame.
fn reply(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Sends `msg`, giving up when the socket is kicked or idle meanwhile.
async fn send(sink: &mut Sink, msg: Message, kicked: &Notify, idle: Instant) -> Result<(), End> {
    tokio::select! {
        biased;
        () = kicked.notified() => Err(End::Slow),
        () = sleep_until(idle) => Err(End::Idle),
        r = sink.send(msg) => r.map_err(|_| End::Gone),
    }
}
