//! Live updates over WebSockets (issue #6, docs/live.md), end to end and without mocks: two
//! API instances (two `App`s on one SQLite file and one bus, each serving the real router on
//! its own loopback port), a real `redis-server` / `nats-server -js` started by the test, the
//! relay and every consumer running in instance A only, and real WebSocket clients
//! (tokio-tungstenite). Timeouts are failure bounds, never assertions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tektree_domain::gamification::{Condition, Goal, Repeat};
use tektree_domain::{GamificationRules, QuotaRules, Rules, XpRules};
use tektree_outbox::test_support::{unique_nats_names, unique_stream_key, NatsServer, RedisServer};
use tektree_outbox::{Bus, NatsBus, RedisBus};
use tektree_services::api;
use tektree_services::api::auth::{AuthConfig, Authenticator, JwtKey};
use tektree_services::api::cors::CorsOrigins;
use tektree_services::api::ratelimit::RateLimiter;
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::app::App;
use tektree_services::live::{Live, LiveConfig, Notification};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

/// Bound on any wait for a message or a state: a stuck pipeline fails, a slow machine does not.
const BOUND: Duration = Duration::from_secs(90);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The servers a cluster runs on (kept alive with it).
#[allow(dead_code)]
enum Servers {
    Redis(RedisServer),
    Nats(NatsServer),
    None,
}

/// One API instance.
struct Instance {
    /// The ports, with the `live` consumer.
    app: App,
    /// The API's state (security, live updates) over `app`.
    api: ApiState,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

/// Two API instances on one store and one bus; the pipeline runs in `a`.
struct Cluster {
    a: Instance,
    b: Instance,
    auth: Authenticator,
    http: reqwest::Client,
    stop: watch::Sender<bool>,
    pipeline: JoinSet<()>,
    _servers: Servers,
    _dir: tempfile::TempDir,
}

fn secret() -> Vec<u8> {
    b"live-test-secret-live-test-secret-0123456789".to_vec()
}

fn authenticator() -> Authenticator {
    Authenticator::new(AuthConfig::new(JwtKey::Hs256(secret()))).unwrap()
}

/// Rules that make a few commands produce every kind of notification: registration is worth
/// 100 XP (level 1 → 2), the Free tier allows one unit a month (the first question crosses
/// 80 %), the first question unlocks an achievement and completes a quest, and one active day
/// is a streak milestone.
fn rich_rules() -> Rules {
    let goal = |id: &str| Goal {
        id: id.into(),
        name: id.into(),
        condition: Condition::Count {
            activity: "question".into(),
            at_least: 1,
        },
        xp_reward: 5,
        repeat: Repeat::Once,
    };
    Rules {
        xp: XpRules {
            registration: 100,
            ..XpRules::default()
        },
        quota: QuotaRules {
            free: Some(1),
            ..QuotaRules::default()
        },
        gamification: GamificationRules {
            achievements: vec![goal("first-question")],
            quests: vec![goal("ask-one")],
            streak_milestones: vec![1],
        },
    }
}

fn live_config() -> LiveConfig {
    LiveConfig {
        channel: format!("tektree.live.test.{}", Uuid::new_v4().simple()),
        ..LiveConfig::default()
    }
}

/// An app on `store` with `bus` (already connected to a unique stream) and live updates on
/// `bus_url`'s fan-out, serving the API on a free loopback port.
async fn instance(
    store: &str,
    bus: Arc<dyn Bus>,
    bus_url: &str,
    rules: Rules,
    live: &LiveConfig,
) -> Instance {
    let mut app = App::open(store, "memory", rules).await.unwrap();
    if bus_url != "memory" {
        app.bus = bus;
        app.in_process_bus = false;
    }
    let api = ApiState::new(app)
        .with_security(Security {
            auth: authenticator(),
            rate_limiter: RateLimiter::disabled(),
            cors: CorsOrigins::none(),
        })
        .with_live(Live::open(bus_url, live.clone()).await.unwrap());
    let app = api.app.as_ref().clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = api.clone();
    let server = tokio::spawn(async move {
        api::serve(served, listener, std::future::pending())
            .await
            .unwrap();
    });
    Instance {
        app,
        api,
        addr,
        server,
    }
}

impl Cluster {
    async fn redis(rules: Rules, live: LiveConfig) -> Cluster {
        let server = RedisServer::start();
        let key = unique_stream_key();
        let mut buses: Vec<Arc<dyn Bus>> = vec![];
        for _ in 0..2 {
            buses.push(Arc::new(
                RedisBus::with_stream(&server.url, key.clone())
                    .await
                    .unwrap(),
            ));
        }
        let url = server.url.clone();
        Cluster::start(buses, &url, rules, live, Servers::Redis(server)).await
    }

    async fn nats(rules: Rules, live: LiveConfig) -> Cluster {
        let server = NatsServer::start();
        let names = unique_nats_names();
        let mut buses: Vec<Arc<dyn Bus>> = vec![];
        for _ in 0..2 {
            buses.push(Arc::new(
                NatsBus::with_prefix(&server.url, &names.stream, &names.subject_prefix)
                    .await
                    .unwrap(),
            ));
        }
        let url = server.url.clone();
        Cluster::start(buses, &url, rules, live, Servers::Nats(server)).await
    }

    async fn start(
        mut buses: Vec<Arc<dyn Bus>>,
        bus_url: &str,
        rules: Rules,
        live: LiveConfig,
        servers: Servers,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite://{}", dir.path().join("tektree.db").display());
        let b = instance(&store, buses.pop().unwrap(), bus_url, rules.clone(), &live).await;
        let a = instance(&store, buses.pop().unwrap(), bus_url, rules, &live).await;
        let (stop, rx) = watch::channel(false);
        let mut pipeline = JoinSet::new();
        a.app.spawn_pipeline(rx, &mut pipeline);
        Cluster {
            a,
            b,
            auth: authenticator(),
            http: reqwest::Client::new(),
            stop,
            pipeline,
            _servers: servers,
            _dir: dir,
        }
    }

    fn token(&self, user: Uuid) -> String {
        self.auth.mint(user, &[], 3600).unwrap()
    }

    /// POSTs `body` to `path` on `to` as `user`; asserts 201.
    async fn command(&self, to: &Instance, path: &str, user: Uuid, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("http://{}{path}", to.addr))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 201, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn register(&self, to: &Instance, user: Uuid) {
        self.command(to, "/v1/users", user, json!({"display_name": "Ada"}))
            .await;
    }

    async fn ask(&self, to: &Instance, user: Uuid, tags: &[&str]) {
        self.command(
            to,
            "/v1/questions",
            user,
            json!({"title": "Why Rust?", "body": "Tell me.", "tags": tags}),
        )
        .await;
    }

    async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.pipeline.join_next().await.is_some() {}
        self.a.server.abort();
        self.b.server.abort();
    }
}

/// A WebSocket handshake to `path` (with its query) on `addr`, with `Authorization: Bearer`
/// when `bearer` is given.
async fn connect(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// The next JSON text message (pings and pongs skipped); panics on close or after [`BOUND`].
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(BOUND, ws.next())
            .await
            .expect("no message within the bound")
            .expect("socket ended")
            .expect("socket failed");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads messages until one satisfies `want`; every message read goes to `seen`.
async fn until(ws: &mut Ws, seen: &mut Vec<Value>, want: impl Fn(&Value) -> bool) -> Value {
    loop {
        let v = next_json(ws).await;
        seen.push(v.clone());
        if want(&v) {
            return v;
        }
    }
}

fn is(v: &Value, kind: &str) -> bool {
    v["type"] == kind
}

/// The refusal of a handshake: status, headers and JSON body.
fn refusal(r: Result<Ws, tungstenite::Error>) -> (u16, tungstenite::http::HeaderMap, Value) {
    match r {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status().as_u16(),
                resp.headers().clone(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    }
}

/// A command sent to instance A reaches a socket on instance B through Redis pub/sub: every
/// notification type of the user (registration XP with a level-up, the question's XP with an
/// achievement, a quest, a streak milestone and the quota warning) and nothing of another
/// user.
#[tokio::test]
async fn a_command_on_instance_a_notifies_a_socket_on_instance_b_over_redis() {
    let c = Cluster::redis(rich_rules(), live_config()).await;
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut ws = connect(c.b.addr, "/ws/notifications", Some(&c.token(ada)))
        .await
        .unwrap();
    c.register(&c.a, ada).await;
    c.register(&c.a, bob).await;
    let mut seen = vec![];
    let xp = until(&mut ws, &mut seen, |v| is(v, "xp.earned")).await;
    assert_eq!(xp["user_id"], ada.to_string());
    assert_eq!(xp["amount"], 100);
    assert_eq!(xp["total_xp"], 100);
    assert_eq!(xp["source_event_type"], "user.registered");
    assert!(xp["event_id"].is_string() && xp["position"].as_u64().unwrap() > 0);
    let up = until(&mut ws, &mut seen, |v| is(v, "level.up")).await;
    assert_eq!(
        (up["from_level"].clone(), up["to_level"].clone()),
        (json!(1), json!(2))
    );

    c.ask(&c.a, ada, &["rust"]).await;
    let mut kinds: Vec<&str> = vec![
        "achievement.unlocked",
        "quest.completed",
        "streak.milestone",
        "quota.warning",
    ];
    while !kinds.is_empty() {
        let v = next_json(&mut ws).await;
        seen.push(v.clone());
        kinds.retain(|k| !is(&v, k));
        match v["type"].as_str().unwrap() {
            "achievement.unlocked" => assert_eq!(v["achievement_id"], "first-question"),
            "quest.completed" => assert_eq!(v["quest_id"], "ask-one"),
            "streak.milestone" => assert_eq!(v["days"], 1),
            "quota.warning" => {
                assert_eq!(
                    (v["used"].clone(), v["limit"].clone()),
                    (json!(1), json!(1))
                );
                assert_eq!(v["percent"], 80);
                assert_eq!(v["tier"], "free");
            }
            _ => {}
        }
    }
    assert!(
        seen.iter().any(|v| is(v, "xp.earned")
            && v["source_event_type"] == "knowledge.question.posted"
            && v["tags"] == json!(["rust"])),
        "{seen:#?}"
    );
    // Bob's messages were published before Ada's question's (one consumer, position order),
    // so had any been routed here, they would have arrived by now.
    for v in &seen {
        assert_eq!(v["user_id"], ada.to_string(), "{v}");
        assert_ne!(v["type"], "rank.changed", "{v}");
    }
    c.shutdown().await;
}

/// A leaderboard socket on instance A (token in `access_token`, browser style) gets
/// `rank.changed` of the boards it follows, with ranks read after the leaderboard caught up;
/// `subscribe` / `unsubscribe` frames are confirmed, bad ones answered with an error.
#[tokio::test]
async fn a_leaderboard_socket_gets_rank_changes_of_the_boards_it_follows() {
    let c = Cluster::redis(rich_rules(), live_config()).await;
    let ada = Uuid::new_v4();
    let path = format!(
        "/ws/leaderboard?board=all-time&access_token={}",
        c.token(ada)
    );
    let mut ws = connect(c.a.addr, &path, None).await.unwrap();
    c.register(&c.b, ada).await;
    let mut seen = vec![];
    let rank = until(&mut ws, &mut seen, |v| is(v, "rank.changed")).await;
    assert_eq!(rank["board"], "all-time");
    assert_eq!(rank["user_id"], ada.to_string());
    assert_eq!(
        (rank["xp"].clone(), rank["rank"].clone()),
        (json!(100), json!(1))
    );

    ws.send(Message::text(r#"{"subscribe": "tag:Rust"}"#))
        .await
        .unwrap();
    let ok = until(&mut ws, &mut seen, |v| is(v, "subscribed")).await;
    assert_eq!(ok["board"], "tag:rust");
    assert_eq!(ok["boards"], json!(["all-time", "tag:rust"]));
    ws.send(Message::text(r#"{"unsubscribe": "all-time"}"#))
        .await
        .unwrap();
    let ok = until(&mut ws, &mut seen, |v| is(v, "unsubscribed")).await;
    assert_eq!(ok["boards"], json!(["tag:rust"]));
    for bad in [
        r#"{"subscribe": "nope"}"#,
        "not json",
        r#"{"subscribe": "all-time", "unsubscribe": "all-time"}"#,
    ] {
        ws.send(Message::text(bad)).await.unwrap();
        let e = until(&mut ws, &mut seen, |v| is(v, "error")).await;
        assert!(e["detail"].as_str().is_some_and(|d| !d.is_empty()), "{e}");
    }

    c.ask(&c.a, ada, &["rust"]).await;
    let tag = until(&mut ws, &mut seen, |v| is(v, "rank.changed")).await;
    assert_eq!(tag["board"], "tag:rust");
    assert_eq!(
        (tag["xp"].clone(), tag["rank"].clone()),
        (json!(2), json!(1))
    );
    // The REST query agrees once settled.
    c.a.app.settle(BOUND).await.unwrap();
    let row =
        c.a.app
            .read_models
            .rank("tag:rust", ada)
            .await
            .unwrap()
            .unwrap();
    assert_eq!((row.xp, row.rank), (2, 1));
    c.shutdown().await;
}

/// The handshake is refused before any upgrade: 401 problem+json with a Bearer challenge for
/// a missing, invalid, foreign or doubled token (header or query), 400 for a bad board,
/// a problem for a plain GET, 503 where live updates are off.
#[tokio::test]
async fn handshakes_without_a_valid_token_are_refused_before_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("t.db").display());
    let bus: Arc<dyn Bus> = Arc::new(tektree_outbox::MemoryBus::new());
    let live = live_config();
    let i = instance(&store, bus.clone(), "memory", Rules::default(), &live).await;
    let auth = authenticator();
    let user = Uuid::new_v4();
    let good = auth.mint(user, &[], 60).unwrap();
    let foreign = Authenticator::new(AuthConfig::new(JwtKey::Hs256(vec![9u8; 32])))
        .unwrap()
        .mint(user, &[], 60)
        .unwrap();
    let expired = auth.sign(&auth.claims(user, &[], 1_000_000, 60)).unwrap();

    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("/ws/notifications".into(), None, "no token"),
        ("/ws/leaderboard?board=all-time".into(), None, "no token"),
        (
            "/ws/notifications".into(),
            Some("not-a-jwt"),
            "malformed header token",
        ),
        (
            format!("/ws/notifications?access_token={foreign}"),
            None,
            "foreign key",
        ),
        (
            format!("/ws/leaderboard?access_token={expired}"),
            None,
            "expired",
        ),
        (
            "/ws/notifications?access_token=".into(),
            None,
            "empty query token",
        ),
        (
            format!("/ws/notifications?access_token={good}"),
            Some(good.as_str()),
            "token twice",
        ),
    ];
    for (path, bearer, why) in cases {
        let (status, headers, body) = refusal(connect(i.addr, &path, bearer).await);
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(headers["content-type"], "application/problem+json", "{why}");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{why}"
        );
        assert_eq!(
            body["type"], "https://tektree.dev/problems/unauthenticated",
            "{why}"
        );
        assert!(!body["detail"].as_str().unwrap().contains(&good), "{why}");
    }
    assert_eq!(i.api.live.as_ref().unwrap().sockets(), 0);

    let (status, _, body) =
        refusal(connect(i.addr, "/ws/leaderboard?board=weekly:nope", Some(&good)).await);
    assert_eq!(
        (status, body["type"].as_str().unwrap()),
        (400, "https://tektree.dev/problems/invalid_query")
    );
    let (status, _, _) =
        refusal(connect(i.addr, "/ws/notifications?board=all-time", Some(&good)).await);
    assert_eq!(status, 400);

    let plain = reqwest::Client::new()
        .get(format!("http://{}/ws/notifications", i.addr))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert!(plain.status().is_client_error(), "{}", plain.status());
    let body: Value = plain.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://tektree.dev/problems/websocket_required"
    );

    // Both token forms work.
    let ws = connect(i.addr, "/ws/notifications", Some(&good))
        .await
        .unwrap();
    let ws2 = connect(
        i.addr,
        &format!("/ws/leaderboard?access_token={good}"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(i.api.live.as_ref().unwrap().sockets(), 2);
    drop((ws, ws2));

    // An instance without live updates refuses with 503 (after the token check).
    let mut off = i.api.clone();
    off.live = None;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = api::serve(off, listener, std::future::pending()).await;
    });
    let (status, _, body) = refusal(connect(addr, "/ws/notifications", Some(&good)).await);
    assert_eq!(
        (status, body["type"].as_str().unwrap()),
        (503, "https://tektree.dev/problems/live_unavailable")
    );
    let (status, _, _) = refusal(connect(addr, "/ws/notifications", None).await);
    assert_eq!(status, 401);
    server.abort();
    i.server.abort();
}

/// A `rank.changed` for `board` with `padding` bytes of filler (so that a client that does
/// not read fills its TCP buffers after a few messages).
fn synthetic(board: &str, n: u64, padding: usize) -> Notification {
    let mut fields = Map::new();
    fields.insert("board".into(), json!(board));
    fields.insert("xp".into(), json!(n));
    fields.insert("rank".into(), json!(1));
    fields.insert("padding".into(), json!("x".repeat(padding)));
    Notification {
        kind: "rank.changed".into(),
        user_id: Uuid::new_v4(),
        event_id: Uuid::new_v4(),
        position: n,
        occurred_at: Utc::now(),
        fields,
    }
}

/// A client that never reads is dropped once its queue (8 here) overflows, its connection
/// closes, and the drop is counted; a healthy client on the same board, on the same instance,
/// keeps receiving everything. Messages are published on instance A's fan-out and routed by
/// instance B.
#[tokio::test]
async fn a_slow_client_is_dropped_while_a_healthy_one_keeps_receiving() {
    let live = LiveConfig {
        queue: 8,
        ..live_config()
    };
    let c = Cluster::redis(Rules::default(), live).await;
    let user = Uuid::new_v4();
    let token = c.token(user);
    let path = "/ws/leaderboard?board=tag:slow";
    let mut healthy = connect(c.b.addr, path, Some(&token)).await.unwrap();
    // The slow client: a tiny receive buffer, and it never reads.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(c.b.addr).await.unwrap();
    let mut req = format!("ws://{}{path}", c.b.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut slow, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    let live_b = c.b.api.live.clone().unwrap();
    let live_a = c.a.api.live.clone().unwrap();
    assert_eq!(live_b.sockets(), 2);

    // Rounds of 4 messages (half the queue), each read by the healthy client before the next,
    // until instance B lets go of the slow one.
    let mut n = 0u64;
    let deadline = tokio::time::Instant::now() + BOUND;
    while live_b.sockets() == 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow client was never dropped after {n} messages"
        );
        assert!(
            n < 20_000,
            "the slow client was never dropped after {n} messages"
        );
        let batch: Vec<Notification> = (n + 1..=n + 4)
            .map(|i| synthetic("tag:slow", i, 4096))
            .collect();
        live_a.publish(&batch).await.unwrap();
        for _ in 0..4 {
            n += 1;
            let v = next_json(&mut healthy).await;
            assert_eq!(v["xp"], n, "the healthy client missed a message");
        }
    }
    assert_eq!(live_b.sockets(), 1);
    // The healthy client keeps receiving.
    for _ in 0..20 {
        let batch: Vec<Notification> = (n + 1..=n + 4)
            .map(|i| synthetic("tag:slow", i, 16))
            .collect();
        live_a.publish(&batch).await.unwrap();
        for _ in 0..4 {
            n += 1;
            assert_eq!(next_json(&mut healthy).await["xp"], n);
        }
    }
    // The slow client, reading at last, finds fewer messages than were sent, then the end of
    // the connection (the close frame 1008 if it got through, else EOF or a reset).
    let mut got = 0u64;
    let end = loop {
        match tokio::time::timeout(BOUND, slow.next())
            .await
            .expect("the slow socket was not closed")
        {
            Some(Ok(Message::Text(_))) => got += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(got < n, "the slow client got {got} of {n}");
    if let Some(code) = end {
        assert_eq!(code, CloseCode::Policy);
    }
    let metrics = reqwest::get(format!("http://{}/metrics", c.b.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("tektree_live_slow_clients_dropped_total{endpoint=\"leaderboard\"}")),
        "{metrics}"
    );
    c.shutdown().await;
}

/// The cross-instance path over NATS: the fan-out is a core subject on the bus's server.
#[tokio::test]
async fn a_command_on_instance_a_notifies_a_socket_on_instance_b_over_nats() {
    let c = Cluster::nats(rich_rules(), live_config()).await;
    let ada = Uuid::new_v4();
    let mut ws = connect(c.b.addr, "/ws/notifications", Some(&c.token(ada)))
        .await
        .unwrap();
    let mut board = connect(
        c.b.addr,
        "/ws/leaderboard?board=all-time",
        Some(&c.token(Uuid::new_v4())),
    )
    .await
    .unwrap();
    c.register(&c.a, ada).await;
    let mut seen = vec![];
    let xp = until(&mut ws, &mut seen, |v| is(v, "xp.earned")).await;
    assert_eq!(
        (xp["user_id"].clone(), xp["amount"].clone()),
        (json!(ada.to_string()), json!(100))
    );
    until(&mut ws, &mut seen, |v| is(v, "level.up")).await;
    let rank = until(&mut board, &mut seen, |v| is(v, "rank.changed")).await;
    assert_eq!(
        (rank["user_id"].clone(), rank["rank"].clone()),
        (json!(ada.to_string()), json!(1))
    );
    c.shutdown().await;
}
