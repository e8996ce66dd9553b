//! Scenario **http**: the append workload over HTTP against a `tektree serve` child process
//! (SQLite store, in-process bus, relay and every worker running), driven by an in-process
//! load generator on loopback: N clients sharing one keep-alive `reqwest` pool, each sending
//! its next command once the previous one was answered. Also the server's memory: `VmHWM`
//! (peak) and `VmRSS` of the child, read from `/proc/<pid>/status` once its pipeline settled.
//!
//! Over HTTP every command is issued by a user as themselves (the API has no importer actor),
//! so the workload is mapped as follows: each user registers with their own token; posts and
//! comments are sent with their author's token, ownerless ones (3.5 %) with a stand-in user
//! picked by the post's id; votes, anonymous in the workload, are cast by registered users, a
//! different one for each vote on the same content; accepts by the question's (stand-in)
//! author. Rate limits are off (`--rate-limit off`) and the Free tier's monthly quota is lifted
//! (`--rules` with `[quota] free = 1000000000`), as the importer is never refused either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::StatusCode;
use tektree_domain::{ContentCommand, UserCommand};
use tektree_services::api::auth::Role;
use tektree_services::api::commands::{
    AcceptBody, AnswerBody, CommentBody, QuestionBody, RegisterBody, VoteBody,
};
use tektree_services::api::status::ProjectionsStatus;
use tektree_services::config::SecurityOptions;
use uuid::Uuid;

use crate::clients::{self, Sent};
use crate::corpus::remove_db;
use crate::machine::proc_status_kib;
use crate::stats::Latencies;
use crate::workload::{Cmd, Workload};

/// Attempts per command when the server answers 409 `conflict` (the handler's own retries
/// were exhausted) or 503, as the in-process append client does.
const CLIENT_ATTEMPTS: u32 = 20;
/// How long `tektree serve` may take to answer `/healthz`.
const START_PATIENCE: Duration = Duration::from_secs(60);
/// How long the server's pipeline may take to catch up after the workload.
const SETTLE_PATIENCE: Duration = Duration::from_secs(300);
/// Lifetime of the bench's tokens.
const TOKEN_TTL_SECS: u64 = 24 * 3600;
/// The rules file of the served store: issue #2's defaults with the Free quota lifted.
const RULES: &str = "[quota]\nfree = 1000000000\n";

/// One HTTP command: `POST path` with `body` (JSON) as user `caller`.
#[derive(Debug, Clone)]
pub struct Request {
    /// Path, e.g. `/v1/questions/<id>/answers`.
    pub path: String,
    /// The JSON body.
    pub body: String,
    /// Whose token is sent.
    pub caller: Uuid,
}

/// The workload as HTTP requests, phase by phase.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `(phase name, requests)` in order.
    pub phases: Vec<(&'static str, Vec<Request>)>,
    /// Every registered user (the callers).
    pub users: Vec<Uuid>,
}

/// Maps `workload` to HTTP requests (module docs).
///
/// # Errors
/// When the workload has no registrations (no caller to map to).
pub fn plan(workload: &Workload) -> Result<Plan> {
    let users: Vec<Uuid> = workload
        .phases
        .iter()
        .flat_map(|p| &p.commands)
        .filter_map(|(c, _)| match c {
            Cmd::User(id, UserCommand::Register { .. }) => Some(*id),
            _ => None,
        })
        .collect();
    if users.is_empty() {
        bail!("the workload registers no users");
    }
    let pick =
        |id: Uuid, k: u128| users[((id.as_u128().wrapping_add(k)) % users.len() as u128) as usize];
    let mut authors: HashMap<Uuid, Uuid> = HashMap::new();
    let mut votes_on: HashMap<Uuid, u128> = HashMap::new();
    let mut phases = Vec::new();
    for phase in &workload.phases {
        let mut requests = Vec::with_capacity(phase.commands.len());
        for (cmd, _) in &phase.commands {
            let r = match cmd {
                Cmd::User(id, UserCommand::Register { display_name, .. }) => Request {
                    path: "/v1/users".into(),
                    body: json(&RegisterBody {
                        user_id: Some(*id),
                        display_name: display_name.clone(),
                        preferences: Default::default(),
                    })?,
                    caller: *id,
                },
                Cmd::Content(_, c) => match c {
                    ContentCommand::PostQuestion {
                        question_id,
                        author_id,
                        title,
                        body,
                        tags,
                        ..
                    } => {
                        let author = author_id.unwrap_or_else(|| pick(*question_id, 0));
                        authors.insert(*question_id, author);
                        Request {
                            path: "/v1/questions".into(),
                            body: json(&QuestionBody {
                                question_id: Some(*question_id),
                                title: title.clone(),
                                body: body.clone(),
                                tags: tags.clone(),
                                area_id: None,
                            })?,
                            caller: author,
                        }
                    }
                    ContentCommand::SubmitAnswer {
                        answer_id,
                        question_id,
                        author_id,
                        body,
                        ..
                    } => Request {
                        path: format!("/v1/questions/{question_id}/answers"),
                        body: json(&AnswerBody {
                            answer_id: Some(*answer_id),
                            body: body.clone(),
                        })?,
                        caller: author_id.unwrap_or_else(|| pick(*answer_id, 0)),
                    },
                    ContentCommand::AddComment {
                        content_id,
                        comment_id,
                        author_id,
                        text,
                        ..
                    } => Request {
                        path: format!("/v1/content/{content_id}/comments"),
                        body: json(&CommentBody {
                            comment_id: Some(*comment_id),
                            text: text.clone(),
                        })?,
                        caller: author_id.unwrap_or_else(|| pick(*comment_id, 0)),
                    },
                    ContentCommand::Vote {
                        content_id,
                        direction,
                        ..
                    } => {
                        let k = votes_on.entry(*content_id).or_default();
                        *k += 1;
                        Request {
                            path: format!("/v1/content/{content_id}/votes"),
                            body: json(&VoteBody {
                                direction: *direction,
                            })?,
                            caller: pick(*content_id, *k),
                        }
                    }
                    ContentCommand::AcceptAnswer {
                        question_id,
                        answer_id,
                        ..
                    } => Request {
                        path: format!("/v1/questions/{question_id}/accept"),
                        body: json(&AcceptBody {
                            answer_id: *answer_id,
                        })?,
                        caller: *authors
                            .get(question_id)
                            .with_context(|| format!("accept on unknown question {question_id}"))?,
                    },
                    other => bail!("the bench workload has no HTTP form for {other:?}"),
                },
                Cmd::User(_, other) => bail!("the bench workload has no HTTP form for {other:?}"),
            };
            requests.push(r);
        }
        phases.push((phase.name, requests));
    }
    Ok(Plan { phases, users })
}

/// `v` as JSON text.
fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

/// A running `tektree serve` child; killed when dropped.
pub struct Serve {
    child: tokio::process::Child,
    pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: PathBuf,
}

impl Serve {
    /// Starts `exe serve` on a fresh SQLite store at `store`, with the in-process bus, rate
    /// limits off, the rules file `rules` and a free loopback port; its log goes to
    /// `<store>.log`. Returns once `/healthz` answers 200.
    ///
    /// # Errors
    /// When the child cannot start, exits, or does not answer within a minute.
    pub async fn start(
        exe: &Path,
        store: &Path,
        rules: &Path,
        http: &reqwest::Client,
    ) -> Result<Serve> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?
            .port();
        let log = store.with_extension("log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(exe);
        // The bench decides every setting; nothing from the caller's environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TEKTREE_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--store")
            .arg(format!("sqlite://{}", store.display()))
            .args(["--bus", "memory", "--rate-limit", "off", "--rules"])
            .arg(rules)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} (build it with `cargo build --bin tektree`)",
                exe.display()
            )
        })?;
        let pid = child.id().context("the serve child has no pid")?;
        let mut serve = Serve {
            child,
            pid,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Some(status) = serve.child.try_wait()? {
                bail!("tektree serve exited ({status}): {}", serve.log_tail());
            }
            let up = http
                .get(format!("{}/healthz", serve.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if up {
                return Ok(serve);
            }
            if Instant::now() >= deadline {
                bail!(
                    "tektree serve did not answer /healthz within {START_PATIENCE:?}: {}",
                    serve.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `(VmHWM, VmRSS)` of the child in KiB.
    pub fn rss_kib(&self) -> (Option<u64>, Option<u64>) {
        let pid = self.pid.to_string();
        (
            proc_status_kib(&pid, "VmHWM"),
            proc_status_kib(&pid, "VmRSS"),
        )
    }

    /// The last lines of the child's log (for error messages).
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Waits until the server's pipeline caught up (`GET /v1/projections`: every consumer's
    /// lag 0, the head unchanged across two polls); the time it took, `None` after
    /// `patience`.
    ///
    /// # Errors
    /// When the status endpoint fails.
    pub async fn settle(
        &self,
        http: &reqwest::Client,
        patience: Duration,
    ) -> Result<Option<Duration>> {
        let started = Instant::now();
        let mut stable = None;
        while started.elapsed() < patience {
            let s: ProjectionsStatus = http
                .get(format!("{}/v1/projections", self.base))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            if s.consumers.iter().all(|c| c.lag == 0) {
                if stable == Some(s.head_position) {
                    return Ok(Some(started.elapsed()));
                }
                stable = Some(s.head_position);
            } else {
                stable = None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(None)
    }

    /// Kills the child and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What one run against a server did.
#[derive(Debug, Default)]
pub struct HttpRun {
    /// 2xx answers.
    pub commands: u64,
    /// Non-2xx answers after the retries.
    pub errors: u64,
    /// The first few errors (`status path: body`).
    pub error_samples: Vec<String>,
    /// Retries after 409 `conflict` or 503.
    pub conflict_retries: u64,
    /// Wall time of all phases.
    pub elapsed: Duration,
    /// Per-command latency, retries included.
    pub latencies: Latencies,
    /// Commands/s of each phase, in order.
    pub phases: Vec<(&'static str, f64)>,
    /// The server's `VmHWM` in KiB, once its pipeline settled.
    pub peak_rss_kib: u64,
    /// The server's `VmRSS` in KiB, at the same moment.
    pub rss_end_kib: u64,
    /// How long the pipeline took to catch up after the last answer (`None`: not within
    /// [`SETTLE_PATIENCE`]).
    pub settled_after: Option<Duration>,
}

/// Sends one request with client-side retries; `(status, body of a failure, retries)`.
async fn send(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &str,
) -> (Result<StatusCode, String>, u64) {
    let mut retries = 0;
    loop {
        let sent = http
            .post(url)
            .header(reqwest::header::AUTHORIZATION, token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let outcome = match sent {
            Ok(resp) => {
                let status = resp.status();
                // Read the whole body, so that the connection goes back to the pool.
                let text = resp.text().await.unwrap_or_default();
                if status.is_success() {
                    return (Ok(status), retries);
                }
                let again = status == StatusCode::SERVICE_UNAVAILABLE
                    || (status == StatusCode::CONFLICT && text.contains("/problems/conflict\""));
                (again, format!("{status}: {text}"))
            }
            Err(e) => (false, format!("transport: {e}")),
        };
        match outcome {
            (true, _) if retries + 1 < u64::from(CLIENT_ATTEMPTS) => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(1 + retries)).await;
            }
            (_, failure) => return (Err(failure), retries),
        }
    }
}

/// Runs `plan` once against a fresh `tektree serve` (executable `exe`, store `store`) with
/// `clients` concurrent clients, phase after phase; then waits for the server's pipeline and
/// reads its memory. The server is killed at the end, also on errors.
///
/// # Errors
/// When the server does not start or a client task fails.
pub async fn run_once(exe: &Path, store: &Path, plan: &Plan, clients: usize) -> Result<HttpRun> {
    remove_db(store);
    let rules = store.with_extension("rules.toml");
    std::fs::write(&rules, RULES).with_context(|| format!("writing {}", rules.display()))?;
    let store_url = format!("sqlite://{}", store.display());
    // The server's default key: the secret file next to its store, created here first.
    let (auth, _) = SecurityOptions::default().authenticator(&store_url)?;
    let mut tokens = HashMap::with_capacity(plan.users.len());
    for &u in &plan.users {
        tokens.insert(
            u,
            format!("Bearer {}", auth.mint(u, &[Role::User], TOKEN_TTL_SECS)?),
        );
    }
    let tokens = Arc::new(tokens);
    let clients = clients.max(1);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .tcp_nodelay(true)
        .build()?;
    let serve = Serve::start(exe, store, &rules, &http).await?;
    let result = drive(&serve, &http, plan, &tokens, clients).await;
    let result = match result {
        Ok(mut run) => match serve.settle(&http, SETTLE_PATIENCE).await {
            Ok(settled) => {
                run.settled_after = settled;
                let (hwm, rss) = serve.rss_kib();
                run.peak_rss_kib = hwm.unwrap_or(0);
                run.rss_end_kib = rss.unwrap_or(0);
                Ok(run)
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    serve.stop().await;
    remove_db(store);
    let _ = std::fs::remove_file(&rules);
    if let Ok(secret) = tektree_services::config::default_secret_file(&store_url) {
        let _ = std::fs::remove_file(secret);
    }
    result
}

/// The phases of `plan` against `serve` by `clients` clients ([`crate::clients::run`]).
async fn drive(
    serve: &Serve,
    http: &reqwest::Client,
    plan: &Plan,
    tokens: &Arc<HashMap<Uuid, String>>,
    clients: usize,
) -> Result<HttpRun> {
    let (http, tokens, base) = (http.clone(), tokens.clone(), serve.base.clone());
    let tally = clients::run(&plan.phases, clients, move |r: Request| {
        let (http, tokens, base) = (http.clone(), tokens.clone(), base.clone());
        async move {
            let token = tokens.get(&r.caller).map(String::as_str).unwrap_or("");
            let (result, retries) = send(&http, &format!("{base}{}", r.path), token, &r.body).await;
            Sent {
                result: result.map(|_| 0).map_err(|e| format!("{}: {e}", r.path)),
                retries,
            }
        }
    })
    .await?;
    Ok(HttpRun {
        commands: tally.succeeded,
        errors: tally.failed,
        error_samples: tally.failures,
        conflict_retries: tally.retries,
        elapsed: tally.elapsed,
        latencies: tally.latencies,
        phases: tally.phases,
        ..HttpRun::default()
    })
}

/// The `tektree` executable next to this one.
///
/// # Errors
/// When this executable cannot be located.
pub fn serve_exe() -> Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("locating this executable")?
        .with_file_name("tektree"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::generate;

    #[test]
    fn every_command_maps_to_a_registered_caller() {
        let w = generate(3, 2_000);
        let p = plan(&w).unwrap();
        assert_eq!(
            p.phases.iter().map(|(_, r)| r.len()).sum::<usize>(),
            w.len()
        );
        let users: std::collections::HashSet<Uuid> = p.users.iter().copied().collect();
        assert!(p
            .phases
            .iter()
            .flat_map(|(_, r)| r)
            .all(|r| users.contains(&r.caller)));
        // Registrations are each made by the user registered.
        for r in &p.phases[0].1 {
            let b: RegisterBody = serde_json::from_str(&r.body).unwrap();
            assert_eq!(b.user_id, Some(r.caller));
        }
        // No content gets two votes from one caller.
        let mut votes = std::collections::HashSet::new();
        let vote_phase = p.phases.iter().find(|(n, _)| *n == "votes").unwrap();
        for r in &vote_phase.1 {
            assert!(votes.insert((r.path.clone(), r.caller)), "{r:?}");
        }
    }
}
