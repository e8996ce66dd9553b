//! The seeded random command workload, sent over HTTP by concurrent clients.
//!
//! Users register, post questions, answer, comment, vote (up, down, and changing their vote)
//! and accept answers. Contention is on purpose: three **hot users** author the three **hot
//! posts**, which get 20 % of all votes (so their content aggregates and their profile and
//! subscription aggregates are written by many requests at once), and hot users cast 15 % of
//! the votes (as much as the API's per-user rate limit lets them).
//!
//! Every request carries the ids it creates (`question_id`, `answer_id`, `comment_id`,
//! `user_id`), an `Idempotency-Key`, `Authorization: Bearer <HS256 JWT>` and `X-User-Id`, so it
//! can be retried as is: on a connection error, a timeout or a 5xx (the API was killed) the
//! same request is sent again until it is answered. Commands only ever reference entities whose
//! creation was answered 2xx. Every command answered 2xx is recorded with what it asked for
//! ([`Act`]: who did what to which ids), the events it returned and when it was sent and
//! answered; the read-model oracle (`oracle.rs`) computes the read models from these records.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::rng::Rng;

/// Metered posts (questions + answers + comments) per user the workload stays under: the
/// free tier's monthly quota is 100 and the API's check trails the pipeline a little.
const METERED_CAP: u32 = 80;
/// Fewer eligible authors than this: register a new user first.
const MIN_AUTHORS: usize = 6;
/// Tags of questions (few, so the tag leaderboards get contended too).
const TAGS: &[&str] = &["rust", "async", "history", "sql", "redis", "nats", "cqrs"];
/// A request not answered within this is treated like a connection error (sent again).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Give up on a command after this long without an answer (the API never came back).
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
/// `409 conflict` answers (concurrent writers kept conflicting) are retried this many times.
const CONFLICT_RETRIES: u32 = 20;
/// The JWT contract (issue #4).
const JWT_ISSUER: &str = "tektree";
/// See [`JWT_ISSUER`].
const JWT_AUDIENCE: &str = "tektree-api";

/// One event as a command response lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReturnedEvent {
    /// Event id.
    pub event_id: Uuid,
    /// Catalog name.
    pub event_type: String,
    /// Per-aggregate sequence.
    pub sequence: u64,
    /// Global position.
    pub position: u64,
}

/// A command response body.
#[derive(Debug, Clone, Deserialize)]
struct CommandResponse {
    aggregate_type: String,
    aggregate_id: Uuid,
    events: Vec<ReturnedEvent>,
}

/// A command answered 2xx.
#[derive(Debug, Clone)]
pub struct Record {
    /// What it was.
    pub kind: Kind,
    /// What it asked for.
    pub act: Act,
    /// Aggregate type it ran on.
    pub aggregate_type: String,
    /// Aggregate id it ran on.
    pub aggregate_id: Uuid,
    /// Events it returned (empty for an idempotent repeat). Every attempt of a command carries
    /// the same `Idempotency-Key`, so a retry of an attempt that committed gets that attempt's
    /// events back, and nothing is appended twice.
    pub events: Vec<ReturnedEvent>,
    /// When its first attempt was sent (no earlier than its events' `occurred_at`).
    pub sent_at: DateTime<Utc>,
    /// When its final answer arrived (no later than its events' `occurred_at`).
    pub answered_at: DateTime<Utc>,
}

/// What a command asked for: who did what to which ids (all chosen by the workload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// `user` registers.
    Register {
        /// The new user.
        user: Uuid,
    },
    /// `author` posts `question` with `tags`.
    Question {
        /// The new question.
        question: Uuid,
        /// Its author.
        author: Uuid,
        /// Its tags, as sent.
        tags: Vec<String>,
    },
    /// `author` answers `question` with `answer`.
    Answer {
        /// The new answer.
        answer: Uuid,
        /// The answered question.
        question: Uuid,
        /// Its author.
        author: Uuid,
    },
    /// `author` comments on `content` (a question or an answer).
    Comment {
        /// The new comment.
        comment: Uuid,
        /// The commented question or answer.
        content: Uuid,
        /// Its author.
        author: Uuid,
    },
    /// `voter` votes on `content`, up or down.
    Vote {
        /// The voted question or answer.
        content: Uuid,
        /// The voter.
        voter: Uuid,
        /// Up (else down).
        up: bool,
    },
    /// `actor` (the question's author) accepts `answer` on `question`.
    Accept {
        /// The question.
        question: Uuid,
        /// The accepted answer.
        answer: Uuid,
        /// Who sent it.
        actor: Uuid,
    },
}

impl Act {
    /// The kind of command.
    pub fn kind(&self) -> Kind {
        match self {
            Act::Register { .. } => Kind::Register,
            Act::Question { .. } => Kind::Question,
            Act::Answer { .. } => Kind::Answer,
            Act::Comment { .. } => Kind::Comment,
            Act::Vote { .. } => Kind::Vote,
            Act::Accept { .. } => Kind::Accept,
        }
    }
}

/// Kinds of commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `POST /v1/users`.
    Register,
    /// `POST /v1/questions`.
    Question,
    /// `POST /v1/questions/{id}/answers`.
    Answer,
    /// `POST /v1/content/{id}/comments`.
    Comment,
    /// `POST /v1/content/{id}/votes`.
    Vote,
    /// `POST /v1/questions/{id}/accept`.
    Accept,
}

/// A command, planned: the request and what it changes in the [`World`] once answered 2xx.
#[derive(Debug, Clone)]
struct Planned {
    act: Act,
    actor: Uuid,
    path: String,
    body: Value,
    effect: Effect,
}

#[derive(Debug, Clone)]
enum Effect {
    User(Uuid),
    Question { id: Uuid, author: Uuid },
    Answer { id: Uuid, question: Uuid },
    Nothing,
    Accept { question: Uuid },
}

/// A registered user.
#[derive(Debug, Clone)]
struct UserInfo {
    id: Uuid,
    /// Metered posts sent (refused ones included: conservative).
    metered: u32,
}

/// A posted question.
#[derive(Debug, Clone)]
struct QuestionInfo {
    id: Uuid,
    author: Uuid,
    answers: Vec<Uuid>,
    accepted: bool,
    accept_pending: bool,
}

/// What the clients know exists (only entities whose creation was answered 2xx).
#[derive(Debug, Default)]
struct World {
    users: Vec<UserInfo>,
    user_index: HashMap<Uuid, usize>,
    hot_users: Vec<Uuid>,
    questions: Vec<QuestionInfo>,
    question_index: HashMap<Uuid, usize>,
    /// Questions and answers.
    content: Vec<Uuid>,
    hot_posts: Vec<Uuid>,
    /// Last vote direction sent per (voter, content).
    votes: HashMap<(Uuid, Uuid), bool>,
    next_user: u64,
    next_post: u64,
    /// Users registering right now (not yet answered).
    registering: u64,
}

impl World {
    /// A user who may still post, preferring ordinary users (hot users post little).
    fn author(&mut self, rng: &mut Rng) -> Option<Uuid> {
        let eligible: Vec<usize> = (0..self.users.len())
            .filter(|&i| {
                self.users[i].metered < METERED_CAP && !self.hot_users.contains(&self.users[i].id)
            })
            .collect();
        if eligible.len() < MIN_AUTHORS {
            return None;
        }
        let i = eligible[rng.index(eligible.len())];
        self.users[i].metered += 1;
        Some(self.users[i].id)
    }

    fn register(&mut self, rng: &mut Rng) -> Planned {
        let id = rng.uuid();
        self.next_user += 1;
        self.registering += 1;
        Planned {
            act: Act::Register { user: id },
            actor: id,
            path: "/v1/users".into(),
            body: json!({"user_id": id, "display_name": format!("user {}", self.next_user)}),
            effect: Effect::User(id),
        }
    }

    fn question(&mut self, rng: &mut Rng, author: Uuid) -> Planned {
        let id = rng.uuid();
        self.next_post += 1;
        let n = rng.between(1, 3) as usize;
        let mut tags: Vec<&str> = TAGS.to_vec();
        rng.shuffle(&mut tags);
        tags.truncate(n);
        Planned {
            act: Act::Question {
                question: id,
                author,
                tags: tags.iter().map(|t| t.to_string()).collect(),
            },
            actor: author,
            path: "/v1/questions".into(),
            body: json!({
                "question_id": id,
                "title": format!("Question {}", self.next_post),
                "body": format!("Body of question {} ({})", self.next_post, rng.hex(4)),
                "tags": tags,
            }),
            effect: Effect::Question { id, author },
        }
    }

    /// Plans the next command.
    fn plan(&mut self, rng: &mut Rng) -> Planned {
        if self.users.len() + (self.registering as usize) < MIN_AUTHORS + self.hot_users.len()
            || rng.percent(4)
        {
            return self.register(rng);
        }
        let roll = rng.below(100);
        if roll < 14 || self.questions.is_empty() {
            return match self.author(rng) {
                Some(a) => self.question(rng, a),
                None => self.register(rng),
            };
        }
        if roll < 32 {
            let Some(author) = self.author(rng) else {
                return self.register(rng);
            };
            let q = self.questions[rng.index(self.questions.len())].id;
            let id = rng.uuid();
            self.next_post += 1;
            return Planned {
                act: Act::Answer {
                    answer: id,
                    question: q,
                    author,
                },
                actor: author,
                path: format!("/v1/questions/{q}/answers"),
                body: json!({"answer_id": id, "body": format!("Answer {}", self.next_post)}),
                effect: Effect::Answer { id, question: q },
            };
        }
        if roll < 46 {
            let Some(author) = self.author(rng) else {
                return self.register(rng);
            };
            let c = self.content[rng.index(self.content.len())];
            let id = rng.uuid();
            return Planned {
                act: Act::Comment {
                    comment: id,
                    content: c,
                    author,
                },
                actor: author,
                path: format!("/v1/content/{c}/comments"),
                body: json!({"comment_id": id, "text": format!("Comment {}", rng.hex(6))}),
                effect: Effect::Nothing,
            };
        }
        if roll < 92 || !self.plan_accept_possible() {
            return self.vote(rng);
        }
        self.accept(rng).unwrap_or_else(|| self.vote(rng))
    }

    fn vote(&mut self, rng: &mut Rng) -> Planned {
        let content = if !self.hot_posts.is_empty() && rng.percent(20) {
            self.hot_posts[rng.index(self.hot_posts.len())]
        } else {
            self.content[rng.index(self.content.len())]
        };
        let voter = if !self.hot_users.is_empty() && rng.percent(15) {
            self.hot_users[rng.index(self.hot_users.len())]
        } else {
            self.users[rng.index(self.users.len())].id
        };
        let up = match self.votes.get(&(voter, content)) {
            // Change the vote half of the time (the same direction again is a no-op).
            Some(&previous) => previous != rng.percent(50),
            None => rng.percent(75),
        };
        self.votes.insert((voter, content), up);
        Planned {
            act: Act::Vote { content, voter, up },
            actor: voter,
            path: format!("/v1/content/{content}/votes"),
            body: json!({"direction": if up { "up" } else { "down" }}),
            effect: Effect::Nothing,
        }
    }

    fn plan_accept_possible(&self) -> bool {
        self.questions
            .iter()
            .any(|q| !q.answers.is_empty() && !q.accepted && !q.accept_pending)
    }

    fn accept(&mut self, rng: &mut Rng) -> Option<Planned> {
        let open: Vec<usize> = (0..self.questions.len())
            .filter(|&i| {
                let q = &self.questions[i];
                !q.answers.is_empty() && !q.accepted && !q.accept_pending
            })
            .collect();
        if open.is_empty() {
            return None;
        }
        let q = &mut self.questions[open[rng.index(open.len())]];
        q.accept_pending = true;
        let answer = q.answers[rng.index(q.answers.len())];
        Some(Planned {
            act: Act::Accept {
                question: q.id,
                answer,
                actor: q.author,
            },
            actor: q.author,
            path: format!("/v1/questions/{}/accept", q.id),
            body: json!({"answer_id": answer}),
            effect: Effect::Accept { question: q.id },
        })
    }

    /// Records the outcome of `p` (`ok`: answered 2xx).
    fn settle(&mut self, p: &Planned, ok: bool) {
        match &p.effect {
            Effect::User(id) => {
                self.registering = self.registering.saturating_sub(1);
                if ok && !self.user_index.contains_key(id) {
                    self.user_index.insert(*id, self.users.len());
                    self.users.push(UserInfo {
                        id: *id,
                        metered: 0,
                    });
                }
            }
            Effect::Question { id, author } if ok => {
                self.question_index.insert(*id, self.questions.len());
                self.questions.push(QuestionInfo {
                    id: *id,
                    author: *author,
                    answers: Vec::new(),
                    accepted: false,
                    accept_pending: false,
                });
                self.content.push(*id);
            }
            Effect::Answer { id, question, .. } if ok => {
                if let Some(&i) = self.question_index.get(question) {
                    self.questions[i].answers.push(*id);
                }
                self.content.push(*id);
            }
            Effect::Accept { question } => {
                if let Some(&i) = self.question_index.get(question) {
                    let q = &mut self.questions[i];
                    q.accept_pending = false;
                    // Refused (e.g. 409 after many conflicts): do not try that question again.
                    q.accepted = true;
                }
            }
            _ => {}
        }
    }
}

/// A command that did not end 2xx.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// What it was.
    pub kind: Kind,
    /// Final status (0: never answered).
    pub status: u16,
    /// Problem `type` or error text.
    pub detail: String,
}

/// Counters of the workload.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Commands planned and sent.
    pub sent: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// HTTP attempts that had to be repeated (connection errors, timeouts, 5xx, 409, 429).
    pub retries: u64,
    /// 429 answers waited out (rate limit).
    pub rate_limited: u64,
}

/// The workload: world, records, counters, HTTP client.
pub struct Workload {
    http: reqwest::Client,
    bases: Vec<String>,
    /// Requests sent (picks the API of the next one, round robin).
    sends: AtomicU64,
    key: EncodingKey,
    world: Mutex<World>,
    records: Mutex<Vec<Record>>,
    refusals: Mutex<Vec<Refusal>>,
    stats: Mutex<Stats>,
    /// Commands finished (answered or given up).
    pub completed: AtomicU64,
    /// Commands started.
    started: AtomicU64,
    /// Clients pause while this is set (the pipeline lags too far behind).
    pub paused: AtomicBool,
    /// Clients stop starting commands once this is set.
    pub stop: AtomicBool,
    /// Time between two command starts over all clients (`None`: as fast as answered).
    interval: Option<Duration>,
    /// When the next command may start.
    next_start: Mutex<Instant>,
}

impl Workload {
    /// A workload against the APIs at `bases` (`http://127.0.0.1:PORT`; each request, retries
    /// included, goes to the next one, round robin) signing tokens with the HS256 `secret`,
    /// starting at most `rate` commands per second over all clients (0: no limit).
    pub fn new(bases: Vec<String>, secret: &str, rate: f64) -> anyhow::Result<Workload> {
        anyhow::ensure!(!bases.is_empty(), "no API to send to");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Workload {
            http,
            bases,
            sends: AtomicU64::new(0),
            key: EncodingKey::from_secret(secret.as_bytes()),
            world: Mutex::new(World::default()),
            records: Mutex::new(Vec::new()),
            refusals: Mutex::new(Vec::new()),
            stats: Mutex::new(Stats::default()),
            completed: AtomicU64::new(0),
            started: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            interval: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            next_start: Mutex::new(Instant::now()),
        })
    }

    /// Waits until `GET /healthz` answers 200 on every API (up to `timeout` in all).
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for base in &self.bases {
            loop {
                if let Ok(r) = self.http.get(format!("{base}/healthz")).send().await {
                    if r.status().is_success() {
                        break;
                    }
                }
                if Instant::now() >= deadline {
                    anyhow::bail!("the API at {base} did not become healthy");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The API of the next request.
    fn base(&self) -> &str {
        let n = self.sends.fetch_add(1, Ordering::Relaxed) as usize;
        &self.bases[n % self.bases.len()]
    }

    /// The warm-up, sequential: registers 3 hot and `base_users` ordinary users, the 3 hot
    /// posts (by the hot users) and `questions` ordinary questions. Returns the ordinary
    /// questions' `knowledge.question.posted` events with their question ids (candidates for
    /// poison events).
    pub async fn warm_up(
        &self,
        rng: &mut Rng,
        base_users: usize,
        questions: usize,
    ) -> Vec<(Uuid, ReturnedEvent)> {
        for i in 0..3 + base_users {
            let p = self.world.lock().expect("world").register(rng);
            if let (Some(_), Effect::User(id)) = (self.execute(&p).await, &p.effect) {
                if i < 3 {
                    self.world.lock().expect("world").hot_users.push(*id);
                }
            }
        }
        let hot = self.world.lock().expect("world").hot_users.clone();
        for author in hot {
            let p = self.world.lock().expect("world").question(rng, author);
            if let (Some(_), Effect::Question { id, .. }) = (self.execute(&p).await, &p.effect) {
                self.world.lock().expect("world").hot_posts.push(*id);
            }
        }
        let mut candidates = Vec::new();
        for _ in 0..questions {
            let planned = {
                let mut w = self.world.lock().expect("world");
                w.author(rng).map(|a| w.question(rng, a))
            };
            let Some(p) = planned else { break };
            if let (Some(events), Effect::Question { id, .. }) = (self.execute(&p).await, &p.effect)
            {
                candidates.extend(
                    events
                        .into_iter()
                        .filter(|e| e.event_type == "knowledge.question.posted")
                        .map(|e| (*id, e)),
                );
            }
        }
        candidates
    }

    /// One client: plans and sends commands until `limit` commands were started in all (small
    /// mode) or [`Workload::stop`] is set (long mode).
    pub async fn client(&self, mut rng: Rng, limit: Option<u64>) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            while self.paused.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Some(limit) = limit {
                if self.started.fetch_add(1, Ordering::SeqCst) >= limit {
                    return;
                }
            }
            if let Some(interval) = self.interval {
                // The next free start slot; no bursts to catch up after a pause.
                let slot = {
                    let mut next = self.next_start.lock().expect("next start");
                    let slot = (*next).max(Instant::now());
                    *next = slot + interval;
                    slot
                };
                tokio::time::sleep_until(slot.into()).await;
            }
            let p = self.world.lock().expect("world").plan(&mut rng);
            self.execute(&p).await;
        }
    }

    /// Sends `p` until it is answered; records it; returns its events when answered 2xx.
    async fn execute(&self, p: &Planned) -> Option<Vec<ReturnedEvent>> {
        self.stats.lock().expect("stats").sent += 1;
        let sent_at = Utc::now();
        let result = self.send(p).await;
        let answered_at = Utc::now();
        let ok = result.is_ok();
        self.world.lock().expect("world").settle(p, ok);
        self.completed.fetch_add(1, Ordering::SeqCst);
        match result {
            Ok(resp) => {
                self.stats.lock().expect("stats").ok += 1;
                let events = resp.events.clone();
                self.records.lock().expect("records").push(Record {
                    kind: p.act.kind(),
                    act: p.act.clone(),
                    aggregate_type: resp.aggregate_type,
                    aggregate_id: resp.aggregate_id,
                    events: resp.events,
                    sent_at,
                    answered_at,
                });
                Some(events)
            }
            Err(refusal) => {
                self.refusals.lock().expect("refusals").push(refusal);
                None
            }
        }
    }

    /// A fresh HS256 token for `user` (claims contract of issue #4).
    fn token(&self, user: Uuid) -> String {
        #[derive(Serialize)]
        struct Claims<'a> {
            sub: String,
            iss: &'a str,
            aud: &'a str,
            exp: u64,
            iat: u64,
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            sub: user.to_string(),
            iss: JWT_ISSUER,
            aud: JWT_AUDIENCE,
            exp: now + 3600,
            iat: now,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .expect("HS256 signing cannot fail")
    }

    /// Sends `p` (the same request every time) until a final answer.
    async fn send(&self, p: &Planned) -> Result<CommandResponse, Refusal> {
        let started = Instant::now();
        let idempotency_key = Uuid::new_v4().to_string();
        let mut backoff = Duration::from_millis(20);
        let mut conflicts = 0;
        let mut last_error = String::new();
        loop {
            if started.elapsed() > GIVE_UP_AFTER {
                return Err(Refusal {
                    kind: p.act.kind(),
                    status: 0,
                    detail: format!("never answered: {last_error}"),
                });
            }
            let answer = self
                .http
                .post(format!("{}{}", self.base(), p.path))
                .bearer_auth(self.token(p.actor))
                .header("X-User-Id", p.actor.to_string())
                .header("Idempotency-Key", &idempotency_key)
                .json(&p.body)
                .send()
                .await;
            let retry_in = match answer {
                Err(e) => {
                    last_error = e.to_string();
                    None
                }
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        match serde_json::from_str::<CommandResponse>(&text) {
                            Ok(r) => return Ok(r),
                            Err(e) => {
                                return Err(Refusal {
                                    kind: p.act.kind(),
                                    status: status.as_u16(),
                                    detail: format!("undecodable 2xx body ({e}): {text}"),
                                })
                            }
                        }
                    }
                    let problem = problem_type(&text);
                    last_error = format!("{status} {problem}");
                    match status.as_u16() {
                        429 if problem.ends_with("quota_exceeded") => {
                            return Err(Refusal {
                                kind: p.act.kind(),
                                status: 429,
                                detail: problem,
                            })
                        }
                        429 => {
                            self.stats.lock().expect("stats").rate_limited += 1;
                            Some(Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 60)))
                        }
                        409 if conflicts < CONFLICT_RETRIES => {
                            conflicts += 1;
                            None
                        }
                        s if s >= 500 => None,
                        s => {
                            return Err(Refusal {
                                kind: p.act.kind(),
                                status: s,
                                detail: format!("{problem}: {}", truncate(&text, 300)),
                            })
                        }
                    }
                }
            };
            self.stats.lock().expect("stats").retries += 1;
            let wait = retry_in.unwrap_or(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
            tokio::time::sleep(wait).await;
        }
    }

    /// Every command answered 2xx.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("records").clone()
    }

    /// Every command that did not end 2xx.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().expect("refusals").clone()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats.lock().expect("stats").clone()
    }
}

/// The `type` of a problem+json body (its last path segment), or the body's start.
fn problem_type(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
        .map(|t| t.rsplit('/').next().unwrap_or(&t).to_string())
        .unwrap_or_else(|| truncate(body, 80))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
